//! The aarch64 agent, cross-compiled (`cross/build.sh`) and run under qemu-user, against the
//! x86-64 controller: it enrolls with a one-time token, receives the signed bundle of a release
//! built for aarch64 only, verifies and activates it (its model worker, started by the agent
//! executing itself, runs under qemu too, through binfmt_misc), answers inference on its local
//! API, and reports telemetry that the controller stores, each inference counted once.
//!
//! The lines starting `cross-smoke:` go to the real standard error, past the test harness's
//! capture, so CI's log shows what ran under emulation. Without the cross build or qemu-user the
//! test skips with a loud message; in CI (`CI` set) it fails instead.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use edgefleet_client::Tensor;
use edgefleet_tests::agent::wait_until;
use edgefleet_tests::controller::{ControllerProcess, ControllerSpec};

const TRIPLE: &str = "aarch64-unknown-linux-gnu";
const DEVICE: &str = "arm-pump-01";
const INFERENCES: u64 = 20;
const WAIT: Duration = Duration::from_secs(120);
/// ELF `e_machine` of AArch64.
const EM_AARCH64: u16 = 0xb7;

/// Prints to the real stderr, past the test harness's capture.
fn shout(line: &str) {
    let _ = writeln!(std::io::stderr(), "cross-smoke: {line}");
}

/// The cross-built agent and the command that runs it under qemu-user.
struct Emulation {
    agent: PathBuf,
    runner: Vec<OsString>,
    qemu_version: String,
}

/// What is needed, or `None` after a loud message (a failure in CI).
fn emulation() -> Option<Emulation> {
    let profile = edgefleet_tests::target_dir();
    let agent = std::env::var_os("EDGEFLEET_CROSS_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let name = profile.file_name().expect("a profile directory");
            profile
                .parent()
                .expect("target dir")
                .join(TRIPLE)
                .join(name)
                .join("edgefleet-agent")
        });
    let mut missing = Vec::new();
    if !agent.exists() {
        missing.push(format!(
            "{} (build it: cargo build -p edgefleet-agent --bin edgefleet-agent --target {TRIPLE})",
            agent.display()
        ));
    }
    let qemu = Command::new("qemu-aarch64").arg("--version").output();
    let qemu_version = match &qemu {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
        _ => {
            missing.push(String::from("qemu-aarch64 (Debian's qemu-user)"));
            String::new()
        }
    };
    if !Path::new("/usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1").exists() {
        missing.push(String::from(
            "the aarch64 C library in /usr/aarch64-linux-gnu (libc6-dev-arm64-cross)",
        ));
    }
    let binfmt =
        std::fs::read_to_string("/proc/sys/fs/binfmt_misc/qemu-aarch64").unwrap_or_default();
    if binfmt.lines().next() != Some("enabled") {
        missing.push(String::from(
            "a binfmt_misc handler for aarch64 (update-binfmts --enable qemu-aarch64), which the agent needs to start its model worker",
        ));
    }
    if !missing.is_empty() {
        let why = format!(
            "missing {}; cross/build.sh setup {TRIPLE} installs them",
            missing.join(", ")
        );
        assert!(
            std::env::var_os("CI").is_none(),
            "the aarch64 smoke test must run in CI (.ci/run builds the agent): {why}"
        );
        shout(&format!("SKIPPED: {why}"));
        return None;
    }
    let runner = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cross/qemu-run");
    Some(Emulation {
        agent,
        runner: vec![runner.into_os_string(), OsString::from("aarch64")],
        qemu_version,
    })
}

/// The ELF header's machine field.
fn elf_machine(path: &Path) -> u16 {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(
        &bytes[..4],
        b"\x7fELF",
        "{} is not an ELF file",
        path.display()
    );
    u16::from_le_bytes([bytes[18], bytes[19]])
}

/// What the kernel runs for `pid`: under qemu-user, the emulator, not the aarch64 binary.
fn exe_of(pid: u64) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap()
}

fn is_qemu(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("qemu-aarch64") || n.starts_with("aarch64-binfmt"))
}

#[test]
fn aarch64_agent_under_qemu_enrolls_activates_a_verified_model_and_reports_telemetry() {
    let Some(emulation) = emulation() else {
        return;
    };
    let machine = elf_machine(&emulation.agent);
    assert_eq!(
        machine,
        EM_AARCH64,
        "{} is not an aarch64 build",
        emulation.agent.display()
    );
    shout(&format!(
        "agent binary {} (ELF machine 0x{machine:x}, AArch64), run with {}",
        emulation.agent.display(),
        emulation.qemu_version
    ));

    let dir = tempfile::tempdir().unwrap();
    let controller = ControllerProcess::start(&dir.path().join("data"), &ControllerSpec::default());
    // A release for aarch64 devices only: the agent checks the target as part of verification.
    let digest = controller.register_demo_model_for("aarch64");
    let mut agent = controller.enroll_agent_via(
        &emulation.runner,
        &emulation.agent,
        DEVICE,
        &dir.path().join("agent"),
    );
    agent.wait_ready();
    let logs = |agent: &edgefleet_tests::agent::AgentProcess| {
        format!(
            "agent log:\n{}\ncontroller log:\n{}",
            agent.log_text(),
            controller.log_text()
        )
    };
    let row = controller.wait_device(DEVICE, "enrolled and online", |d| d["online"] == true);
    assert_eq!(row["arch"], "aarch64", "{row}");
    let supervisor = u64::from(agent.pid().unwrap());
    let emulator = exe_of(supervisor);
    assert!(
        is_qemu(&emulator),
        "agent pid {supervisor} runs {}",
        emulator.display()
    );
    shout(&format!(
        "agent pid {supervisor} is executed by {} and enrolled as {DEVICE}; the controller lists it with arch {}",
        emulator.display(),
        row["arch"]
    ));

    let (status, body) = controller.post(
        &format!("/api/v1/devices/{DEVICE}/assign"),
        &serde_json::json!({"model": digest}),
    );
    assert_eq!(status, 200, "assign: {body}");
    wait_until(WAIT, "the aarch64 agent to activate the model", || {
        (controller.device(DEVICE)["active_digest"].as_str() == Some(digest.as_str())).then_some(())
    });
    let mut client = agent.client();
    wait_until(WAIT, "the aarch64 agent's API to serve the model", || {
        (client.model().ok()?.model.digest == digest).then_some(())
    });
    let status = agent.status();
    assert_eq!(status["arch"], "aarch64", "{status}");
    let events = status["events"].as_array().unwrap();
    for kind in ["downloading", "installed", "activated"] {
        let event = events
            .iter()
            .find(|e| e["kind"] == kind && e["digest"] == digest.as_str())
            .unwrap_or_else(|| panic!("no {kind} event for {digest}: {status}\n{}", logs(&agent)));
        shout(&format!("agent event: {event}"));
    }
    let worker = status["worker"]["pid"].as_u64().unwrap();
    let worker_exe = exe_of(worker);
    assert!(
        is_qemu(&worker_exe),
        "worker pid {worker} runs {}",
        worker_exe.display()
    );
    shout(&format!(
        "verified bundle {digest} (pump-anomaly@1.0.0, target aarch64) active; its model worker pid {worker} is executed by {}",
        worker_exe.display()
    ));

    for i in 0..INFERENCES {
        let row = vec![60.0 + i as f32 % 7.0, 2.5, 11.0, 3.2];
        let reply = client
            .infer(&[("features", Tensor::f32(vec![1, 4], row))])
            .unwrap_or_else(|err| panic!("inference {i}: {err}\n{}", logs(&agent)));
        assert_eq!(reply.model.digest, digest);
        assert!(!reply.outputs.is_empty());
    }
    wait_until(
        WAIT,
        "the aarch64 agent's telemetry stored and acked",
        || {
            let (_, inferences) = controller.telemetry(DEVICE);
            let pending = agent.status()["spool"]["pending"].as_u64()?;
            (inferences >= INFERENCES && pending == 0).then_some(())
        },
    );
    let (windows, inferences) = controller.telemetry(DEVICE);
    assert_eq!(
        inferences, INFERENCES,
        "{windows} windows count {inferences} inferences"
    );
    shout(&format!(
        "{INFERENCES} inferences answered by the emulated agent; the controller stored {windows} telemetry windows counting {inferences} inferences"
    ));
}
