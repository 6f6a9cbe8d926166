//! The MQTT topic scheme `edgefleet/v1/{device_id}/{kind}`. This module is the only place that
//! formats or parses a topic.

use std::fmt;

use crate::ids::{DeviceId, IdError};

pub const PREFIX: &str = "edgefleet/v1";
/// The shared-subscription group controller replicas join, so each report is ingested once.
pub const SHARE_GROUP: &str = "edgefleet";

/// What a topic carries, and in which direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub enum TopicKind {
    /// Device → controller, retained: online/offline (also the last will) and what it runs.
    Status,
    /// Device → controller: telemetry windows.
    Telemetry,
    /// Device → controller: lifecycle events (activated, rolled back, install failed, …).
    Event,
    /// Device → controller: data-capture batches ready for upload.
    Capture,
    /// Controller → device, retained: the signed assignment.
    Assignment,
    /// Controller → device: acknowledgements of spooled reports.
    Ack,
}

impl TopicKind {
    pub const ALL: [TopicKind; 6] = [
        TopicKind::Status,
        TopicKind::Telemetry,
        TopicKind::Event,
        TopicKind::Capture,
        TopicKind::Assignment,
        TopicKind::Ack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TopicKind::Status => "status",
            TopicKind::Telemetry => "telemetry",
            TopicKind::Event => "event",
            TopicKind::Capture => "capture",
            TopicKind::Assignment => "assignment",
            TopicKind::Ack => "ack",
        }
    }

    /// Whether devices publish on this kind (the others only the controller publishes).
    pub fn from_device(self) -> bool {
        matches!(
            self,
            TopicKind::Status | TopicKind::Telemetry | TopicKind::Event | TopicKind::Capture
        )
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == s)
    }
}

/// A concrete topic for one device.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topic {
    pub device: DeviceId,
    pub kind: TopicKind,
}

impl Topic {
    pub fn new(device: DeviceId, kind: TopicKind) -> Self {
        Self { device, kind }
    }

    pub fn parse(topic: &str) -> Result<Self, TopicError> {
        let rest = topic
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| TopicError::Prefix {
                topic: topic.to_owned(),
            })?;
        let (device, kind) = rest.split_once('/').ok_or_else(|| TopicError::Shape {
            topic: topic.to_owned(),
        })?;
        let device = DeviceId::new(device).map_err(|source| TopicError::Device { source })?;
        let kind = TopicKind::parse(kind).ok_or_else(|| TopicError::Kind {
            kind: kind.to_owned(),
        })?;
        Ok(Self { device, kind })
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}/{}/{}", self.device, self.kind.as_str())
    }
}

/// The filter a controller replica subscribes to for one device→controller kind, as a shared
/// subscription: `$share/edgefleet/edgefleet/v1/+/{kind}`.
pub fn shared_filter(kind: TopicKind) -> String {
    format!("$share/{SHARE_GROUP}/{PREFIX}/+/{}", kind.as_str())
}

/// The plain (unshared) filter for one kind across all devices.
pub fn fleet_filter(kind: TopicKind) -> String {
    format!("{PREFIX}/+/{}", kind.as_str())
}

/// The Mosquitto ACL pattern lines that let each device (`%u` = its certificate identity) publish
/// and read only its own topics.
pub fn mosquitto_acl_patterns() -> Vec<String> {
    TopicKind::ALL
        .into_iter()
        .map(|kind| {
            let access = if kind.from_device() { "write" } else { "read" };
            format!("pattern {access} {PREFIX}/%u/{}", kind.as_str())
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic {topic:?} is not under {PREFIX}/")]
    Prefix { topic: String },
    #[error("topic {topic:?} is not of the form {PREFIX}/<device>/<kind>")]
    Shape { topic: String },
    #[error("topic names a bad device id: {source}")]
    Device { source: IdError },
    #[error(
        "topic kind {kind:?} is unknown; expected one of status, telemetry, event, capture, assignment, ack"
    )]
    Kind { kind: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_build_and_parse_back() {
        let device = DeviceId::new("pump-7").unwrap();
        for kind in TopicKind::ALL {
            let topic = Topic::new(device.clone(), kind);
            assert_eq!(Topic::parse(&topic.to_string()).unwrap(), topic);
        }
        assert_eq!(
            Topic::new(device, TopicKind::Telemetry).to_string(),
            "edgefleet/v1/pump-7/telemetry"
        );
        assert_eq!(
            shared_filter(TopicKind::Event),
            "$share/edgefleet/edgefleet/v1/+/event"
        );
    }

    #[test]
    fn hostile_topics_are_refused() {
        for bad in [
            "edgefleet/v1/a/b/telemetry",
            "edgefleet/v1/+/telemetry",
            "edgefleet/v1/#",
            "edgefleet/v1//telemetry",
            "edgefleet/v2/a/telemetry",
            "edgefleet/v1/a/telemetry/",
            "edgefleet/v1/a/secrets",
            "$SYS/broker",
        ] {
            assert!(Topic::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn acl_patterns_are_per_identity() {
        let lines = mosquitto_acl_patterns();
        assert!(lines.contains(&String::from("pattern write edgefleet/v1/%u/telemetry")));
        assert!(lines.contains(&String::from("pattern read edgefleet/v1/%u/assignment")));
    }
}
