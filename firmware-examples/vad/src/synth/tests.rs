//! The generated recording: deterministic, loud where it says speech is, quiet elsewhere.

use super::*;

fn rms(samples: &[f32]) -> f64 {
    let sum: f64 = samples.iter().map(|s| f64::from(*s).powi(2)).sum();
    (sum / samples.len() as f64).sqrt()
}

fn span(signal: &[f32], from_s: f64, to_s: f64) -> &[f32] {
    let rate = f64::from(SAMPLE_RATE);
    &signal[(from_s * rate) as usize..(to_s * rate) as usize]
}

#[test]
fn the_recording_is_the_same_every_time() {
    let signal = signal();
    assert_eq!(signal.len(), (DURATION_S * 16_000.0) as usize);
    assert_eq!(signal, super::signal());
}

#[test]
fn voiced_regions_are_loud_and_the_gaps_are_background_noise() {
    let signal = signal();
    let speech = speech();
    assert_eq!(speech.len(), 3);
    let mut gap_from = 0.0;
    for segment in speech.iter().map(Segment::seconds) {
        let voiced = rms(span(&signal, segment.start_s + 0.05, segment.end_s - 0.05));
        assert!(voiced > 0.05, "speech {segment:?} has rms {voiced}");
        let quiet = rms(span(&signal, gap_from, segment.start_s));
        assert!(quiet < 0.002, "the gap before {segment:?} has rms {quiet}");
        gap_from = segment.end_s;
    }
    assert!(rms(span(&signal, gap_from, DURATION_S)) < 0.002);
    let peak = signal.iter().fold(0.0f32, |m, s| m.max(s.abs()));
    assert!(peak <= 0.51, "peak {peak}");
}

#[test]
fn the_wav_file_reads_back_as_16khz_mono_16bit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("speech.wav");
    write_wav(&path).unwrap();
    let reader = hound::WavReader::open(&path).unwrap();
    let spec = reader.spec();
    assert_eq!(
        (spec.sample_rate, spec.channels, spec.bits_per_sample),
        (16_000, 1, 16)
    );
    assert_eq!(reader.len() as usize, signal().len());
    assert!(!path.with_extension("wav.tmp").exists());
}
