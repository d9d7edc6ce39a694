"""Precise BatchNorm (pycls / detectron2 PreciseBN), the batch-statistics guard and bn_momentum for every model
(the folder recipe on real images: tests/test_recipes.py)."""

import functools
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagjax import data
from bagjax.models import create_model
from bagjax.training import precise_bn
from bagjax.training.state import TrainState
from trainutil import ROOT, read_metrics, restore_params, run_train, train_env

SMALL = {"width": 8, "stage_sizes": (1, 1, 1, 1)}
MODELS = {"bagnet17": (SMALL, 40), "resnet50": (SMALL, 64), "anchornet": ({}, 112)}


def _state(name, kwargs, size, batch):
    model = create_model(name, num_classes=5, **kwargs)
    if name == "anchornet":  # model.init's ~350 random initializers take minutes to compile on a CPU
        from test_anchornet import numpy_variables

        variables = numpy_variables(model, data.normalize(batch["image"][:1]))
    else:
        variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0),
                                                                         data.normalize(batch["image"][:1]))
    # Statistics that describe nothing: what lagging running averages look like.
    stats = jax.tree.map(lambda s: s + 0.5, variables["batch_stats"])
    return model, TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"], batch_stats=stats,
                             opt_state={})


def _batch(size, n=8, seed=0):
    """uint8 images, as the input pipeline gives them (precise BN normalizes them as the train step does)."""
    rng = np.random.default_rng(seed)
    image = 128 + 40 * (rng.normal(0.0, 1.0, (n, size, size, 3)) + rng.normal(0.0, 1.0, (n, 1, 1, 3)))
    return {"image": jnp.asarray(np.clip(image, 0, 255), jnp.uint8), "label": jnp.arange(n) % 5}


@pytest.mark.parametrize("name", MODELS)
def test_precise_statistics_make_eval_mode_equal_train_mode_on_the_batch(name):
    kwargs, size = MODELS[name]
    batch = _batch(size)
    model, state = _state(name, kwargs, size, batch)
    p_accumulate = jax.jit(functools.partial(precise_bn.accumulate, model=model, num_batches=2))
    stats, kept = precise_bn.recompute(p_accumulate, state, iter([batch, batch]))
    assert kept == 0
    state = state.replace(batch_stats=stats)

    @jax.jit
    def both(variables, images):
        images = data.normalize(images)
        (train, _), _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return model.apply(variables, images, train=False)[0], train

    evaluated, trained = both(state.variables, batch["image"])
    assert float(jnp.abs(trained).max()) > 1e-2  # not trivially zero
    np.testing.assert_allclose(evaluated, trained, rtol=1e-4, atol=1e-4)


def test_statistics_are_the_equal_weight_average_of_the_batch_moments():
    """pycls: mean of the per-batch means and of the per-batch (biased) variances, not an EMA."""
    kwargs, size = MODELS["bagnet17"]
    batches = [_batch(size, seed=s) for s in range(3)]
    model, state = _state("bagnet17", kwargs, size, batches[0])
    p_accumulate = jax.jit(functools.partial(precise_bn.accumulate, model=model, num_batches=3))
    got, _ = precise_bn.recompute(p_accumulate, state, iter(batches))
    moments = [precise_bn.batch_moments(state.variables, b, model=model) for b in batches]
    want = jax.tree.map(lambda *m: sum(m) / 3, *moments)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), got, want)
    # The stem BN has one moment per channel, and different batches give different moments.
    assert moments[0]["bn1"]["mean"].shape == (8,)
    assert not np.allclose(moments[0]["bn1"]["var"], moments[1]["bn1"]["var"])


def test_non_finite_statistics_keep_their_previous_values():
    """Weights whose activations overflow give non-finite moments: those BatchNorms keep the statistics they had,
    mean and var together (x ~ 1e20 overflows x**2, so the variance goes while the mean may stay finite)."""
    kwargs, size = MODELS["bagnet17"]
    batch = _batch(size)
    model, state = _state("bagnet17", kwargs, size, batch)
    params = jax.tree_util.tree_map_with_path(  # the last block's last conv overflows: only BNs after it see inf
        lambda path, p: p * 1e38 if "layer4" in jax.tree_util.keystr(path) and "conv3" in jax.tree_util.keystr(path)
        else p, state.params)
    state = state.replace(params=params)
    p_accumulate = jax.jit(functools.partial(precise_bn.accumulate, model=model, num_batches=1))
    raw = p_accumulate(jax.tree.map(jnp.zeros_like, state.batch_stats), state, batch)
    stats, kept = precise_bn.recompute(p_accumulate, state, iter([batch]))
    for path, new in jax.tree_util.tree_leaves_with_path(stats, is_leaf=lambda n: set(n) == {"mean", "var"}):
        old = functools.reduce(lambda t, k: t[k.key], path, state.batch_stats)
        want = functools.reduce(lambda t, k: t[k.key], path, raw)
        if not all(np.isfinite(want[k]).all() for k in want):
            want = old
        for k in ("mean", "var"):
            np.testing.assert_array_equal(new[k], want[k])
    bad = sum(not (np.isfinite(n["mean"]).all() and np.isfinite(n["var"]).all())
              for n in jax.tree.leaves(raw, is_leaf=lambda n: set(n) == {"mean", "var"}))
    assert kept == bad > 0 and bad < len(jax.tree.leaves(raw)) // 2  # some kept, the others recomputed


# The loop's precise-BN call (loop.train_and_evaluate: p_bn_accumulate) on a 1-D mesh over all devices.
_DEVICES_SCRIPT = """
import functools, sys
import jax, jax.numpy as jnp, numpy as np
from bagjax.models import create_model
from bagjax.training import precise_bn, sharding
from bagjax.training.state import TrainState
model = create_model("bagnet17", num_classes=5, width=8, stage_sizes=(1, 1, 1, 1))
variables = model.init(jax.random.key(0), jnp.zeros((1, 40, 40, 3)))
state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"], batch_stats=variables["batch_stats"],
                   opt_state={})
mesh = sharding.make_mesh()
state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), state)
p_accumulate = jax.jit(functools.partial(precise_bn.accumulate, model=model, num_batches=3),
                       in_shardings=(state_sharding.batch_stats, state_sharding, sharding.batch_sharding(mesh)),
                       out_shardings=state_sharding.batch_stats, donate_argnums=0)
rng = np.random.default_rng(0)
# Every quarter of a batch has its own brightness: per-device variances differ from the global one.
batches = [{"image": (rng.normal(0, 1, (8, 40, 40, 3)) + np.repeat(np.arange(4), 2)[:, None, None, None]
                     ).astype(np.float32)} for _ in range(3)]
stats, _ = precise_bn.recompute(p_accumulate, state, (sharding.global_batch(b, mesh) for b in batches))
flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(stats)}
np.savez(sys.argv[1], devices=jax.device_count(), **flat)
"""


def test_same_statistics_on_one_and_four_devices(tmp_path):
    results = []
    for devices in (1, 4):
        out = tmp_path / f"stats{devices}.npz"
        proc = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT, str(out)], cwd=ROOT, env=train_env(devices),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(dict(np.load(out)))
    assert results[0].pop("devices") == 1 and results[1].pop("devices") == 4
    assert results[0].keys() == results[1].keys() and len(results[0]) > 10
    for key in results[0]:
        np.testing.assert_allclose(results[1][key], results[0][key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_resuming_after_an_evaluation_is_bit_exact_with_precise_bn(tmp_path):
    """Precise BN at step 2 replaces the statistics, training goes on from them; a run resumed from the step-2
    checkpoint recomputes nothing differently and ends with the same parameters and statistics, bit for bit."""
    args = ("--config.total_steps=4", "--config.eval_every_steps=2", "--config.checkpoint_every_steps=1",
            "--config.keep_checkpoints=10", "--config.heatmap_images=0")
    run_train("demo.py:smoke", tmp_path / "straight", *args)
    assert [m["precise_bn_seconds"] > 0 for m in read_metrics(tmp_path / "straight") if "eval_accuracy" in m] \
        == [True, True]
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    for step in (3, 4):
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / str(step))
    proc = run_train("demo.py:smoke", tmp_path / "resumed", *args)
    assert "resuming from step 2 " in proc.stdout
    jax.tree.map(np.testing.assert_array_equal, restore_params(tmp_path / "straight", 4),
                 restore_params(tmp_path / "resumed", 4))


def test_guard_warns_in_one_line_only_when_batch_statistics_win_by_more_than_5_points():
    from configs import default

    config = default.get_config()
    far = {"guard_eval_accuracy": 0.565, "guard_batch_stats_accuracy": 0.824, "guard_count": 1000}
    line = precise_bn.guard_warning(far, config)
    assert "\n" not in line and "82.4%" in line and "56.5%" in line and "precise_bn.num_batches" in line
    close = dict(far, guard_batch_stats_accuracy=0.61)
    assert precise_bn.guard_warning(close, config) is None


@pytest.mark.parametrize("name", ["bagnet17", "resnet50"])
def test_bn_momentum_defaults_to_the_official_momenta_and_overrides_every_batchnorm(name):
    """One train step from zero statistics stores (1 - momentum) x the batch mean in each BatchNorm."""
    kwargs, size = MODELS[name]
    batch = _batch(size)
    ratios = {}
    for momentum in (None, 0.5):
        model = create_model(name, num_classes=5, **kwargs, bn_momentum=momentum)
        variables = model.init(jax.random.key(0), batch["image"][:1])
        zero = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
        exact = model.clone(bn_momentum=0.0).apply({**variables, "batch_stats": zero}, batch["image"], train=True,
                                                   mutable=["batch_stats"])[1]["batch_stats"]
        _, updated = model.apply({**variables, "batch_stats": zero}, batch["image"], train=True,
                                 mutable=["batch_stats"])
        ratios[momentum] = jax.tree_util.tree_leaves_with_path(jax.tree.map(
            lambda u, e: float(jnp.sum(u) / jnp.sum(e)), updated["batch_stats"], exact))
    official = {jax.tree_util.keystr(k): r for k, r in ratios[None] if k[-1].key == "mean"}
    stem = "['bn1']['mean']"
    assert official.pop(stem) == pytest.approx(0.1 if name == "resnet50" else 0.001, rel=1e-4)
    assert all(r == pytest.approx(0.1, rel=1e-4) for r in official.values())
    assert all(r == pytest.approx(0.5, rel=1e-4) for k, r in ratios[0.5] if k[-1].key == "mean")
