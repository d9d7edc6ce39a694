"""Exported BagNet-33 on the CPU: onnxruntime against the PyTorch reference and jax.jit, with the same weights.

BagNet-33 (Brendel & Bethge 2019) at 224 px, batch 8, eval mode. The weights are the PyTorch reference's
(tests/torch_reference.py, random with non-trivial BatchNorm statistics) converted with bagjax.convert; the
export is ``bagjax.export.export`` (uint8 NHWC in, normalised inside, dynamic batch and size) to ONNX and to a TF
SavedModel. PyTorch gets the same images already normalised, under ``torch.no_grad()`` with its default threads;
jax.jit runs the exported function itself (normalisation included). Rounds alternate (``bench/models.py``).

    python bench/export.py [--batch 8] [--size 224] [--iters 5] [--no-savedmodel]

It prints each runtime's images/s, the largest output differences, the export times and file sizes; the last
line is `export_onnx: R.RRx (onnxruntime over PyTorch reference)`.
"""
from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import torch_reference  # noqa: E402
from bagjax import cli, convert, export  # noqa: E402
from bagjax.data import normalize  # noqa: E402
from bagjax.models import create_model, receptive_field  # noqa: E402
from benchargs import at_least  # noqa: E402
from models import _median_seconds, torch_step  # noqa: E402

MODEL = "bagnet33"
NUM_CLASSES = 1000


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--no-savedmodel", action="store_true", help="skip the TF SavedModel")
    args = parser.parse_args()
    at_least(parser, args, batch=1, size=receptive_field(MODEL)[0], iters=1)
    import onnxruntime as ort

    reference = torch_reference.build_reference(MODEL, NUM_CLASSES)
    variables = convert.from_torch_state_dict(MODEL, reference.state_dict())
    source = export.Source(MODEL, create_model(MODEL, num_classes=NUM_CLASSES), variables,
                           tuple(map(str, range(NUM_CLASSES))), 224, "crop:0.875", "bench/export.py")
    images = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    out = pathlib.Path(tempfile.mkdtemp(prefix="bagjax-bench-export-"))

    try:
        start = time.perf_counter()
        onnx_path = export.export(source, "onnx", out / "onnx")
        onnx_seconds = time.perf_counter() - start
        session = ort.InferenceSession(str(onnx_path))
        fns = {"onnxruntime": lambda: session.run(["logits", "patch_logits"], {"images": images})}
        torch_fn, _ = torch_step(reference, np.asarray(normalize(images)), bf16=False)
        fns["torch"] = torch_fn
        jitted = jax.jit(export.serving_fn(source, ("logits", "patch_logits")))
        fns["jax.jit"] = lambda: jax.tree.map(np.asarray, jitted(variables, images))
        if not args.no_savedmodel:
            import tensorflow as tf

            start = time.perf_counter()
            sm_path = export.export(source, "savedmodel", out / "savedmodel")
            sm_seconds = time.perf_counter() - start
            serving = tf.saved_model.load(str(sm_path)).signatures["serving_default"]
            tf_images = tf.constant(images)
            fns["tensorflow"] = lambda: {k: v.numpy() for k, v in serving(images=tf_images).items()}

        logits, patch_logits = fns["onnxruntime"]()
        want = fns["jax.jit"]()
        errors = {"vs PyTorch logits": relative_error(logits, fns["torch"]()),
                  "vs jax.jit logits": relative_error(logits, want["logits"]),
                  "vs jax.jit patch_logits": relative_error(patch_logits, want["patch_logits"])}
        if "tensorflow" in fns:
            got = fns["tensorflow"]()
            errors["TF vs jax.jit logits"] = relative_error(got["logits"], want["logits"])
            errors["TF vs jax.jit patch_logits"] = relative_error(got["patch_logits"], want["patch_logits"])
        seconds = _median_seconds(fns, args.iters)
        threads = torch.get_num_threads()
        print(f"{MODEL} eval, batch {args.batch}, {args.size} px, float32, CPU ({threads} torch threads)")
        print(f"{'runtime':<20}{'img/s':>8}")
        for name, s in seconds.items():
            print(f"{'PyTorch reference' if name == 'torch' else name:<20}{args.batch / s:>8.2f}")
        print("max relative difference (onnxruntime unless named): "
              + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
        print(f"export: ONNX {onnx_seconds:.1f} s, {export.size_of(onnx_path) / 1e6:.1f} MB"
              + ("" if args.no_savedmodel else
                 f"; SavedModel {sm_seconds:.1f} s, {export.size_of(sm_path) / 1e6:.1f} MB"))
        print(f"export_onnx: {seconds['torch'] / seconds['onnxruntime']:.2f}x (onnxruntime over PyTorch reference)")
    finally:
        shutil.rmtree(out, ignore_errors=True)

if __name__ == "__main__":
    main()
