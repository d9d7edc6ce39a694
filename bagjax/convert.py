"""PyTorch state_dict -> Flax variables for the official BagNets and torchvision's ResNet-50.

The official BagNet weights (Brendel & Bethge 2019, bethgelab ``bagnets``) are files named
``bagnet8/16/32-*.pth.tar`` for receptive fields 9/17/33, holding state_dicts saved from
``nn.DataParallel`` (keys prefixed ``module.``), sometimes wrapped in ``{'state_dict': ...}``.
Conversion is a renaming plus two layout changes: conv weights OIHW -> HWIO and linear weights
(out, in) -> (in, out); BatchNorm weight/bias become params scale/bias and the running statistics
become batch_stats mean/var (``num_batches_tracked`` is dropped).

``python -m bagjax.convert --model bagnet33 --torch-weights FILE --out DIR`` writes DIR/variables
(an orbax checkpoint) and DIR/model.json, which ``read_pretrained`` (and ``config.init_from``) reads.
The model names ``bagnet8``, ``bagnet16`` and ``bagnet32`` of the official files are accepted as
aliases of ``bagnet9``, ``bagnet17`` and ``bagnet33``.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np

import bagjax
from bagjax import cli
from bagjax.models.bagnet import KERNEL3
from bagjax.errors import PathNotFoundError, UserError

MODELS = ("bagnet9", "bagnet17", "bagnet33", "resnet50")
ALIASES = {"bagnet8": "bagnet9", "bagnet16": "bagnet17", "bagnet32": "bagnet33"}

# ResNet-50 stages (He et al. 2016, Table 1): planes and block counts; bottleneck expansion 4.
_STAGE_PLANES = (64, 128, 256, 512)
_STAGE_BLOCKS = (3, 4, 6, 3)
_EXPANSION = 4
# Leading blocks per stage with a 3x3 conv2: the BagNets' kernel3, and every block of ResNet-50.
_KERNEL3 = {**KERNEL3, "resnet50": _STAGE_BLOCKS}
_BN_TORCH_TO_FLAX = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                     "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}

_TORCH_MISSING = "PyTorch is needed to read .pth files: pip install torch==2.13.0 (CPU build)"


def canonical_name(name: str) -> str:
    """`bagnet9/17/33` or `resnet50`, mapping the official file names bagnet8/16/32 to their rf."""
    name = ALIASES.get(name, name)
    if name not in MODELS:
        raise UserError(f"cannot convert model {name!r}: choose one of {', '.join(MODELS + tuple(ALIASES))}")
    return name


def _conv_shape(out_c: int, in_c: int, k: int) -> tuple[int, ...]:
    return (out_c, in_c, k, k)


def torch_layout(name: str, num_classes: int) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], str]]:
    """Expected torch keys -> (flax path, torch shape, kind) with kind 'conv', 'linear', 'vector' or a BN field.

    The layout is the torchvision ResNet-50 one; BagNets (BagNet paper Sec. 3) swap the 7x7 stem for
    1x1 + 3x3 convs and use 1x1 conv2 in blocks beyond the per-stage 3x3 count.
    """
    name = canonical_name(name)
    layout: dict[str, tuple[tuple[str, ...], tuple[int, ...], str]] = {}

    def conv(tkey: str, fpath: tuple[str, ...], shape: tuple[int, ...]) -> None:
        layout[f"{tkey}.weight"] = (fpath + ("kernel",), shape, "conv")

    def bn(tkey: str, fpath: tuple[str, ...], n: int) -> None:
        for field in _BN_TORCH_TO_FLAX:
            layout[f"{tkey}.{field}"] = (fpath, (n,), field)

    if name == "resnet50":
        conv("conv1", ("conv1",), _conv_shape(64, 3, 7))
    else:
        conv("conv1", ("conv1",), _conv_shape(64, 3, 1))
        conv("conv2", ("conv2",), _conv_shape(64, 64, 3))
    bn("bn1", ("bn1",), 64)
    inplanes = 64
    for s, (planes, blocks, k3) in enumerate(zip(_STAGE_PLANES, _STAGE_BLOCKS, _KERNEL3[name])):
        for i in range(blocks):
            t, f = f"layer{s + 1}.{i}", f"layer{s + 1}_{i}"
            conv(f"{t}.conv1", (f, "conv1"), _conv_shape(planes, inplanes, 1))
            bn(f"{t}.bn1", (f, "bn1"), planes)
            conv(f"{t}.conv2", (f, "conv2"), _conv_shape(planes, planes, 3 if i < k3 else 1))
            bn(f"{t}.bn2", (f, "bn2"), planes)
            conv(f"{t}.conv3", (f, "conv3"), _conv_shape(planes * _EXPANSION, planes, 1))
            bn(f"{t}.bn3", (f, "bn3"), planes * _EXPANSION)
            if i == 0:
                conv(f"{t}.downsample.0", (f, "downsample_conv"), _conv_shape(planes * _EXPANSION, inplanes, 1))
                bn(f"{t}.downsample.1", (f, "downsample_bn"), planes * _EXPANSION)
            inplanes = planes * _EXPANSION
    layout["fc.weight"] = (("head", "kernel"), (num_classes, inplanes), "linear")
    layout["fc.bias"] = (("head", "bias"), (num_classes,), "vector")
    return layout


def _to_numpy(value: Any) -> np.ndarray:
    """A float32 numpy copy of a torch tensor (any dtype, any device) or array, without importing torch."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _unwrap(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Strip a {'state_dict': ...} wrapper, DataParallel `module.` prefixes and BN step counters."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if not key.endswith("num_batches_tracked"):
            out[key] = value
    return out


def _shape_of(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in value.shape)


def guess_model(state_dict: Mapping[str, Any]) -> str | None:
    """The model whose layout matches the state_dict's keys and shapes exactly, or None."""
    sd = _unwrap(state_dict)
    if "fc.weight" not in sd:
        return None
    num_classes = _shape_of(sd["fc.weight"])[0]
    for name in MODELS:
        layout = torch_layout(name, num_classes)
        if set(layout) == set(sd) and all(_shape_of(sd[k]) == layout[k][1] for k in layout):
            return name
    return None


def _fail(problem: str, state_dict: Mapping[str, Any], name: str) -> None:
    guess = guess_model(state_dict)
    hint = (f"these weights look like {guess}: use --model {guess}" if guess and guess != name
            else f"check that the file holds {name} weights")
    raise UserError(f"{problem} for {name}; {hint}")


def from_torch_state_dict(name: str, state_dict: Mapping[str, Any]) -> dict[str, dict]:
    """Official BagNet or torchvision ResNet-50 state_dict -> {'params', 'batch_stats'} as float32 numpy.

    Accepts torch tensors or numpy arrays, `{'state_dict': ...}` wrappers and `module.` prefixes;
    `num_classes` is read from `fc.weight`. Unknown or missing keys and shape mismatches raise a
    one-line ValueError naming the key.
    """
    name = canonical_name(name)
    sd = _unwrap(state_dict)
    if "fc.weight" not in sd:
        _fail("the state_dict has no fc.weight", state_dict, name)
    num_classes = _shape_of(sd["fc.weight"])[0]
    layout = torch_layout(name, num_classes)
    unknown = sorted(set(sd) - set(layout))
    if unknown:
        _fail(f"unexpected key {unknown[0]!r} ({len(unknown)} unexpected in all)", state_dict, name)
    missing = [k for k in layout if k not in sd]
    if missing:
        _fail(f"missing key {missing[0]!r} ({len(missing)} missing in all)", state_dict, name)
    variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for key, (fpath, shape, kind) in layout.items():
        got = _shape_of(sd[key])
        if got != shape:
            _fail(f"{key} has shape {got} but {shape} is expected", state_dict, name)
        value = _to_numpy(sd[key])
        if kind == "conv":
            collection, leaf_path, value = "params", fpath, value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif kind == "linear":
            collection, leaf_path, value = "params", fpath, value.T  # (out, in) -> (in, out)
        elif kind == "vector":
            collection, leaf_path = "params", fpath
        else:
            collection, leaf = _BN_TORCH_TO_FLAX[kind]
            leaf_path = fpath + (leaf,)
        node = variables[collection]
        for part in leaf_path[:-1]:
            node = node.setdefault(part, {})
        node[leaf_path[-1]] = np.ascontiguousarray(value)
    return variables


def load_torch_file(path: str | os.PathLike) -> Mapping[str, Any]:
    """Read a .pth / .pth.tar file on the CPU with PyTorch (imported only here)."""
    try:
        import torch
    except ImportError as e:
        raise UserError(_TORCH_MISSING) from e
    path = pathlib.Path(path)
    if not path.is_file():
        raise PathNotFoundError(f"no such weights file: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # random bytes, pickles of whole models or optimizer objects
        raise UserError(f"{path} is not a PyTorch state_dict (torch.load with weights_only=True cannot read it: "
                        f"{type(e).__name__}): give the .pth/.pth.tar file of the official weights") from None
    if not isinstance(loaded, Mapping) or not all(isinstance(k, str) for k in loaded):
        raise UserError(f"{path} is not a PyTorch state_dict (it holds a {type(loaded).__name__}, not a dict of "
                        "named tensors): give the .pth/.pth.tar file of the official weights")
    return loaded


def num_parameters(variables: Mapping[str, Any]) -> int:
    """The number of trainable parameters (the 'params' collection)."""
    return int(sum(np.size(leaf) for leaf in _leaves(variables["params"])))


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, Mapping):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    return [tree]


def write_pretrained(out_dir: str | os.PathLike, variables: Mapping[str, Any], *, model: str,
                     num_classes: int, head: str = "learned", source: str = "",
                     overwrite: bool = False) -> None:
    """Write `out_dir/variables` (orbax) and `out_dir/model.json` {model, num_classes, head, source, bagjax_version}."""
    import orbax.checkpoint as ocp

    from bagjax.training.checkpoints import is_workdir

    out = pathlib.Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a directory")
    if is_workdir(out):  # init_from would then read the training checkpoint, not these weights
        raise UserError(f"--out {out} is a training workdir: write the converted weights to a directory of "
                        "their own (init_from takes either kind)")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out} is not empty: pass --overwrite or choose another directory")
        if (out / "variables").exists():
            shutil.rmtree(out / "variables")
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "variables", dict(variables))
        ckptr.wait_until_finished()
    meta = {"model": model, "num_classes": int(num_classes), "head": head, "source": source,
            "bagjax_version": bagjax.__version__}
    (out / "model.json").write_text(json.dumps(meta, indent=2) + "\n")


def check_pretrained(path: str | os.PathLike) -> pathlib.Path:
    """``path`` as an absolute path if it looks like a `write_pretrained` directory, else a one-line error."""
    path = pathlib.Path(path).absolute()
    if not (path / "model.json").is_file() or not (path / "variables").is_dir():
        raise UserError(f"{path} is not a converted checkpoint (no model.json + variables/): "
                        "create one with python -m bagjax.convert")
    return path


def read_pretrained(path: str | os.PathLike) -> tuple[dict, dict]:
    """(variables as numpy, meta) from a directory written by `write_pretrained`."""
    import jax
    import orbax.checkpoint as ocp

    path = check_pretrained(path)
    meta = json.loads((path / "model.json").read_text())
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(path / "variables")
    return jax.tree.map(np.asarray, variables), meta


def reduced_precision_warning(init_from: str, dtype: str) -> str | None:
    """One warning line when converted official BagNet weights are to run in a dtype below float32, else None.

    The original BagNet weights have near-dead layers that lose accuracy at reduced precision: a published
    re-evaluation of BagNet-33 gives 66.7 % top-1 in FP32, 64.2 % in TF32 and 58.0 % in fp16.
    """
    import jax.numpy as jnp  # for bfloat16's itemsize

    meta_path = pathlib.Path(init_from) / "model.json"
    if not init_from or jnp.dtype(dtype).itemsize >= 4 or not meta_path.is_file():
        return None
    model = json.loads(meta_path.read_text()).get("model", "")
    if model not in KERNEL3:
        return None
    return (f"warning: {init_from} holds the original {model} weights and dtype={dtype}: these weights lose "
            "accuracy below float32 (BagNet-33 re-evaluated: FP32 66.7 %, TF32 64.2 %, fp16 58.0 % top-1, from "
            "near-dead layers); evaluate with --config.dtype=float32 to reproduce the published accuracy")


def main(argv: list[str] | None = None) -> None:
    """CLI: convert a PyTorch weights file and write it for `train.py --config.init_from=DIR`."""
    parser = cli.ArgumentParser(prog="python -m bagjax.convert", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=MODELS + tuple(ALIASES))
    parser.add_argument("--torch-weights", required=True, help="a .pth / .pth.tar state_dict file")
    parser.add_argument("--out", required=True, help="output directory (must be empty or new)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing conversion in --out")
    args = parser.parse_args(argv)
    name = canonical_name(args.model)
    with cli.user_errors():
        variables = from_torch_state_dict(name, load_torch_file(args.torch_weights))
        num_classes = variables["params"]["head"]["bias"].shape[0]
        write_pretrained(args.out, variables, model=name, num_classes=num_classes,
                         source=os.path.basename(args.torch_weights), overwrite=args.overwrite)
    print(f"wrote {name} ({num_parameters(variables):,} parameters, {num_classes} classes) to {args.out}")


if __name__ == "__main__":
    main()
