"""Export a trained bagjax model to ONNX or a TF SavedModel that runs without JAX.

    python -m bagjax.export --workdir runs/demo --format onnx --out exports/demo
    python -m bagjax.export --weights converted/bagnet33 --format savedmodel --out exports/bagnet33_tf

The exported graph takes uint8 NHWC RGB images and normalises them inside (``bagjax.data.normalize``, as the
jitted training and eval steps do), so a deployer cannot get the preprocessing wrong. Its batch is always
dynamic; its height and width are dynamic too (any size at least the receptive field) unless
``--image-size`` fixes them. A BagNet returns ``logits`` and ``patch_logits`` (Brendel & Bethge 2019, Fig. 2:
the evidence map, which grows with the image); AnchorNet returns the image ``logits`` of
``anchornet.image_logits`` and each branch's ``logits_RF``, ``class_maps_RF`` and ``attention_RF`` (Yang et al.,
Figure 2). The class names, the input rule, the receptive field, stride and the bagjax version travel inside
the file (ONNX ``metadata_props``; the SavedModel's ``assets/bagjax.json``), and ``OUT/README.md`` is a model
card with a runnable onnxruntime or TensorFlow snippet. Details: docs/deploy.md.

ONNX goes through jax2onnx, the SavedModel through orbax-export (jax2tf); both are in the ``export`` extra:
``pip install -e ".[export]"``. Computation is float32 whatever the training dtype (the parameters are float32).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import pathlib
import shutil
import time
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bagjax  # noqa: E402
from bagjax import cli  # noqa: E402
from bagjax.errors import UserError  # noqa: E402

FORMATS = ("onnx", "savedmodel")
FILES = {"onnx": "model.onnx", "savedmodel": "saved_model"}
INPUT_NAME = "images"
METADATA_FILE = "bagjax.json"
RESNET_MIN_SIZE = 32  # ResNet-50 (padded convs, total stride 32) needs no receptive field; one output location
_EXTRA = 'pip install -e ".[export]"'


@dataclasses.dataclass(frozen=True)
class Source:
    """What is exported: a model with its float32 variables, the names of its classes and its preprocessing."""

    name: str  # registry name (bagjax.models.MODELS)
    model: Any
    variables: dict[str, Any]
    class_names: tuple[str, ...]
    image_size: int  # the size it was trained / is evaluated at
    preprocessing: str  # 'resize' (whole image to image_size) or 'crop:F' (shorter side to size/F, centre crop)
    origin: str
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


def load_workdir(workdir: str | pathlib.Path, checkpoint: str = "best") -> Source:
    """A training workdir's model at ``checkpoint``: 'best' (by eval accuracy, else latest), 'latest' or a step."""
    from bagjax.models import create_model
    from bagjax.training import checkpoints
    from bagjax.workdir import load_trained

    steps = checkpoints.finished_steps(workdir) if checkpoints.is_workdir(workdir) else []
    if checkpoint == "best":
        step = None
    elif checkpoint == "latest":
        step = steps[-1] if steps else None
    elif checkpoint.isdigit() and int(checkpoint) in steps:
        step = int(checkpoint)
    else:
        raise UserError(f"--checkpoint {checkpoint}: give best, latest or one of the steps in {workdir}: "
                        f"{', '.join(map(str, steps)) or 'none (train first)'}")
    trained = load_trained(workdir, step)
    config = trained.config
    kw = dict(config.get("model_kwargs", {}))
    model = create_model(config.model, num_classes=len(trained.class_names), head=config.head, **kw)  # float32
    preprocessing = "resize" if config.dataset.startswith("synthetic") else f"crop:{config.data.crop_fraction}"
    return Source(config.model, model, trained.variables, trained.class_names, int(config.image_size),
                  preprocessing, f"workdir {pathlib.Path(workdir).name}, checkpoint {checkpoint}", kw)


def load_weights(weights: str | pathlib.Path, model: str | None = None) -> Source:
    """A ``bagjax.convert`` output (e.g. the official BagNet-33 ImageNet weights); classes are named by index."""
    from bagjax import convert
    from bagjax.models import create_model

    variables, meta = convert.read_pretrained(weights)
    if model is not None and convert.canonical_name(model) != meta["model"]:
        raise UserError(f"--model {model}: {weights} holds {meta['model']} weights: pass --model {meta['model']} "
                        "or leave --model out")
    num_classes = int(meta["num_classes"])
    built = create_model(meta["model"], num_classes=num_classes, head=meta.get("head", "learned"))
    names = tuple(str(i) for i in range(num_classes))
    origin = f"converted weights {meta.get('source') or pathlib.Path(weights).name}"
    return Source(meta["model"], built, variables, names, 224, "crop:0.875", origin)  # ImageNet's eval size


def all_outputs(source: Source, x: jax.Array) -> dict[str, jax.Array]:
    """Every output of the model on normalised images ``x``, flat: image ``logits`` first, then a BagNet's
    ``patch_logits`` or AnchorNet's per-branch ``logits_RF``, ``class_maps_RF`` and ``attention_RF``."""
    from bagjax.models import is_bagnet

    if is_bagnet(source.name):  # the network once: the image logits are the mean of the patch logits (contract)
        patch_logits = source.model.apply(source.variables, x, train=False, method="patch_logits")
        return {"logits": jnp.mean(patch_logits, axis=(1, 2)), "patch_logits": patch_logits}
    raw = source.model.apply(source.variables, x, train=False)
    if isinstance(raw, dict):  # AnchorNet: {'logits', 'class_maps', 'attention'}, each keyed by branch
        from bagjax.models.anchornet import image_logits

        flat = {"logits": image_logits(raw)}
        for rf in raw["logits"]:
            flat.update({f"{key}_{rf}": raw[key][rf] for key in ("logits", "class_maps", "attention")})
        return flat
    return {"logits": raw}


def available_outputs(source: Source) -> tuple[str, ...]:
    """The names ``all_outputs`` gives for this model (found by shape evaluation, nothing is computed)."""
    size, names = geometry(source)[2], []
    jax.eval_shape(lambda x: names.extend(all_outputs(source, x)), jax.ShapeDtypeStruct((1, size, size, 3),
                                                                                          jnp.float32))
    return tuple(names)  # in all_outputs' order (the dict eval_shape returns has its keys sorted)


def check_outputs(source: Source, outputs: list[str] | None) -> tuple[str, ...]:
    """``outputs`` (default: all the model has), refusing any it has not."""
    available = available_outputs(source)
    if not outputs:
        return available
    unknown = [o for o in outputs if o not in available]
    if unknown:
        raise UserError(f"--outputs {','.join(unknown)}: {source.name} has no such output; it has "
                        f"{','.join(available)}")
    return tuple(dict.fromkeys(outputs))


def serving_fn(source: Source, outputs: tuple[str, ...]) -> Callable[[Any, jax.Array], dict[str, jax.Array]]:
    """``fn(variables, uint8 NHWC images) -> {name: array}``: normalisation inside, eval mode, float32."""
    from bagjax.data import normalize

    def fn(variables, images):
        flat = all_outputs(dataclasses.replace(source, variables=variables), normalize(images))
        return {o: flat[o] for o in outputs}

    return fn


def geometry(source: Source) -> tuple[int | None, int | None, int]:
    """(receptive field, stride, smallest input side): the evidence-map geometry (None for ResNet-50)."""
    from bagjax.models import receptive_field

    try:
        rf, stride = receptive_field(source.name, **source.model_kwargs)  # AnchorNet: its largest branch
    except ValueError:  # ResNet-50
        return None, None, RESNET_MIN_SIZE
    return rf, stride, rf


def metadata(source: Source, outputs: tuple[str, ...], image_size: int | None, fmt: str) -> dict[str, Any]:
    """What the exported file says about itself (also the model card's facts)."""
    rf, stride, min_size = geometry(source)
    rule = (f"fixed {image_size}x{image_size} px" if image_size else f"any height and width >= {min_size} px")
    return {"bagjax_version": bagjax.__version__, "model": source.name, "format": fmt, "source": source.origin,
            "class_names": list(source.class_names), "input": INPUT_NAME,
            "input_rule": f"uint8 RGB, NHWC, any batch, {rule}; normalised inside", "image_size": image_size,
            "min_size": min_size, "trained_image_size": source.image_size, "preprocessing": source.preprocessing,
            "receptive_field": rf, "stride": stride, "outputs": list(outputs)}


def _input_shape(source: Source, image_size: int | None) -> tuple[str, tuple[str, ...]]:
    """(the jax.export shape string, its constraints) of the image input; the batch is always symbolic."""
    if image_size:
        return f"b, {image_size}, {image_size}, 3", ()
    min_size = geometry(source)[2]
    return "b, h, w, 3", (f"h >= {min_size}", f"w >= {min_size}")


@contextlib.contextmanager
def _export_form():
    """Trace AnchorNet's depthwise convs as one grouped conv (not XLA's platform choice between two forms)."""
    from bagjax.models.layers import depthwise_form

    with depthwise_form("grouped"):
        yield


def write_onnx(source: Source, path: pathlib.Path, outputs: tuple[str, ...], image_size: int | None,
               meta: dict[str, Any]) -> None:
    """ONNX through jax2onnx, with the metadata in ``metadata_props`` and jax2onnx's stale shapes removed."""
    logging.getLogger("jax2onnx").setLevel(logging.ERROR)  # it logs a traceback per plugin our jax lacks
    try:
        import onnx
        from jax2onnx import to_onnx
    except ImportError as e:
        raise UserError(f"ONNX export needs jax2onnx and onnx ({e.name} is missing): {_EXTRA}") from None
    shape, constraints = _input_shape(source, image_size)
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(shape, constraints=constraints), jnp.uint8)
    fn = serving_fn(source, outputs)
    with _export_form(), contextlib.redirect_stdout(io.StringIO()):  # jax2onnx prints debug lines
        proto = to_onnx(lambda images: tuple(fn(source.variables, images).values()), [spec],
                        model_name=f"bagjax_{source.name}", input_names=[INPUT_NAME], output_names=list(outputs))
    # jax2onnx keeps intermediate shapes of its NHWC<->NCHW rewrites that contradict the graph for symbolic
    # sizes; onnxruntime then rejects the graph (ShapeInferenceError). The runtime infers them itself.
    del proto.graph.value_info[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value if isinstance(value, str) else json.dumps(value))
    onnx.save(proto, path)  # one self-contained file (< 2 GB): no external .onnx.data to append to


def write_savedmodel(source: Source, path: pathlib.Path, outputs: tuple[str, ...], image_size: int | None,
                     meta: dict[str, Any]) -> None:
    """A TF SavedModel through orbax-export: signature ``serving_default(images) -> {output: tensor}``, with the
    metadata as the asset ``assets/bagjax.json``."""
    try:
        import tensorflow as tf
        from orbax.export import ExportManager, JaxModule, ServingConfig
    except ImportError as e:
        raise UserError(f"SavedModel export needs orbax-export ({e.name} is missing): {_EXTRA}") from None
    shape, constraints = _input_shape(source, image_size)
    asset = path.parent / METADATA_FILE
    asset.write_text(json.dumps(meta, indent=2) + "\n")
    fn = serving_fn(source, outputs)
    with _export_form():
        module = JaxModule(source.variables, fn, input_polymorphic_shape=f"({shape})",
                           jax2tf_kwargs={"polymorphic_constraints": constraints})
        side = image_size or None
        signature = [tf.TensorSpec([None, side, side, 3], tf.uint8, name=INPUT_NAME)]
        manager = ExportManager(module, [ServingConfig("serving_default", input_signature=signature,
                                                       extra_trackable_resources=tf.saved_model.Asset(str(asset)))])
        manager.save(str(path))
    asset.unlink()


def model_card(meta: dict[str, Any], fmt: str) -> str:
    """``README.md`` next to the export: classes, input, outputs, evidence-map geometry and a runnable snippet."""
    rf, stride = meta["receptive_field"], meta["stride"]
    names = meta["class_names"]
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    outputs = []
    for o in meta["outputs"]:
        if o == "logits":
            outputs.append("- `logits` (B, classes): the image scores (softmax them for probabilities).")
        elif o.startswith(("patch_logits", "class_maps")):
            branch_rf = int(o.rsplit("_", 1)[1]) if o.startswith("class_maps") else rf
            outputs.append(f"- `{o}` (B, H', W', classes): the evidence map. Location (i, j) sees the input box rows "
                           f"[{stride}i, {stride}i + {branch_rf}), columns [{stride}j, {stride}j + {branch_rf}); "
                           f"H' = (height - {branch_rf}) // {stride} + 1"
                           + ("; the image logits are its mean." if o == "patch_logits" else "."))
        elif o.startswith("attention"):
            outputs.append(f"- `{o}` (B, H', W'): the branch's spatial attention (sums to 1), on the class map's "
                           "grid.")
        else:
            outputs.append(f"- `{o}` (B, classes): one branch's image logits.")
    size = meta["trained_image_size"]
    if meta["preprocessing"] == "resize":
        prep = f"image = image.resize(({size}, {size}), Image.BILINEAR)  # as in training"
    else:
        short = int(size / float(meta["preprocessing"].split(":")[1]) + 1e-6)
        prep = (f"w, h = image.size  # shorter side to {short} px, then the centre {size}x{size} crop\n"
                f"new = ({short}, int({short} * h / w)) if w <= h else (int({short} * w / h), {short})\n"
                "image = image.resize(new, Image.BILINEAR) if new != image.size else image\n"
                f"left, top = round((new[0] - {size}) / 2), round((new[1] - {size}) / 2)\n"
                f"image = image.crop((left, top, left + {size}, top + {size}))")
    if fmt == "onnx":
        run = ("import onnxruntime as ort\n"
               "session = ort.InferenceSession(f\"{EXPORT}/model.onnx\")\n"
               "names = [o.name for o in session.get_outputs()]\n"
               "outputs = dict(zip(names, session.run(None, {\"images\": pixels})))")
    else:
        run = ("import tensorflow as tf\n"
               "model = tf.saved_model.load(f\"{EXPORT}/saved_model\")\n"
               "outputs = {k: v.numpy() for k, v in model.signatures[\"serving_default\"](images=pixels).items()}")
    classes = "json.loads(session.get_modelmeta().custom_metadata_map[\"class_names\"])" if fmt == "onnx" else \
        "json.load(open(f\"{EXPORT}/saved_model/assets/bagjax.json\"))[\"class_names\"]"
    snippet = ("import json, sys\nimport numpy as np\nfrom PIL import Image\n\n"
               "EXPORT, IMAGE = sys.argv[1], sys.argv[2]\n"
               f"image = Image.open(IMAGE).convert(\"RGB\")\n{prep}\n"
               f"pixels = np.asarray(image, np.uint8)[None]  # uint8 NHWC; the model normalises\n{run}\n"
               f"classes = {classes}\n"
               "print(classes[int(outputs[\"logits\"][0].argmax())], outputs[\"logits\"][0].tolist())\n")
    geometry_line = (f"Receptive field {rf} px, stride {stride} px." if rf else
                     "No bounded receptive field (a ResNet-50): no evidence map.")
    return "\n".join([
        f"# {meta['model']} (bagjax {meta['bagjax_version']}, {fmt})", "",
        f"Exported by `python -m bagjax.export` from {meta['source']}.", "",
        f"- Classes ({len(names)}): {shown}.",
        f"- Input `{meta['input']}`: {meta['input_rule']}. Trained at {size} px.",
        f"- {geometry_line}", "", "## Outputs", "", *outputs, "",
        "## Run it (no JAX, no bagjax)", "", "`python snippet.py EXPORT_DIR IMAGE` with this code:", "",
        "```python", snippet.rstrip(), "```", ""])


def snippet_of(card: str) -> str:
    """The Python code block of a model card (tests run it as a user would)."""
    return card.split("```python\n", 1)[1].split("```", 1)[0]


def export(source: Source, fmt: str, out: str | pathlib.Path, *, outputs: list[str] | None = None,
           image_size: int | None = None, overwrite: bool = False) -> pathlib.Path:
    """Write ``out/model.onnx`` or ``out/saved_model`` with ``out/README.md``; returns the model's path.

    The export is written to a fresh sibling directory and moved into place only when complete, so a failed
    export leaves an earlier one untouched and a re-export never appends to old files.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    chosen = check_outputs(source, outputs)
    min_size = geometry(source)[2]
    if image_size is not None and image_size < min_size:
        raise UserError(f"--image-size {image_size}: {source.name} needs at least {min_size} px (its receptive "
                        f"field); give --image-size {min_size} or more, or leave it out for any size")
    out = cli.check_output_dir(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} is not empty: pass --overwrite to replace it, or choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        meta = metadata(source, chosen, image_size, fmt)
        writer = write_onnx if fmt == "onnx" else write_savedmodel
        writer(source, staging / FILES[fmt], chosen, image_size, meta)
        (staging / "README.md").write_text(model_card(meta, fmt))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / FILES[fmt]


def size_of(path: pathlib.Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog="python -m bagjax.export", description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a training workdir (python train.py ... --workdir)")
    src.add_argument("--weights", help="a bagjax.convert output directory (model.json + variables/)")
    parser.add_argument("--model", help="with --weights: the model it holds (checked against its model.json)")
    parser.add_argument("--checkpoint", help="with --workdir: best (default), latest or a step")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="output directory (model file + README.md model card)")
    parser.add_argument("--outputs", help="comma-separated (default: all, e.g. logits,patch_logits for a BagNet)")
    parser.add_argument("--image-size", type=int, help="fix height and width (default: any size >= the minimum)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    args = parser.parse_args(argv)

    def run() -> None:
        start = time.perf_counter()
        if args.workdir and args.model:
            raise UserError("--model goes with --weights: a workdir's config.json names its model; leave it out")
        if args.weights and args.checkpoint:
            raise UserError("--checkpoint goes with --workdir: converted --weights hold one set of weights")
        source = (load_workdir(args.workdir, args.checkpoint or "best") if args.workdir else
                  load_weights(args.weights, args.model))
        outputs = [o.strip() for o in args.outputs.split(",") if o.strip()] if args.outputs else None
        path = export(source, args.format, args.out, outputs=outputs, image_size=args.image_size,
                      overwrite=args.overwrite)
        print(f"wrote {path} ({size_of(path) / 1e6:.1f} MB) and its model card {path.parent / 'README.md'} "
              f"in {time.perf_counter() - start:.1f} s")

    cli.run_main(run)


if __name__ == "__main__":
    main()
