//! The segmenter on probability traces written one frame (512 samples, 32 ms) per value.

use expect_test::{Expect, expect};

use super::*;

const FRAME: u64 = 512;

/// Feeds `trace` (space-separated probabilities, one 32 ms frame each) and prints the segments
/// in milliseconds, with `at end` for one that `finish` closed.
#[track_caller]
fn check(config: SegmenterConfig, trace: &str, expected: Expect) {
    let mut segmenter = Segmenter::new(config);
    let mut out = String::new();
    let show = |segment: Segment, out: &mut String, when: &str| {
        let seconds = segment.seconds();
        out.push_str(&format!(
            "{:.0}-{:.0} ms{when}\n",
            seconds.start_s * 1000.0,
            seconds.end_s * 1000.0
        ));
    };
    for word in trace.split_whitespace() {
        let probability: f32 = word.parse().expect("a probability");
        if let Some(segment) = segmenter.push(FRAME, probability) {
            show(segment, &mut out, "");
        }
    }
    if let Some(segment) = segmenter.finish() {
        show(segment, &mut out, " at end");
    }
    expected.assert_eq(&out);
}

#[test]
fn speech_between_silences_is_one_padded_segment() {
    // Speech from frame 3 (96 ms) to frame 12 (384 ms); silence from 384 ms lasts 4 frames
    // (128 ms >= 100 ms), so the segment closes at 384 + 30 ms.
    check(
        SegmenterConfig::default(),
        "0.01 0.02 0.1 0.9 0.95 0.97 0.99 0.98 0.9 0.8 0.7 0.6 0.1 0.05 0.02 0.01 0.01",
        expect![[r#"
            66-414 ms
        "#]],
    );
}

#[test]
fn probabilities_between_the_thresholds_neither_start_nor_end_speech() {
    // 0.4 is below the start threshold (0.5) but above the end threshold (0.35): it cannot
    // start a segment, and inside one it keeps it open however long it lasts.
    check(
        SegmenterConfig::default(),
        "0.4 0.4 0.4 0.9 0.9 0.9 0.4 0.4 0.4 0.4 0.4 0.4 0.9 0.9 0.2 0.2 0.2 0.2",
        expect![[r#"
            66-478 ms
        "#]],
    );
}

#[test]
fn a_pause_shorter_than_min_silence_does_not_split_a_segment() {
    // Three low frames (96 ms < 100 ms) inside speech, then a real pause.
    check(
        SegmenterConfig::default(),
        "0.9 0.9 0.9 0.9 0.1 0.1 0.1 0.9 0.9 0.9 0.9 0.1 0.1 0.1 0.1 0.1",
        expect![[r#"
            0-382 ms
        "#]],
    );
}

#[test]
fn a_long_pause_splits_and_padding_never_overlaps_the_previous_segment() {
    let config = SegmenterConfig {
        pad: ms(200),
        ..SegmenterConfig::default()
    };
    check(
        config,
        "0.9 0.9 0.9 0.9 0.9 0.9 0.9 0.9 0.1 0.1 0.1 0.1 0.9 0.9 0.9 0.9 0.9 0.9 0.9 0.9 0.1 0.1 0.1 0.1",
        expect![[r#"
            0-384 ms
            384-768 ms
        "#]],
    );
}

#[test]
fn segments_shorter_than_min_speech_are_dropped() {
    // Two frames of speech (64 ms + padding) is a click, not speech.
    check(
        SegmenterConfig::default(),
        "0.1 0.1 0.9 0.9 0.1 0.1 0.1 0.1 0.1 0.1 0.9 0.9 0.9 0.9 0.9 0.9 0.9 0.9 0.1 0.1 0.1 0.1",
        expect![[r#"
            290-606 ms
        "#]],
    );
}

#[test]
fn speech_running_to_the_end_of_the_stream_is_closed_by_finish() {
    check(
        SegmenterConfig::default(),
        "0.1 0.1 0.1 0.9 0.9 0.9 0.9 0.9 0.9 0.9 0.9 0.9 0.2",
        expect![[r#"
            66-414 ms at end
        "#]],
    );
}
