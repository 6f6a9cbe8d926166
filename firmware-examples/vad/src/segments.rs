//! Speech segments from per-frame speech probabilities, with hysteresis (the rule of Silero's own
//! `VADIterator`): a frame at or above `threshold` starts speech; speech ends only after frames
//! below the lower `neg_threshold` have lasted `min_silence`, and frames in between change
//! nothing, so a probability hovering near one threshold does not chatter. Each segment is
//! widened by `pad` on both sides (never over the previous one) and kept only if it lasts at
//! least `min_speech`. Pure: sample counts in, segments out.

use serde::Serialize;

use crate::audio::SAMPLE_RATE;

/// The hysteresis thresholds and durations, in samples at 16 kHz.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SegmenterConfig {
    /// A frame at or above this probability is speech.
    pub threshold: f32,
    /// A frame below this probability counts toward the silence that ends speech.
    pub neg_threshold: f32,
    /// Silence this long ends a segment.
    pub min_silence: u64,
    /// Shorter segments are dropped (clicks, breaths).
    pub min_speech: u64,
    /// Added before each start and after each end.
    pub pad: u64,
}

/// Milliseconds to samples at 16 kHz.
pub fn ms(milliseconds: u64) -> u64 {
    milliseconds * u64::from(SAMPLE_RATE) / 1000
}

impl Default for SegmenterConfig {
    /// Silero's defaults: 0.5 / 0.35, 100 ms of silence, 250 ms of speech, 30 ms of padding.
    fn default() -> Self {
        Self {
            threshold: 0.5,
            neg_threshold: 0.35,
            min_silence: ms(100),
            min_speech: ms(250),
            pad: ms(30),
        }
    }
}

/// A speech segment, in samples from the start of the stream (`end` exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub start: u64,
    pub end: u64,
}

/// A segment in seconds, as the example prints it with `--json`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct SegmentSeconds {
    pub start_s: f64,
    pub end_s: f64,
}

impl Segment {
    pub fn seconds(&self) -> SegmentSeconds {
        let rate = f64::from(SAMPLE_RATE);
        SegmentSeconds {
            start_s: self.start as f64 / rate,
            end_s: self.end as f64 / rate,
        }
    }
}

/// The streaming segmenter: feed it every frame's probability in order.
#[derive(Debug, Clone)]
pub struct Segmenter {
    config: SegmenterConfig,
    /// Samples seen so far.
    position: u64,
    /// Where the open segment starts (padded), while in speech.
    start: Option<u64>,
    /// Where the current run of silence inside speech started.
    silence_from: Option<u64>,
    /// End of the last segment: padding never reaches back over it.
    last_end: u64,
}

impl Segmenter {
    pub fn new(config: SegmenterConfig) -> Self {
        Self {
            config,
            position: 0,
            start: None,
            silence_from: None,
            last_end: 0,
        }
    }

    /// The next frame: `samples` long, speech with `probability`. Returns the segment this
    /// frame closed, if any.
    pub fn push(&mut self, samples: u64, probability: f32) -> Option<Segment> {
        let frame_start = self.position;
        self.position += samples;
        let config = self.config;
        if probability >= config.threshold {
            self.silence_from = None;
            if self.start.is_none() {
                self.start = Some(frame_start.saturating_sub(config.pad).max(self.last_end));
            }
            return None;
        }
        let start = self.start?;
        if probability >= config.neg_threshold {
            return None;
        }
        let silence_from = *self.silence_from.get_or_insert(frame_start);
        if self.position - silence_from < config.min_silence {
            return None;
        }
        self.close(start, (silence_from + config.pad).min(self.position))
    }

    /// The end of the stream: closes a segment still open.
    pub fn finish(&mut self) -> Option<Segment> {
        let start = self.start?;
        let end = match self.silence_from {
            Some(silence_from) => (silence_from + self.config.pad).min(self.position),
            None => self.position,
        };
        self.close(start, end)
    }

    fn close(&mut self, start: u64, end: u64) -> Option<Segment> {
        self.start = None;
        self.silence_from = None;
        self.last_end = end;
        (end - start >= self.config.min_speech).then_some(Segment { start, end })
    }
}

#[cfg(test)]
mod tests;
