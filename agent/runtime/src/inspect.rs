//! Reading what an ONNX file declares (inputs, outputs, operators, opset) from its protobuf,
//! without building a tract model: the checks that run before a model is loaded.

use std::collections::BTreeSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use edgefleet_protocol::TensorName;
use edgefleet_protocol::manifest::{DType, NanPolicy, TensorSpec};
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::dimension::Value as Dim;
use tract_onnx::pb::{self, ModelProto};
use tract_onnx::prelude::*;

use crate::{RuntimeError, UNSUPPORTED_OPS, panic_message};

/// What a model file declares, read from its ONNX graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// Graph inputs that are not initializers, in graph order; `None` marks a dynamic or
    /// symbolic dimension. NaN policy is [`NanPolicy::Reject`].
    pub inputs: Vec<TensorSpec>,
    /// Graph outputs, in graph order.
    pub outputs: Vec<TensorSpec>,
    /// Every operator type the graph uses, subgraphs (`If`/`Loop`/`Scan` bodies) included.
    pub ops: BTreeSet<String>,
    /// Operators tract-onnx does not implement, with the first node using each. Loading fails
    /// when such a node is reachable from an output.
    pub unimplemented: Vec<OpUse>,
    /// Version of the default (`ai.onnx`) operator set, if the model imports it.
    pub opset: Option<i64>,
    pub ir_version: i64,
    /// `producer_name producer_version`, as the exporter wrote it (may be empty).
    pub producer: String,
    /// Files the model reads tensor data from (ONNX external data), relative to its directory.
    pub external_data: BTreeSet<String>,
}

/// One operator type and the (first) node that uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpUse {
    pub op: String,
    pub node: String,
}

/// Decodes the ONNX protobuf; never panics.
fn read_proto(path: &Path) -> Result<ModelProto, RuntimeError> {
    let proto = catch_unwind(|| onnx().proto_model_for_path(path))
        .map_err(|p| RuntimeError::Panic(panic_message(p)))?
        .map_err(|err| {
            RuntimeError::Load(format!(
                "{} is not a readable ONNX file ({err:#}); upload the .onnx file the exporter wrote",
                path.display()
            ))
        })?;
    if proto.graph.is_none() {
        return Err(RuntimeError::Load(format!(
            "{} is not an ONNX model: it has no graph (an empty, truncated or non-ONNX file)",
            path.display()
        )));
    }
    Ok(proto)
}

/// The name tract gives a node: its name, else its first output, else its position.
fn node_label(node: &pb::NodeProto, position: usize) -> String {
    if !node.name.is_empty() {
        node.name.clone()
    } else if let Some(output) = node.output.first().filter(|o| !o.is_empty()) {
        output.clone()
    } else {
        format!("#{position} ({})", node.op_type)
    }
}

/// The operators and external-data files of the graph and all its subgraphs. Refuses the
/// first node that uses one of [`UNSUPPORTED_OPS`].
struct GraphWalk {
    ops: BTreeSet<String>,
    unimplemented: Vec<OpUse>,
    external_data: BTreeSet<String>,
}

/// Records where a tensor's data lives when it is external (read by tract at load time).
fn collect_external(tensor: &pb::TensorProto, out: &mut BTreeSet<String>) {
    if tensor.data_location == Some(pb::tensor_proto::DataLocation::External as i32) {
        let location = tensor
            .external_data
            .iter()
            .find(|e| e.key == "location")
            .map_or_else(String::new, |e| e.value.clone());
        out.insert(location);
    }
}

fn walk(proto: &ModelProto) -> Result<GraphWalk, RuntimeError> {
    let registered = onnx().op_register;
    let mut walk = GraphWalk {
        ops: BTreeSet::new(),
        unimplemented: Vec::new(),
        external_data: BTreeSet::new(),
    };
    let mut stack: Vec<&pb::GraphProto> = proto.graph.iter().collect();
    while let Some(graph) = stack.pop() {
        for tensor in &graph.initializer {
            collect_external(tensor, &mut walk.external_data);
        }
        for (position, node) in graph.node.iter().enumerate() {
            if UNSUPPORTED_OPS.contains(&node.op_type.as_str()) {
                return Err(RuntimeError::UnsupportedOp {
                    op: node.op_type.clone(),
                    node: node_label(node, position),
                });
            }
            if walk.ops.insert(node.op_type.clone()) && !registered.0.contains_key(&node.op_type) {
                walk.unimplemented.push(OpUse {
                    op: node.op_type.clone(),
                    node: node_label(node, position),
                });
            }
            for attribute in &node.attribute {
                stack.extend(attribute.g.as_ref());
                stack.extend(attribute.graphs.iter());
                for tensor in attribute.t.iter().chain(&attribute.tensors) {
                    collect_external(tensor, &mut walk.external_data);
                }
            }
        }
    }
    Ok(walk)
}

/// Refuses models that use an operator in [`UNSUPPORTED_OPS`] (in any subgraph too), naming the
/// operator and the node.
pub fn check_ops(path: &Path) -> Result<(), RuntimeError> {
    walk(&read_proto(path)?).map(|_| ())
}

/// Reads a model's declared inputs, outputs, operators and opset, refusing unsupported
/// operators and element types first. Does not build or run the model; never panics.
pub fn inspect(path: &Path) -> Result<ModelInfo, RuntimeError> {
    let proto = read_proto(path)?;
    catch_unwind(AssertUnwindSafe(|| inspect_proto(&proto)))
        .map_err(|p| RuntimeError::Panic(panic_message(p)))?
}

fn inspect_proto(proto: &ModelProto) -> Result<ModelInfo, RuntimeError> {
    let walk = walk(proto)?;
    let Some(graph) = proto.graph.as_ref() else {
        return Err(RuntimeError::Load(String::from(
            "the ONNX file has no graph",
        )));
    };
    let initializers: BTreeSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs = graph
        .input
        .iter()
        .filter(|i| !initializers.contains(i.name.as_str()))
        .map(|i| tensor_spec("input", i))
        .collect::<Result<Vec<_>, _>>()?;
    let outputs = graph
        .output
        .iter()
        .map(|o| tensor_spec("output", o))
        .collect::<Result<Vec<_>, _>>()?;
    let opset = proto
        .opset_import
        .iter()
        .find(|import| import.domain.is_empty() || import.domain == "ai.onnx")
        .map(|import| import.version);
    let producer = format!("{} {}", proto.producer_name, proto.producer_version)
        .trim()
        .to_owned();
    Ok(ModelInfo {
        inputs,
        outputs,
        ops: walk.ops,
        unimplemented: walk.unimplemented,
        opset,
        ir_version: proto.ir_version,
        producer,
        external_data: walk.external_data,
    })
}

/// The protocol type of an ONNX element type, or `None` when the protocol cannot carry it.
fn dtype_of(elem_type: i32) -> Option<DType> {
    Some(match DataType::try_from(elem_type).ok()? {
        DataType::Float => DType::F32,
        DataType::Double => DType::F64,
        DataType::Int32 => DType::I32,
        DataType::Int64 => DType::I64,
        DataType::Uint8 => DType::U8,
        DataType::Int8 => DType::I8,
        DataType::Bool => DType::Bool,
        _ => return None,
    })
}

fn tensor_spec(kind: &'static str, info: &pb::ValueInfoProto) -> Result<TensorSpec, RuntimeError> {
    let name = TensorName::new(info.name.as_str()).map_err(|err| {
        RuntimeError::Schema(format!(
            "model {kind} {:?} has a name EdgeFleet cannot use ({err}); rename it in the export",
            info.name
        ))
    })?;
    let Some(pb::type_proto::Value::TensorType(tensor)) =
        info.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Err(RuntimeError::Schema(format!(
            "model {kind} `{name}` is not a tensor (sequence, map and optional types are not supported); export it as a tensor"
        )));
    };
    let dtype = dtype_of(tensor.elem_type).ok_or_else(|| RuntimeError::UnsupportedDtype {
        kind,
        tensor: name.to_string(),
        dtype: DataType::try_from(tensor.elem_type).map_or_else(
            |_| format!("#{}", tensor.elem_type),
            |dt| dt.as_str_name().to_owned(),
        ),
    })?;
    let Some(shape) = tensor.shape.as_ref() else {
        return Err(RuntimeError::Schema(format!(
            "model {kind} `{name}` declares no shape (unknown rank); declare the {kind} explicitly"
        )));
    };
    let shape = shape
        .dim
        .iter()
        .map(|dim| match dim.value {
            Some(Dim::DimValue(n)) => u64::try_from(n).ok(),
            _ => None,
        })
        .collect();
    Ok(TensorSpec {
        name,
        dtype,
        shape,
        nan: NanPolicy::Reject,
    })
}
