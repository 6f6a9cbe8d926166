//! Reading WAV streams (not seekable, like a pipe) and raw PCM into frames.

use std::io::Cursor;

use super::*;

fn wav_bytes(spec: hound::WavSpec, samples: &[f32]) -> Vec<u8> {
    let mut bytes = Cursor::new(Vec::new());
    let mut writer = hound::WavWriter::new(&mut bytes, spec).unwrap();
    for sample in samples {
        match spec.sample_format {
            hound::SampleFormat::Float => writer.write_sample(*sample).unwrap(),
            hound::SampleFormat::Int => {
                let full = (1i64 << (spec.bits_per_sample - 1)) as f32;
                writer.write_sample((sample * full) as i32).unwrap();
            }
        }
    }
    writer.finalize().unwrap();
    bytes.into_inner()
}

fn spec(sample_rate: u32, channels: u16, bits: u16, format: hound::SampleFormat) -> hound::WavSpec {
    hound::WavSpec {
        channels,
        sample_rate,
        bits_per_sample: bits,
        sample_format: format,
    }
}

/// Reads everything in frames of 4; returns the samples and the frame sizes.
fn read_all(mut reader: AudioReader) -> (Vec<f32>, Vec<usize>) {
    let (mut samples, mut sizes) = (Vec::new(), Vec::new());
    let mut frame = [0.0f32; 4];
    loop {
        let n = reader.read(&mut frame).unwrap();
        sizes.push(n);
        samples.extend_from_slice(&frame[..n]);
        if n < frame.len() {
            return (samples, sizes);
        }
    }
}

#[test]
fn integer_and_float_wav_read_as_the_same_samples_in_frames() {
    let samples = [0.0, 0.5, -0.5, 0.25, -1.0, 0.75];
    for (bits, format) in [
        (16, hound::SampleFormat::Int),
        (24, hound::SampleFormat::Int),
        (32, hound::SampleFormat::Float),
    ] {
        let bytes = wav_bytes(spec(16_000, 1, bits, format), &samples);
        let (read, sizes) = read_all(AudioReader::wav(Box::new(Cursor::new(bytes))).unwrap());
        assert_eq!(read, samples, "{bits}-bit {format:?}");
        assert_eq!(sizes, [4, 2], "the last frame is short");
    }
}

#[test]
fn a_wav_stream_shorter_than_its_header_says_ends_where_the_data_ends() {
    // As `arecord -t wav` writes to a pipe: the header declares more than ever arrives.
    let mut bytes = wav_bytes(spec(16_000, 1, 16, hound::SampleFormat::Int), &[0.5; 6]);
    bytes.truncate(bytes.len() - 5);
    let (read, sizes) = read_all(AudioReader::wav(Box::new(Cursor::new(bytes))).unwrap());
    assert_eq!(read, [0.5; 3]);
    assert_eq!(sizes, [3]);
}

#[test]
fn raw_pcm_reads_little_endian_16_bit_and_ignores_a_trailing_odd_byte() {
    let mut bytes: Vec<u8> = [0i16, 16_384, -16_384, -32_768]
        .iter()
        .flat_map(|s| s.to_le_bytes())
        .collect();
    bytes.push(0x7f);
    let (read, sizes) = read_all(AudioReader::raw_s16le(Box::new(Cursor::new(bytes))));
    assert_eq!(read, [0.0, 0.5, -0.5, -1.0]);
    assert_eq!(sizes, [4, 0]);
}

#[test]
fn audio_the_model_cannot_take_is_refused_with_what_to_do() {
    let refused = |spec: hound::WavSpec| {
        AudioReader::wav(Box::new(Cursor::new(wav_bytes(spec, &[0.0; 8]))))
            .unwrap_err()
            .to_string()
    };
    let rate = refused(spec(44_100, 1, 16, hound::SampleFormat::Int));
    assert!(
        rate.contains("44100 Hz") && rate.contains("sox in.wav -r 16000"),
        "{rate}"
    );
    let stereo = refused(spec(16_000, 2, 16, hound::SampleFormat::Int));
    assert!(
        stereo.contains("2 channels") && stereo.contains("mono"),
        "{stereo}"
    );
    let junk = AudioReader::wav(Box::new(Cursor::new(b"not a wav file at all".to_vec())))
        .unwrap_err()
        .to_string();
    assert!(
        junk.contains("not a readable WAV stream") && junk.contains("--raw"),
        "{junk}"
    );
}
