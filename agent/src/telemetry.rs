//! Per-window telemetry in the worker: which input elements are features comes from the
//! manifest's schema; each is counted into the manifest's reference bins (plus NaN, out of range
//! and moments). Outputs are sketched too: the argmax class for vector outputs, ten bins over
//! [0, 1] for a single score.

use edgefleet_protocol::TensorName;
use edgefleet_protocol::manifest::{Manifest, NamedTensor};
use edgefleet_protocol::messages::NamedSketch;
use edgefleet_protocol::sketch::{FeatureSketch, ReferenceFeature};

use crate::control::WindowData;

/// Where a feature is read from and the bins it is counted in.
#[derive(Debug, Clone)]
struct Feature {
    tensor: TensorName,
    index: usize,
    reference: ReferenceFeature,
}

/// Accumulates one window.
#[derive(Debug)]
pub struct WindowAcc {
    features: Vec<Feature>,
    score_bins: ReferenceFeature,
    pub data: WindowData,
}

impl WindowAcc {
    pub fn new(manifest: &Manifest) -> Self {
        let features: Vec<Feature> = manifest
            .referenced_features()
            .map(|(spec, reference)| Feature {
                tensor: spec.tensor.clone(),
                index: spec.index as usize,
                reference: reference.clone(),
            })
            .collect();
        let score_bins =
            ReferenceFeature::score_bins(TensorName::new("score").expect("valid name"));
        let mut acc = Self {
            features,
            score_bins,
            data: WindowData::default(),
        };
        acc.reset();
        acc
    }

    /// Starts a new window and returns the finished one.
    pub fn take(&mut self) -> WindowData {
        let done = std::mem::take(&mut self.data);
        self.reset();
        done
    }

    fn reset(&mut self) {
        self.data.features = self
            .features
            .iter()
            .map(|f| NamedSketch {
                name: f.reference.name.clone(),
                sketch: f.reference.sketch(),
            })
            .collect();
        self.data.outputs.clear();
    }

    /// The feature values in one request's inputs (every row of a batch), as (feature, value);
    /// counted with [`WindowAcc::count_features`] once the inputs passed the schema check.
    pub fn feature_values(&self, inputs: &[NamedTensor]) -> Vec<(usize, f64)> {
        let mut values = Vec::new();
        for (i, feature) in self.features.iter().enumerate() {
            let Some(tensor) = inputs.iter().find(|t| t.name == feature.tensor) else {
                continue;
            };
            let width = tensor.shape.last().copied().unwrap_or(1).max(1) as usize;
            for row in tensor.data.to_f64_vec().chunks(width) {
                if let Some(value) = row.get(feature.index) {
                    values.push((i, *value));
                }
            }
        }
        values
    }

    pub fn count_features(&mut self, values: &[(usize, f64)]) {
        for (i, value) in values {
            if let (Some(feature), Some(slot)) =
                (self.features.get(*i), self.data.features.get_mut(*i))
            {
                slot.sketch.observe(&feature.reference, *value);
            }
        }
    }

    /// Counts the features of inputs known to be valid.
    pub fn observe_inputs(&mut self, inputs: &[NamedTensor]) {
        let values = self.feature_values(inputs);
        self.count_features(&values);
    }

    /// Counts one request's outputs.
    pub fn observe_outputs(&mut self, outputs: &[NamedTensor]) {
        for output in outputs {
            let width = output.shape.last().copied().unwrap_or(1).max(1) as usize;
            let values = output.data.to_f64_vec();
            let position = self.data.outputs.iter().position(|s| s.name == output.name);
            let slot = match position {
                Some(i) => &mut self.data.outputs[i],
                None => {
                    let bins = if width > 1 { width } else { 10 };
                    self.data.outputs.push(NamedSketch {
                        name: output.name.clone(),
                        sketch: FeatureSketch::new(bins),
                    });
                    self.data.outputs.last_mut().expect("just pushed")
                }
            };
            for row in values.chunks(width) {
                if width > 1 {
                    // The argmax class of each row, as the bin index.
                    let class = row
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .map_or(0, |(i, _)| i);
                    let classes = ReferenceFeature::class_bins(output.name.clone(), width);
                    slot.sketch.observe(&classes, class as f64);
                } else if let Some(score) = row.first() {
                    slot.sketch.observe(&self.score_bins, *score);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use edgefleet_protocol::manifest::{FeatureSpec, ReferenceStats, TensorData};

    use super::*;

    fn manifest() -> Manifest {
        let mut manifest = Manifest {
            format: 1,
            name: "m".parse().unwrap(),
            version: "1".parse().unwrap(),
            release: 1,
            description: None,
            target: edgefleet_protocol::manifest::Target {
                arch: edgefleet_protocol::Arch::any(),
                min_agent_version: None,
            },
            payloads: vec![],
            runtime: Default::default(),
            inputs: vec![],
            outputs: vec![],
            prediction: None,
            features: vec![],
            golden: vec![],
            reference: None,
            lineage: Default::default(),
            created_at: edgefleet_protocol::Timestamp(0),
            expires: edgefleet_protocol::Timestamp(1),
        };
        let reference = ReferenceFeature::from_samples(
            TensorName::new("temp").unwrap(),
            &(0..100).map(f64::from).collect::<Vec<_>>(),
        )
        .unwrap();
        manifest.features = vec![FeatureSpec {
            name: TensorName::new("temp").unwrap(),
            tensor: TensorName::new("x").unwrap(),
            index: 1,
        }];
        manifest.reference = Some(ReferenceStats {
            sample_count: 100,
            features: vec![reference],
        });
        manifest
    }

    #[test]
    fn features_are_counted_per_row_at_the_reference_bins() {
        let mut acc = WindowAcc::new(&manifest());
        // Two rows of [other, temp]: temps 5 and 95; then a NaN and an out-of-range value.
        acc.observe_inputs(&[NamedTensor {
            name: TensorName::new("x").unwrap(),
            shape: vec![2, 2],
            data: TensorData::F32(vec![0.0, 5.0, 0.0, 95.0]),
        }]);
        acc.observe_inputs(&[NamedTensor {
            name: TensorName::new("x").unwrap(),
            shape: vec![2, 2],
            data: TensorData::F32(vec![0.0, f32::NAN, 0.0, 500.0]),
        }]);
        let window = acc.take();
        let sketch = &window.features[0].sketch;
        assert_eq!(sketch.bins, vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        assert_eq!((sketch.count, sketch.nan, sketch.out_of_range), (3, 1, 1));
        assert_eq!(
            acc.take().features[0].sketch.count,
            0,
            "a new window starts empty"
        );
    }

    #[test]
    fn outputs_are_sketched_by_class_or_score() {
        let mut acc = WindowAcc::new(&manifest());
        acc.observe_outputs(&[
            NamedTensor {
                name: TensorName::new("probs").unwrap(),
                shape: vec![2, 3],
                data: TensorData::F32(vec![0.1, 0.7, 0.2, 0.8, 0.1, 0.1]),
            },
            NamedTensor {
                name: TensorName::new("score").unwrap(),
                shape: vec![1, 1],
                data: TensorData::F32(vec![0.93]),
            },
        ]);
        let window = acc.take();
        assert_eq!(window.outputs[0].sketch.bins, vec![1, 1, 0]);
        assert_eq!(window.outputs[1].sketch.bins[9], 1);
    }
}
