#!/usr/bin/env python3
# Copyright The EdgeFleet Authors
# SPDX-License-Identifier: Apache-2.0
"""Retrains the pump anomaly classifier on captured field data and registers the candidate.

The retraining command of a drift policy: the controller runs it once per drift episode with
the retraining request (JSON) on standard input and EDGEFLEET_URL / EDGEFLEET_TOKEN in the
environment. It

1. downloads the captured samples of the drifted model with `edgefleet capture download` and
   keeps the rows of the devices in the drifted scope (the request's `devices`),
   (waiting, up to --wait-s, until --min-captured rows have been uploaded),
2. trains the demo's 4-8-1 MLP (controller/demo/train_sensor_model.py) on the rows that have
   ground truth; when there are fewer than --min-rows, rows of the original reference are added,
   labelled by the parent model,
3. writes model.onnx, reference.csv (the captured field rows: what the candidate's drift
   detectors compare against), training.csv and metrics.json into --out,
4. registers the candidate with `edgefleet model register ... --candidate-for NAME --parent
   DIGEST --param drift_event=EVENT`, so its lineage names the parent and the drift event and
   the parent's drift policy rolls it out.

    retrain.py --out DIR [--request FILE] [--version X.Y.Z] [-- extra register flags]

Needs Python 3 with numpy and onnx only (Debian: python3-numpy python3-onnx).
"""

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "controller", "demo"))


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def next_version(version):
    """1.0.0 -> 1.1.0: the minor number bumped, the patch reset."""
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        fail(f"cannot derive the next version from {version!r}; pass --version")
    return f"{parts[0]}.{int(parts[1]) + 1}.0"


def edgefleet(cli, args):
    """Runs the edgefleet CLI; returns its standard output."""
    done = subprocess.run([cli, *args], capture_output=True, text=True)
    if done.returncode != 0:
        fail(f"`edgefleet {' '.join(args[:2])}` failed: {done.stderr.strip()}")
    return done.stdout


def captured_rows(cli, digest, devices, features, workdir):
    """(features [n, 4], labels [n] with NaN where no ground truth came back) of the scope."""
    import numpy as np

    path = os.path.join(workdir, "captured.csv")
    edgefleet(cli, ["capture", "download", "--model", digest, "-o", path])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in features if rows and c not in rows[0]]
    if missing:
        fail(f"the captured CSV has no column {missing[0]}; is this the pump model?")
    keep = [r for r in rows if not devices or r["device"] in devices]
    x = np.array([[float(r[c]) for c in features] for r in keep], dtype=np.float64).reshape(-1, len(features))
    y = np.array(
        [float(r["feedback_label"]) if r.get("feedback_label") not in (None, "") else np.nan for r in keep],
        dtype=np.float64,
    )
    return x, y, len(rows)


def read_reference(path, features):
    import numpy as np

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return np.array([[float(r[c]) for c in features] for r in rows], dtype=np.float64)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--request", help="the retraining request JSON (default: standard input)")
    parser.add_argument("--out", required=True, help="directory for the model, reference and metrics")
    parser.add_argument("--version", help="the candidate's version (default: the parent's, minor + 1)")
    parser.add_argument("--edgefleet", default=os.environ.get("EDGEFLEET_CLI", "edgefleet"),
                        help="the edgefleet CLI (default: $EDGEFLEET_CLI or edgefleet on PATH)")
    parser.add_argument("--reference", default=os.path.join(DEMO_DIR, "reference.csv"),
                        help="the original reference sample, for padding")
    parser.add_argument("--parent-onnx", default=os.path.join(DEMO_DIR, "sensor-anomaly.onnx"),
                        help="the parent model, to label padding rows")
    parser.add_argument("--min-rows", type=int, default=300,
                        help="labelled rows below which reference rows are added (default 300)")
    parser.add_argument("--min-captured", type=int, default=500,
                        help="captured rows of the drifted devices to wait for (default 500)")
    parser.add_argument("--wait-s", type=float, default=300,
                        help="how long to wait for them before training on what there is (default 300)")
    parser.add_argument("--steps", type=int, default=3000, help="gradient steps (default 3000)")
    parser.add_argument("register_args", nargs="*", help="extra flags for `edgefleet model register`")
    args = parser.parse_args()

    sys.path.insert(0, DEMO_DIR)
    import numpy as np
    import onnx
    import train_sensor_model as demo

    text = open(args.request).read() if args.request else sys.stdin.read()
    try:
        request = json.loads(text)
        event = request["drift_event"]["event"]
        model = request["model"]
        name, version, digest = model["name"], model["version"], model["digest"]
    except (ValueError, KeyError, TypeError) as err:
        fail(f"the retraining request is not the controller's JSON ({err}); pipe it in or pass --request")
    devices = set(request.get("devices") or [])
    if not request.get("capture"):
        fail("data capture is off on the drifted devices; turn it on with `edgefleet capture enable DEVICE`")
    os.makedirs(args.out, exist_ok=True)

    features = demo.FEATURES
    deadline = time.monotonic() + args.wait_s
    while True:
        x, y, total = captured_rows(args.edgefleet, digest, devices, features, args.out)
        if len(x) >= args.min_captured or time.monotonic() >= deadline:
            break
        print(f"{len(x)} of {args.min_captured} captured rows so far; waiting for more uploads")
        time.sleep(2)
    labelled = ~np.isnan(y)
    print(f"drift event {event}: {len(x)} captured rows of {total} from {len(devices)} device(s), "
          f"{int(labelled.sum())} with ground truth")
    if len(x) == 0:
        fail("no captured rows from the drifted devices yet; wait for their uploads and run again")

    x_train, y_train = x[labelled], y[labelled]
    padded = 0
    if len(x_train) < args.min_rows:
        reference = read_reference(args.reference, features)
        parent = onnx.load(args.parent_onnx)
        need = min(args.min_rows - len(x_train), len(reference))
        rng = np.random.default_rng(demo.SEED + 2)
        pad = reference[np.sort(rng.choice(len(reference), size=need, replace=False))]
        pad_y = (demo.eval_graph_numpy(parent, pad).ravel() >= 0.5).astype(np.float64)
        x_train, y_train = np.concatenate([x_train, pad]), np.concatenate([y_train, pad_y])
        padded = need
        print(f"added {need} reference rows labelled by the parent model")

    rng = np.random.default_rng(demo.SEED + 3)
    order = rng.permutation(len(x_train))
    n_test = max(1, len(order) // 5)
    test, train = order[:n_test], order[n_test:]
    mean32 = x_train[train].mean(axis=0).astype(np.float32)
    std32 = np.maximum(x_train[train].std(axis=0), 1e-6).astype(np.float32)

    def standardize(a):
        return (a - mean32.astype(np.float64)) / std32.astype(np.float64)

    demo.STEPS = args.steps
    params = demo.train(standardize(x_train[train]), y_train[train], rng)
    _, _, p_test = demo.forward(params, standardize(x_train[test]))
    accuracy = float(np.mean((p_test.ravel() >= 0.5) == (y_train[test] == 1)))
    parent_accuracy = float(np.mean(
        (demo.eval_graph_numpy(onnx.load(args.parent_onnx), x_train[test]).ravel() >= 0.5) == (y_train[test] == 1)
    ))
    print(f"held-out accuracy {accuracy:.4f} (parent model on the same rows {parent_accuracy:.4f})")

    candidate = demo.build_onnx(mean32, std32, params)
    model_path = os.path.join(args.out, "model.onnx")
    with open(model_path, "wb") as f:
        f.write(candidate.SerializeToString(deterministic=True))
    reference_path = os.path.join(args.out, "reference.csv")
    demo.write_csv(reference_path, x)
    training_path = os.path.join(args.out, "training.csv")
    demo.write_csv(training_path, x_train)
    metrics = {
        "drift_event": event, "parent": digest, "captured_rows": int(len(x)),
        "labelled_rows": int(labelled.sum()), "padded_rows": padded,
        "accuracy": round(accuracy, 4), "parent_accuracy": round(parent_accuracy, 4),
    }
    with open(os.path.join(args.out, "metrics.json"), "w", newline="\n") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")

    new_version = args.version or next_version(version)
    registered = edgefleet(args.edgefleet, [
        "model", "register", model_path, "--name", name, "--version", new_version,
        "--reference", reference_path, "--training-data", training_path,
        "--candidate-for", name, "--parent", digest,
        "--param", f"drift_event={event}", "--param", f"steps={args.steps}",
        "--metric", f"accuracy={accuracy:.4f}", "--metric", f"parent_accuracy={parent_accuracy:.4f}",
        *args.register_args, "--output", "json",
    ])
    try:
        answer = json.load(io.StringIO(registered))
    except ValueError:
        fail(f"`edgefleet model register` printed no JSON: {registered[:200]}")
    rollout = answer.get("auto_rollout") or {}
    started = f", rollout {rollout.get('rollout')}" if rollout.get("started") else ""
    print(f"registered {name} {new_version} ({answer.get('digest', '?')[:12]}) as candidate for {name}{started}")


if __name__ == "__main__":
    main()
