//! Parsing the `bundle build` flags: tensor specs and features. The reference CSV and golden
//! JSON are parsed by [`crate::release`].

use anyhow::{Context, Result, bail};
use edgefleet_protocol::TensorName;
use edgefleet_protocol::manifest::{DType, FeatureSpec, NanPolicy, TensorSpec};

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

/// `name:dtype:dims[:allow-nan]`, dims like `1x576`, `?` for a dynamic dimension, empty for a
/// scalar.
pub fn tensor_spec(s: &str) -> Result<TensorSpec> {
    let parts: Vec<&str> = s.split(':').collect();
    let (name, dt, dims, nan) = match parts.as_slice() {
        [name, dt, dims] => (name, dt, dims, NanPolicy::Reject),
        [name, dt, dims, "allow-nan"] => (name, dt, dims, NanPolicy::Allow),
        _ => {
            bail!("tensor spec {s:?} is not `name:dtype:dims[:allow-nan]` (e.g. `input:f32:1x576`)")
        }
    };
    // An empty dims part declares a scalar.
    let shape =
        dims.split('x')
            .filter(|_| !dims.is_empty())
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
        assert!(tensor_spec("c:bool:").unwrap().shape.is_empty());
        assert!(tensor_spec("x#y:f32:1").is_err());
        assert!(tensor_spec("save_infer_model/scale_0.tmp_1:f32:1x2").is_ok());
        assert!(
            tensor_spec("x:f32:ax1")
                .unwrap_err()
                .to_string()
                .contains("\"a\"")
        );
    }
}
