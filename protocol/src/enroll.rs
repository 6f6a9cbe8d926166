//! Device enrollment over HTTPS: a device with a one-time token sends a CSR for its own key and
//! receives its certificate (signed by the fleet CA), the fleet CA, the per-device MAC key that
//! authenticates its messages, and where the broker is. JSON bodies.

use serde::{Deserialize, Serialize};

use crate::ids::{Arch, DeviceId};

/// Path of the enrollment endpoint on the controller.
pub const ENROLL_PATH: &str = "/api/v1/enroll";
pub const ENROLL_VERSION: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub v: u16,
    /// The one-time enrollment token an operator issued.
    pub token: String,
    pub device: DeviceId,
    /// PKCS#10 request for the device's own key; its common name must be the device id.
    pub csr_pem: String,
    pub arch: Arch,
    pub agent_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollResponse {
    pub v: u16,
    pub device: DeviceId,
    pub certificate_pem: String,
    pub ca_pem: String,
    /// The device's message-authentication key, 64 hex digits.
    pub mac_key_hex: String,
    /// The broker, `mqtts://host:port`.
    pub mqtt_url: String,
}

/// The error body of a refused enrollment (HTTP 4xx).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollError {
    pub error: EnrollErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollErrorDetail {
    pub code: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrollment_bodies_round_trip_as_json_and_refuse_bad_device_ids() {
        let request = EnrollRequest {
            v: ENROLL_VERSION,
            token: String::from("t0k3n"),
            device: DeviceId::new("pump-1").unwrap(),
            csr_pem: String::from("-----BEGIN CERTIFICATE REQUEST-----"),
            arch: Arch::new("aarch64").unwrap(),
            agent_version: String::from("0.1.0"),
        };
        let json = serde_json::to_string(&request).unwrap();
        assert_eq!(
            serde_json::from_str::<EnrollRequest>(&json).unwrap(),
            request
        );
        let hostile = json.replace("pump-1", "pump/#");
        assert!(
            serde_json::from_str::<EnrollRequest>(&hostile)
                .unwrap_err()
                .to_string()
                .contains("device id")
        );
    }
}
