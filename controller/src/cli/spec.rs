//! Parsing the `bundle build` inputs: tensor specs, features, golden vectors (JSON) and the
//! reference-statistics CSV.

use std::path::Path;

use anyhow::{Context, Result, bail};
use edgefleet_protocol::TensorName;
use edgefleet_protocol::manifest::{
    DType, FeatureSpec, GoldenVector, NamedTensor, NanPolicy, ReferenceStats, TensorData,
    TensorSpec,
};
use edgefleet_protocol::sketch::ReferenceFeature;
use serde::Deserialize;

fn dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "f64" => DType::F64,
        "i32" => DType::I32,
        "i64" => DType::I64,
        "u8" => DType::U8,
        "i8" => DType::I8,
        "bool" => DType::Bool,
        other => bail!("dtype {other:?} is not one of f32, f64, i32, i64, u8, i8, bool"),
    })
}

/// `name:dtype:dims[:allow-nan]`, dims like `1x576`, `?` for a dynamic dimension.
pub fn tensor_spec(s: &str) -> Result<TensorSpec> {
    let parts: Vec<&str> = s.split(':').collect();
    let (name, dt, dims, nan) = match parts.as_slice() {
        [name, dt, dims] => (name, dt, dims, NanPolicy::Reject),
        [name, dt, dims, "allow-nan"] => (name, dt, dims, NanPolicy::Allow),
        _ => {
            bail!("tensor spec {s:?} is not `name:dtype:dims[:allow-nan]` (e.g. `input:f32:1x576`)")
        }
    };
    let shape =
        dims.split('x')
            .map(|d| match d {
                "?" => Ok(None),
                d => d.parse::<u64>().map(Some).map_err(|_| {
                    anyhow::anyhow!("dimension {d:?} in {s:?} is not a number or `?`")
                }),
            })
            .collect::<Result<Vec<_>>>()?;
    Ok(TensorSpec {
        name: TensorName::new(*name)?,
        dtype: dtype(dt)?,
        shape,
        nan,
    })
}

/// `feature=tensor:index`.
pub fn feature_spec(s: &str) -> Result<FeatureSpec> {
    let (name, rest) = s
        .split_once('=')
        .context("feature spec is not `name=tensor:index`")?;
    let (tensor, index) = rest
        .rsplit_once(':')
        .context("feature spec is not `name=tensor:index`")?;
    Ok(FeatureSpec {
        name: TensorName::new(name)?,
        tensor: TensorName::new(tensor)?,
        index: index
            .parse()
            .with_context(|| format!("feature index {index:?} is not a number"))?,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GoldenTensorJson {
    shape: Vec<u64>,
    data: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GoldenJson {
    inputs: std::collections::BTreeMap<String, GoldenTensorJson>,
    outputs: std::collections::BTreeMap<String, GoldenTensorJson>,
    #[serde(default = "default_tolerance")]
    tolerance: f32,
}

fn default_tolerance() -> f32 {
    1e-4
}

fn tensor_data(dtype: DType, values: &[serde_json::Value]) -> Result<TensorData> {
    let num = |v: &serde_json::Value| v.as_f64().with_context(|| format!("{v} is not a number"));
    let int = |v: &serde_json::Value| v.as_i64().with_context(|| format!("{v} is not an integer"));
    Ok(match dtype {
        DType::F32 => TensorData::F32(
            values
                .iter()
                .map(|v| num(v).map(|x| x as f32))
                .collect::<Result<_>>()?,
        ),
        DType::F64 => TensorData::F64(values.iter().map(num).collect::<Result<_>>()?),
        DType::I32 => TensorData::I32(
            values
                .iter()
                .map(|v| int(v).and_then(|x| Ok(i32::try_from(x)?)))
                .collect::<Result<_>>()?,
        ),
        DType::I64 => TensorData::I64(values.iter().map(int).collect::<Result<_>>()?),
        DType::U8 => TensorData::U8(
            values
                .iter()
                .map(|v| int(v).and_then(|x| Ok(u8::try_from(x)?)))
                .collect::<Result<_>>()?,
        ),
        DType::I8 => TensorData::I8(
            values
                .iter()
                .map(|v| int(v).and_then(|x| Ok(i8::try_from(x)?)))
                .collect::<Result<_>>()?,
        ),
        DType::Bool => TensorData::Bool(
            values
                .iter()
                .map(|v| v.as_bool().with_context(|| format!("{v} is not a boolean")))
                .collect::<Result<_>>()?,
        ),
    })
}

fn named_tensors(
    kind: &str,
    map: &std::collections::BTreeMap<String, GoldenTensorJson>,
    specs: &[TensorSpec],
) -> Result<Vec<NamedTensor>> {
    map.iter()
        .map(|(name, tensor)| {
            let spec = specs
                .iter()
                .find(|s| s.name.as_str() == name)
                .with_context(|| format!("{kind} {name:?} is not declared with --{kind}"))?;
            let data =
                tensor_data(spec.dtype, &tensor.data).with_context(|| format!("{kind} {name}"))?;
            Ok(NamedTensor {
                name: spec.name.clone(),
                shape: tensor.shape.clone(),
                data,
            })
        })
        .collect()
}

/// Reads golden vectors from JSON: `[{"inputs": {"x": {"shape": [1,2], "data": [..]}}, "outputs": {..}, "tolerance": 1e-4}]`.
pub fn golden(
    path: &Path,
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
) -> Result<Vec<GoldenVector>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let vectors: Vec<GoldenJson> = serde_json::from_str(&text)
        .with_context(|| format!("{} is not golden-vector JSON", path.display()))?;
    vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            Ok(GoldenVector {
                inputs: named_tensors("input", &v.inputs, inputs)
                    .with_context(|| format!("golden vector {i}"))?,
                outputs: named_tensors("output", &v.outputs, outputs)
                    .with_context(|| format!("golden vector {i}"))?,
                tolerance: v.tolerance,
            })
        })
        .collect()
}

/// Reference statistics from a CSV with a header row naming features: decile bin edges and
/// proportions per column. Columns must match the declared features (or, with none declared,
/// become features of `default_tensor` at their column index).
pub fn reference(
    path: &Path,
    features: &mut Vec<FeatureSpec>,
    default_tensor: Option<&TensorName>,
) -> Result<ReferenceStats> {
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    let headers: Vec<String> = reader
        .headers()
        .with_context(|| format!("{} has no header row", path.display()))?
        .iter()
        .map(str::to_owned)
        .collect();
    let mut columns: Vec<Vec<f64>> = vec![Vec::new(); headers.len()];
    for (row, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("{}: row {}", path.display(), row + 2))?;
        for (col, field) in record.iter().enumerate() {
            let field = field.trim();
            let value = if field.is_empty() || field.eq_ignore_ascii_case("nan") {
                f64::NAN
            } else {
                field.parse::<f64>().with_context(|| {
                    format!(
                        "{}: row {}, column {}: {field:?} is not a number",
                        path.display(),
                        row + 2,
                        headers[col]
                    )
                })?
            };
            columns[col].push(value);
        }
    }
    if features.is_empty() {
        let tensor = default_tensor.context(
            "the reference CSV needs --feature name=tensor:index when the model has several inputs",
        )?;
        for (index, name) in headers.iter().enumerate() {
            features.push(FeatureSpec {
                name: TensorName::new(name.as_str())?,
                tensor: tensor.clone(),
                index: u32::try_from(index)?,
            });
        }
    }
    let mut out = Vec::new();
    for feature in features.iter() {
        let col = headers
            .iter()
            .position(|h| h == feature.name.as_str())
            .with_context(|| {
                format!(
                    "feature {} has no column in {}",
                    feature.name,
                    path.display()
                )
            })?;
        out.push(
            ReferenceFeature::from_samples(feature.name.clone(), &columns[col])
                .map_err(anyhow::Error::msg)?,
        );
    }
    let sample_count = columns.first().map_or(0, Vec::len) as u64;
    Ok(ReferenceStats {
        sample_count,
        features: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_specs_parse_and_explain_errors() {
        let spec = tensor_spec("state:f32:2x1x128").unwrap();
        assert_eq!(spec.shape, vec![Some(2), Some(1), Some(128)]);
        assert_eq!(
            tensor_spec("x:f32:?x4:allow-nan").unwrap().shape,
            vec![None, Some(4)]
        );
        assert!(
            tensor_spec("x:f16:1")
                .unwrap_err()
                .to_string()
                .contains("f16")
        );
        assert!(tensor_spec("x#y:f32:1").is_err());
        assert!(tensor_spec("save_infer_model/scale_0.tmp_1:f32:1x2").is_ok());
        assert!(
            tensor_spec("x:f32:ax1")
                .unwrap_err()
                .to_string()
                .contains("\"a\"")
        );
    }

    #[test]
    fn reference_csv_gives_decile_bins_per_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ref.csv");
        let mut text = String::from("temp,vibration\n");
        for i in 0..100 {
            text.push_str(&format!("{},{}\n", i, (i % 2) as f64));
        }
        std::fs::write(&path, text).unwrap();
        let mut features = Vec::new();
        let x = TensorName::new("x").unwrap();
        let stats = reference(&path, &mut features, Some(&x)).unwrap();
        assert_eq!(stats.sample_count, 100);
        assert_eq!(features.len(), 2);
        assert_eq!(features[1].index, 1);
        assert_eq!(stats.features[0].edges.len(), 9);
        assert_eq!(stats.features[1].edges, vec![1.0]);
        assert_eq!(stats.features[1].proportions, vec![0.5, 0.5]);

        std::fs::write(&path, "temp\n1\nwarm\n").unwrap();
        let err = reference(&path, &mut Vec::new(), Some(&x)).unwrap_err();
        assert!(
            format!("{err:#}").contains("row 3, column temp: \"warm\" is not a number"),
            "{err:#}"
        );
    }
}
