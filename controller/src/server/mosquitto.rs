//! `edgefleet-controller mosquitto-config`: a Mosquitto configuration for production fleets.
//! TLS with client certificates from the fleet CA, the certificate's common name as the user
//! name, and an ACL that keeps
//! each device to its own topics while the controller reads reports and writes assignments.

use std::fmt::Write as _;

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

/// The main configuration for a listener on `listen` with files in `dir`.
pub fn config(listen: &std::net::SocketAddr, dir: &std::path::Path) -> String {
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
         tls_version tlsv1.2\n\
         acl_file {dir}/acl\n",
        max = edgefleet_protocol::codec::MAX_MESSAGE_BYTES + 4096,
        port = listen.port(),
        ip = listen.ip(),
        dir = dir.display(),
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
    fsutil::write_atomic(
        &out.join("mosquitto.conf"),
        config(&args.listen, &out).as_bytes(),
        fsutil::PUBLIC_MODE,
    )?;
    println!(
        "wrote {}/mosquitto.conf (listener {}, mTLS with the fleet CA, per-device ACL)\n\
         run: mosquitto -c {}/mosquitto.conf\n\
         then: edgefleet-controller --mqtt mqtts://HOST:{} --data-dir {}",
        out.display(),
        args.listen,
        out.display(),
        args.listen.port(),
        serve.data_dir.display()
    );
    Ok(())
}
