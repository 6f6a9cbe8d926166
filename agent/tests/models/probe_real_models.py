"""Reproduce the "Real models fetched at test time" facts in README.md.

    python3 -m pip install onnx==1.23.2 numpy onnxruntime==1.32.0   # tract==0.23.9 optional
    python3 -m pip download --no-deps rapidocr-onnxruntime==1.4.4 -d /tmp/rapidocr
    python3 -m pip download --no-deps silero-vad==6.2.3 -d /tmp/silero
    (cd /tmp/rapidocr && unzip -o rapidocr_onnxruntime-1.4.4-py3-none-any.whl \
        rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx)
    (cd /tmp/silero && unzip -o silero_vad-6.2.3-py3-none-any.whl \
        silero_vad/data/silero_vad_openvino_16k.onnx)
    python3 probe_real_models.py \
        /tmp/rapidocr/rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx \
        /tmp/silero/silero_vad/data/silero_vad_openvino_16k.onnx

Nothing here is committed model data; the models are fetched from PyPI wheels.
"""

import hashlib
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

SR = 16000


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def describe(path):
    m = onnx.load(path)
    inits = {i.name for i in m.graph.initializer}

    def vi(v):
        t = v.type.tensor_type
        dims = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim]
        return f"{v.name!r} {TensorProto.DataType.Name(t.elem_type)} {dims}"

    print(f"  file {path}: {os.path.getsize(path)} bytes, sha256 {sha256(path)}")
    print(f"  ir_version {m.ir_version}, opsets {[(o.domain, o.version) for o in m.opset_import]},"
          f" producer {m.producer_name!r}")
    print("  inputs:", "; ".join(vi(v) for v in m.graph.input if v.name not in inits))
    print("  outputs:", "; ".join(vi(v) for v in m.graph.output))


def session(path):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- signals
def sawtooth_signal(noise=True):
    """0.5 s zeros | 1.0 s 0.5*saw220*env4 (+ uniform[-0.05,0.05) noise, rng seed 7) | 0.5 s zeros."""
    t = np.arange(SR, dtype=np.float64) / SR
    saw = 2.0 * np.mod(220.0 * t, 1.0) - 1.0                     # 220 Hz sawtooth, [-1, 1)
    env = 0.5 * (1.0 - np.cos(2.0 * np.pi * 4.0 * t))            # 4 Hz raised-cosine envelope
    voiced = 0.5 * saw * env
    if noise:
        voiced = voiced + np.random.default_rng(7).uniform(-0.05, 0.05, SR)
    sil = np.zeros(SR // 2)
    return np.concatenate([sil, voiced, sil]).astype(np.float32)


def resonator(x, f, bw):
    """Two-pole resonator: y[i] = x[i] + 2 r cos(th) y[i-1] - r^2 y[i-2]."""
    r = np.exp(-np.pi * bw / SR)
    a1, a2 = 2.0 * r * np.cos(2.0 * np.pi * f / SR), -r * r
    y = np.zeros_like(x)
    y1 = y2 = 0.0
    for i, v in enumerate(x):
        y0 = v + a1 * y1 + a2 * y2
        y[i] = y0
        y2, y1 = y1, y0
    return y


def vowel_signal():
    """Deterministic (no RNG) formant-synthesised /a/ that Silero does classify as speech."""
    t = np.arange(SR, dtype=np.float64) / SR
    f0 = 120.0 + 30.0 * 0.5 * (1.0 - np.cos(2.0 * np.pi * 1.0 * t))   # pitch 120 -> 150 -> 120 Hz
    phase = np.cumsum(f0) / SR
    x = np.diff(np.floor(phase), prepend=0.0)                         # glottal impulse train
    for f, bw in ((700.0, 80.0), (1220.0, 90.0), (2600.0, 120.0)):
        x = resonator(x, f, bw)
    x = x / np.max(np.abs(x))
    env = 0.5 * (1.0 - np.cos(2.0 * np.pi * 4.0 * t))
    sil = np.zeros(SR // 2)
    return np.concatenate([sil, 0.5 * x * env, sil]).astype(np.float32)


def silero_frames(run, sig):
    """512-sample frames, each prefixed by the previous 64 samples (zeros for frame 0); state carried."""
    state = np.zeros((2, 1, 128), np.float32)
    ctx = np.zeros(64, np.float32)
    probs = []
    for i in range(len(sig) // 512):  # 2 s -> 62 full frames; trailing 256 samples are dropped
        frame = sig[i * 512:(i + 1) * 512]
        out, state = run(np.concatenate([ctx, frame])[None, :].astype(np.float32), state)
        probs.append(round(float(np.asarray(out).ravel()[0]), 3))
        ctx = frame[-64:]
    return probs


# ---------------------------------------------------------------- probes
def probe_ppocr(path):
    print("== PP-OCR ch_ppocr_mobile_v2.0_cls_infer")
    describe(path)
    x = np.full((1, 3, 48, 192), 0.5, np.float32)
    y = session(path).run(None, {"x": x})[0]
    print("  onnxruntime all-0.5 [1,3,48,192] ->", y.dtype, list(y.shape), [repr(float(v)) for v in y.ravel()])
    try:
        import tract
    except ImportError:
        return
    im = tract.onnx().load(path)
    im.set_input_fact(0, "1,3,48,192,f32")  # required: the declared input shape is [-1,3,?,?]
    r = im.into_model().into_runnable()
    y = r.run([x])[0].to_numpy()
    print("  tract (input fact 1,3,48,192,f32) ->", [repr(float(v)) for v in y.ravel()])


def probe_silero(path):
    print("== Silero VAD silero_vad_openvino_16k")
    describe(path)
    s = session(path)

    def run_ort(inp, state):
        return s.run(["output", "stateN"], {"input": inp, "state": state})

    out, st = run_ort(np.zeros((1, 576), np.float32), np.zeros((2, 1, 128), np.float32))
    print("  zeros: output", repr(float(out.ravel()[0])), "stateN.flat[:4]", [repr(float(v)) for v in st.ravel()[:4]])
    runners = [("onnxruntime", run_ort)]
    try:
        import tract

        r = tract.onnx().load(path).into_model().into_runnable()
        runners.append(("tract", lambda inp, state: [t.to_numpy() for t in r.run([inp, state])]))
    except ImportError:
        pass
    for name, sig in (("sawtooth+noise", sawtooth_signal(True)),
                      ("sawtooth, no noise", sawtooth_signal(False)),
                      ("formant vowel", vowel_signal())):
        print(f"  signal {name}: sha256(f32 LE) {hashlib.sha256(sig.tobytes()).hexdigest()}")
        for rname, run in runners:
            print(f"    {rname}: {silero_frames(run, sig)}")


if __name__ == "__main__":
    ppocr = sys.argv[1] if len(sys.argv) > 1 else \
        "/tmp/rapidocr/rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
    silero = sys.argv[2] if len(sys.argv) > 2 else "/tmp/models/silero_vad/data/silero_vad_openvino_16k.onnx"
    probe_ppocr(ppocr)
    probe_silero(silero)
