"""Image-folder start-up from the cached index against the first scan (decoding every file, in 1 and W processes).

Writes an ImageFolder of 500x375 JPEGs (ImageNet-like, as bench/input_pipeline.py) in a temp dir and times what
``train.py`` does with it before step 1: ``ImageFolderSource`` (list, index, slice the splits) and the dataset
fingerprint. First with an empty cache and 1 scan process, then with an empty cache and ``--workers`` processes,
then again with the index those left (what every later run, resume and host does: stat, no decode). Prints
files/s and the extrapolation to ImageNet's 1,281,167 train images.

    python bench/folder_index.py                  # 5,000 JPEGs, 2 processes
    python bench/folder_index.py --images 50000 --workers 16

Last line: ``folder_index: R.RRx (bagjax cached index over the first scan)``.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bagjax import cli  # noqa: E402
from bagjax.data import fingerprint, sources  # noqa: E402
from benchargs import at_least  # noqa: E402
from input_pipeline import write_jpegs  # noqa: E402

IMAGENET_TRAIN = 1_281_167


def start_up(root: pathlib.Path, cache: pathlib.Path, workers: int) -> tuple[float, float]:
    """Wall and CPU seconds (this process and its workers) of a run's data start-up on ``root``: the source (index
    included) and its fingerprint."""
    options = sources.SourceOptions(spec=f"imagefolder:{root}", data_dir="", manual_dir="", train_split="train",
                                    eval_split="validation", synthetic_train_size=0, synthetic_eval_size=0,
                                    synthetic_image_size=0, cache_dir=str(cache), scan_workers=workers)
    start, cpu = time.perf_counter(), os.times()
    source = sources.ImageFolderSource(str(root), options)
    fingerprint.of_source(source, options.spec, {"train": "train", "eval": "validation"})
    end = os.times()
    used = sum(getattr(end, k) - getattr(cpu, k) for k in ("user", "system", "children_user", "children_system"))
    return time.perf_counter() - start, used


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="train JPEGs (500x375) in the generated folder")
    parser.add_argument("--workers", type=int, default=2, help="scan processes of the parallel first scan")
    parser.add_argument("--repeats", type=int, default=3, help="cached start-ups timed (the median is reported)")
    args = parser.parse_args()
    at_least(parser, args, images=8, workers=1, repeats=1)
    with tempfile.TemporaryDirectory() as tmp:
        root, tmp = pathlib.Path(tmp) / "images", pathlib.Path(tmp)
        start = time.perf_counter()
        write_jpegs(root, args.images)
        files = args.images + 8  # + the validation split's
        print(f"wrote {files} JPEGs in {time.perf_counter() - start:.1f} s; {sources.available_cores()} cores",
              flush=True)
        one = start_up(root, tmp / "cache1", 1)
        many = start_up(root, tmp / "cache2", args.workers)
        cached = sorted(start_up(root, tmp / "cache2", args.workers) for _ in range(args.repeats))[args.repeats // 2]
    rows = [("first scan, 1 process", one), (f"first scan, {args.workers} processes", many),
            ("cached index (stat only)", cached)]
    print(f"| start-up ({files} files) | seconds | CPU seconds | files/s | ImageNet train ({IMAGENET_TRAIN:,} files) |")
    print("|---|---|---|---|---|")
    for name, (seconds, cpu) in rows:
        estimate = IMAGENET_TRAIN / files * seconds
        print(f"| {name} | {seconds:.2f} | {cpu:.2f} | {files / seconds:,.0f} | {estimate / 60:.1f} min |")
    print(f"first scan: {one[0] / many[0]:.2f}x with {args.workers} processes over 1")
    print(f"folder_index: {many[0] / cached[0]:.2f}x (bagjax cached index over the first scan)")


if __name__ == "__main__":
    main()
