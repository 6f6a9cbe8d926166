"""Generate the tiny ONNX test fixtures used by the EdgeFleet agent tests.

Regenerate (from this directory):

    python3 -m pip install onnx==1.23.2 numpy && python3 make_models.py

Every model is built with the `onnx` helper API (opset 13, ir_version 8 so
that older readers such as tract-onnx 0.23.9 accept it), written next to this
script, and its sha256 is printed. With onnx==1.23.2 the output bytes are
deterministic, so the sha256 values in README.md should be reproduced exactly.

Models
------
scale_f32.onnx
    x: float32 [1,4] -> y: float32 [1,4], y = x * [1,2,3,4] (Mul with an
    initializer). Tiny tabular model with exactly known outputs.
reshape6.onnx
    x: float32 ["n"] (one dynamic dim) -> Reshape to constant [2,3] ->
    y: float32 [2,3]. Works only when n == 6, fails at run time otherwise
    (fixture for "runtime errors drive an error-rate breach") -- in
    onnxruntime. CAUTION: tract-onnx 0.23.9 rejects it already at
    analysis/optimisation time ("Reshape volume mismatch ... [Sym(n)] vs
    [2,3]") because it cannot prove n == 6; use broadcast6.onnx for a tract
    run-time error.
broadcast6.onnx
    x: float32 ["n"] -> y: float32 [6] = x + zeros(6). Loads and optimises in
    tract with n symbolic; n == 6 works, n == 5 (any n not in {1, 6}) fails
    at run time with a clean error ("Can not broadcast 5 against 6") in both
    tract and onnxruntime. n == 1 also works (ONNX broadcasting).
huge_alloc.onnx
    x: float32 [1] -> y: float32 [200000,200000] =
    ConstantOfShape([200000,200000], value=1.0) * x. Materialising y needs
    160 GB (fixture for "a model that exhausts memory must not take the agent
    down"). Never run it in a process you care about. NOTE: tract
    constant-folds ConstantOfShape while typing/decluttering, so the 160 GB
    allocation happens at model LOAD/optimise time, not at run time.
huge_expand.onnx
    x: float32 [1] -> y: float32 [200000,200000] = Expand(x, [200000,200000]).
    Same 160 GB output, but the allocation depends on the input, so tract
    loads and optimises it fine and the allocation happens at RUN time.
if_op.onnx
    c: bool [] -> y: float32 [1], an ONNX `If` node whose then/else branches
    are Constants [1.0] / [2.0]. NOTE: tract-onnx 0.23.9 DOES implement `If`
    (it loads, optimises and returns [1.0] / [2.0]), so this is not a negative
    fixture for tract; use det_unsupported.onnx for that.
det_unsupported.onnx
    x: float32 [2,2] -> y: float32 [] = Det(x). `Det` is not registered in
    tract-onnx 0.23.9, so the model loads but fails to type / optimise: the
    negative fixture for "an op tract cannot run". onnxruntime runs it.
classifier3.onnx / classifier3_b.onnx
    x: float32 [1,3] -> probs: float32 [1,3] = Softmax(x @ W + b, axis=-1).
    The two files differ only in W, so their argmax disagrees for some inputs
    (fixture for shadow-model argmax agreement).
"""

import hashlib
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
OPSET = 13
IR_VERSION = 8


def finish(graph, filename):
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="edgefleet-make_models",
        producer_version="1",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    path = os.path.join(HERE, filename)
    data = model.SerializeToString()
    with open(path, "wb") as f:
        f.write(data)
    print(f"{hashlib.sha256(data).hexdigest()}  {filename}  ({len(data)} bytes)")


def scale_f32():
    scale = numpy_helper.from_array(
        np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32), name="scale"
    )
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["y"], name="mul")],
        "scale_f32",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[scale],
    )
    finish(graph, "scale_f32.onnx")


def reshape6():
    shape = numpy_helper.from_array(np.array([2, 3], dtype=np.int64), name="shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")],
        "reshape6",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[shape],
    )
    finish(graph, "reshape6.onnx")


def broadcast6():
    zeros = numpy_helper.from_array(np.zeros(6, dtype=np.float32), name="zeros6")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "zeros6"], ["y"], name="add")],
        "broadcast6",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6])],
        initializer=[zeros],
    )
    finish(graph, "broadcast6.onnx")


def huge_alloc():
    shape = numpy_helper.from_array(
        np.array([200000, 200000], dtype=np.int64), name="big_shape"
    )
    nodes = [
        helper.make_node(
            "ConstantOfShape",
            ["big_shape"],
            ["ones"],
            name="const_of_shape",
            value=helper.make_tensor("value", TensorProto.FLOAT, [1], [1.0]),
        ),
        helper.make_node("Mul", ["ones", "x"], ["y"], name="mul"),
    ]
    graph = helper.make_graph(
        nodes,
        "huge_alloc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [200000, 200000])],
        initializer=[shape],
    )
    finish(graph, "huge_alloc.onnx")


def huge_expand():
    shape = numpy_helper.from_array(
        np.array([200000, 200000], dtype=np.int64), name="big_shape"
    )
    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "big_shape"], ["y"], name="expand")],
        "huge_expand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [200000, 200000])],
        initializer=[shape],
    )
    finish(graph, "huge_expand.onnx")


def _const_branch(name, value):
    node = helper.make_node(
        "Constant",
        [],
        [f"{name}_out"],
        name=f"{name}_const",
        value=helper.make_tensor(f"{name}_value", TensorProto.FLOAT, [1], [value]),
    )
    return helper.make_graph(
        [node],
        name,
        [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1])],
    )


def if_op():
    node = helper.make_node(
        "If",
        ["c"],
        ["y"],
        name="if",
        then_branch=_const_branch("then_branch", 1.0),
        else_branch=_const_branch("else_branch", 2.0),
    )
    graph = helper.make_graph(
        [node],
        "if_op",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    finish(graph, "if_op.onnx")


def det_unsupported():
    graph = helper.make_graph(
        [helper.make_node("Det", ["x"], ["y"], name="det")],
        "det_unsupported",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    finish(graph, "det_unsupported.onnx")


def classifier(filename, weights):
    w = numpy_helper.from_array(np.array(weights, dtype=np.float32), name="W")
    b = numpy_helper.from_array(np.array([0.1, -0.2, 0.05], dtype=np.float32), name="b")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["logits_nobias"], name="matmul"),
        helper.make_node("Add", ["logits_nobias", "b"], ["logits"], name="add"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        filename.rsplit(".", 1)[0],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 3])],
        initializer=[w, b],
    )
    finish(graph, filename)


# classifier3: roughly "class k wins when x[k] is largest", skewed so it is not the identity.
W_A = [
    [2.0, -1.0, 0.5],
    [-0.5, 1.5, -1.0],
    [0.25, 0.5, 1.0],
]
# classifier3_b: columns permuted/rescaled so argmax differs for some inputs.
W_B = [
    [-1.0, 2.0, 0.5],
    [1.5, -0.5, -1.0],
    [0.5, 0.25, 1.0],
]


def main():
    scale_f32()
    reshape6()
    broadcast6()
    huge_alloc()
    huge_expand()
    if_op()
    det_unsupported()
    classifier("classifier3.onnx", W_A)
    classifier("classifier3_b.onnx", W_B)


if __name__ == "__main__":
    main()
