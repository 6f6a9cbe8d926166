//! Voice activity detection on a device: 16 kHz audio streamed frame by frame to the local
//! EdgeFleet agent, which runs Silero VAD; speech segments out. `audio` reads WAV or raw PCM,
//! `detector` drives the model through `edgefleet-client` with its recurrent state,
//! `segments` turns probabilities into segments with hysteresis, and `synth` makes a test
//! recording whose speech is known.

pub mod audio;
pub mod detector;
pub mod segments;
pub mod synth;
