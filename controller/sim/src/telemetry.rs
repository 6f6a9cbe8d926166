//! Telemetry windows a simulated device reports: the requests of one window drawn from the
//! model's behaviour, counted exactly as the agent counts them (features at the manifest's
//! reference bins, outputs by score or class, latency histogram, shadow agreement), with the
//! `protocol::sketch` types the agent uses.

use edgefleet_protocol::manifest::{Manifest, TensorSpec};
use edgefleet_protocol::messages::{
    ErrorCounts, ModelRef, NamedSketch, ResourceUsage, ShadowStats, TelemetryWindow,
};
use edgefleet_protocol::sketch::{FeatureSketch, LatencyHistogram, ReferenceFeature};
use edgefleet_protocol::{TensorName, Timestamp};
use rand::RngExt;
use rand_distr::{Distribution, Poisson};

use crate::behaviour::{Behaviour, Dist};

/// How many requests arrive at `rate` per second over `seconds` (Poisson).
pub fn request_count<R: rand::Rng + ?Sized>(rng: &mut R, rate: f64, seconds: f64) -> u64 {
    let lambda = rate * seconds;
    if lambda.is_nan() || lambda <= 0.0 {
        return 0;
    }
    Poisson::new(lambda).map_or(0, |poisson| poisson.sample(rng) as u64)
}

/// What happened to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Runtime,
    InvalidInput,
    Timeout,
}

pub fn request_outcome<R: rand::Rng + ?Sized>(rng: &mut R, behaviour: &Behaviour) -> Outcome {
    let errors = behaviour.errors;
    let point: f64 = rng.random();
    if point < errors.runtime {
        Outcome::Runtime
    } else if point < errors.runtime + errors.invalid_input {
        Outcome::InvalidInput
    } else if point < errors.runtime + errors.invalid_input + errors.timeout {
        Outcome::Timeout
    } else {
        Outcome::Ok
    }
}

/// A value of the manifest's reference distribution: a bin drawn by its training proportion,
/// then a uniform point inside it (the outer bins end at the training minimum and maximum), so
/// an undrifted device fills the bins in the reference proportions.
pub fn sample_reference<R: rand::Rng + ?Sized>(rng: &mut R, reference: &ReferenceFeature) -> f64 {
    let total: f64 = reference.proportions.iter().sum();
    let mut point = rng.random_range(0.0..total.max(f64::MIN_POSITIVE));
    let mut bin = reference.proportions.len().saturating_sub(1);
    for (i, p) in reference.proportions.iter().enumerate() {
        if point < *p {
            bin = i;
            break;
        }
        point -= p;
    }
    let (lo, hi) = bin_range(reference, bin);
    if lo < hi {
        rng.random_range(lo..hi)
    } else {
        lo
    }
}

/// The values bin `bin` of `reference` holds: `[lo, hi)`, the outer bins bounded by the
/// reference minimum and maximum.
fn bin_range(reference: &ReferenceFeature, bin: usize) -> (f64, f64) {
    let edges = &reference.edges;
    let hi = edges.get(bin).copied().unwrap_or(reference.max);
    let lo = match bin {
        0 => reference.min,
        _ => edges.get(bin - 1).copied().unwrap_or(reference.min),
    };
    (lo.min(hi), hi)
}

/// Mean and standard deviation of the reference distribution as [`sample_reference`] draws it.
pub fn reference_mean_sd(reference: &ReferenceFeature) -> (f64, f64) {
    let total: f64 = reference.proportions.iter().sum();
    if total <= 0.0 {
        return (reference.min, 0.0);
    }
    let (mut mean, mut square) = (0.0, 0.0);
    for (i, p) in reference.proportions.iter().enumerate() {
        let (lo, hi) = bin_range(reference, i);
        let w = p / total;
        let mid = (lo + hi) / 2.0;
        mean += w * mid;
        square += w * ((hi - lo).powi(2) / 12.0 + mid * mid);
    }
    (mean, (square - mean * mean).max(0.0).sqrt())
}

/// Where one feature's values come from.
#[derive(Debug)]
struct FeatureSource<'a> {
    reference: &'a ReferenceFeature,
    dist: Option<Dist>,
    mean: f64,
    sd: f64,
    drifts: bool,
}

impl FeatureSource<'_> {
    fn sample<R: rand::Rng + ?Sized>(&self, rng: &mut R, behaviour: &Behaviour) -> f64 {
        let x = match &self.dist {
            Some(dist) => dist.sample(rng),
            None => sample_reference(rng, self.reference),
        };
        match (&behaviour.drift, self.drifts) {
            (Some(drift), true) => drift.apply(rng, x, self.mean, self.sd),
            _ => x,
        }
    }
}

/// The manifest's features that have reference statistics, in manifest order (the agent sketches
/// exactly these), with where their values come from under `behaviour`.
fn feature_sources<'a>(manifest: &'a Manifest, behaviour: &Behaviour) -> Vec<FeatureSource<'a>> {
    manifest
        .referenced_features()
        .map(|(spec, reference)| {
            let name = spec.name.as_str();
            let dist = behaviour.features.get(name).copied();
            let (mean, sd) = dist.map_or_else(|| reference_mean_sd(reference), |d| d.mean_sd());
            let drifts = behaviour.drift.as_ref().is_some_and(|d| d.applies_to(name));
            FeatureSource {
                reference,
                dist,
                mean,
                sd,
                drifts,
            }
        })
        .collect()
}

/// How an output is sketched: ten score bins for one value, the argmax class for several.
fn output_bins(spec: &TensorSpec) -> (usize, ReferenceFeature) {
    let width = spec.shape.last().copied().flatten().unwrap_or(1).max(1) as usize;
    let bins = if width > 1 {
        ReferenceFeature::class_bins(spec.name.clone(), width)
    } else {
        ReferenceFeature::score_bins(TensorName::new("score").expect("a valid tensor name"))
    };
    (width, bins)
}

/// The model a window is for and, if one runs, the shadow beside it.
#[derive(Debug)]
pub struct WindowModels<'a> {
    pub active: (&'a ModelRef, &'a Manifest, &'a Behaviour),
    pub shadow: Option<(&'a ModelRef, &'a Behaviour)>,
}

/// One telemetry window over `[start, end)`: its requests drawn from the behaviour.
pub fn window<R: rand::Rng + ?Sized>(
    rng: &mut R,
    models: &WindowModels<'_>,
    start: Timestamp,
    end: Timestamp,
) -> TelemetryWindow {
    let (model, manifest, behaviour) = models.active;
    let seconds = end.millis_since(start) as f64 / 1000.0;
    let sources = feature_sources(manifest, behaviour);
    let mut features: Vec<NamedSketch> = sources
        .iter()
        .map(|s| NamedSketch {
            name: s.reference.name.clone(),
            sketch: s.reference.sketch(),
        })
        .collect();
    let outputs_bins: Vec<(usize, ReferenceFeature)> =
        manifest.outputs.iter().map(output_bins).collect();
    let mut outputs: Vec<NamedSketch> = Vec::new();
    let mut errors = ErrorCounts::default();
    let mut latency = LatencyHistogram::default();
    let mut inferences = 0u64;
    let mut shadow = models.shadow.map(|(shadow_model, _)| ShadowStats {
        model: shadow_model.clone(),
        compared: 0,
        dropped: 0,
        errors: 0,
        argmax_agree: 0,
        abs_diff_sum: 0.0,
        latency: LatencyHistogram::default(),
        feedback: None,
    });
    for _ in 0..request_count(rng, behaviour.inference_rate, seconds) {
        let outcome = request_outcome(rng, behaviour);
        if outcome == Outcome::InvalidInput {
            errors.invalid_input += 1;
            continue;
        }
        // Features count for every request past the schema check, as in the agent.
        for (source, sketch) in sources.iter().zip(&mut features) {
            let x = source.sample(rng, behaviour);
            sketch.sketch.observe(source.reference, x);
        }
        match outcome {
            Outcome::Runtime => {
                errors.runtime += 1;
                continue;
            }
            Outcome::Timeout => {
                errors.timeout += 1;
                continue;
            }
            Outcome::Ok | Outcome::InvalidInput => {}
        }
        inferences += 1;
        latency.record(behaviour.latency_us.sample(rng).max(0.0) as u64);
        for (i, (spec, (width, bins))) in manifest.outputs.iter().zip(&outputs_bins).enumerate() {
            if outputs.len() <= i {
                let n_bins = if *width > 1 { *width } else { 10 };
                outputs.push(NamedSketch {
                    name: spec.name.clone(),
                    sketch: FeatureSketch::new(n_bins),
                });
            }
            let value = if *width > 1 {
                behaviour.sample_class(rng, *width) as f64
            } else {
                behaviour.output.sample(rng).clamp(0.0, 1.0)
            };
            outputs[i].sketch.observe(bins, value);
        }
        if let (Some(stats), Some((_, candidate))) = (shadow.as_mut(), models.shadow) {
            if request_outcome(rng, candidate) != Outcome::Ok {
                stats.errors += 1;
                continue;
            }
            stats.compared += 1;
            stats
                .latency
                .record(candidate.latency_us.sample(rng).max(0.0) as u64);
            if rng.random_bool(candidate.shadow_agreement.clamp(0.0, 1.0)) {
                stats.argmax_agree += 1;
            }
            if candidate.shadow_mean_abs_diff > 0.0 {
                // Exponentially distributed around the configured mean.
                let u: f64 = rng.random();
                stats.abs_diff_sum += -candidate.shadow_mean_abs_diff * (1.0 - u).ln();
            }
        }
    }
    TelemetryWindow {
        model: model.clone(),
        window_start: start,
        window_end: end,
        inferences,
        errors,
        latency,
        features,
        outputs,
        shadow,
        feedback: None,
        resources: ResourceUsage {
            cpu_percent: behaviour.cpu_percent as f32,
            rss_bytes: (behaviour.rss_mib * 1024.0 * 1024.0) as u64,
        },
    }
}

/// Requests answered (successes, runtime errors) over a model's grace window: what the agent's
/// activation check counts.
pub fn grace_counts<R: rand::Rng + ?Sized>(
    rng: &mut R,
    behaviour: &Behaviour,
    grace_window_s: u32,
) -> (u64, u64) {
    let (mut ok, mut runtime) = (0, 0);
    for _ in 0..request_count(rng, behaviour.inference_rate, f64::from(grace_window_s)) {
        match request_outcome(rng, behaviour) {
            Outcome::Ok => ok += 1,
            Outcome::Runtime => runtime += 1,
            Outcome::InvalidInput | Outcome::Timeout => {}
        }
    }
    (ok, runtime)
}

#[cfg(test)]
mod tests;
