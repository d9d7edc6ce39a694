"""bagjax.convert against the PyTorch references: converted weights give the same logits.

Random-weight references (tests/torch_reference.py) with non-trivial BatchNorm statistics are converted
and run in Flax; image logits and, for BagNets, patch logits (BagNet paper Sec. 3: the image logits are
the mean of the per-patch logits) must agree to 1e-4 at float32 on a square and a non-square input.
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_reference
from bagjax import convert
from bagjax.errors import UserError
from bagjax.models import create_model

NUM_CLASSES = 10
TOLERANCE = 1e-4
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Parameter counts with 1000 classes: the official BagNets and torchvision's ResNet-50.
PARAMS_1000 = {"bagnet9": 15_688_744, "bagnet17": 16_213_032, "bagnet33": 18_310_184, "resnet50": 25_557_032}
BAGNETS = ("bagnet9", "bagnet17", "bagnet33")
SIZES = {**{name: ((64, 64), (72, 56)) for name in BAGNETS}, "resnet50": ((64, 64), (96, 80))}
SEEDS = {"bagnet9": 1, "bagnet17": 2, "bagnet33": 3, "resnet50": 4}


def _images(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, height, width, 3)).astype(np.float32)


def _torch_apply(fn, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return fn(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()).numpy()


class Converted:
    """A reference model, its converted variables and jitted Flax functions."""

    def __init__(self, name: str):
        self.reference = torch_reference.build_reference(name, NUM_CLASSES, seed=SEEDS[name])
        self.variables = convert.from_torch_state_dict(name, self.reference.state_dict())
        model = create_model(name, num_classes=NUM_CLASSES)
        # One compiled function per input shape gives both outputs, so the two BagNet tests share it.
        self.outputs = jax.jit(lambda v, x: {
            "logits": model.apply(v, x, train=False),
            **({"patch_logits": model.apply(v, x, train=False, method="patch_logits")} if name in BAGNETS else {})})


@pytest.fixture(scope="module")
def converted():
    """name -> Converted, each model built and compiled once for the whole module."""
    return functools.lru_cache(maxsize=None)(Converted)


@pytest.mark.parametrize("name", list(PARAMS_1000))
def test_image_logits_match_reference(name: str, converted):
    c = converted(name)
    for height, width in SIZES[name]:
        x = _images(height, width)
        expected = _torch_apply(c.reference, x)
        assert np.std(expected) > 1e-2, "degenerate reference logits would make the tolerance meaningless"
        got = np.asarray(c.outputs(c.variables, x)["logits"])
        assert got.shape == (2, NUM_CLASSES)
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE, err_msg=f"{name} {height}x{width}")


@pytest.mark.parametrize("name", BAGNETS)
def test_patch_logits_match_reference(name: str, converted):
    c = converted(name)
    for height, width in SIZES[name]:
        x = _images(height, width)
        expected = _torch_apply(c.reference.patch_logits, x)
        got = np.asarray(c.outputs(c.variables, x)["patch_logits"])
        assert got.shape == expected.shape, f"{name} {height}x{width}"
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE, err_msg=f"{name} {height}x{width}")


def _shapes(tree) -> dict:
    return jax.tree.map(lambda leaf: tuple(leaf.shape), tree)


@pytest.mark.parametrize("name", list(PARAMS_1000))
def test_parameter_count_and_tree_match_flax_model(name: str):
    reference = torch_reference.build_reference(name, 1000)
    assert sum(p.numel() for p in reference.parameters()) == PARAMS_1000[name]
    model = create_model(name, num_classes=1000)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract["params"])) == PARAMS_1000[name]
    # numpy inputs work too, and give exactly the Flax model's variable tree.
    state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
    variables = convert.from_torch_state_dict(name, state_dict)
    assert _shapes(variables) == _shapes(dict(abstract))
    assert convert.num_parameters(variables) == PARAMS_1000[name]


def test_cli_round_trip_of_official_pth_tar(tmp_path: pathlib.Path, converted):
    """An official-style file ({'state_dict': {'module.' + key: ...}}) through the CLI and read_pretrained."""
    c = converted("bagnet9")
    weights = tmp_path / "bagnet8-34f4ccd2.pth.tar"
    torch.save({"state_dict": {"module." + k: v for k, v in c.reference.state_dict().items()}}, weights)
    out = tmp_path / "converted"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run([sys.executable, "-m", "bagjax.convert", "--model", "bagnet9", "--torch-weights",
                          str(weights), "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert f"{convert.num_parameters(c.variables):,} parameters, {NUM_CLASSES} classes" in run.stdout
    variables, meta = convert.read_pretrained(out)
    assert meta["model"] == "bagnet9" and meta["num_classes"] == NUM_CLASSES and meta["head"] == "learned"
    assert meta["source"] == weights.name
    x = _images(72, 56, seed=2)
    np.testing.assert_allclose(np.asarray(c.outputs(variables, x)["logits"]), _torch_apply(c.reference, x),
                               rtol=0, atol=TOLERANCE)


def test_official_file_names_are_aliases():
    state_dict = torch_reference.build_reference("bagnet17", NUM_CLASSES).state_dict()
    via_alias = convert.from_torch_state_dict("bagnet16", state_dict)
    direct = convert.from_torch_state_dict("bagnet17", state_dict)
    assert jax.tree.all(jax.tree.map(np.array_equal, via_alias, direct))


def test_wrong_model_names_the_key_and_the_right_model():
    state_dict = torch_reference.build_reference("bagnet17", NUM_CLASSES).state_dict()
    with pytest.raises(ValueError, match=r"layer4\.0\.conv2\.weight .*use --model bagnet17"):
        convert.from_torch_state_dict("bagnet33", state_dict)
    with pytest.raises(ValueError, match=r"unexpected key 'conv2\.weight'.*use --model bagnet17"):
        convert.from_torch_state_dict("resnet50", state_dict)
    with pytest.raises(ValueError, match="choose one of"):
        convert.from_torch_state_dict("bagnet11", state_dict)


def test_missing_and_misshapen_keys_are_named():
    state_dict = dict(torch_reference.build_reference("bagnet9", NUM_CLASSES).state_dict())
    del state_dict["layer2.1.bn2.running_var"]
    with pytest.raises(ValueError, match=r"missing key 'layer2\.1\.bn2\.running_var'"):
        convert.from_torch_state_dict("bagnet9", state_dict)
    state_dict["layer2.1.bn2.running_var"] = torch.ones(7)
    with pytest.raises(ValueError, match=r"layer2\.1\.bn2\.running_var has shape \(7,\) but \(128,\)"):
        convert.from_torch_state_dict("bagnet9", state_dict)


def test_cli_reports_errors_in_one_line(tmp_path: pathlib.Path):
    weights = tmp_path / "w.pth"
    torch.save(torch_reference.build_reference("bagnet9", NUM_CLASSES).state_dict(), weights)
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["--model", "bagnet33", "--torch-weights", str(weights), "--out", str(tmp_path / "o")])
    line = str(exit_info.value.code)
    assert line.startswith("error: ") and "\n" not in line and "use --model bagnet9" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content", ["random_bytes", "bare_tensor"])
def test_a_file_that_is_not_a_state_dict_says_so_in_one_line(content: str, tmp_path: pathlib.Path):
    weights = tmp_path / "w.pth"
    if content == "random_bytes":
        weights.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        torch.save(torch.zeros(3, 3), weights)
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["--model", "bagnet9", "--torch-weights", str(weights), "--out", str(tmp_path / "o")])
    line = str(exit_info.value.code)
    assert "\n" not in line and line.startswith(f"error: {weights} is not a PyTorch state_dict"), line


def test_write_refuses_to_overwrite_and_read_rejects_other_dirs(tmp_path: pathlib.Path):
    variables = {"params": {"head": {"kernel": np.ones((4, 2), np.float32), "bias": np.zeros(2, np.float32)}},
                 "batch_stats": {"bn1": {"mean": np.zeros(4, np.float32), "var": np.ones(4, np.float32)}}}
    convert.write_pretrained(tmp_path / "out", variables, model="bagnet33", num_classes=2)
    with pytest.raises(ValueError, match="not empty: pass --overwrite"):
        convert.write_pretrained(tmp_path / "out", variables, model="bagnet33", num_classes=2)
    variables["params"]["head"]["bias"] = np.full(2, 3.0, np.float32)
    convert.write_pretrained(tmp_path / "out", variables, model="bagnet33", num_classes=2, overwrite=True)
    restored, meta = convert.read_pretrained(tmp_path / "out")
    np.testing.assert_array_equal(restored["params"]["head"]["bias"], [3.0, 3.0])
    assert json.loads((tmp_path / "out" / "model.json").read_text()) == meta
    with pytest.raises(ValueError, match="is not a converted checkpoint"):
        convert.read_pretrained(tmp_path)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="training workdir"):
        convert.write_pretrained(tmp_path / "run", variables, model="bagnet33", num_classes=2, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints", "config.json"]


def test_reading_pth_without_torch_says_how_to_install(tmp_path: pathlib.Path, monkeypatch):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(UserError, match=r"pip install torch==2\.13\.0"):
        convert.load_torch_file(weights)
