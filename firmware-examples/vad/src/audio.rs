//! 16 kHz mono audio in: a WAV stream (a file or standard input; 8/16/24/32-bit PCM or 32-bit
//! float) or raw 16-bit little-endian PCM (what `arecord -f S16_LE -r 16000 -c 1 -t raw`
//! writes), read as `f32` samples in [-1, 1] a frame at a time.

use std::io::{BufReader, ErrorKind, Read};

/// The only sample rate Silero VAD's 16 kHz model accepts.
pub const SAMPLE_RATE: u32 = 16_000;

/// Why the audio cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error(
        "the input is not a readable WAV stream ({0}); give a 16 kHz mono WAV file, or raw 16-bit little-endian PCM with --raw"
    )]
    Wav(hound::Error),
    #[error(
        "the audio is sampled at {0} Hz, and Silero VAD needs {SAMPLE_RATE} Hz; resample it first (e.g. `sox in.wav -r 16000 out.wav`)"
    )]
    SampleRate(u32),
    #[error("the audio has {0} channels; give mono audio (e.g. `sox in.wav -c 1 out.wav`)")]
    Channels(u16),
    #[error("{0}-bit float WAV samples are not supported; use 16-bit PCM or 32-bit float")]
    FloatBits(u16),
    #[error("cannot read the audio: {0}")]
    Io(#[from] std::io::Error),
}

enum Format {
    /// Integer PCM: samples are divided by 2^(bits - 1).
    Int {
        scale: f32,
    },
    Float,
}

enum Source {
    Wav {
        reader: hound::WavReader<BufReader<Box<dyn Read>>>,
        format: Format,
    },
    Raw(BufReader<Box<dyn Read>>),
}

/// A mono 16 kHz sample stream.
pub struct AudioReader {
    source: Source,
}

impl std::fmt::Debug for AudioReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.source {
            Source::Wav { .. } => "wav",
            Source::Raw(_) => "raw s16le",
        };
        f.debug_struct("AudioReader")
            .field("format", &kind)
            .finish()
    }
}

impl AudioReader {
    /// Reads a WAV header from `input` and checks that it holds 16 kHz mono audio. The input
    /// need not be seekable, so a pipe works.
    pub fn wav(input: Box<dyn Read>) -> Result<Self, AudioError> {
        let reader = hound::WavReader::new(BufReader::new(input)).map_err(wav_error)?;
        let spec = reader.spec();
        if spec.channels != 1 {
            return Err(AudioError::Channels(spec.channels));
        }
        if spec.sample_rate != SAMPLE_RATE {
            return Err(AudioError::SampleRate(spec.sample_rate));
        }
        let format = match spec.sample_format {
            hound::SampleFormat::Int => Format::Int {
                scale: 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32,
            },
            hound::SampleFormat::Float if spec.bits_per_sample == 32 => Format::Float,
            hound::SampleFormat::Float => return Err(AudioError::FloatBits(spec.bits_per_sample)),
        };
        Ok(Self {
            source: Source::Wav { reader, format },
        })
    }

    /// Raw 16-bit little-endian mono PCM at 16 kHz, with no header.
    pub fn raw_s16le(input: Box<dyn Read>) -> Self {
        Self {
            source: Source::Raw(BufReader::new(input)),
        }
    }

    /// Fills `frame` with the next samples and returns how many it read: fewer than
    /// `frame.len()` only at the end of the stream (0 once it is over).
    pub fn read(&mut self, frame: &mut [f32]) -> Result<usize, AudioError> {
        match &mut self.source {
            Source::Wav { reader, format } => {
                let mut filled = 0;
                let scale = match format {
                    Format::Int { scale } => Some(*scale),
                    Format::Float => None,
                };
                for slot in frame.iter_mut() {
                    let sample = match scale {
                        Some(scale) => reader
                            .samples::<i32>()
                            .next()
                            .map(|s| s.map(|v| v as f32 * scale)),
                        None => reader.samples::<f32>().next(),
                    };
                    match sample {
                        Some(Ok(value)) => {
                            *slot = value;
                            filled += 1;
                        }
                        None => break,
                        // A stream cut short of the length its header declares (a recorder
                        // writing to a pipe cannot know the length): the audio simply ends.
                        // hound reports that short read as `Other` ("Failed to read enough
                        // bytes"); errors from the OS never carry that kind.
                        Some(Err(hound::Error::IoError(err)))
                            if matches!(
                                err.kind(),
                                ErrorKind::UnexpectedEof | ErrorKind::Other
                            ) =>
                        {
                            break;
                        }
                        Some(Err(err)) => return Err(wav_error(err)),
                    }
                }
                Ok(filled)
            }
            Source::Raw(input) => {
                let mut filled = 0;
                let mut bytes = [0u8; 2];
                for slot in frame.iter_mut() {
                    match input.read_exact(&mut bytes) {
                        Ok(()) => {
                            *slot = f32::from(i16::from_le_bytes(bytes)) / 32_768.0;
                            filled += 1;
                        }
                        // A trailing odd byte is not a sample.
                        Err(err) if err.kind() == ErrorKind::UnexpectedEof => break,
                        Err(err) => return Err(AudioError::Io(err)),
                    }
                }
                Ok(filled)
            }
        }
    }
}

fn wav_error(err: hound::Error) -> AudioError {
    match err {
        hound::Error::IoError(io) => AudioError::Io(io),
        other => AudioError::Wav(other),
    }
}

#[cfg(test)]
mod tests;
