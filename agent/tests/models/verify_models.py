"""Check the fixtures written by make_models.py and print the values quoted in README.md.

    python3 -m pip install onnx==1.23.2 numpy onnxruntime==1.32.0 tract==0.23.9
    python3 verify_models.py            # onnx.checker + onnxruntime + tract (if installed)
    python3 verify_models.py --huge     # also load/run huge_alloc / huge_expand in tract,
                                        # each in a child process capped at 4 GB of address space

`tract` is the official Python binding of tract (same 0.23.9 engine the agent links), used
here only to confirm how the Rust runtime treats each fixture. huge_alloc / huge_expand are
never run in onnxruntime (they would try to allocate 160 GB).
"""

import os
import resource
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = [
    "scale_f32.onnx", "reshape6.onnx", "broadcast6.onnx", "huge_alloc.onnx", "huge_expand.onnx",
    "if_op.onnx", "det_unsupported.onnx", "classifier3.onnx", "classifier3_b.onnx",
]
CLASSIFIER_INPUTS = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 2, 3], [0.5, -1.0, 2.0]]

# (file, list of (label, inputs)) run with both runtimes
CASES = [
    ("scale_f32.onnx", [("x=[[1,1,1,1]]", [np.ones((1, 4), np.float32)]),
                        ("x=[[0.5,-1,2,10]]", [np.array([[0.5, -1, 2, 10]], np.float32)])]),
    ("reshape6.onnx", [("n=6", [np.arange(6, dtype=np.float32)]),
                       ("n=5", [np.arange(5, dtype=np.float32)])]),
    ("broadcast6.onnx", [("n=6", [np.arange(6, dtype=np.float32)]),
                         ("n=5", [np.arange(5, dtype=np.float32)])]),
    ("if_op.onnx", [("c=true", [np.array(True)]), ("c=false", [np.array(False)])]),
    ("det_unsupported.onnx", [("x=[[1,2],[3,4]]", [np.array([[1, 2], [3, 4]], np.float32)])]),
] + [
    (f, [(f"x=[{x}]", [np.array([x], np.float32)]) for x in CLASSIFIER_INPUTS])
    for f in ("classifier3.onnx", "classifier3_b.onnx")
]


def fmt(arr):
    return "[" + ", ".join(repr(float(v)) for v in np.asarray(arr).ravel()) + "]"


def first_line(e):
    return " | ".join(str(e).split("\n")[:4])[:300]


def run_ort():
    print("== onnx.checker")
    for f in FILES:
        onnx.checker.check_model(onnx.load(os.path.join(HERE, f)), full_check=True)
        print("ok", f)
    print("== onnxruntime", ort.__version__)
    for f, cases in CASES:
        so = ort.SessionOptions()
        so.log_severity_level = 4  # keep the expected kernel errors out of stderr
        s = ort.InferenceSession(os.path.join(HERE, f), so, providers=["CPUExecutionProvider"])
        names = [i.name for i in s.get_inputs()]
        for label, inputs in cases:
            try:
                out = s.run(None, dict(zip(names, inputs)))[0]
                extra = f" argmax={int(out.argmax())}" if f.startswith("classifier") else ""
                print(f"{f} {label} -> {out.dtype}{list(out.shape)} {fmt(out)}{extra}")
            except Exception as e:  # noqa: BLE001
                print(f"{f} {label} -> ERROR {type(e).__name__}: {first_line(e)}")


def tract_load(tract, path):
    return tract.onnx().load(path).into_model().into_runnable()


def run_tract():
    try:
        import tract
    except ImportError:
        print("== tract python binding not installed; skipping")
        return
    print("== tract", tract.version())
    for f, cases in CASES:
        try:
            r = tract_load(tract, os.path.join(HERE, f))
        except Exception as e:  # noqa: BLE001
            print(f"{f} LOAD/OPTIMISE ERROR: {first_line(e)}")
            continue
        for label, inputs in cases:
            # Warning: tract does not check every runtime shape (e.g. Gather out of range panics);
            # only cases known to return a clean error are listed in CASES.
            try:
                out = r.run(inputs)[0].to_numpy()
                print(f"{f} {label} -> {out.dtype}{list(out.shape)} {fmt(out)}")
            except Exception as e:  # noqa: BLE001
                print(f"{f} {label} -> ERROR: {first_line(e)}")


def huge_child(name):
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    import tract
    print("load+optimise", name, flush=True)
    r = tract_load(tract, os.path.join(HERE, name))
    print("optimised OK; run", flush=True)
    r.run([np.ones((1,), np.float32)])
    print("run OK (unexpected)", flush=True)


def run_huge():
    for name in ("huge_alloc.onnx", "huge_expand.onnx"):
        p = subprocess.run([sys.executable, __file__, "--huge-child", name],
                           capture_output=True, text=True, timeout=300)
        lines = [l for l in (p.stdout + p.stderr).splitlines()
                 if "failed to allocate" in l or "optimised" in l or "load+" in l or "run OK" in l]
        print(f"{name}: exit code {p.returncode}; " + " / ".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--huge-child":
        huge_child(sys.argv[2])
    else:
        run_ort()
        run_tract()
        if "--huge" in sys.argv:
            run_huge()
