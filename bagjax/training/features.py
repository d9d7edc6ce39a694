"""Head-only training on cached features (``cache_features=True`` with ``freeze_backbone=True``).

With a frozen backbone (eval-mode BatchNorm), an image's logits follow from one vector per image through the
head alone (``model.pooled_features``: the mean feature, or for the heads that normalise per location the mean
of the normalised features, ``bagjax.models.heads.pool_for_head``). So the backbone runs once per image, on the
train and eval images without augmentation (the linear-probe protocol), in batches on the devices; the vectors
are kept in ``WORKDIR/features.npz``, and the head then trains with the same optimizer, schedule, checkpoints and
metrics. Without augmentation the result equals training through the whole network: the same head parameters
after the same steps, to float tolerance (tests/test_features.py). Augmentation needs the uncached path.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Iterator

import grain
import jax
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from bagjax import data
from bagjax.data import pipeline
from bagjax.errors import UserError
from bagjax.models.heads import Head
from bagjax.training import sharding

CACHE_FILE = "features.npz"
# The config keys the cached vectors depend on: a workdir resumed with any of them changed computes them again.
CACHE_KEYS = ("dataset", "model", "head", "model_kwargs", "image_size", "dtype", "init_from", "data")


def check(config: ml_collections.ConfigDict, model: Any) -> None:
    """One line for a ``cache_features`` run that cannot be cached."""
    if not config.freeze_backbone:
        raise UserError("cache_features=True needs a frozen backbone (the cached features must not change): "
                        "add --config.freeze_backbone=True, or drop --config.cache_features")
    if config.robust.clip:
        raise UserError(f"cache_features=True: robust.clip={config.robust.clip!r} clips the patch logits, which the "
                        "pooled features do not give: use --config.cache_features=False")
    if not model.capabilities.cacheable_head:
        raise UserError(f"cache_features=True: {config.model}'s classifiers are not one head on pooled features, so "
                        "nothing per image can be cached: use --config.cache_features=False")


def head_logits(model: Any, params: Any, pooled: jax.Array) -> jax.Array:
    """The image logits of cached vectors through the model's head alone (``params``: the whole tree)."""
    head = Head(model.head, model.num_classes, model.dtype)
    return head.apply({"params": params["head"]}, pooled, normalized=model.capabilities.pooled_normalized)


def _key(config: ml_collections.ConfigDict) -> str:
    return json.dumps({k: json.loads(ml_collections.ConfigDict({k: config[k]}).to_json_best_effort())[k]
                       for k in CACHE_KEYS}, sort_keys=True)


def compute(config: ml_collections.ConfigDict, model: Any, variables: Any, mesh, *, split: str,
            desc: str) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, labels) of every image of ``split`` in order, the eval transform (no augmentation)."""
    fn = jax.jit(lambda v, images: model.apply(v, data.normalize(images), train=False, method="pooled_features"),
                 out_shardings=sharding.replicated(mesh))
    vectors, labels, masks = [], [], []
    bar = tqdm.tqdm(desc=desc, unit="img", dynamic_ncols=True, mininterval=1.0,
                    disable=jax.process_index() != 0)
    for batch in data.eval_batches(config, split=split):
        out = fn(variables, sharding.global_batch({"image": batch["image"]}, mesh)["image"])
        vectors.append(np.asarray(jax.device_get(out)))
        # Every process holds its slice of each global batch (data.eval_batches): gathered in order.
        labels.append(np.asarray(multihost_utils.process_allgather(batch["label"], tiled=True)))
        masks.append(np.asarray(multihost_utils.process_allgather(batch["mask"], tiled=True)))
        bar.update(int(masks[-1].sum()))
    bar.close()
    mask = np.concatenate(masks)
    return np.concatenate(vectors)[mask], np.concatenate(labels)[mask]


def load_or_compute(config: ml_collections.ConfigDict, model: Any, variables: Any, mesh,
                    workdir: pathlib.Path) -> dict[str, np.ndarray]:
    """The cached vectors of the train and eval split: read from the workdir, or computed once and written."""
    path = workdir / CACHE_FILE
    key = _key(config)
    if path.exists():
        with np.load(path) as cached:
            if str(cached["key"]) == key:
                print(f"features: cached in {path}", flush=True)
                return {k: cached[k] for k in cached.files if k != "key"}
    start = time.perf_counter()
    train, train_labels = compute(config, model, variables, mesh, split=config.data.train_split, desc="features train")
    evals, eval_labels = compute(config, model, variables, mesh, split=config.data.eval_split, desc="features eval")
    seconds = time.perf_counter() - start
    cache = {"train": train, "train_labels": train_labels, "eval": evals, "eval_labels": eval_labels}
    if jax.process_index() == 0:
        tmp = workdir / (CACHE_FILE + ".tmp.npz")
        np.savez(tmp, key=np.asarray(key), **cache)
        tmp.replace(path)
    print(f"features: {len(train) + len(evals)} images through the frozen backbone once in {seconds:.1f}s "
          f"({(len(train) + len(evals)) / max(seconds, 1e-9):.1f} img/s), {train.shape[1]} values each, "
          f"kept in {path}", flush=True)
    return cache


def train_batches(config: ml_collections.ConfigDict, cache: dict[str, np.ndarray], *, start_step: int = 0,
                  process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """This process's batches of cached train vectors for steps start_step, ...: the example order of
    ``data.train_batches`` (the same Grain shuffle of the same positions), so a cached run sees the same images
    at every step as an uncached one."""
    p, num_p = pipeline.resolve_processes(process_index, process_count)
    b = pipeline.per_process(int(config.batch_size), num_p, "batch_size")
    order = grain.MapDataset.range(len(cache["train"])).shuffle(seed=int(config.seed)).repeat()
    for indices in order.batch(b)[p::num_p][start_step:]:
        indices = np.asarray(indices)
        yield {"features": cache["train"][indices], "label": cache["train_labels"][indices].astype(np.int32)}


def eval_batches(config: ml_collections.ConfigDict, cache: dict[str, np.ndarray], *,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The cached eval vectors in global batches of ``eval_batch_size`` (padded past the end, mask False)."""
    p, num_p = pipeline.resolve_processes(process_index, process_count)
    global_batch = int(config.eval_batch_size)
    b = pipeline.per_process(global_batch, num_p, "eval_batch_size")
    n = len(cache["eval"])
    for start in range(0, n, global_batch):
        positions = np.arange(start, start + global_batch)[p * b:(p + 1) * b]
        real = positions < n
        safe = np.where(real, positions, 0)
        yield {"features": cache["eval"][safe], "label": cache["eval_labels"][safe].astype(np.int32), "mask": real}
