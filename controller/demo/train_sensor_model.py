#!/usr/bin/env python3
# Copyright The EdgeFleet Authors
# SPDX-License-Identifier: Apache-2.0
"""Trains the EdgeFleet demo model: an anomaly classifier for an industrial pump.

The data are synthetic: four sensor readings driven by two hidden quantities, the
pump's load and its wear. A sample is labelled an anomaly when either of two fault
patterns (bearing overheating, cavitation) holds, with measurement noise blurring
the boundary. A 4-8-1 MLP is trained with full-batch gradient descent in numpy and
exported as ONNX with `onnx.helper`.

    python3 train_sensor_model.py
        writes sensor-anomaly.onnx, reference.csv and metrics.json next to this script

    python3 train_sensor_model.py --shift 0.5 --sample-out drifted.csv --rows 1000
        writes fresh samples (no training) whose temperature and vibration means are
        shifted by 0.5 standard deviations of the training data, for drift demos

Every run with the same arguments writes the same bytes.
"""

import argparse
import json
import os
import sys

# Single-threaded BLAS, so sums are always taken in the same order.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

FEATURES = ["temperature_c", "vibration_rms", "current_a", "pressure_bar"]
SEED = 20240611
N_ROWS = 4000
TEST_FRACTION = 0.2
REFERENCE_ROWS = 1000
HIDDEN = 8
STEPS = 6000
LEARNING_RATE = 0.3
WEIGHT_DECAY = 1e-4
OPSET = 13
IR_VERSION = 8

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_FILE = "sensor-anomaly.onnx"
REFERENCE_FILE = "reference.csv"
METRICS_FILE = "metrics.json"

# Decimal places written to the CSVs, per feature.
DECIMALS = [2, 3, 2, 3]


def generate(rng, n):
    """Returns (x, y): x is [n, 4] raw readings in FEATURES order, y is [n] 0/1."""
    load = rng.normal(0.0, 1.0, n)  # duty relative to nominal, in standard units
    wear = rng.gamma(2.0, 0.5, n)  # bearing/impeller wear, >= 0, right-skewed
    ambient = rng.normal(0.0, 1.0, n)  # ambient temperature swing

    current_a = 11.5 + 1.6 * load + 0.9 * wear + rng.normal(0.0, 0.5, n)
    temperature_c = 48.0 + 4.5 * load + 5.0 * wear + 2.5 * ambient + rng.normal(0.0, 1.5, n)
    vibration_rms = np.exp(np.log(2.2) + 0.12 * load + 0.30 * wear + rng.normal(0.0, 0.18, n))
    pressure_bar = 6.2 + 0.45 * load - 0.35 * wear + rng.normal(0.0, 0.3, n)

    x = np.stack([temperature_c, vibration_rms, current_a, pressure_bar], axis=1)
    # Round as the CSVs do, so the model is trained on exactly what reference.csv holds.
    for j, d in enumerate(DECIMALS):
        x[:, j] = np.round(x[:, j], d)

    # Fault patterns, each positive when both of its conditions hold:
    # bearing overheating (hot and shaking), cavitation (low discharge pressure and shaking).
    bearing = np.minimum((temperature_c - 64.0) / 4.0, (vibration_rms - 3.8) / 0.8)
    cavitation = np.minimum((5.2 - pressure_bar) / 0.35, (vibration_rms - 3.2) / 0.6)
    score = np.maximum(bearing, cavitation) + rng.normal(0.0, 0.5, n)
    y = (score > 0.0).astype(np.float64)
    return x, y


def sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def forward(params, xs):
    w1, b1, w2, b2 = params
    h_pre = xs @ w1 + b1
    h = np.maximum(h_pre, 0.0)
    p = sigmoid(h @ w2 + b2)
    return h_pre, h, p


def train(xs, y, rng):
    """Full-batch gradient descent on mean binary cross-entropy with L2 weight decay."""
    n, d = xs.shape
    w1 = rng.normal(0.0, np.sqrt(2.0 / d), (d, HIDDEN))
    b1 = np.full(HIDDEN, 0.1)
    w2 = rng.normal(0.0, np.sqrt(1.0 / HIDDEN), (HIDDEN, 1))
    b2 = np.zeros(1)
    params = [w1, b1, w2, b2]
    yc = y.reshape(-1, 1)
    for step in range(STEPS):
        h_pre, h, p = forward(params, xs)
        dz2 = (p - yc) / n
        gw2 = h.T @ dz2 + WEIGHT_DECAY * w2
        gb2 = dz2.sum(axis=0)
        dh = (dz2 @ w2.T) * (h_pre > 0.0)
        gw1 = xs.T @ dh + WEIGHT_DECAY * w1
        gb1 = dh.sum(axis=0)
        for param, grad in zip(params, (gw1, gb1, gw2, gb2)):
            param -= LEARNING_RATE * grad
        if step % 1000 == 0 or step == STEPS - 1:
            loss = -np.mean(yc * np.log(p + 1e-12) + (1 - yc) * np.log(1 - p + 1e-12))
            print(f"  step {step:5d}  loss {loss:.4f}")
    return params


def auc(y, score):
    """Area under the ROC curve (Mann-Whitney U), ties counted as half."""
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s))
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2.0 + 1.0
        i = j + 1
    r = np.empty(len(s))
    r[order] = ranks
    pos = y == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def build_onnx(mean, std, params):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1, b1, w2, b2 = (np.asarray(p, dtype=np.float32) for p in params)
    inits = [
        numpy_helper.from_array(np.asarray(mean, dtype=np.float32).reshape(1, 4), "feature_mean"),
        numpy_helper.from_array(np.asarray(std, dtype=np.float32).reshape(1, 4), "feature_std"),
        numpy_helper.from_array(w1, "hidden_weight"),
        numpy_helper.from_array(b1.reshape(1, HIDDEN), "hidden_bias"),
        numpy_helper.from_array(w2, "output_weight"),
        numpy_helper.from_array(b2.reshape(1, 1), "output_bias"),
    ]
    nodes = [
        helper.make_node("Sub", ["features", "feature_mean"], ["centered"], name="center"),
        helper.make_node("Div", ["centered", "feature_std"], ["standardized"], name="scale"),
        helper.make_node("MatMul", ["standardized", "hidden_weight"], ["hidden_mm"], name="hidden_matmul"),
        helper.make_node("Add", ["hidden_mm", "hidden_bias"], ["hidden_pre"], name="hidden_add"),
        helper.make_node("Relu", ["hidden_pre"], ["hidden"], name="hidden_relu"),
        helper.make_node("MatMul", ["hidden", "output_weight"], ["logit_mm"], name="output_matmul"),
        helper.make_node("Add", ["logit_mm", "output_bias"], ["logit"], name="output_add"),
        helper.make_node("Sigmoid", ["logit"], ["anomaly_probability"], name="output_sigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        "sensor_anomaly",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("anomaly_probability", TensorProto.FLOAT, ["batch", 1])],
        initializer=inits,
        doc_string="Pump anomaly classifier. Input columns: " + ", ".join(FEATURES)
        + " (raw units; standardization is in the graph).",
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="edgefleet-demo",
        producer_version="1",
        doc_string="Synthetic industrial-pump sensor anomaly classifier (4-8-1 MLP).",
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {"features": ",".join(FEATURES), "seed": str(SEED)})
    onnx.checker.check_model(model, full_check=True)
    return model


def eval_graph_numpy(model, x):
    """Evaluates the exported graph node by node, in float32, independently of training."""
    from onnx import numpy_helper

    env = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    env["features"] = x.astype(np.float32)
    ops = {
        "Sub": lambda a, b: a - b,
        "Div": lambda a, b: a / b,
        "MatMul": lambda a, b: a @ b,
        "Add": lambda a, b: a + b,
        "Relu": lambda a: np.maximum(a, np.float32(0)),
        "Sigmoid": lambda a: (np.float32(1) / (np.float32(1) + np.exp(-a))).astype(np.float32),
    }
    for node in model.graph.node:
        env[node.output[0]] = ops[node.op_type](*(env[i] for i in node.input))
    return env[model.graph.output[0].name]


def write_csv(path, x):
    with open(path, "w", newline="\n") as f:
        f.write(",".join(FEATURES) + "\n")
        for row in x:
            f.write(",".join(f"{v:.{d}f}" for v, d in zip(row, DECIMALS)) + "\n")


def dataset():
    """The training dataset and its split; also returns the generator, to be used further."""
    rng = np.random.default_rng(SEED)
    x, y = generate(rng, N_ROWS)
    perm = rng.permutation(N_ROWS)
    n_test = int(N_ROWS * TEST_FRACTION)
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return rng, x, y, train_idx, test_idx


def run_train():
    rng, x, y, train_idx, test_idx = dataset()
    x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]

    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    # Store float32 statistics and train on exactly the standardization the graph performs.
    mean32, std32 = mean.astype(np.float32), std.astype(np.float32)

    def standardize(a):
        return (a - mean32.astype(np.float64)) / std32.astype(np.float64)

    print(f"{N_ROWS} rows, {len(train_idx)} train / {len(test_idx)} test, "
          f"anomaly rate {y.mean():.3f} (train {y_train.mean():.3f}, test {y_test.mean():.3f})")
    params = train(standardize(x_train), y_train, rng)

    _, _, p_train = forward(params, standardize(x_train))
    _, _, p_test = forward(params, standardize(x_test))
    p_train, p_test = p_train.ravel(), p_test.ravel()
    train_acc = float(np.mean((p_train >= 0.5) == (y_train == 1)))
    test_acc = float(np.mean((p_test >= 0.5) == (y_test == 1)))
    train_auc, test_auc = auc(y_train, p_train), auc(y_test, p_test)
    baseline = float(max(y_test.mean(), 1 - y_test.mean()))
    print(f"train accuracy {train_acc:.4f}  AUC {train_auc:.4f}")
    print(f"test  accuracy {test_acc:.4f}  AUC {test_auc:.4f}  (always-normal baseline {baseline:.4f})")

    model = build_onnx(mean32, std32, params)

    # Cross-check: the exported graph, run in float32, must reproduce the training predictions.
    p_graph = eval_graph_numpy(model, x).ravel()
    _, _, p_all = forward(params, standardize(x))
    diff = float(np.max(np.abs(p_graph - p_all.ravel())))
    print(f"graph vs training predictions: max |diff| {diff:.2e}")
    if diff > 1e-4:
        sys.exit("the exported graph disagrees with the trained model")

    model_path = os.path.join(HERE, MODEL_FILE)
    with open(model_path, "wb") as f:
        f.write(model.SerializeToString(deterministic=True))

    ref_idx = np.sort(rng.choice(train_idx, size=REFERENCE_ROWS, replace=False))
    write_csv(os.path.join(HERE, REFERENCE_FILE), x[ref_idx])

    metrics = {
        "model": MODEL_FILE,
        "architecture": f"4-{HIDDEN}-1 MLP, ReLU hidden layer, sigmoid output",
        "seed": SEED,
        "n_rows": N_ROWS,
        "n_train": int(len(train_idx)),
        "n_test": int(len(test_idx)),
        "anomaly_rate": round(float(y.mean()), 4),
        "threshold": 0.5,
        "train": {"accuracy": round(train_acc, 4), "auc": round(train_auc, 4)},
        "test": {"accuracy": round(test_acc, 4), "auc": round(test_auc, 4)},
        "accuracy": round(test_acc, 4),
        "auc": round(test_auc, 4),
        "features": [
            {"name": name, "mean": round(float(m), 4), "std": round(float(s), 4)}
            for name, m, s in zip(FEATURES, mean32, std32)
        ],
        "training": {
            "optimizer": "full-batch gradient descent",
            "steps": STEPS,
            "learning_rate": LEARNING_RATE,
            "weight_decay": WEIGHT_DECAY,
            "loss": "binary cross-entropy",
        },
        "reference_rows": REFERENCE_ROWS,
        "onnx": {"opset": OPSET, "ir_version": IR_VERSION},
    }
    with open(os.path.join(HERE, METRICS_FILE), "w", newline="\n") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    for name in (MODEL_FILE, REFERENCE_FILE, METRICS_FILE):
        print(f"wrote {os.path.join(HERE, name)} ({os.path.getsize(os.path.join(HERE, name))} bytes)")


def run_sample(out, rows, shift, seed):
    # The standard deviations are those of the training split (as in metrics.json).
    _, base, _, train_idx, _ = dataset()
    std = base[train_idx].std(axis=0)

    rng = np.random.default_rng(seed)
    x, _ = generate(rng, rows)
    x[:, 0] += shift * std[0]
    x[:, 1] = np.maximum(x[:, 1] + shift * std[1], 0.05)
    for j, d in enumerate(DECIMALS):
        x[:, j] = np.round(x[:, j], d)
    write_csv(out, x)
    print(f"wrote {out}: {rows} rows, seed {seed}, temperature_c and vibration_rms shifted by "
          f"{shift:g} sd ({shift * std[0]:+.2f} C, {shift * std[1]:+.3f} mm/s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shift", type=float, metavar="SIGMA",
                        help="write samples instead of training, with the temperature and "
                             "vibration means shifted by SIGMA training standard deviations "
                             "(vibration is floored at 0.05 mm/s)")
    parser.add_argument("--sample-out", metavar="FILE",
                        help="where --shift writes its samples (default: drifted.csv in the "
                             "current directory)")
    parser.add_argument("--rows", type=int, default=1000, help="rows for --shift (default 1000)")
    parser.add_argument("--seed", type=int, default=SEED + 1,
                        help=f"seed for --shift samples (default {SEED + 1}, not the training seed)")
    args = parser.parse_args()
    if args.shift is None and args.sample_out is not None:
        parser.error("--sample-out needs --shift (use --shift 0 for undrifted samples)")
    if args.shift is not None:
        if args.rows < 1:
            parser.error("--rows must be at least 1")
        run_sample(args.sample_out or "drifted.csv", args.rows, args.shift, args.seed)
    else:
        run_train()


if __name__ == "__main__":
    main()
