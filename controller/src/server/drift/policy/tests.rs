//! Drift policies: what is accepted, what is refused and why, and the rollout request a
//! candidate gets from `auto_rollout`.

use serde_json::json;

use super::*;

fn policy(value: Value) -> Result<DriftPolicy, String> {
    let policy: DriftPolicy = serde_json::from_value(value).map_err(|e| e.to_string())?;
    policy.validate().map(|()| policy)
}

#[test]
fn an_empty_policy_takes_the_detector_defaults() {
    let empty = policy(json!({})).unwrap();
    assert_eq!(empty.detector, DetectorConfig::default());
    assert!(empty.group_by.is_empty() && empty.retrain.is_none() && empty.auto_rollout.is_none());
    let tuned = policy(json!({"detector": {"window_samples": 200}})).unwrap();
    assert_eq!(tuned.detector.window_samples, 200);
    assert_eq!(tuned.detector.alpha, DetectorConfig::default().alpha);
}

#[test]
fn retrain_defaults_to_groups_and_the_fleet() {
    let p = policy(json!({"retrain": {"command": "true"}})).unwrap();
    assert_eq!(
        p.retrain.unwrap().scopes,
        [ScopeKind::Group, ScopeKind::Fleet]
    );
}

#[test]
fn bad_policies_are_refused_with_what_to_give() {
    for (bad, says) in [
        (json!({"detector": {"alpha": 2.0}}), "alpha"),
        (json!({"detector": {"windows": 3}}), "unknown field"),
        (json!({"retrain": {}}), "exactly one of"),
        (
            json!({"retrain": {"command": "x", "webhook": {"url": "https://h", "secret_file": "/s"}}}),
            "exactly one of",
        ),
        (
            json!({"retrain": {"webhook": {"url": "ftp://h", "secret_file": "/s"}}}),
            "http(s) URL",
        ),
        (
            json!({"retrain": {"command": "x", "token_file": "token"}}),
            "absolute path",
        ),
        (
            json!({"retrain": {"command": "x", "scopes": []}}),
            "retrain.scopes",
        ),
        (
            json!({"alert": {"url": "https://h", "secret_file": "relative"}}),
            "absolute path",
        ),
        (
            json!({"auto_rollout": {"waves": [{"size": "0"}]}}),
            "auto_rollout",
        ),
        (
            json!({"auto_rollout": {"candidate": "m@1"}}),
            "leave out `candidate`",
        ),
        (json!({"auto_rollout": {"bogus": 1}}), "auto_rollout"),
        (json!({"group_by": [" "]}), "group_by"),
    ] {
        let err = policy(bad.clone()).expect_err(&bad.to_string());
        assert!(err.contains(says), "{bad}: {err}");
    }
}

#[test]
fn the_auto_rollout_plan_becomes_a_request_for_the_candidate() {
    let p = policy(json!({"auto_rollout": {
        "shadow": {"cohort": "2", "duration_s": 60},
        "waves": [{"size": "1", "bake_s": 60}, {"size": "100%"}],
        "approval": true,
    }}))
    .unwrap();
    let request = p
        .start_request(
            "c".repeat(64),
            Some("b".repeat(64)),
            Some(json!({"drift_event": "dre_1"})),
        )
        .unwrap();
    assert_eq!(request.candidate, "c".repeat(64));
    assert_eq!(request.baseline, Some("b".repeat(64)));
    assert!(request.approval);
    assert_eq!(request.trigger, Some(json!({"drift_event": "dre_1"})));
    assert_eq!(request.waves.map(|w| w.len()), Some(2));
    // A plan that names its baseline keeps it.
    let pinned = policy(json!({"auto_rollout": {"baseline": "m@1.0.0"}})).unwrap();
    let request = pinned
        .start_request("c".repeat(64), Some("b".repeat(64)), None)
        .unwrap();
    assert_eq!(request.baseline.as_deref(), Some("m@1.0.0"));
    assert!(
        DriftPolicy::default()
            .start_request("c".into(), None, None)
            .is_err()
    );
}
