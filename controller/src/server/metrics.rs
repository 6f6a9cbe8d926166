//! Counters for `/metrics` (Prometheus text exposition format 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    reports_ingested: AtomicU64,
    reports_duplicate: AtomicU64,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    http: Mutex<BTreeMap<(String, u16), u64>>,
    rate_limited: AtomicU64,
}

impl Metrics {
    pub fn ingested(&self, new: u64, duplicates: u64) {
        self.reports_ingested.fetch_add(new, Ordering::Relaxed);
        self.reports_duplicate
            .fetch_add(duplicates, Ordering::Relaxed);
    }

    pub fn rejected(&self, reason: &'static str) {
        *self
            .rejected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(reason)
            .or_default() += 1;
    }

    pub fn http(&self, route: &str, status: u16) {
        *self
            .http
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry((route.to_owned(), status))
            .or_default() += 1;
    }

    pub fn rate_limited(&self) {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    pub fn reports_ingested(&self) -> u64 {
        self.reports_ingested.load(Ordering::Relaxed)
    }

    /// The exposition text; `gauges` are point-in-time values from the store.
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        };
        counter(
            &mut out,
            "edgefleet_reports_ingested_total",
            "Device reports committed (each (device, seq) once).",
        );
        let _ = writeln!(
            out,
            "edgefleet_reports_ingested_total {}",
            self.reports_ingested.load(Ordering::Relaxed)
        );
        counter(
            &mut out,
            "edgefleet_reports_duplicate_total",
            "Device reports received again after they were committed (resends).",
        );
        let _ = writeln!(
            out,
            "edgefleet_reports_duplicate_total {}",
            self.reports_duplicate.load(Ordering::Relaxed)
        );
        counter(
            &mut out,
            "edgefleet_messages_rejected_total",
            "Device messages refused, by reason.",
        );
        for (reason, n) in self
            .rejected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(
                out,
                "edgefleet_messages_rejected_total{{reason=\"{reason}\"}} {n}"
            );
        }
        counter(
            &mut out,
            "edgefleet_http_requests_total",
            "API requests, by route and status.",
        );
        for ((route, status), n) in self
            .http
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(
                out,
                "edgefleet_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        counter(
            &mut out,
            "edgefleet_http_rate_limited_total",
            "API requests refused by the rate limit.",
        );
        let _ = writeln!(
            out,
            "edgefleet_http_rate_limited_total {}",
            self.rate_limited.load(Ordering::Relaxed)
        );
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        out
    }
}
