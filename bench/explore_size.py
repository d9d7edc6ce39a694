"""Size of an explorer page (python -m bagjax.explore) for 224 px photos and a 1000-class BagNet-33.

The page's data against the plain way to embed the same evidence: every image as PNG and the patch logits of every
class as float32 (base64). bagjax embeds JPEGs (quality 90) and float16 logits of the top-5 classes plus the
possible blackout winners, at most ``--max-classes``. The photos are random 224 px crops of scikit-learn's two
sample images; the BagNet-33 has random weights (He-normal kernels, unit BatchNorm), so most images reach the class
cap (the worst case for size). The target is at most 4 MB for 32 images.

    python bench/explore_size.py [--images 32] [--classes 1000] [--max-classes 48]

The last line is `explore_size: R.RRx (bagjax over PNG + float32 logits of every class)` (bytes of the baseline
divided by the bytes of the page: larger is smaller).
"""
from __future__ import annotations

import base64
import io
import pathlib
import sys
import tempfile

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

import jax.numpy as jnp
import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images
from test_anchornet import numpy_variables

from bagjax import cli, data, explore
from bagjax.models import create_model
from bagjax.workdir import Trained
from benchargs import at_least
from configs import default

MODEL, SIZE, TARGET_MB = "bagnet33", 224, 4.0


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="photos on the page")
    parser.add_argument("--classes", type=int, default=1000, help="classes of the BagNet-33")
    parser.add_argument("--max-classes", type=int, default=explore.MAX_CLASSES, help="bagjax.explore --max-classes")
    args = parser.parse_args()
    at_least(parser, args, images=1, classes=2, max_classes=explore.TOP_K)

    config = default.get_config()
    config.model, config.image_size = MODEL, SIZE
    model = create_model(MODEL, num_classes=args.classes)
    variables = numpy_variables(model, jnp.zeros((1, SIZE, SIZE, 3)))
    trained = Trained(config, model, variables, tuple(f"class {c}" for c in range(args.classes)))
    rng = np.random.default_rng(0)
    photos = load_sample_images().images
    examples = []
    for i in range(args.images):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - SIZE), rng.integers(0, photo.shape[1] - SIZE)
        examples.append(explore.Example(f"photo {i}", photo[y:y + SIZE, x:x + SIZE]))

    with tempfile.TemporaryDirectory() as tmp:
        page = explore.explore(tmp, examples=examples, trained=trained, out=pathlib.Path(tmp) / "page.html",
                               max_classes=args.max_classes)
        bagjax_bytes = page.stat().st_size
        payload = page.read_text()
    capped = payload.count('"cut":true')

    baseline_bytes = 0
    for example in examples:
        buffer = io.BytesIO()
        Image.fromarray(example.pixels).save(buffer, format="PNG")
        logits = model.apply(variables, data.normalize(example.pixels)[None], train=False, method="patch_logits")[0]
        stored = np.asarray(logits, "<f4").tobytes()
        baseline_bytes += len(base64.b64encode(buffer.getvalue())) + len(base64.b64encode(stored))

    mb = bagjax_bytes / 1e6
    print(f"{MODEL}, {args.classes} classes, random weights, {args.images} photos at {SIZE} px; "
          f"{capped} of {args.images} images hit --max-classes {args.max_classes}")
    print(f"bagjax.explore page: {mb:.2f} MB ({'within' if mb <= TARGET_MB else 'over'} the {TARGET_MB:.0f} MB target "
          f"for 32 images); PNG + float32 logits of every class: {baseline_bytes / 1e6:.2f} MB of data alone")
    print(f"explore_size: {baseline_bytes / bagjax_bytes:.2f}x (bagjax over PNG + float32 logits of every class)")


if __name__ == "__main__":
    main()
