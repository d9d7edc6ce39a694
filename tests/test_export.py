"""python -m bagjax.export: ONNX and TF SavedModel files that match JAX, describe themselves and run without JAX.

Small widths here; full BagNet-33 at 224 px is bench/export.py.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_reference
from trainutil import ROOT, train_env

pytest.importorskip("jax2onnx", reason='the export extra: pip install -e ".[export]"')
ort = pytest.importorskip("onnxruntime")
tf = pytest.importorskip("tensorflow")

from bagjax import convert, export  # noqa: E402
from bagjax.data import normalize  # noqa: E402
from bagjax.errors import UserError  # noqa: E402
from bagjax.models import create_model  # noqa: E402

TINY = {"width": 8, "stage_sizes": (1, 1, 1, 1)}
# (model, model kwargs, square size, non-square size): each at least the model's smallest input.
MODELS = [("bagnet33", TINY, 40, (48, 64)), ("resnet50", TINY, 32, (40, 56)), ("anchornet", {}, 111, (111, 127))]


def source(name: str, kw: dict) -> export.Source:
    """A model with random variables: He-scaled kernels, non-trivial BatchNorm statistics and affine parameters.

    Drawn in NumPy on ``eval_shape``'s shapes: initialising AnchorNet (eagerly or jitted) took longer than its
    export on the shared CPU.
    """
    model = create_model(name, num_classes=5, **kw)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 111, 111, 3)))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        key, shape = path[-1].key, leaf.shape
        noise = rng.standard_normal(shape).astype(np.float32)
        if key == "kernel":
            return noise * np.float32(np.sqrt(2.0 / np.prod(shape[:-1])))
        if key in ("scale", "var"):
            return 1.0 + 0.2 * np.abs(noise)
        return 0.1 * noise

    return export.Source(name, model, jax.tree_util.tree_map_with_path(draw, shapes), tuple("abcde"), 64, "resize",
                         "test", kw)


def onnx_runner(path):
    session = ort.InferenceSession(str(path))
    names = [o.name for o in session.get_outputs()]
    return lambda images: dict(zip(names, session.run(None, {"images": images}))), session


def savedmodel_runner(path):
    model = tf.saved_model.load(str(path))
    serve = model.signatures["serving_default"]
    return lambda images: {k: v.numpy() for k, v in serve(images=tf.constant(images)).items()}, model


def assert_close(got: dict, want: dict):
    assert set(got) == set(want)
    for key in want:
        w = np.asarray(want[key])
        assert got[key].shape == w.shape, key
        err = np.max(np.abs(got[key] - w)) / max(np.max(np.abs(w)), 1e-6)
        assert err < 1e-4, f"{key}: relative error {err:.2e}"


@pytest.mark.parametrize("name,kw,square,rect", MODELS, ids=[m[0] for m in MODELS])
def test_onnx_and_savedmodel_match_jax_for_batch_sizes_and_image_sizes(name, kw, square, rect, tmp_path):
    src = source(name, kw)
    onnx_run, session = onnx_runner(export.export(src, "onnx", tmp_path / "onnx"))
    saved = export.export(src, "savedmodel", tmp_path / "tf")
    tf_run, _ = savedmodel_runner(saved)
    want = jax.jit(export.serving_fn(src, export.available_outputs(src)))
    rng = np.random.default_rng(0)
    for batch, (h, w) in [(1, (square, square)), (3, rect)]:
        images = rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
        expected = want(src.variables, images)
        assert_close(onnx_run(images), expected)
        assert_close(tf_run(images), expected)
    if name == "bagnet33":  # the evidence map grows with the image: 2 x 4 locations at 48 x 64 px
        assert expected["patch_logits"].shape == (3, 2, 4, 5)
    assert json.loads(session.get_modelmeta().custom_metadata_map["class_names"]) == list("abcde")
    assert json.loads((saved / "assets" / export.METADATA_FILE).read_text())["class_names"] == list("abcde")
    assert "README.md" in os.listdir(tmp_path / "onnx") and "README.md" in os.listdir(tmp_path / "tf")


def test_fixed_size_export_and_chosen_outputs(tmp_path):
    src = source("bagnet33", TINY)
    path = export.export(src, "onnx", tmp_path / "out", outputs=["patch_logits"], image_size=40)
    session = ort.InferenceSession(str(path))
    assert [o.name for o in session.get_outputs()] == ["patch_logits"]
    assert session.get_inputs()[0].shape[1:] == [40, 40, 3] and isinstance(session.get_inputs()[0].shape[0], str)
    props = session.get_modelmeta().custom_metadata_map
    assert "fixed 40x40 px" in props["input_rule"] and props["receptive_field"] == "33" and props["stride"] == "8"
    (tmp_path / "out" / "keep").write_text("earlier export")
    with pytest.raises(UserError, match="not empty: pass --overwrite"):
        export.export(src, "onnx", tmp_path / "out")
    export.export(src, "onnx", tmp_path / "out", overwrite=True)  # replaced whole, never appended to
    assert sorted(os.listdir(tmp_path / "out")) == ["README.md", "model.onnx"]


@pytest.mark.parametrize("argv,fragment", [
    (["--format", "tflite"], "invalid choice: 'tflite'"),
    (["--model", "bagnet33"], "holds resnet50 weights: pass --model resnet50"),
    (["--checkpoint", "3"], "--checkpoint goes with --workdir"),
])
def test_command_refusals_are_one_line(argv, fragment, tmp_path, capsys):
    weights = tmp_path / "weights"
    convert.write_pretrained(weights, source("resnet50", TINY).variables, model="resnet50", num_classes=5)
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--weights", str(weights), "--format", "onnx", "--out", str(tmp_path / "out"), *argv])
    message = str(exit_info.value.code) + capsys.readouterr().err
    assert fragment in message and "Traceback" not in message and len(message.strip().splitlines()) <= 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kw,fragment", [
    (dict(outputs=["patch_logits"]), "resnet50 has no such output; it has logits"),
    (dict(image_size=20), "--image-size 20: resnet50 needs at least 32 px"),
])
def test_what_a_model_cannot_export_is_refused_before_writing(kw, fragment, tmp_path):
    with pytest.raises(UserError, match=fragment):
        export.export(source("resnet50", TINY), "onnx", tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_torch_bagnet33_convert_export_onnxruntime_round_trip(tmp_path, capsys):
    reference = torch_reference.build_reference("bagnet33", 10).eval()
    torch.save(reference.state_dict(), tmp_path / "bagnet32.pth.tar")
    convert.main(["--model", "bagnet32", "--torch-weights", str(tmp_path / "bagnet32.pth.tar"),
                  "--out", str(tmp_path / "converted")])
    export.main(["--weights", str(tmp_path / "converted"), "--format", "onnx", "--out", str(tmp_path / "onnx")])
    assert "model.onnx" in capsys.readouterr().out
    images = np.random.default_rng(0).integers(0, 256, (2, 41, 49, 3), dtype=np.uint8)
    got = onnx_runner(tmp_path / "onnx" / "model.onnx")[0](images)
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(normalize(images))).permute(0, 3, 1, 2)
        want = {"logits": reference(x).numpy(), "patch_logits": reference.patch_logits(x).numpy()}
    assert_close(got, want)


def test_model_card_snippet_serves_without_jax_like_predict(smoke_workdir, tmp_path):
    from bagjax.predict import predict

    export.main(["--workdir", str(smoke_workdir), "--format", "onnx", "--out", str(tmp_path / "export"),
                 "--checkpoint", "latest"])
    card = (tmp_path / "export" / "README.md").read_text()
    assert "Receptive field 17 px, stride 8 px" in card and "patch_logits" in card
    snippet = tmp_path / "snippet.py"
    snippet.write_text(export.snippet_of(card) + "\nassert not {'jax', 'jaxlib', 'bagjax'} & "
                       "{m.split('.')[0] for m in sys.modules}, 'imported jax or bagjax'\n")
    image = ROOT / "docs" / "demo_heatmaps.png"  # a real image: the demo's own figure
    env = {k: v for k, v in train_env().items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(snippet), str(tmp_path / "export"), str(image)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    top, logits = proc.stdout.split(" ", 1)
    probabilities = np.exp(json.loads(logits)) / np.sum(np.exp(json.loads(logits)))
    (ranked,) = predict(str(smoke_workdir), [str(image)], out=str(tmp_path / "heatmaps"))
    assert top == ranked[0][0]
    assert np.allclose(sorted(probabilities, reverse=True)[:len(ranked)], [p for _, p in ranked], atol=1e-5)
