"""Every shipped config at full size: its real model, image size, optimizer and schedule, on stand-in images.

The ``:smoke`` runs (test_train.py) replace dataset, image size and width. Here each config keeps everything but
its data: the dataset becomes a tiny image folder (2 classes, 300x260 JPEGs, read and preprocessed by the real
pipeline at the config's ``image_size``), the splits become ``train``/``validation``, ``init_from`` is dropped and
the global batch is 2. The loop's own ``train_step`` is then

- traced for every config with ``jax.eval_shape``, at the batch of 2 and at the config's real global batch size
  (no compilation, so ImageNet-size models cost seconds), and
- compiled and run for one real step for the configs in ``REAL_STEP``: ``demo.py`` and ``tf_flowers_bagnet33.py``
  (full BagNet-33 at 224 px with the frozen backbone of the blackout paper). ``anchornet_demo.py``'s model and
  image size are what its ``:smoke`` run in test_train.py already trains (full AnchorNet at 112 px). Compiling a
  full ResNet-50-deep training step for every config would cost minutes of CI time (AnchorNet's alone ~1 min of
  CPU) for no new code path.
"""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bagjax import data
from bagjax.models import build_model
from bagjax.training import optim
from bagjax.training.loop import _steps, check_config, train_step
from bagjax.training.state import TrainState
from trainutil import ROOT

CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.py") if p.name not in ("__init__.py", "default.py"))
REAL_STEP = ("demo.py", "tf_flowers_bagnet33.py")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("standin")
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("validation", 1)):
        for label in ("daisy", "tulip"):
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (260, 300, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.jpg", quality=90)
    return root


def _load(name: str, images=None):
    """A shipped config as ``get_config()`` gives it (``folder.py`` gets the stand-in folder as its argument)."""
    spec = importlib.util.spec_from_file_location(f"configs.{name[:-3]}", ROOT / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(str(images)) if name == "folder.py" else module.get_config()


def _on_standin(config, images):
    real_batch = config.batch_size
    config.dataset = f"imagefolder:{images}"
    config.data.train_split, config.data.eval_split = "train", "validation"
    config.init_from = ""
    config.batch_size = config.eval_batch_size = 2
    config.data.workers = 0  # in-process: no worker processes per config
    return config, real_batch


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_its_full_model_and_traces_a_train_step(name, images, tmp_path):
    config, real_batch = _on_standin(_load(name, images), images)
    if "width" in config.model_kwargs and name not in ("demo.py", "robust_demo.py", "folder.py"):  # small on purpose
        assert (config.model_kwargs.width, tuple(config.model_kwargs.stage_sizes)) == (64, (3, 4, 6, 3))
    info = data.dataset_info(config)
    num_classes = config.num_classes if config.num_classes > 0 else info.num_classes
    check_config(config, tmp_path, num_classes)
    batch = next(data.train_batches(config))
    size = config.image_size
    assert batch["image"].shape == (2, size, size, 3) and batch["image"].dtype == np.uint8
    model = build_model(config, num_classes)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
    params, batch_stats = abstract["params"], abstract.get("batch_stats", {})
    tx = optim.make_optimizer(config, params, *_steps(config, info)[:2])
    state = jax.eval_shape(lambda: TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                                              opt_state=tx.init(params)))
    step = functools.partial(train_step, model=model, tx=tx, config=config)
    for b in (2, real_batch):
        images_, labels = jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8), jax.ShapeDtypeStruct((b,), jnp.int32)
        new_state, metrics = jax.eval_shape(step, state, {"image": images_, "label": labels})
        assert jax.tree.map(lambda a: (a.shape, a.dtype), new_state) == jax.tree.map(lambda a: (a.shape, a.dtype),
                                                                                    state)
        assert metrics["loss"].shape == ()


@pytest.mark.parametrize("name", REAL_STEP)
def test_config_runs_one_real_train_step(name, images):
    config, _ = _on_standin(_load(name, images), images)
    info = data.dataset_info(config)
    num_classes = config.num_classes if config.num_classes > 0 else info.num_classes
    model = build_model(config, num_classes)
    size = config.image_size
    variables = jax.jit(lambda rng: model.init(rng, jnp.zeros((1, size, size, 3)), train=False))(jax.random.key(0))
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    tx = optim.make_optimizer(config, params, *_steps(config, info)[:2])
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       opt_state=tx.init(params))
    batch = next(data.train_batches(config))
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, config=config))
    new_state, metrics = step(state, batch)
    assert int(new_state.step) == 1 and bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
    if float(optim.learning_rate_schedule(config, *_steps(config, info)[:2])(0)) == 0.0:
        # a warmup from 0 moves nothing at step 0 (AdamW's decay is scaled by the rate too): take step 1
        assert not any(jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), new_state.params, params)))
        new_state, metrics = step(new_state, batch)
        assert int(new_state.step) == 2 and bool(metrics["finite"])
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), new_state.params, params)
    assert any(jax.tree.leaves(moved["head"] if "head" in moved else moved))  # the head (or the model) learned
    if config.freeze_backbone:
        assert not any(jax.tree.leaves({k: v for k, v in moved.items() if k != "head"}))
