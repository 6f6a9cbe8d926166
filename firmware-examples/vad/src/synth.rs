//! A test recording with known answers, at 16 kHz: speech-like voiced regions between stretches
//! of quiet background noise. Each region is a run of syllables, a glottal pulse train with a
//! moving pitch through four vowel formant resonators that glide from vowel to vowel, with a
//! syllable rhythm that never falls silent inside the region; the noise floor (about -60 dBFS)
//! runs under everything. `edgefleet-vad synth` writes it as a WAV file and prints where the
//! speech is. Deterministic: the same samples on every machine.

use std::f64::consts::PI;
use std::path::Path;

use crate::audio::SAMPLE_RATE;
use crate::segments::Segment;

/// Formant frequencies (Hz) of a vowel, for an adult male voice.
#[derive(Debug, Clone, Copy)]
struct Vowel([f64; 4]);

const A: Vowel = Vowel([730.0, 1090.0, 2440.0, 3400.0]);
const E: Vowel = Vowel([530.0, 1840.0, 2480.0, 3500.0]);
const I: Vowel = Vowel([270.0, 2290.0, 3010.0, 3700.0]);
const O: Vowel = Vowel([570.0, 840.0, 2410.0, 3400.0]);
const U: Vowel = Vowel([300.0, 870.0, 2240.0, 3300.0]);

/// Formant bandwidths (Hz).
const BANDWIDTHS: [f64; 4] = [80.0, 100.0, 130.0, 180.0];

/// One voiced region: where it is, the speaker's pitch and formant scale, its syllables.
#[derive(Debug, Clone, Copy)]
struct Region {
    start_s: f64,
    end_s: f64,
    pitch_hz: f64,
    /// 1.0 for a male voice, about 1.15 for a female one.
    formant_scale: f64,
    vowels: &'static [Vowel],
}

/// The recording: three talkers' turns with pauses between them.
const REGIONS: [Region; 3] = [
    Region {
        start_s: 0.50,
        end_s: 1.70,
        pitch_hz: 120.0,
        formant_scale: 1.0,
        vowels: &[A, O, E, A, U, A],
    },
    Region {
        start_s: 2.40,
        end_s: 3.20,
        pitch_hz: 210.0,
        formant_scale: 1.15,
        vowels: &[I, E, A, I],
    },
    Region {
        start_s: 4.00,
        end_s: 5.50,
        pitch_hz: 150.0,
        formant_scale: 1.05,
        vowels: &[O, A, E, I, O, A, U],
    },
];

/// Length of the recording.
pub const DURATION_S: f64 = 6.30;

/// Peak amplitude of the voiced regions (full scale is 1).
const PEAK: f64 = 0.5;
/// Amplitude of the uniform background noise (about -60 dBFS RMS).
const NOISE: f64 = 0.0017;
/// Fade in and out at a region's edges.
const EDGE_S: f64 = 0.015;
/// Formants glide to the next vowel over this long.
const GLIDE_S: f64 = 0.04;

/// Where the speech is: the voiced regions, in samples.
pub fn speech() -> Vec<Segment> {
    let rate = f64::from(SAMPLE_RATE);
    REGIONS
        .iter()
        .map(|r| Segment {
            start: (r.start_s * rate).round() as u64,
            end: (r.end_s * rate).round() as u64,
        })
        .collect()
}

/// SplitMix64: deterministic noise without a dependency.
struct Noise(u64);

impl Noise {
    /// Uniform in [-1, 1).
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

/// A two-pole resonator (one formant), coefficients updated per sample as the formant moves.
#[derive(Default)]
struct Resonator {
    y1: f64,
    y2: f64,
}

impl Resonator {
    fn step(&mut self, x: f64, frequency: f64, bandwidth: f64) -> f64 {
        let rate = f64::from(SAMPLE_RATE);
        let r = (-PI * bandwidth / rate).exp();
        let a1 = 2.0 * r * (2.0 * PI * frequency / rate).cos();
        let a2 = -r * r;
        // Unit gain at the resonance keeps the vowels at similar loudness.
        let gain = 1.0 - r;
        let y = gain * x + a1 * self.y1 + a2 * self.y2;
        self.y2 = self.y1;
        self.y1 = y;
        y
    }
}

/// The voiced samples of `region` (unnormalised), one per sample of its span.
fn voice(region: &Region, noise: &mut Noise) -> Vec<f64> {
    let rate = f64::from(SAMPLE_RATE);
    let n = ((region.end_s - region.start_s) * rate).round() as usize;
    let syllable_s = (region.end_s - region.start_s) / region.vowels.len() as f64;
    let mut resonators: [Resonator; 4] = Default::default();
    let (mut phase, mut glottal) = (0.0f64, 0.0f64);
    (0..n)
        .map(|i| {
            let t = i as f64 / rate;
            let duration = region.end_s - region.start_s;
            // Pitch: a slow rise and fall around the speaker's mean, declining over the turn.
            let pitch = region.pitch_hz * (1.0 + 0.08 * (2.0 * PI * 0.9 * t).sin() - 0.06 * t);
            phase += pitch / rate;
            // One pulse per glottal cycle, smoothed (spectral tilt of the glottal flow).
            let pulse = if phase >= 1.0 {
                phase -= 1.0;
                1.0
            } else {
                0.0
            };
            glottal = 0.75 * glottal + pulse;
            let aspiration = 0.02 * noise.next();
            // Formants: the syllable's vowel, gliding from the previous one at its start.
            let syllable = ((t / syllable_s) as usize).min(region.vowels.len() - 1);
            let into = t - syllable as f64 * syllable_s;
            let current = region.vowels[syllable].0;
            let previous = region.vowels[syllable.saturating_sub(1)].0;
            let mix = (into / GLIDE_S).min(1.0);
            let mut y = glottal + aspiration;
            for (k, resonator) in resonators.iter_mut().enumerate() {
                let frequency =
                    region.formant_scale * (previous[k] + (current[k] - previous[k]) * mix);
                y = resonator.step(y, frequency, BANDWIDTHS[k]);
            }
            // Syllable rhythm (louder nucleus, softer edges, never silent) and the fades at
            // the region's edges.
            let rhythm = 0.6 - 0.4 * (2.0 * PI * into / syllable_s).cos();
            let edge = (t.min(duration - t) / EDGE_S).min(1.0);
            let fade = 0.5 - 0.5 * (PI * edge).cos();
            y * rhythm * fade
        })
        .collect()
}

/// The whole recording, `DURATION_S` long.
pub fn signal() -> Vec<f32> {
    let rate = f64::from(SAMPLE_RATE);
    let mut noise = Noise(0x5eed_0016_0000_0001);
    let total = (DURATION_S * rate).round() as usize;
    let mut out: Vec<f64> = (0..total).map(|_| NOISE * noise.next()).collect();
    for region in &REGIONS {
        let voiced = voice(region, &mut noise);
        let peak = voiced.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let first = (region.start_s * rate).round() as usize;
        for (slot, v) in out[first..].iter_mut().zip(&voiced) {
            *slot += PEAK * v / peak;
        }
    }
    out.into_iter().map(|v| v as f32).collect()
}

/// A sample in [-1, 1] as 16-bit PCM (what the WAV file and a raw PCM stream hold).
pub fn pcm16(sample: f32) -> i16 {
    (sample.clamp(-1.0, 1.0) * 32_767.0).round() as i16
}

/// Writes the recording to `path` as a 16-bit PCM mono WAV file (a temporary file beside it,
/// synced, then renamed, so a crash leaves no half-written WAV).
pub fn write_wav(path: &Path) -> Result<(), hound::Error> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: SAMPLE_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let tmp = path.with_extension("wav.tmp");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    let mut writer = hound::WavWriter::new(&mut file, spec)?;
    for sample in signal() {
        writer.write_sample(pcm16(sample))?;
    }
    writer.finalize()?;
    file.into_inner()
        .map_err(std::io::IntoInnerError::into_error)?
        .sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests;
