//! Mergeable summaries: per-feature bin counts at the reference edges, and latency histograms.
//! Sketches from many devices and windows merge by addition, so fleet-wide drift and latency
//! percentiles need no raw data.

use serde::{Deserialize, Serialize};

use crate::ids::TensorName;

/// A feature's training-data distribution: inner bin edges (deciles) and the share of training
/// rows in each of the `edges.len() + 1` bins. Bin `i` holds `edges[i-1] <= x < edges[i]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct ReferenceFeature {
    pub name: TensorName,
    pub edges: Vec<f64>,
    pub proportions: Vec<f64>,
    /// The smallest and largest training value; values outside are counted as out of range.
    pub min: f64,
    pub max: f64,
}

/// Bin of `x` for sorted inner `edges`: the number of edges `<= x`.
pub fn bin_index(edges: &[f64], x: f64) -> usize {
    edges.partition_point(|edge| *edge <= x)
}

impl ReferenceFeature {
    /// Decile edges and bin proportions from training values. NaNs are ignored; repeated
    /// quantiles (a feature with few distinct values) collapse into one edge.
    pub fn from_samples(name: TensorName, values: &[f64]) -> Result<Self, String> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
        if sorted.is_empty() {
            return Err(format!("feature {name} has no numeric values"));
        }
        if sorted.iter().any(|v| v.is_infinite()) {
            return Err(format!("feature {name} has infinite values"));
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let mut edges: Vec<f64> = Vec::with_capacity(9);
        for decile in 1..10 {
            let edge = sorted[(decile * n / 10).min(n - 1)];
            if edge > sorted[0] && edges.last().is_none_or(|last| edge > *last) {
                edges.push(edge);
            }
        }
        let mut counts = vec![0u64; edges.len() + 1];
        for value in &sorted {
            counts[bin_index(&edges, *value)] += 1;
        }
        let proportions = counts.iter().map(|c| *c as f64 / n as f64).collect();
        Ok(Self {
            name,
            edges,
            proportions,
            min: sorted[0],
            max: sorted[n - 1],
        })
    }

    pub fn validate(&self) -> Result<(), String> {
        let name = &self.name;
        if self.proportions.len() != self.edges.len() + 1 {
            return Err(format!(
                "reference feature {name} has {} edges and {} proportions; it needs one more proportion than edges",
                self.edges.len(),
                self.proportions.len()
            ));
        }
        if self.edges.iter().any(|e| !e.is_finite()) || self.edges.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(format!(
                "reference feature {name}: edges must be finite and strictly increasing"
            ));
        }
        if self.proportions.iter().any(|p| !(0.0..=1.0).contains(p)) {
            return Err(format!(
                "reference feature {name}: proportions must be between 0 and 1"
            ));
        }
        let total: f64 = self.proportions.iter().sum();
        if (total - 1.0).abs() > 1e-6 {
            return Err(format!(
                "reference feature {name}: proportions sum to {total}, not 1"
            ));
        }
        if self.min.is_nan() || self.max.is_nan() || self.min > self.max {
            return Err(format!("reference feature {name}: min must be ≤ max"));
        }
        Ok(())
    }

    /// An empty sketch with this feature's bins.
    pub fn sketch(&self) -> FeatureSketch {
        FeatureSketch::new(self.edges.len() + 1)
    }

    /// The bins a model output holding a single score is counted in: ten equal bins over [0, 1].
    pub fn score_bins(name: TensorName) -> Self {
        Self {
            name,
            edges: (1..10).map(|i| f64::from(i) / 10.0).collect(),
            proportions: vec![0.1; 10],
            min: 0.0,
            max: 1.0,
        }
    }

    /// The bins a model output of `width` class scores is counted in: its argmax class, one bin
    /// per class.
    pub fn class_bins(name: TensorName, width: usize) -> Self {
        let width = width.max(1);
        Self {
            name,
            edges: (1..width).map(|i| i as f64 - 0.5).collect(),
            proportions: vec![1.0 / width as f64; width],
            min: 0.0,
            max: (width - 1) as f64,
        }
    }
}

/// Counts of one feature's values over a window, at the reference bins, plus moments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct FeatureSketch {
    pub bins: Vec<u64>,
    /// Non-NaN values seen.
    pub count: u64,
    pub nan: u64,
    /// Values below the reference minimum or above the reference maximum.
    pub out_of_range: u64,
    pub sum: f64,
    pub sum_sq: f64,
    /// `+∞` while empty. JSON has no infinities (serde_json writes `null`), so `null` reads back
    /// as the empty value; the agent's worker hands windows to its supervisor as JSON.
    #[serde(deserialize_with = "infinity_if_null")]
    pub min: f64,
    /// `-∞` while empty; `null` reads back as that.
    #[serde(deserialize_with = "neg_infinity_if_null")]
    pub max: f64,
}

fn infinity_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::INFINITY))
}

fn neg_infinity_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NEG_INFINITY))
}

impl FeatureSketch {
    pub fn new(n_bins: usize) -> Self {
        Self {
            bins: vec![0; n_bins],
            count: 0,
            nan: 0,
            out_of_range: 0,
            sum: 0.0,
            sum_sq: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }

    pub fn observe(&mut self, reference: &ReferenceFeature, x: f64) {
        if x.is_nan() {
            self.nan += 1;
            return;
        }
        let bin = bin_index(&reference.edges, x);
        if let Some(slot) = self.bins.get_mut(bin) {
            *slot += 1;
        }
        self.count += 1;
        if x < reference.min || x > reference.max {
            self.out_of_range += 1;
        }
        self.sum += x;
        self.sum_sq += x * x;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
    }

    /// Adds `other` into `self`. Fails if the two were taken at different bins.
    pub fn merge(&mut self, other: &FeatureSketch) -> Result<(), String> {
        if self.bins.len() != other.bins.len() {
            return Err(format!(
                "cannot merge sketches with {} and {} bins",
                self.bins.len(),
                other.bins.len()
            ));
        }
        for (a, b) in self.bins.iter_mut().zip(&other.bins) {
            *a = a.saturating_add(*b);
        }
        self.count = self.count.saturating_add(other.count);
        self.nan = self.nan.saturating_add(other.nan);
        self.out_of_range = self.out_of_range.saturating_add(other.out_of_range);
        self.sum += other.sum;
        self.sum_sq += other.sum_sq;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        Ok(())
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

/// Sub-buckets per power of two: 8 gives at most 12.5% relative bucket width.
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;

/// A log-linear latency histogram in microseconds (HDR-style, 8 buckets per octave, ≤ 12.5%
/// relative error). Merges by addition.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct LatencyHistogram {
    /// Count per bucket; trailing empty buckets are not stored.
    pub buckets: Vec<u64>,
}

impl LatencyHistogram {
    /// The bucket holding `micros`.
    pub fn bucket_of(micros: u64) -> usize {
        if micros < SUB {
            return micros as usize;
        }
        let exp = 63 - u64::from(micros.leading_zeros());
        let sub = (micros >> (exp - u64::from(SUB_BITS))) & (SUB - 1);
        ((exp - u64::from(SUB_BITS) + 1) * SUB + sub) as usize
    }

    /// The smallest value in bucket `index`.
    pub fn bucket_floor(index: usize) -> u64 {
        let index = index as u64;
        if index < SUB {
            return index;
        }
        let exp = index / SUB + u64::from(SUB_BITS) - 1;
        let sub = index % SUB;
        if exp >= 64 {
            return u64::MAX;
        }
        (SUB + sub) << (exp - u64::from(SUB_BITS))
    }

    pub fn record(&mut self, micros: u64) {
        let bucket = Self::bucket_of(micros);
        if self.buckets.len() <= bucket {
            self.buckets.resize(bucket + 1, 0);
        }
        self.buckets[bucket] += 1;
    }

    pub fn count(&self) -> u64 {
        self.buckets
            .iter()
            .fold(0u64, |acc, c| acc.saturating_add(*c))
    }

    pub fn merge(&mut self, other: &LatencyHistogram) {
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a = a.saturating_add(*b);
        }
    }

    /// The upper bound (exclusive) of the bucket holding quantile `q` (0..=1), in microseconds.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (index, count) in self.buckets.iter().enumerate() {
            seen = seen.saturating_add(*count);
            if seen >= rank {
                return Some(Self::bucket_floor(index + 1));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests;
