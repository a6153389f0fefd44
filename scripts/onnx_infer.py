#!/usr/bin/env python3
"""A persistent onnxruntime worker: loads one fedinspect ONNX model (FP32 or INT8 QDQ) on the
CPU and runs the image batches it is sent on stdin, answering on stdout.

The client starts it (`client eval-onnx`, `client bench --onnx`, client/src/eval/onnx.rs) so
that preprocessing, decoding and mAP stay the client's own code and only the network runs here.
It needs onnxruntime and numpy: the torch venv of scripts/install-torch.sh has them
(`eval "$(scripts/install-torch.sh)"`, then `$FEDINSPECT_PYTHON`).

  $FEDINSPECT_PYTHON scripts/onnx_infer.py model.onnx [--threads 2] [--no-optimize]

Protocol (all JSON lines are UTF-8, one object per line; tensors are raw little-endian
float32, C order):
  worker -> client, once:  {"ready": true, "onnxruntime": "1.x", "input": "images",
                            "outputs": ["heatmap", "boxes"], "metadata": {...}}
  client -> worker:        {"shape": [N, C, H, W]} then N*C*H*W float32 values
  worker -> client:        {"ok": true, "seconds": <session.run wall time>,
                            "outputs": [{"name": ..., "shape": [...]}, ...]}
                           then each output's values, in that order
                        or {"ok": false, "error": "..."} (the worker keeps serving)
  client -> worker:        {"quit": true}, or end of input: the worker exits with status 0.

Exit status: 2 for bad arguments or an unreadable request, 3 when onnxruntime or numpy is
missing from this interpreter, 4 when onnxruntime refuses the model.
"""

import argparse
import json
import os
import sys
import time


def fail(status, message):
    print(f"onnx_infer: {message}", file=sys.stderr)
    sys.exit(status)


def send(out, obj, arrays=()):
    out.write((json.dumps(obj) + "\n").encode())
    for a in arrays:
        out.write(a.tobytes())
    out.flush()


def read_exact(inp, n):
    chunks = []
    while n > 0:
        chunk = inp.read(n)
        if not chunk:
            fail(2, f"input ended {n} bytes before the end of a batch")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="the .onnx file")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument(
        "--no-optimize",
        action="store_true",
        help="run the graph exactly as written (onnxruntime's graph optimisations off)",
    )
    args = parser.parse_args()
    if not os.path.isfile(args.model):
        fail(2, f"no model file {args.model}")
    if args.threads < 1:
        fail(2, f"--threads {args.threads}: give at least 1")
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError as e:
        fail(
            3,
            f"{e.name or e} is not installed for {sys.executable}; run scripts/install-torch.sh "
            "(it adds onnxruntime to the torch venv) and use the interpreter it prints as "
            "FEDINSPECT_PYTHON",
        )

    options = ort.SessionOptions()
    if args.no_optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # onnxruntime's worker threads spin after each run by default; on a small CPU that spin
    # takes the cores from whatever runs next (the other runtimes of a latency comparison, or
    # the inspection line's own work), so it is off.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(
            args.model, sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # onnxruntime raises its own exception types
        fail(4, f"onnxruntime refuses {args.model}: {e}")
    inputs = session.get_inputs()
    if len(inputs) != 1:
        fail(4, f"{args.model} has {len(inputs)} inputs; a fedinspect model has one, `images`")
    name = inputs[0].name
    output_names = [o.name for o in session.get_outputs()]

    inp, out = sys.stdin.buffer, sys.stdout.buffer
    send(
        out,
        {
            "ready": True,
            "onnxruntime": ort.__version__,
            "input": name,
            "outputs": output_names,
            "metadata": dict(session.get_modelmeta().custom_metadata_map),
        },
    )
    while True:
        line = inp.readline()
        if not line:
            return
        try:
            request = json.loads(line)
        except ValueError as e:
            fail(2, f"request is not JSON ({e}): {line[:200]!r}")
        if request.get("quit"):
            return
        shape = request.get("shape")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d > 0 for d in shape)):
            fail(2, f"request shape {shape!r}: give a list of positive integers")
        count = 1
        for d in shape:
            count *= d
        images = np.frombuffer(read_exact(inp, 4 * count), dtype="<f4").reshape(shape)
        try:
            started = time.perf_counter()
            outputs = session.run(None, {name: images})
            seconds = time.perf_counter() - started
        except Exception as e:
            send(out, {"ok": False, "error": f"onnxruntime failed on {shape}: {e}"})
            continue
        arrays = [np.ascontiguousarray(o, dtype="<f4") for o in outputs]
        header = {
            "ok": True,
            "seconds": seconds,
            "outputs": [{"name": n, "shape": list(a.shape)} for n, a in zip(output_names, arrays)],
        }
        send(out, header, arrays)


if __name__ == "__main__":
    main()
