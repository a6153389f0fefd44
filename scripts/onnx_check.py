#!/usr/bin/env python3
"""Runs an exported fedinspect ONNX model in onnxruntime (CPU) and reports what it sees.

Used by client/tests/onnx_parity.rs to check the exporter against a reference runtime, and by
people to check a file by hand. Needs onnxruntime, numpy and safetensors: the torch venv of
scripts/install-torch.sh has them (`eval "$(scripts/install-torch.sh)"`, then `$FEDINSPECT_PYTHON`).

  $FEDINSPECT_PYTHON scripts/onnx_check.py model.onnx
      loads the model, runs it on one random image of the declared input shape (--height and
      --width for a model with dynamic sides) and prints a JSON summary on stdout: the
      onnxruntime version, producer, model version, metadata, and the input and output
      names with their declared and actual shapes.
  $FEDINSPECT_PYTHON scripts/onnx_check.py model.onnx --input in.safetensors --output out.safetensors
      runs it on the tensor `images` of in.safetensors (float32 [N, C, H, W]) and writes every
      model output (`heatmap`, `boxes`) to out.safetensors, plus the same summary.

Exit status: 0 on success, 2 for bad arguments or files, 3 when onnxruntime (or numpy or
safetensors) is missing from this interpreter, 4 when onnxruntime refuses or fails the model.
"""

import argparse
import json
import os
import sys


def fail(status, message):
    print(f"onnx_check: {message}", file=sys.stderr)
    sys.exit(status)


def import_runtime():
    try:
        import numpy
        import onnxruntime
        from safetensors.numpy import load_file, save_file
    except ImportError as e:
        fail(
            3,
            f"{e.name or e} is not installed for {sys.executable}; run scripts/install-torch.sh "
            "(it adds onnxruntime to the torch venv) and use the interpreter it prints as "
            "FEDINSPECT_PYTHON",
        )
    return numpy, onnxruntime, load_file, save_file


def declared_shape(value):
    return [d if isinstance(d, int) else str(d) for d in value.shape]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="the .onnx file")
    parser.add_argument("--input", help="safetensors file with an `images` tensor")
    parser.add_argument("--output", help="safetensors file to write the outputs to")
    parser.add_argument("--height", type=int, default=640, help="side for dynamic models")
    parser.add_argument("--width", type=int, default=640, help="side for dynamic models")
    parser.add_argument(
        "--no-optimize",
        action="store_true",
        help="run the graph exactly as written (onnxruntime's graph optimisations off)",
    )
    args = parser.parse_args()
    if not os.path.isfile(args.model):
        fail(2, f"no model file {args.model}")
    np, ort, load_file, save_file = import_runtime()

    options = ort.SessionOptions()
    if args.no_optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # Reproducible numbers, and polite on a shared 2-core machine.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
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
    if args.input:
        try:
            images = load_file(args.input)["images"]
        except (OSError, KeyError) as e:
            fail(2, f"cannot read tensor `images` from {args.input}: {e}")
    else:
        shape = [
            d if isinstance(d, int) else {"batch": 1}.get(d, args.height if i == 2 else args.width)
            for i, d in enumerate(inputs[0].shape)
        ]
        images = np.random.default_rng(0).random(shape, dtype=np.float32)
    if images.dtype != np.float32:
        fail(2, f"`images` is {images.dtype}; the model takes float32")

    try:
        outputs = session.run(None, {name: images})
    except Exception as e:
        fail(4, f"onnxruntime failed to run {args.model} on {list(images.shape)}: {e}")
    names = [o.name for o in session.get_outputs()]
    if args.output:
        save_file({n: np.ascontiguousarray(v) for n, v in zip(names, outputs)}, args.output)

    meta = session.get_modelmeta()
    summary = {
        "onnxruntime": ort.__version__,
        "producer": meta.producer_name,
        "version": meta.version,
        "metadata": dict(meta.custom_metadata_map),
        "input": {"name": name, "declared": declared_shape(inputs[0]), "shape": list(images.shape)},
        "outputs": [
            {"name": o.name, "declared": declared_shape(o), "shape": list(v.shape)}
            for o, v in zip(session.get_outputs(), outputs)
        ],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
