//! Crash safety of installs: the agent is killed (SIGKILL, or an abort at a named crash point)
//! during installs, restarted, and must serve a verified model — the old or the new — every time.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use edgefleet_tests::agent::admin_at;
use edgefleet_tests::fleet::BundleSpec;

use crate::{Setup, install_ok, setup, silero, silero_silence};

/// What a restarted agent must show: a committed state with no trial, a serving model that is
/// one of `allowed` and answers correctly, and no leftovers in the store.
fn assert_consistent(setup: &mut Setup, allowed: &[&str]) -> String {
    setup.agent.wait_ready();
    let (probability, digest) = silero_silence(setup);
    assert!(
        allowed.contains(&digest.as_str()),
        "serving {digest}, expected one of {allowed:?}"
    );
    assert!(
        (probability - 0.001_67).abs() < 1e-4,
        "model output {probability}"
    );
    let status = setup.agent.status();
    let state = &status["state"];
    assert!(state["trial"].is_null(), "{status}");
    assert_eq!(state["active"]["digest"], digest.as_str(), "{status}");
    let store = setup.agent.state_dir.join("store");
    assert_eq!(
        std::fs::read_dir(store.join("staging")).unwrap().count(),
        0,
        "staging leftovers"
    );
    let on_disk: BTreeSet<String> = std::fs::read_dir(store.join("models"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let referenced: BTreeSet<String> = ["active", "previous", "shadow"]
        .iter()
        .filter_map(|k| state[k]["digest"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(on_disk, referenced, "unreferenced models left in the store");
    assert!(!store.join("state.json.tmp").exists());
    digest
}

#[test]
fn every_install_crash_point_leaves_a_verified_model_serving() {
    let points = [
        "install.mid_payload",
        "install.after_payload_fsync",
        "install.after_payloads",
        "install.before_dir_rename",
        "install.after_dir_rename",
        "commit.before_rename",
        "commit.after_rename",
    ];
    let mut setup = setup(&[]);
    let mut current = install_ok(&setup, &BundleSpec::silero(&silero(), 1));
    for (i, point) in points.iter().enumerate() {
        let (path, next) = setup
            .fleet
            .bundle(&BundleSpec::silero(&silero(), i as u64 + 2));
        setup.agent.set_env("EDGEFLEET_FAILPOINT", Some(point));
        setup.agent.restart();
        setup.agent.wait_ready();
        let err = setup
            .agent
            .install(&path)
            .expect_err("the agent aborts at the crash point");
        assert!(!err.is_empty());
        assert!(
            setup
                .agent
                .log_text()
                .contains(&format!("failpoint {point} reached")),
            "{point} was not reached"
        );
        setup.agent.set_env("EDGEFLEET_FAILPOINT", None);
        setup.agent.restart();
        current = assert_consistent(&mut setup, &[&current, &next]);
        if *point == "commit.after_rename" {
            // The trial was committed, then the agent died during activation: it reverted.
            let event = setup.agent.status()["events"]
                .as_array()
                .unwrap()
                .last()
                .cloned()
                .unwrap();
            assert_eq!(event["kind"], "rolled_back", "{event}");
        }
    }
}

/// A small deterministic PRNG (xorshift64*), so a failing run can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// `EDGEFLEET_KILLS` kills (default 200; the soak run uses 1000), each at a random moment of an
/// install (verify, unpack, commit, worker start, self-test, grace window).
#[test]
fn random_sigkills_during_installs_never_leave_a_broken_model() {
    let kills: u64 = std::env::var("EDGEFLEET_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seed: u64 = std::env::var("EDGEFLEET_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_cafe);
    let mut rng = Rng(seed);
    let mut setup = setup(&[]);
    let mut current = install_ok(&setup, &BundleSpec::silero(&silero(), 1));
    let mut release = 1;
    let (mut became_new, mut stayed_old) = (0u64, 0u64);
    let started = Instant::now();
    for kill in 0..kills {
        release += 1;
        let (path, next) = setup.fleet.bundle(&BundleSpec::silero(&silero(), release));
        let delay = Duration::from_micros(rng.next() % 1_500_000);
        let admin = setup.agent.admin_socket();
        let install = std::thread::spawn(move || {
            admin_at(&admin, &serde_json::json!({"install": {"path": path}}))
        });
        std::thread::sleep(delay);
        setup.agent.kill();
        let _ = install.join();
        setup.agent.restart();
        let serving = assert_consistent(&mut setup, &[&current, &next]);
        if serving == next {
            became_new += 1;
        } else {
            stayed_old += 1;
        }
        current = serving;
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "kill {kill}: the run exceeded its time bound"
        );
    }
    eprintln!(
        "{kills} kills (seed {seed:#x}): new model kept {became_new}×, old model kept {stayed_old}×, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        became_new > 0 && stayed_old > 0,
        "kills should land both before and after the commit"
    );
}
