//! `edgefleet-controller mosquitto-config`: a Mosquitto configuration for production fleets.
//! TLS with client certificates from the fleet CA, the certificate's common name as the user
//! name, the controller's certificate revocation list, and an ACL that keeps each device to its
//! own topics while the controller reads reports and writes assignments.
//!
//! The ACL is keyed on the certificate's name, not on the MQTT client id: Mosquitto lets any
//! client connect with any client id and closes the older connection holding it, so a device can
//! knock another off (it reconnects) but cannot use its topics. The controller relies on the same
//! takeover to end a revoked device's session (`revocation`), which needs no ACL rule.
//!
//! Measured with Mosquitto 2.0.11: a PUBLISH on another device's topic is answered with PUBACK
//! 0x87 (not authorized) and goes nowhere; a SUBSCRIBE to one is granted, and then nothing on it
//! is delivered, retained or live. Enrollment refuses device ids that would take the controller's
//! name (`pki::reserved_device_id`), which the ACL lets use every topic.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use edgefleet_protocol::topics;

use super::config::{MosquittoConfigArgs, ServeArgs};
use super::pki::{CONTROLLER_CN, FleetCa};
use crate::fsutil;

/// The ACL file: the controller's rules, then one pattern per topic kind for devices.
pub fn acl() -> String {
    let mut out = String::from("# EdgeFleet: written by `edgefleet-controller mosquitto-config`\n");
    let _ = writeln!(out, "user {CONTROLLER_CN}");
    let _ = writeln!(out, "topic read {}/+/+", topics::PREFIX);
    let _ = writeln!(out, "topic write {}/+/+", topics::PREFIX);
    let _ = writeln!(out);
    for line in topics::mosquitto_acl_patterns() {
        let _ = writeln!(out, "{line}");
    }
    out
}

/// The main configuration for a listener on `listen` with files in `dir` and the controller's
/// CRL at `crl`.
pub fn config(listen: &std::net::SocketAddr, dir: &Path, crl: &Path) -> String {
    format!(
        "# EdgeFleet: written by `edgefleet-controller mosquitto-config`\n\
         per_listener_settings false\n\
         allow_anonymous false\n\
         persistence false\n\
         max_packet_size {max}\n\
         # The controller consumes the whole fleet's reports over one connection: Mosquitto's\n\
         # default queue of 1000 messages per client drops reports under a burst (devices then\n\
         # resend them). Bounded by bytes as well, so a stalled client cannot exhaust memory.\n\
         max_queued_messages 200000\n\
         max_queued_bytes 268435456\n\
         listener {port} {ip}\n\
         protocol mqtt\n\
         cafile {dir}/ca.pem\n\
         certfile {dir}/server.pem\n\
         keyfile {dir}/server.key\n\
         require_certificate true\n\
         use_identity_as_username true\n\
         crlfile {crl}\n\
         tls_version tlsv1.2\n\
         acl_file {dir}/acl\n",
        max = edgefleet_protocol::codec::MAX_MESSAGE_BYTES + 4096,
        port = listen.port(),
        ip = listen.ip(),
        dir = dir.display(),
        crl = crl.display(),
    )
}

pub fn write_config(serve: &ServeArgs, args: &MosquittoConfigArgs) -> Result<()> {
    let ca = FleetCa::open_or_create(&serve.data_dir.join("pki"))?;
    fsutil::create_private_dir(&args.out)?;
    let out = std::fs::canonicalize(&args.out)
        .with_context(|| format!("cannot resolve {}", args.out.display()))?;
    let mut hosts: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
    hosts.extend(args.hostnames.iter().cloned());
    let server = ca.identity("mosquitto", "edgefleet-mosquitto", &hosts, true)?;
    std::fs::copy(&server.cert, out.join("server.pem"))?;
    fsutil::write_atomic(
        &out.join("server.key"),
        &std::fs::read(&server.key)?,
        fsutil::SECRET_MODE,
    )?;
    fsutil::write_atomic(
        &out.join("ca.pem"),
        ca.ca_pem.as_bytes(),
        fsutil::PUBLIC_MODE,
    )?;
    fsutil::write_atomic(&out.join("acl"), acl().as_bytes(), fsutil::PUBLIC_MODE)?;
    // Mosquitto does not start without its crlfile. The controller rewrites it from its store on
    // start; until then an empty list stands in (only when there is none yet).
    let crl = serve.crl_path();
    if !crl.exists() {
        let now = edgefleet_protocol::Clock::now(&edgefleet_protocol::SystemClock);
        super::revocation::write_crl(&ca, &crl, &[], now.as_millis() as i64)?;
    }
    let crl =
        std::fs::canonicalize(&crl).with_context(|| format!("cannot resolve {}", crl.display()))?;
    fsutil::write_atomic(
        &out.join("mosquitto.conf"),
        config(&args.listen, &out, &crl).as_bytes(),
        fsutil::PUBLIC_MODE,
    )?;
    println!(
        "wrote {out}/mosquitto.conf (listener {listen}, mTLS with the fleet CA, CRL {crl}, per-device ACL)\n\
         run: mosquitto -c {out}/mosquitto.conf   (as a user that can read {out} and {crl})\n\
         then: edgefleet-controller --mqtt mqtts://HOST:{port} --data-dir {data} \\\n\
         \x20     --crl-reload-command 'kill -HUP $(pidof mosquitto)'   (Mosquitto re-reads the CRL only on SIGHUP)",
        out = out.display(),
        listen = args.listen,
        crl = crl.display(),
        port = args.listen.port(),
        data = serve.data_dir.display()
    );
    Ok(())
}
