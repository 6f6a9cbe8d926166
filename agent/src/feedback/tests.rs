//! Reading predictions, scoring ground truth, and the log's bounds.

use edgefleet_protocol::TensorName;
use edgefleet_protocol::manifest::TensorData;

use super::*;

fn output(name: &str, shape: &[u64], data: Vec<f32>) -> NamedTensor {
    NamedTensor {
        name: TensorName::new(name).unwrap(),
        shape: shape.to_vec(),
        data: TensorData::F32(data),
    }
}

fn spec(name: &str, kind: PredictionKind) -> PredictionSpec {
    PredictionSpec {
        output: TensorName::new(name).unwrap(),
        kind,
    }
}

const AT_HALF: PredictionKind = PredictionKind::Classification { threshold: 0.5 };

#[track_caller]
fn check(spec: &PredictionSpec, outputs: &[NamedTensor], expected: Prediction) {
    assert_eq!(Prediction::read(spec, outputs), expected);
}

#[test]
fn predictions_are_read_as_the_spec_says() {
    let score = spec("p", AT_HALF);
    check(
        &score,
        &[output("p", &[1, 1], vec![0.5])],
        Prediction::Class {
            class: 1,
            classes: 2,
        },
    );
    check(
        &score,
        &[output("p", &[1, 1], vec![0.49])],
        Prediction::Class {
            class: 0,
            classes: 2,
        },
    );
    check(
        &spec("p", PredictionKind::Classification { threshold: 0.9 }),
        &[output("p", &[1, 1], vec![0.8])],
        Prediction::Class {
            class: 0,
            classes: 2,
        },
    );
    check(
        &spec("probs", AT_HALF),
        &[
            output("p", &[1, 1], vec![0.0]),
            output("probs", &[1, 3], vec![0.1, 0.7, 0.2]),
        ],
        Prediction::Class {
            class: 1,
            classes: 3,
        },
    );
    check(
        &spec("y", PredictionKind::Regression),
        &[output("y", &[1], vec![2.5])],
        Prediction::Value(2.5),
    );
    for (outputs, reason) in [
        (
            vec![output("q", &[1, 1], vec![0.0])],
            "without its prediction output",
        ),
        (vec![output("p", &[2, 1], vec![0.0, 1.0])], "2 rows"),
    ] {
        match Prediction::read(&score, &outputs) {
            Prediction::Unscorable(why) => assert!(why.contains(reason), "{why}"),
            other => panic!("{other:?}"),
        }
    }
    for (data, reason) in [
        (vec![1.0, 2.0], "2 values per row"),
        (vec![f32::NAN], "NaN"),
    ] {
        let shape = [1, data.len() as u64];
        match Prediction::read(
            &spec("p", PredictionKind::Regression),
            &[output("p", &shape, data)],
        ) {
            Prediction::Unscorable(why) => assert!(why.contains(reason), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn ground_truth_is_scored_or_refused_with_what_to_send() {
    let class = Prediction::Class {
        class: 1,
        classes: 3,
    };
    let right = Outcome::score(&class, Truth::Label(1)).unwrap();
    let wrong = Outcome::score(&class, Truth::Label(2)).unwrap();
    assert_eq!((right.correct, wrong.correct), (Some(true), Some(false)));
    let err = Outcome::score(&class, Truth::Label(3)).unwrap_err();
    assert!(err.contains("classes 0 to 2"), "{err}");
    assert!(
        Outcome::score(&class, Truth::Value(1.0))
            .unwrap_err()
            .contains("send `label`")
    );
    let value = Prediction::Value(3.0);
    assert!(
        Outcome::score(&value, Truth::Label(1))
            .unwrap_err()
            .contains("send `value`")
    );
    assert!(Outcome::score(&value, Truth::Value(f64::INFINITY)).is_err());
    assert!(Outcome::score(&value, Truth::Value(-1e200)).is_err());

    let mut stats = FeedbackStats::default();
    right.count(&mut stats);
    wrong.count(&mut stats);
    Outcome::score(&value, Truth::Value(1.0))
        .unwrap()
        .count(&mut stats);
    Outcome::score(&value, Truth::Value(4.0))
        .unwrap()
        .count(&mut stats);
    assert_eq!(
        stats,
        FeedbackStats {
            count: 4,
            correct: 1,
            abs_error_sum: 3.0,
            sq_error_sum: 5.0,
        }
    );
}

fn limits(max_predictions: usize, max_age_s: u64) -> FeedbackLimits {
    FeedbackLimits {
        max_predictions,
        max_age: Duration::from_secs(max_age_s),
    }
}

fn binary(class: u32) -> Prediction {
    Prediction::Class { class, classes: 2 }
}

#[test]
fn feedback_joins_a_prediction_once() {
    let t0 = Instant::now();
    let mut log = PredictionLog::new(limits(10, 60), 5);
    let a = log.record(t0, binary(1), false);
    let b = log.record(t0, binary(0), true);
    assert_eq!(b, a + 1);
    assert_eq!(a, (6 << 32) + 1, "prefix 5 becomes 6: never 0");
    log.record_shadow(b, binary(1));
    let joined = log.feedback(t0, b, Truth::Label(0)).unwrap();
    assert_eq!(joined.outcome.correct, Some(true));
    assert_eq!(joined.shadow.unwrap().correct, Some(false));
    assert!(joined.captured);
    assert_eq!(
        log.feedback(t0, b, Truth::Label(0)),
        Err(FeedbackError::Twice { id: b })
    );
    // A label that does not fit leaves the prediction open for a corrected one.
    assert!(matches!(
        log.feedback(t0, a, Truth::Label(5)),
        Err(FeedbackError::Unfit(_))
    ));
    assert!(
        log.feedback(t0, a, Truth::Label(1))
            .unwrap()
            .shadow
            .is_none()
    );
    // Ids of another worker (another prefix), or not issued yet, are unknown.
    for id in [
        1,
        a - 1,
        b + 1,
        PredictionLog::new(limits(10, 60), 9).next_id,
    ] {
        assert_eq!(
            log.feedback(t0, id, Truth::Label(0)),
            Err(FeedbackError::Unknown { id })
        );
    }
}

#[test]
fn the_log_forgets_the_oldest_by_count_and_by_age() {
    let t0 = Instant::now();
    let mut log = PredictionLog::new(limits(3, 60), 1);
    let ids: Vec<u64> = (0..5).map(|_| log.record(t0, binary(1), false)).collect();
    assert_eq!(log.len(), 3);
    let err = log.feedback(t0, ids[0], Truth::Label(1)).unwrap_err();
    assert!(matches!(err, FeedbackError::Expired { .. }));
    assert!(
        err.to_string()
            .contains("3 most recent predictions for 60 s"),
        "{err}"
    );
    assert!(log.feedback(t0, ids[2], Truth::Label(1)).is_ok());
    let later = t0 + Duration::from_secs(61);
    assert!(matches!(
        log.feedback(later, ids[4], Truth::Label(1)),
        Err(FeedbackError::Expired { .. })
    ));
    assert!(log.is_empty());
    // With no room at all, ids are still handed out and feedback says why it cannot join.
    let mut none = PredictionLog::new(limits(0, 60), 1);
    let id = none.record(t0, binary(1), false);
    assert!(matches!(
        none.feedback(t0, id, Truth::Label(1)),
        Err(FeedbackError::Expired { .. })
    ));
}

#[test]
fn ids_stay_exact_in_json() {
    let log = PredictionLog::new(limits(1, 1), u64::MAX);
    assert!(log.next_id < 1 << 53);
    let log = PredictionLog::with_random_prefix(limits(1, 1));
    assert!(log.next_id > 1 << 32 && log.next_id < 1 << 53);
}
