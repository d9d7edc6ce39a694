"""The train/eval loop: ``train_and_evaluate(config, workdir)``.

In the manner of flax/examples/imagenet and big_vision: parameters are created already sharded
(``jax.jit(init, out_shardings=...)``), the train step is jitted with in/out shardings and donates the old
state, batches become global arrays with ``jax.make_array_from_process_local_data``. The data order is a
function of (seed, step), so a resumed run sees the same batches as an uninterrupted one. Everything the
user can get wrong is checked before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
import signal
import time
from typing import Any, Callable, Generator, Iterator, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax.experimental import multihost_utils

from bagjax import cli, data
from bagjax.data import fingerprint
from bagjax.models import build_model
from bagjax.models.contract import cross_entropy
from bagjax.training import checkpoints, checks, features, hooks, optim, precise_bn, sharding
from bagjax.training.checkpoints import write_dataset_info
from bagjax.training.lock import lock_workdir
from bagjax.training.metrics import MetricWriter
from bagjax.training.state import TrainState
from bagjax.workdir import Trained
from bagjax.errors import PathNotFoundError, PathNotWritableError, UserError


# The initialisation runs once, yet XLA compiled it longer than the training step: one threefry and erfinv loop
# per parameter array (12 s against 11 s for a width-8 BagNet smoke run, 37 s against 17 s for AnchorNet).
# LLVM optimisation level 1 compiles it 2-3x faster with bit-identical values on the CPU
# (tests/test_train.py::test_initialisation_is_bit_identical_at_the_init_optimisation_level).
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


# ----------------------------------------------------------------------------------------------- steps
def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optax update on a global batch; returns the new state and the batch's loss and accuracy.

    A batch of cached features (``cache_features``: key ``features`` instead of ``image``) goes through the
    head alone (bagjax.training.features). With ``freeze_backbone`` only the head is differentiated, so the
    backbone's backward pass is never computed (the optimizer would zero its gradient anyway)."""
    train_bn = not config.freeze_backbone  # a frozen backbone keeps its BatchNorm statistics too

    def loss_fn(params):
        if "features" in batch:
            logits = features.head_logits(model, params, batch["features"])
            loss = cross_entropy(logits, batch["label"], config.label_smoothing).mean()
            return loss, (logits, state.batch_stats)
        images = data.normalize(batch["image"])  # uint8 from the host, normalized on the device
        variables = {"params": params, "batch_stats": state.batch_stats}
        if train_bn:
            (logits, aux), updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        else:
            (logits, aux), updates = model.apply(variables, images, train=False), {"batch_stats": state.batch_stats}
        loss = model.capabilities.loss(logits, aux, batch["label"], label_smoothing=config.label_smoothing,
                                       aux_weight=config.aux_loss_weight)
        return loss, (logits, updates["batch_stats"])

    if config.freeze_backbone:  # the gradient of the head alone: the frozen backbone runs forward only
        head_loss = lambda head: loss_fn({**state.params, optim.HEAD_KEY: head})
        (loss, (logits, batch_stats)), head_grads = jax.value_and_grad(head_loss, has_aux=True)(
            state.params[optim.HEAD_KEY])
        grads = {**jax.tree.map(jnp.zeros_like, state.params), optim.HEAD_KEY: head_grads}
    else:
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


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module) -> dict[str, jax.Array]:
    """Sums of correct top-1/top-5, cross-entropy and count over the real (mask=True) examples of a batch (of
    images, or of cached features: ``bagjax.training.features``)."""
    if "features" in batch:
        logits = features.head_logits(model, state.params, batch["features"])
    else:
        logits, _ = model.apply(state.variables, data.normalize(batch["image"]), train=False)
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
    rf = model.capabilities.receptive_field
    if rf is not None and config.image_size < rf:
        raise UserError(f"image_size={config.image_size} is below {config.model}'s receptive field of {rf} px: "
                        f"use --config.image_size={rf} or larger")
    num_features = model.capabilities.num_features
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


# ----------------------------------------------------------------------------------------------- the run
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       on_finish: Sequence[Callable[[Trained, pathlib.Path], None]] = ()) -> dict[str, float]:
    """Train ``config`` in ``workdir`` (resuming if it holds checkpoints) and return the final eval metrics.

    A run stopped by SIGTERM or SIGINT returns the metrics it has with ``preempted=True`` and ``signal`` after
    checkpointing. Every config value is checked, then the workdir is locked (bagjax.training.lock), before
    anything is written or compiled. ``on_finish`` hooks get the trained model and the workdir at the end, on
    every process (train.py passes the heatmap figure and page, ``bagjax.explore.write_run_figures``).
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
        return _train(config, workdir, info, num_classes, on_finish)
    finally:
        if lock is not None:
            lock.release()


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path, info: data.DatasetInfo, num_classes: int,
           on_finish: Sequence[Callable[[Trained, pathlib.Path], None]]) -> dict[str, float]:
    """The run itself, once every check passed and the workdir is locked."""
    is_main = jax.process_index() == 0
    verdict = check_data(config, workdir, info, is_main)  # before anything is restored or written
    steps_per_epoch, total_steps, eval_every = _steps(config, info)
    mesh = sharding.make_mesh()
    model = build_model(config, num_classes)
    ckpt = checkpoints.Checkpoints(workdir, keep=config.keep_checkpoints, keep_best=config.keep_best_checkpoints)
    state, state_sharding, tx = create_train_state(config, model, mesh, ckpt, workdir, steps_per_epoch, total_steps)
    if is_main:  # only now: a run refused above must not overwrite the workdir's record of its config
        checkpoints.write_config(workdir, config)
        write_dataset_info(workdir, info.class_names, info.num_train, info.num_eval, info.fingerprint)
    steps = compile_steps(config, model, tx, mesh, state_sharding)
    # Head-only on cached features: both splits' pooled features computed once (bagjax.training.features).
    cache = features.load_or_compute(config, model, state.variables, mesh, workdir) if config.cache_features else None
    eval_batches = functools.partial(data.eval_batches, config) if cache is None else \
        functools.partial(features.eval_batches, config, cache)
    evaluators = Evaluators(precise_bn=hooks.PreciseBN(config, mesh, steps.bn_accumulate, is_main),
                            evaluate=functools.partial(evaluate, steps.eval, eval_batches, mesh=mesh),
                            guard=hooks.BNGuard(config, mesh, steps.guard, info.num_eval, is_main))
    start_step = int(jax.device_get(state.step))
    writer = MetricWriter(workdir, enabled=is_main, resume_step=start_step)
    if verdict.changed:
        writer.note(start_step, {"data_changed": verdict.line})
    cli.raise_if_interrupted()  # a SIGTERM/SIGINT during start-up: one line, nothing written yet to lose
    batches = (data.train_batches(config, start_step=start_step) if cache is None
               else features.train_batches(config, cache, start_step=start_step))
    state, eval_metrics = train_loop(config, state, steps.train, batches, evaluators, ckpt, writer, mesh,
                                     start_step=start_step, total_steps=total_steps, eval_every=eval_every)
    if eval_metrics.get("preempted"):
        return eval_metrics
    if not eval_metrics:  # resumed at the end: evaluate what was restored (its statistics are already precise)
        eval_metrics = {**evaluators.evaluate(state), **evaluators.guard(state)}
    trained = Trained(config, model, state.variables, tuple(info.class_names))
    for hook in on_finish:
        hook(trained, workdir)
    print_final(eval_metrics)
    return eval_metrics


def check_data(config: ml_collections.ConfigDict, workdir: pathlib.Path, info: data.DatasetInfo,
               is_main: bool = True) -> fingerprint.Verdict:
    """A resume on other data than the workdir's checkpoints were trained on is refused (bagjax.data.fingerprint);
    what was skipped or changed is printed."""
    if info.num_skipped:
        print(f"data: skipped {info.num_skipped} unreadable image(s)", flush=True)
    if not checkpoints.finished_steps(workdir) or info.fingerprint is None:
        return fingerprint.Verdict(None)  # a new run: nothing to compare with
    verdict = fingerprint.check(checkpoints.saved_fingerprint(workdir), info.fingerprint, str(workdir),
                                allow_changed=bool(config.data.get("allow_changed_data", False)))
    if verdict.line and is_main:
        print(verdict.line, flush=True)
    return verdict


def _steps(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> tuple[int, int, int]:
    steps_per_epoch = max(info.num_train // config.batch_size, 1)
    total = config.total_steps if config.total_steps > 0 else int(math.ceil(config.num_epochs * steps_per_epoch))
    every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
    return steps_per_epoch, total, every


# ----------------------------------------------------------------------------------------------- state
def init_variables(rng: jax.Array, *, model: nn.Module, image_size: int) -> dict[str, Any]:
    """Fresh ``params`` and ``batch_stats`` (empty for a model without BatchNorm)."""
    variables = model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def init_state(variables: dict[str, Any], *, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]))


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module, mesh: Any,
                       ckpt: checkpoints.Checkpoints, workdir: pathlib.Path, steps_per_epoch: int,
                       total_steps: int) -> tuple[TrainState, Any, optax.GradientTransformation]:
    """The state to train, created sharded (never whole on one device): the workdir's latest checkpoint if it
    has one, else fresh weights (or ``init_from``'s); with its shardings and the optimizer."""
    init = functools.partial(init_variables, model=model, image_size=config.image_size)
    abstract_vars = jax.eval_shape(init, jax.random.key(config.seed))
    tx = optim.make_optimizer(config, abstract_vars["params"], steps_per_epoch, total_steps)
    make_state = functools.partial(init_state, tx=tx)
    abstract_state = jax.eval_shape(make_state, abstract_vars)
    state_sharding = sharding.state_shardings(abstract_state, mesh, config.fsdp)
    abstract_sharded = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract_state, state_sharding)
    state = ckpt.restore_latest(abstract_sharded, checkpoints.changed_keys(workdir, config))
    if state is not None:
        print(f"resuming from step {int(state.step)} in {ckpt.directory}", flush=True)
        return state, state_sharding, tx
    var_sharding = {"params": state_sharding.params, "batch_stats": state_sharding.batch_stats}
    variables = jax.jit(init, out_shardings=var_sharding,
                        compiler_options=INIT_COMPILER_OPTIONS)(jax.random.key(config.seed))
    if config.init_from:
        pretrained, source = load_pretrained(config.init_from)
        variables, reinit = merge_pretrained(variables, pretrained, config.reinit_head)
        print(f"initialised from {source}" + (f"; new head ({len(reinit)} arrays)" if reinit else ""), flush=True)
    return jax.jit(make_state, out_shardings=state_sharding)(variables), state_sharding, tx


# ----------------------------------------------------------------------------------------------- compiled steps
class Steps(NamedTuple):
    """The jitted functions of a run, with the state's and the batch's shardings (compiled on first call)."""

    train: Callable
    eval: Callable
    bn_accumulate: Callable
    guard: Callable


def compile_steps(config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation, mesh: Any,
                  state_sharding: Any) -> Steps:
    """``train_step`` (donating the old state), ``eval_step``, precise BN's accumulation and the BN guard's step."""
    batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    return Steps(
        train=jax.jit(functools.partial(train_step, model=model, tx=tx, config=config),
                      in_shardings=(state_sharding, batch), out_shardings=(state_sharding, replicated),
                      donate_argnums=0),
        eval=jax.jit(functools.partial(eval_step, model=model), in_shardings=(state_sharding, batch),
                     out_shardings=replicated),
        bn_accumulate=jax.jit(functools.partial(precise_bn.accumulate, model=model,
                                                num_batches=config.precise_bn.num_batches),
                              in_shardings=(state_sharding.batch_stats, state_sharding, batch),
                              out_shardings=state_sharding.batch_stats, donate_argnums=0),
        guard=jax.jit(functools.partial(precise_bn.guard_step, model=model), in_shardings=(state_sharding, batch),
                      out_shardings=replicated))


# ----------------------------------------------------------------------------------------------- the loop
@dataclasses.dataclass(frozen=True)
class Evaluators:
    """What an eval point runs (big_vision's evaluators): precise BN, the eval split, and at the end the BN guard."""

    precise_bn: Callable[[TrainState, int], tuple[TrainState, dict[str, float]]]
    evaluate: Callable[[TrainState], dict[str, float]]
    guard: Callable[[TrainState], dict[str, float]]


def train_loop(config: ml_collections.ConfigDict, state: TrainState, p_train_step: Callable,
               batches: Generator[dict[str, np.ndarray], None, None], evaluators: Evaluators,
               ckpt: checkpoints.Checkpoints, writer: MetricWriter, mesh: Any, *, start_step: int, total_steps: int,
               eval_every: int) -> tuple[TrainState, dict[str, float]]:
    """Steps ``start_step + 1 .. total_steps`` on ``batches`` (closed at the end): log, evaluate and checkpoint on
    schedule, checkpoint and stop on SIGTERM/SIGINT. Returns the state and the last eval metrics (``preempted`` and
    ``signal`` when stopped)."""
    is_main = jax.process_index() == 0
    finite = hooks.FiniteCheck(config.skip_nonfinite_updates, ckpt.directory)
    preemption = _Preemption()
    eval_metrics: dict[str, float] = {}
    bar = tqdm.tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                    disable=not is_main, mininterval=1.0)
    try:
        rate = _Rate(start_step, config.batch_size)
        for step in range(start_step + 1, total_steps + 1):
            state, metrics = p_train_step(state, sharding.global_batch(next(batches), mesh))
            finite.add(step, metrics["finite"])
            if step % config.log_every_steps == 0 or step == total_steps:
                finite.check()
                log_train(writer, bar, step, jax.device_get(metrics), rate(step))
            bar.update(1)
            if step % eval_every == 0 or step == total_steps:
                finite.check()
                state, eval_metrics = eval_point(state, step, evaluators, config, ckpt.directory,
                                                 final=step == total_steps)
                writer.write(step, eval_metrics)
                ckpt.save(state, {"eval_accuracy": eval_metrics["eval_accuracy"]}, force=True)
            elif step % config.checkpoint_every_steps == 0:
                finite.check()
                ckpt.save(state)
            if preemption.agreed():
                finite.check()
                return state, stop_on_signal(state, ckpt, step, preemption.signum, eval_metrics)
        ckpt.wait()
    finally:
        batches.close()  # a generator (data.train_batches): stops the input workers now
        bar.close()
        preemption.restore()
        writer.close()
        ckpt.wait()
        ckpt.close()
    return state, eval_metrics


class _Rate:
    """Images per second since the last call (the loop's throughput line)."""

    def __init__(self, step: int, batch_size: int):
        self.time, self.step, self.batch_size = time.perf_counter(), step, batch_size

    def __call__(self, step: int) -> float:
        now = time.perf_counter()
        rate = (step - self.step) * self.batch_size / max(now - self.time, 1e-9)
        self.time, self.step = now, step
        return rate


def log_train(writer: MetricWriter, bar: tqdm.tqdm, step: int, metrics: dict[str, Any], rate: float) -> None:
    writer.write(step, {"train_loss": float(metrics["loss"]), "train_accuracy": float(metrics["accuracy"]),
                        "images_per_sec": rate})
    bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", img_s=f"{rate:.1f}")


def eval_point(state: TrainState, step: int, evaluators: Evaluators, config: ml_collections.ConfigDict,
               directory: pathlib.Path, final: bool) -> tuple[TrainState, dict[str, float]]:
    """Precise BN, then the eval split (refused if not finite), then, at the last step, the BN guard."""
    state, bn_cost = evaluators.precise_bn(state, step)
    eval_metrics = {**evaluators.evaluate(state), **bn_cost}
    hooks.check_finite_eval(eval_metrics, step, directory, config.skip_nonfinite_updates)
    if final:
        eval_metrics.update(evaluators.guard(state))
    return state, eval_metrics


def evaluate(p_eval_step: Callable, eval_batches: Callable[[], Iterator[dict[str, np.ndarray]]], state: TrainState,
             mesh: Any) -> dict[str, float]:
    """Top-1, top-5 and cross-entropy over one pass of ``eval_batches()``, every example counted once."""
    totals: dict[str, float] = {}
    for batch in eval_batches():
        out = jax.device_get(p_eval_step(state, sharding.global_batch(batch, mesh)))
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = max(totals.get("count", 0.0), 1.0)
    return {"eval_accuracy": totals["correct"] / count, "eval_top5": totals["correct_top5"] / count,
            "eval_loss": totals["loss"] / count, "eval_count": int(totals["count"])}


def stop_on_signal(state: TrainState, ckpt: checkpoints.Checkpoints, step: int, signum: int,
                   eval_metrics: dict[str, float]) -> dict[str, Any]:
    """Checkpoint now and say how to resume; the metrics to return for a preempted run."""
    ckpt.save(state, force=True)
    ckpt.wait()
    what = "interrupted (SIGINT)" if signum == signal.SIGINT else "preempted"
    print(f"{what}: saved a checkpoint at step {step} in {ckpt.directory}; rerun the same command to resume",
          flush=True)
    return {**eval_metrics, "preempted": True, "signal": signum}


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


def print_final(m: dict[str, float]) -> None:
    print(f"final eval: accuracy={m['eval_accuracy']:.4f} loss={m['eval_loss']:.4f} top5={m['eval_top5']:.4f} "
          f"examples={m['eval_count']} batch_stats_accuracy={m['guard_batch_stats_accuracy']:.4f} "
          f"(eval mode {m['guard_eval_accuracy']:.4f} on the same {m['guard_count']})"
          + (f" precise_bn={m['precise_bn_seconds']:.1f}s" if "precise_bn_seconds" in m else ""), flush=True)
