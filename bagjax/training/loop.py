"""The train/eval loop: ``train_and_evaluate(config, workdir)``.

In the manner of flax/examples/imagenet and big_vision: parameters are created already sharded
(``jax.jit(init, out_shardings=...)``), the train step is jitted with in/out shardings and donates the old
state, batches become global arrays with ``jax.make_array_from_process_local_data``. The data order is a
function of (seed, step), so a resumed run sees the same batches as an uninterrupted one. Everything the
user can get wrong is checked before anything is compiled.
"""

from __future__ import annotations

import functools
import math
import os
import pathlib
import signal
import time
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax.experimental import multihost_utils

from bagjax import cli, data, robust
from bagjax.data import fingerprint
from bagjax.models import build_model, is_bagnet
from bagjax.training import checkpoints, checks, features, optim, precise_bn, sharding
from bagjax.training.checkpoints import write_dataset_info
from bagjax.training.lock import lock_workdir
from bagjax.training.metrics import MetricWriter
from bagjax.training.state import TrainState
from bagjax.errors import PathNotFoundError, PathNotWritableError, UserError


class NonFiniteLossError(UserError, RuntimeError):
    """The loss or the gradients stopped being finite."""


def check_finite_eval(eval_metrics: dict[str, float], step: int, directory: pathlib.Path,
                      skip_nonfinite: bool = False) -> None:
    """The NaN guard of eval: a model whose eval loss is not finite is reported, not saved (with
    ``skip_nonfinite_updates`` the run goes on, with a warning)."""
    if math.isfinite(eval_metrics["eval_loss"]):
        return
    if skip_nonfinite:
        print(f"warning: non-finite eval loss at step {step} (skip_nonfinite_updates=True: going on)", flush=True)
    else:
        raise NonFiniteLossError(
            f"non-finite eval loss at step {step}: stopped without saving it; the last good checkpoint is kept in "
            f"{directory}. Lower optimizer.learning_rate, set optimizer.grad_clip_norm, or set "
            "skip_nonfinite_updates=True")


# ----------------------------------------------------------------------------------------------- loss
def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy with optional label smoothing."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing) \
        if label_smoothing else jax.nn.one_hot(labels, logits.shape[-1])
    return optax.softmax_cross_entropy(logits, targets)


def loss_and_logits(model_name: str, outputs: Any, labels: jax.Array, config: ml_collections.ConfigDict):
    """Mean training loss and the image logits of a model's outputs (AnchorNet returns a dict)."""
    if model_name == "anchornet":
        from bagjax.models import anchornet

        loss = anchornet.training_loss(outputs, labels, aux_weight=config.aux_loss_weight,
                                       label_smoothing=config.label_smoothing)
        return loss, anchornet.image_logits(outputs)
    return cross_entropy(outputs, labels, config.label_smoothing).mean(), outputs


def eval_logits(model_name: str, outputs: Any) -> jax.Array:
    if model_name == "anchornet":
        from bagjax.models import anchornet

        return anchornet.image_logits(outputs)
    return outputs


# ----------------------------------------------------------------------------------------------- steps
def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optax update on a global batch; returns the new state and the batch's loss and accuracy.

    A batch of cached features (``cache_features``: key ``features`` instead of ``image``) goes through the
    head alone (bagjax.training.features)."""
    train_bn = not config.freeze_backbone  # a frozen backbone keeps its BatchNorm statistics too

    def loss_fn(params):
        if "features" in batch:
            logits = features.head_logits(model, params, batch["features"])
            loss = cross_entropy(logits, batch["label"], config.label_smoothing).mean()
            return loss, (logits, state.batch_stats)
        images = data.normalize(batch["image"])  # uint8 from the host, normalized on the device
        variables = {"params": params, "batch_stats": state.batch_stats}
        if train_bn:
            outputs, updates = robust.apply_model(model, variables, images, config, train=True,
                                                  mutable=["batch_stats"])
        else:
            outputs = robust.apply_model(model, variables, images, config, train=False)
            updates = {"batch_stats": state.batch_stats}
        loss, logits = loss_and_logits(config.model, outputs, batch["label"], config)
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                           batch_stats=batch_stats, opt_state=opt_state)
    finite = jnp.isfinite(loss) & jax.tree.reduce(jnp.logical_and, jax.tree.map(lambda g: jnp.isfinite(g).all(), grads))
    if config.skip_nonfinite_updates:  # keep the old parameters, count the step
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                                 state.replace(step=state.step + 1))
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]), "finite": finite}
    return new_state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
              config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
    """Sums of correct top-1/top-5, cross-entropy and count over the real (mask=True) examples of a batch (of
    images, or of cached features)."""
    if "features" in batch:
        logits = features.head_logits(model, state.params, batch["features"])
    else:
        logits = eval_logits(config.model, robust.apply_model(model, state.variables, data.normalize(batch["image"]),
                                                              config, train=False))
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["label"]
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {"correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
            "correct_top5": jnp.sum(jnp.any(top5 == labels[:, None], -1) * mask),
            "loss": jnp.sum(cross_entropy(logits, labels) * mask),
            "count": jnp.sum(mask)}


# ----------------------------------------------------------------------------------------------- checks
def check_config(config: ml_collections.ConfigDict, workdir: pathlib.Path, num_classes: int) -> None:
    """Everything a user can get wrong, before any compilation; one actionable line each."""
    n = jax.device_count()
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % n:
            raise UserError(f"{key}={config[key]} is not divisible by the {n} devices: "
                            f"use a multiple of {n}, e.g. --config.{key}={max(n, config[key] // n * n)}")
    model = build_model(config, num_classes)
    rf = getattr(model, "receptive_field", None)
    if rf is not None and config.image_size < rf:
        raise UserError(f"image_size={config.image_size} is below {config.model}'s receptive field of {rf} px: "
                        f"use --config.image_size={rf} or larger")
    num_features = getattr(model, "num_features", None)
    if config.head == "identity" and num_features is not None and num_classes > num_features:
        raise UserError(f"the identity head needs num_classes <= {num_features} feature channels, got {num_classes}: "
                        "use --config.head=learned or --config.model_kwargs.identity_expand=True")
    if config.recipe_init_from is not None and config.init_from != config.recipe_init_from:
        raise UserError(f"configs/folder.py chose its model for init_from={config.recipe_init_from!r}, not "
                        f"{config.init_from!r}: give the weights in the config argument, --config "
                        f"configs/folder.py:PATH,init_from={config.init_from or 'DIR'}")
    if config.cache_features:
        features.check(config, model)
    if config.init_from and not pathlib.Path(config.init_from).exists():
        raise PathNotFoundError(f"init_from {config.init_from} does not exist: convert the official weights with "
                                f"python -m bagjax.convert --model {config.model} --torch-weights FILE --out "
                                f"{config.init_from}, or train from scratch with --config.init_from=''")
    from bagjax.convert import check_pretrained, reduced_precision_warning
    if config.init_from and not checkpoints.is_workdir(config.init_from):
        check_pretrained(config.init_from)  # refused before the workdir is locked or written
    if config.init_from and (warning := reduced_precision_warning(config.init_from, config.dtype)):
        print(warning, flush=True)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test.{jax.process_index()}"  # one per process: no unlink race
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PathNotWritableError(f"workdir {workdir} is not writable ({e.strerror}): "
                                   "choose another --workdir") from None


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """``jax.distributed.initialize`` when asked, or (``auto``) when a multi-process launch is detected.

    Explicit settings come from ``config.distributed.*`` or else the environment: ``JAX_COORDINATOR_ADDRESS``
    (host:port of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (what ``python -m bagjax.launch``
    sets). Anything left unset is auto-detected by JAX (Slurm, Open MPI, Kubernetes, Cloud TPU). ``auto`` only
    initializes when a coordinator is given or a launcher with more than one task is detected (Slurm
    ``SLURM_NTASKS``, Open MPI ``OMPI_COMM_WORLD_SIZE``, a Kubernetes JobSet or indexed Job, a multi-host TPU
    slice's ``TPU_WORKER_HOSTNAMES``), so a single process inside such an environment still runs standalone.
    """
    dist = config.distributed
    env = os.environ
    address = dist.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = dist.num_processes if dist.num_processes > 0 else int(env.get("JAX_NUM_PROCESSES", -1))
    process_id = dist.process_id if dist.process_id >= 0 else int(env.get("JAX_PROCESS_ID", -1))
    cluster = (int(env.get("SLURM_NTASKS", 1)) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", 1)) > 1
               or "JOBSET_NAME" in env or "JOB_COMPLETION_INDEX" in env
               or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
    if dist.initialize not in ("auto", "always", "never"):
        raise UserError(f"distributed.initialize={dist.initialize!r}: use auto, always or never")
    if dist.initialize == "never" or (dist.initialize == "auto" and not (address or cluster)):
        return
    if jax.distributed.is_initialized():
        return
    kwargs: dict[str, Any] = {}
    if address:
        kwargs["coordinator_address"] = address
    if num_processes > 0:
        kwargs["num_processes"] = num_processes
    if process_id >= 0:
        kwargs["process_id"] = process_id
    jax.distributed.initialize(**kwargs)


# ----------------------------------------------------------------------------------------------- state
def load_pretrained(path: str) -> tuple[dict[str, Any], str]:
    """Variables from a ``python -m bagjax.convert`` directory or a training workdir, and a description."""
    if checkpoints.is_workdir(path):
        return checkpoints.read_variables(path), f"training workdir {path}"
    from bagjax.convert import read_pretrained

    variables, meta = read_pretrained(path)
    return variables, f"{meta.get('model', '?')} weights converted from {meta.get('source') or path}"


def merge_pretrained(init: dict[str, Any], pretrained: dict[str, Any],
                     reinit_head: bool = False) -> tuple[dict[str, Any], list[str]]:
    """Take every pretrained array whose path and shape match; the head is re-initialised when its shape differs,
    or always with ``reinit_head`` (other classes of the same number).

    Returns the merged variables and the paths kept from ``init``. Anything else that does not match is an error.
    """
    kept = []

    def pick(path, new):
        keys = [getattr(k, "key", str(k)) for k in path]
        node = pretrained
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                node = None
                break
            node = node[k]
        name = "/".join(keys)
        if node is not None and tuple(np.shape(node)) == tuple(new.shape) and not (reinit_head and "head" in keys):
            return jnp.asarray(node, new.dtype)
        if "head" in keys:
            kept.append(name)
            return new
        raise UserError(f"init_from does not fit the model at {name} "
                        f"({'missing' if node is None else np.shape(node)} vs {tuple(new.shape)}): "
                        "use weights of the same --config.model")

    return jax.tree_util.tree_map_with_path(pick, init), kept


# ----------------------------------------------------------------------------------------------- loop
def _steps(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> tuple[int, int, int]:
    steps_per_epoch = max(info.num_train // config.batch_size, 1)
    total = config.total_steps if config.total_steps > 0 else int(math.ceil(config.num_epochs * steps_per_epoch))
    every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
    return steps_per_epoch, total, every


class _Preemption:
    """Remembers a SIGTERM (preemption) or SIGINT (Ctrl-C) so the loop can checkpoint at a step boundary and exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signum = 0
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        self.requested, self.signum = True, signum

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def evaluate(p_eval_step, state: TrainState, batches: Iterator[dict[str, np.ndarray]], mesh) -> dict[str, float]:
    """Top-1, top-5 and cross-entropy over the whole eval split (``batches``), every example counted once."""
    totals: dict[str, float] = {}
    for batch in batches:
        out = jax.device_get(p_eval_step(state, sharding.global_batch(batch, mesh)))
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = max(totals.get("count", 0.0), 1.0)
    return {"eval_accuracy": totals["correct"] / count, "eval_top5": totals["correct_top5"] / count,
            "eval_loss": totals["loss"] / count, "eval_count": int(totals["count"])}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train ``config`` in ``workdir`` (resuming if it holds checkpoints) and return the final eval metrics.

    A run stopped by SIGTERM or SIGINT returns the metrics it has with ``preempted=True`` and ``signal`` after
    checkpointing. Every config value is checked, then the workdir is locked (bagjax.training.lock), before
    anything is written or compiled.
    """
    checks.check_workdir_arg(workdir)
    checks.check_values(config)
    workdir = pathlib.Path(workdir)
    maybe_initialize_distributed(config)
    info = data.dataset_info(config)
    checks.check_splits(config, info.num_train, info.num_eval)
    num_classes = info.num_classes if config.num_classes <= 0 else config.num_classes
    if num_classes < info.num_classes:
        raise UserError(f"num_classes={num_classes} but the dataset has {info.num_classes} classes: "
                        f"use --config.num_classes={info.num_classes} (or -1 to take it from the data)")
    check_config(config, workdir, num_classes)
    lock = lock_workdir(workdir, is_main=jax.process_index() == 0, process_count=jax.process_count())
    try:
        return _train(config, workdir, info, num_classes)
    finally:
        if lock is not None:
            lock.release()


def check_data(config: ml_collections.ConfigDict, workdir: pathlib.Path,
               info: data.DatasetInfo) -> fingerprint.Verdict:
    """A resume on other data than the workdir's checkpoints were trained on is refused (bagjax.data.fingerprint)."""
    if not checkpoints.finished_steps(workdir) or info.fingerprint is None:
        return fingerprint.Verdict(None)  # a new run: nothing to compare with
    return fingerprint.check(checkpoints.saved_fingerprint(workdir), info.fingerprint, str(workdir),
                             allow_changed=bool(config.data.get("allow_changed_data", False)))


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path, info: data.DatasetInfo,
           num_classes: int) -> dict[str, float]:
    """The run itself, once every check passed and the workdir is locked."""
    if info.num_skipped:
        print(f"data: skipped {info.num_skipped} unreadable image(s)", flush=True)
    is_main = jax.process_index() == 0
    verdict = check_data(config, workdir, info)  # before anything is restored or written
    if verdict.line and is_main:
        print(verdict.line, flush=True)

    steps_per_epoch, total_steps, eval_every = _steps(config, info)
    mesh = sharding.make_mesh()
    model = build_model(config, num_classes)
    dummy = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)

    def init_variables(rng):
        variables = model.init(rng, dummy, train=False)
        return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

    abstract_vars = jax.eval_shape(init_variables, jax.random.key(config.seed))
    tx = optim.make_optimizer(config, abstract_vars["params"], steps_per_epoch, total_steps)

    def init_state(variables):
        return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                          batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]))

    abstract_state = jax.eval_shape(init_state, abstract_vars)
    state_sharding = sharding.state_shardings(abstract_state, mesh, config.fsdp)
    ckpt = checkpoints.Checkpoints(workdir, keep=config.keep_checkpoints, keep_best=config.keep_best_checkpoints)
    abstract_sharded = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract_state, state_sharding)
    state = ckpt.restore_latest(abstract_sharded, checkpoints.changed_keys(workdir, config))
    if state is not None:
        print(f"resuming from step {int(state.step)} in {ckpt.directory}", flush=True)
    else:
        var_sharding = {"params": state_sharding.params, "batch_stats": state_sharding.batch_stats}
        variables = jax.jit(init_variables, out_shardings=var_sharding)(jax.random.key(config.seed))
        if config.init_from:
            pretrained, source = load_pretrained(config.init_from)
            variables, reinit = merge_pretrained(variables, pretrained, config.reinit_head)
            print(f"initialised from {source}" + (f"; new head ({len(reinit)} arrays)" if reinit else ""), flush=True)
        state = jax.jit(init_state, out_shardings=state_sharding)(variables)

    if is_main:  # only now: a run refused above must not overwrite the workdir's record of its config
        checkpoints.write_config(workdir, config)
        write_dataset_info(workdir, info.class_names, info.num_train, info.num_eval, info.fingerprint)
    start_step = int(jax.device_get(state.step))
    p_train_step = jax.jit(functools.partial(train_step, model=model, tx=tx, config=config),
                           in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                           out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)
    p_eval_step = jax.jit(functools.partial(eval_step, model=model, config=config),
                          in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                          out_shardings=sharding.replicated(mesh))
    p_bn_accumulate = jax.jit(functools.partial(precise_bn.accumulate, model=model,
                                                num_batches=config.precise_bn.num_batches),
                              in_shardings=(state_sharding.batch_stats, state_sharding, sharding.batch_sharding(mesh)),
                              out_shardings=state_sharding.batch_stats, donate_argnums=0)
    p_guard_step = jax.jit(functools.partial(precise_bn.guard_step, model=model,
                                             logits_fn=functools.partial(eval_logits, config.model)),
                           in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                           out_shardings=sharding.replicated(mesh))

    def with_precise_bn(state: TrainState, step: int) -> tuple[TrainState, dict[str, float]]:
        """The state with BatchNorm statistics recomputed for its weights (precise_bn.py), and the cost."""
        if not precise_bn.enabled(config, state):
            return state, {}
        start = time.perf_counter()
        batches = (sharding.global_batch(b, mesh) for b in precise_bn.statistics_batches(config, step))
        stats, kept = jax.block_until_ready(precise_bn.recompute(p_bn_accumulate, state, batches))
        if kept and is_main:
            print(f"warning: precise BN at step {step}: {kept} BatchNorm layer(s) got non-finite statistics with these "
                  "weights and keep their previous ones", flush=True)
        return state.replace(batch_stats=stats), {"precise_bn_seconds": time.perf_counter() - start,
                                                  **({"precise_bn_kept_layers": kept} if kept else {})}

    def final_guard(state: TrainState) -> dict[str, float]:
        """Eval-mode against batch-statistics accuracy on a few eval batches; one warning line if far apart."""
        batches = (sharding.global_batch(b, mesh) for b in precise_bn.guard_batches(config, info.num_eval))
        metrics = precise_bn.guard(p_guard_step, state, batches)
        if is_main and (warning := precise_bn.guard_warning(metrics, config)):
            print(warning, flush=True)
        return metrics

    cache = features.load_or_compute(config, model, state.variables, mesh, workdir) if config.cache_features else None

    def eval_batches():
        return data.eval_batches(config) if cache is None else features.eval_batches(config, cache)

    writer = MetricWriter(workdir, enabled=is_main, resume_step=start_step)
    if verdict.changed:
        writer.note(start_step, {"data_changed": verdict.line})
    cli.raise_if_interrupted()  # a SIGTERM/SIGINT during start-up: one line, nothing written yet to lose
    preemption = _Preemption()
    eval_metrics: dict[str, float] = {}
    batches: Iterator[dict[str, np.ndarray]] = (data.train_batches(config, start_step=start_step) if cache is None
                                                else features.train_batches(config, cache, start_step=start_step))
    bar = tqdm.tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                    disable=not is_main, mininterval=1.0)
    try:
        last_time, last_step = time.perf_counter(), start_step
        pending: list[tuple[int, jax.Array]] = []  # (step, finite flag) not yet looked at

        def check_finite():
            flags = jax.device_get([f for _, f in pending])
            bad = [s for (s, _), ok in zip(pending, flags) if not ok]
            pending.clear()
            if bad and not config.skip_nonfinite_updates:
                raise NonFiniteLossError(
                    f"non-finite loss or gradients at step {bad[0]}: stopped; the last good checkpoint is kept in "
                    f"{ckpt.directory}. Lower optimizer.learning_rate, set optimizer.grad_clip_norm, or set "
                    "skip_nonfinite_updates=True")

        for step in range(start_step + 1, total_steps + 1):
            state, metrics = p_train_step(state, sharding.global_batch(next(batches), mesh))
            pending.append((step, metrics["finite"]))
            if step % config.log_every_steps == 0 or step == total_steps:
                check_finite()
                metrics = jax.device_get(metrics)
                now = time.perf_counter()
                rate = (step - last_step) * config.batch_size / max(now - last_time, 1e-9)
                last_time, last_step = now, step
                writer.write(step, {"train_loss": float(metrics["loss"]), "train_accuracy": float(metrics["accuracy"]),
                                    "images_per_sec": rate})
                bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", img_s=f"{rate:.1f}")
            bar.update(1)
            if step % eval_every == 0 or step == total_steps:
                check_finite()
                state, bn_cost = with_precise_bn(state, step)
                eval_metrics = {**evaluate(p_eval_step, state, eval_batches(), mesh), **bn_cost}
                check_finite_eval(eval_metrics, step, ckpt.directory, config.skip_nonfinite_updates)
                if step == total_steps:
                    eval_metrics.update(final_guard(state))
                writer.write(step, eval_metrics)
                ckpt.save(state, {"eval_accuracy": eval_metrics["eval_accuracy"]}, force=True)
            elif step % config.checkpoint_every_steps == 0:
                check_finite()
                ckpt.save(state)
            if preemption.agreed():
                check_finite()
                ckpt.save(state, force=True)
                ckpt.wait()
                what = "interrupted (SIGINT)" if preemption.signum == signal.SIGINT else "preempted"
                print(f"{what}: saved a checkpoint at step {step} in {ckpt.directory}; "
                      "rerun the same command to resume", flush=True)
                return {**eval_metrics, "preempted": True, "signal": preemption.signum}
        ckpt.wait()
    finally:
        batches.close()  # a generator (data.train_batches): stops the input workers now
        bar.close()
        preemption.restore()
        writer.close()
        ckpt.wait()
        ckpt.close()

    if not eval_metrics:  # resumed at the end: evaluate what was restored (its statistics are already precise)
        eval_metrics = {**evaluate(p_eval_step, state, eval_batches(), mesh), **final_guard(state)}
    if is_bagnet(config.model) and config.heatmap_images > 0:
        # Every process takes part: gathering FSDP-sharded parameters that span processes is a collective.
        variables = multihost_utils.process_allgather(state.variables, tiled=True)
        if is_main:
            _write_heatmaps(config, model, variables, workdir, info.class_names)
    print(f"final eval: accuracy={eval_metrics['eval_accuracy']:.4f} loss={eval_metrics['eval_loss']:.4f} "
          f"top5={eval_metrics['eval_top5']:.4f} examples={eval_metrics['eval_count']} "
          f"batch_stats_accuracy={eval_metrics['guard_batch_stats_accuracy']:.4f} "
          f"(eval mode {eval_metrics['guard_eval_accuracy']:.4f} on the same {eval_metrics['guard_count']})"
          + (f" precise_bn={eval_metrics['precise_bn_seconds']:.1f}s" if "precise_bn_seconds" in eval_metrics else ""),
          flush=True)
    return eval_metrics


def _write_heatmaps(config, model, variables, workdir: pathlib.Path, class_names) -> None:
    """A figure of a few eval images beside the exact stride-1 evidence map of their predicted class (heatmaps.png),
    and the evidence explorer page of the same images (explore.html, ``bagjax.explore``)."""
    from bagjax import explore, interpret
    from bagjax.workdir import Trained

    batch = next(iter(data.eval_batches(config, process_index=0, process_count=1)))
    pixels = batch["image"][: config.heatmap_images]
    images = jax.jit(data.normalize)(pixels)
    predicted = np.asarray(jnp.argmax(model.apply(variables, images, train=False), -1))
    maps = interpret.stride1_heatmap(model, variables, images, predicted)
    titles = [f"true {class_names[t]} / pred {class_names[p]}" for t, p in zip(batch["label"], predicted)]
    interpret.save_heatmap_figure(workdir / "heatmaps.png", pixels, maps, titles)
    print(f"wrote {workdir / 'heatmaps.png'}", flush=True)
    examples = [explore.Example(f"eval #{i}", p, int(t)) for i, (p, t) in enumerate(zip(pixels, batch["label"]))]
    trained = Trained(config, model, variables, tuple(class_names))
    print(f"wrote {explore.explore(workdir, examples=examples, trained=trained, progress=False)}", flush=True)
