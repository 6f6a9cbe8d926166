"""The baseline for `agent/benches/api.rs`: the inference server users build today.

A FastAPI app that loads an ONNX model with onnxruntime (one intra-op thread) and serves
`POST /v1/infer` with the same JSON body as the EdgeFleet agent's local API:

    request:  {"inputs": {"<name>": {"shape": [...], "data": [...]}, ...}}
    response: {"outputs": {"<name>": {"shape": [...], "data": [...]}, ...}}

Inputs are validated by pydantic and converted to float32 numpy arrays; the handler is a plain
`def`, as FastAPI recommends for blocking calls, so it runs in FastAPI's thread pool. The model
path comes from `EDGEFLEET_BENCH_MODEL`.

Run: EDGEFLEET_BENCH_MODEL=model.onnx uvicorn fastapi_server:app --host 127.0.0.1 --port 8000 --workers 1
"""

import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel


class TensorIn(BaseModel):
    shape: list[int]
    data: list[float]


class InferRequest(BaseModel):
    inputs: dict[str, TensorIn]


options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
session = ort.InferenceSession(
    os.environ["EDGEFLEET_BENCH_MODEL"],
    sess_options=options,
    providers=["CPUExecutionProvider"],
)
input_names = [i.name for i in session.get_inputs()]
output_names = [o.name for o in session.get_outputs()]

app = FastAPI()


@app.get("/healthz")
def healthz():
    return {"ok": True}


@app.post("/v1/infer")
def infer(request: InferRequest):
    feeds = {}
    for name in input_names:
        tensor = request.inputs.get(name)
        if tensor is None:
            raise HTTPException(status_code=422, detail=f"missing input {name}")
        try:
            feeds[name] = np.asarray(tensor.data, dtype=np.float32).reshape(tensor.shape)
        except ValueError as err:
            raise HTTPException(status_code=422, detail=f"input {name}: {err}") from err
    results = session.run(output_names, feeds)
    return {
        "outputs": {
            name: {"shape": list(value.shape), "data": value.ravel().tolist()}
            for name, value in zip(output_names, results)
        }
    }
