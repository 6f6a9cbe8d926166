//! EdgeFleet protocol: ids, the MQTT topic scheme, wire messages, the CBOR codec, the trust chain
//! and the signed bundle format. Data and pure functions only: no tokio, sockets or files, and it
//! never reads the clock (it defines [`Clock`] for the edges that do).

pub mod assignment;
pub mod bundle;
pub mod capture;
pub mod codec;
pub mod crypto;
pub mod enroll;
pub mod ids;
pub mod manifest;
pub mod messages;
pub mod sketch;
pub mod time;
pub mod topics;
pub mod trust;

#[cfg(test)]
mod proptests;

pub use assignment::{AssignedModel, Assignment, DeviceTrust, Floors};
pub use bundle::{Bundle, BundleError, BundleVerifier};
pub use codec::DecodeError;
pub use crypto::{DeviceMacKey, Domain, KeyId, PublicKey, SecretKey, Sha256Digest};
pub use ids::{Arch, DeviceId, IdError, ModelName, ModelVersion, RolloutId, TensorName};
pub use manifest::{Manifest, ManifestPolicy};
pub use messages::{ControllerMessage, DeviceMessage};
pub use time::{Clock, ManualClock, SystemClock, Timestamp};
pub use topics::{Topic, TopicKind};
pub use trust::{ReleaseKeyring, Role, RootKeyring, Signed, TrustError, Verified};
