//! The deployment kit (`firmware-examples/deploy/`) and the agent's Debian package: the
//! provisioning script writes a device's config, trust files and enrollment token into an image
//! root, and an agent started with what it wrote enrolls with the real controller; the package
//! built by `agent/packaging/build-deb.sh` holds the binary, the unit and the config, and
//! installs into (and purges from) a throwaway root with dpkg.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use edgefleet_tests::agent::AgentProcess;
use edgefleet_tests::controller::{ControllerProcess, ControllerSpec};
use edgefleet_tests::{Run, bin, run, run_ok, run_with_input};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `provision.sh args` with `token` on its standard input.
fn provision(args: &[&std::ffi::OsStr], token: &str) -> Run {
    run_with_input(
        Command::new(repo().join("firmware-examples/deploy/provision.sh"))
            .args(args)
            .env_remove("EDGEFLEET_ENROLL_TOKEN"),
        format!("{token}\n").as_bytes(),
    )
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

#[test]
fn a_device_provisioned_with_the_kit_enrolls_with_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let controller = ControllerProcess::start(&dir.path().join("data"), &ControllerSpec::default());
    let (status, created) = controller.post(
        "/api/v1/enroll-tokens",
        &serde_json::json!({"labels": {"site": "kit"}, "expires_in_s": 600}),
    );
    assert!((200..300).contains(&status), "{created}");
    let token = created["token"].as_str().unwrap();
    let keys = controller.data_dir.join("keys");
    let rootfs = dir.path().join("rootfs");
    let template = repo().join("agent/packaging/agent.toml");
    let (devices, mqtt) = (
        format!("https://{}", controller.devices),
        format!("mqtts://{}", controller.mqtt),
    );
    let ca = controller.ca_path();
    let (trust_root, keyring) = (keys.join("root-v1.cbor"), keys.join("keyring.cbor"));
    let args = [
        os("--root"),
        rootfs.as_os_str(),
        os("--template"),
        template.as_os_str(),
        os("--device-id"),
        os("kit-01"),
        os("--controller"),
        os(&devices),
        os("--mqtt"),
        os(&mqtt),
        os("--ca"),
        ca.as_os_str(),
        os("--trust-root"),
        trust_root.as_os_str(),
        os("--keyring"),
        keyring.as_os_str(),
    ];

    // Nothing is written when an argument is wrong.
    let mut bad = args.to_vec();
    bad[5] = os("kit/01");
    let refused = provision(&bad, token);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(
        refused.stderr.contains("may use only letters"),
        "{}",
        refused.stderr
    );
    assert!(!rootfs.exists());

    let out = provision(&args, token);
    assert!(out.status.success(), "{out:?}");
    let etc = rootfs.join("etc/edgefleet");
    assert_eq!(
        std::fs::read(etc.join("ca.pem")).unwrap(),
        std::fs::read(&ca).unwrap()
    );
    assert_eq!(
        std::fs::read(etc.join("keyring.cbor")).unwrap(),
        std::fs::read(&keyring).unwrap()
    );
    let env_file = etc.join("agent.env");
    let mode = std::fs::metadata(&env_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the token file is root-only");
    let env_text = std::fs::read_to_string(&env_file).unwrap();
    assert_eq!(
        env_text,
        format!("EDGEFLEET_ENROLL_URL={devices}\nEDGEFLEET_ENROLL_TOKEN={token}\n")
    );
    let config = etc.join("agent.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.contains("# This device's id"),
        "the documentation stays:\n{text}"
    );
    assert!(
        !text.contains(token),
        "the token stays out of the world-readable config"
    );

    // The agent reads back what was written (without the enrollment environment, as an admin
    // command on the device does).
    let printed = run_ok(
        Command::new(bin("edgefleet-agent"))
            .arg("--config")
            .arg(&config)
            .arg("print-config"),
    );
    for line in [
        "device_id = \"kit-01\"".to_owned(),
        format!("[mqtt]\nurl = \"{mqtt}\""),
        "ca = \"/etc/edgefleet/ca.pem\"".to_owned(),
        "cert = \"/var/lib/edgefleet/device.pem\"".to_owned(),
    ] {
        assert!(
            printed.stdout.contains(&line),
            "{line:?} missing in:\n{}",
            printed.stdout
        );
    }

    // Started with that config (its paths moved from / into the test's directories) and the
    // environment file as systemd passes it, the agent enrolls and comes online.
    let state = dir.path().join("state");
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let mut env: Vec<(&str, String)> = env_text
        .lines()
        .map(|line| {
            let (key, value) = line.split_once('=').unwrap();
            (key, value.to_owned())
        })
        .collect();
    env.extend([
        ("EDGEFLEET_CONFIG", path(&config)),
        ("EDGEFLEET_DEVICE_ID", "kit-01".to_owned()),
        ("EDGEFLEET_MQTT_CA", path(&etc.join("ca.pem"))),
        ("EDGEFLEET_MQTT_CERT", path(&state.join("device.pem"))),
        ("EDGEFLEET_MQTT_KEY", path(&state.join("device.key"))),
        ("EDGEFLEET_MQTT_MAC_KEY", path(&state.join("mac.key"))),
    ]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut agent = AgentProcess::start_trusting(
        &bin("edgefleet-agent"),
        (&etc.join("root-v1.cbor"), &etc.join("keyring.cbor")),
        &state,
        &env,
    );
    agent.wait_ready();
    let row = controller.wait_device("kit-01", "enrolled and online", |d| d["online"] == true);
    assert_eq!(row["labels"]["site"], "kit", "{row}");
    assert!(state.join("device.pem").exists());
}

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    run_ok(Command::new("dpkg-deb").args(args).arg(deb)).stdout
}

#[test]
fn the_debian_package_holds_the_agent_unit_and_config_and_installs_into_a_root() {
    let dir = tempfile::tempdir().unwrap();
    let built = run_ok(
        Command::new(repo().join("agent/packaging/build-deb.sh"))
            .arg("--binary")
            .arg(bin("edgefleet-agent"))
            .arg("--out")
            .arg(dir.path())
            .args(["--compress", "gzip"]),
    );
    let deb = PathBuf::from(built.stdout.trim());
    let arch = run_ok(Command::new("dpkg").arg("--print-architecture"))
        .stdout
        .trim()
        .to_owned();
    assert_eq!(
        deb.file_name().unwrap().to_str().unwrap(),
        format!("edgefleet-agent_0.1.0_{arch}.deb")
    );

    let info = dpkg_deb(&["--info"], &deb);
    for field in [
        "Package: edgefleet-agent",
        "Version: 0.1.0",
        &format!("Architecture: {arch}"),
        "Depends: libc6 (>= 2.",
    ] {
        assert!(info.contains(field), "{field:?} missing in:\n{info}");
    }
    let contents = dpkg_deb(&["--contents"], &deb);
    for (mode, file) in [
        ("-rwxr-xr-x root/root", "./usr/bin/edgefleet-agent"),
        (
            "-rw-r--r-- root/root",
            "./lib/systemd/system/edgefleet-agent.service",
        ),
        ("-rw-r--r-- root/root", "./etc/edgefleet/agent.toml"),
    ] {
        assert!(
            contents
                .lines()
                .any(|l| l.starts_with(mode) && l.ends_with(file)),
            "{mode} {file} missing in:\n{contents}"
        );
    }

    // Install into a throwaway root: an empty dpkg database, maintainer scripts run outside a
    // chroot with DPKG_ROOT set (so they leave the host's accounts and services alone).
    let root = dir.path().join("root");
    for sub in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    let dpkg = |args: &[&str]| {
        let out = run(Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            .args([
                "--force-script-chrootless",
                "--force-not-root",
                "--log=/dev/null",
            ])
            .args(args));
        assert!(out.success(), "dpkg {args:?}: {out:?}");
        out
    };
    // Its libc6 dependency is the host's, not the empty root's.
    dpkg(&["--force-depends", "--install", deb.to_str().unwrap()]);
    let status = dpkg(&["--status", "edgefleet-agent"]).stdout;
    assert!(status.contains("Status: install ok installed"), "{status}");
    assert!(
        status.contains("Conffiles:\n /etc/edgefleet/agent.toml"),
        "{status}"
    );
    let installed = root.join("usr/bin/edgefleet-agent");
    let version = run_ok(Command::new(&installed).arg("--version"));
    assert_eq!(version.stdout.trim(), "edgefleet-agent 0.1.0");
    for (installed_file, source) in [
        ("etc/edgefleet/agent.toml", "agent/packaging/agent.toml"),
        (
            "lib/systemd/system/edgefleet-agent.service",
            "agent/packaging/edgefleet-agent.service",
        ),
    ] {
        assert_eq!(
            std::fs::read(root.join(installed_file)).unwrap(),
            std::fs::read(repo().join(source)).unwrap(),
            "{installed_file}"
        );
    }
    let printed = run_ok(
        Command::new(&installed)
            .arg("--config")
            .arg(root.join("etc/edgefleet/agent.toml"))
            .arg("print-config"),
    );
    assert!(
        printed
            .stdout
            .contains("state_dir = \"/var/lib/edgefleet\""),
        "{}",
        printed.stdout
    );

    std::fs::create_dir_all(root.join("var/lib/edgefleet/store")).unwrap();
    dpkg(&["--purge", "edgefleet-agent"]);
    assert!(!installed.exists());
    assert!(!root.join("etc/edgefleet/agent.toml").exists());
    assert!(
        !root.join("var/lib/edgefleet").exists(),
        "purge removes the state"
    );
}
