"""Dataset sources behind the specs `synthetic[:VARIANT]`, `imagefolder:PATH`, `tfds:NAME[/CONFIG]`.

Two kinds of source:
- indexed (synthetic, imagefolder): random access by example index, so every
    process reads only its own share and a resume skips examples for free;
- streamed (tfds): a deterministic record stream (fixed file order plus a
    seeded shuffle buffer per epoch); every process reads the serialized records
    of each global batch but decodes only its own slice.
Images leave a source as RGB (PIL image or uint8 array); preprocessing lives
in preprocess.py and is the same for all sources.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
import random
import socket
from collections.abc import Iterator

import numpy as np
from PIL import Image

from bagjax.data import order
from bagjax.data import preprocess
from bagjax.data import synthetic

logger = logging.getLogger(__name__)

# tfds.folder_dataset.ImageFolder's layout rules (mirrored, see ImageFolderSource).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
_SCAN_DRAFT_SIZE = 64
_NAMES_IN_WARNING = 5
_DOWNLOAD_SOCKET_TIMEOUT_S = 30.0


class DatasetUnavailableError(RuntimeError):
    """A tfds dataset cannot be found or prepared (typically: offline)."""


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """The config fields a source depends on (hashable, so sources are cached)."""

    spec: str
    data_dir: str
    manual_dir: str
    train_split: str
    eval_split: str
    shuffle_buffer: int
    synthetic_train_size: int
    synthetic_eval_size: int
    synthetic_image_size: int

    @classmethod
    def from_config(cls, config) -> SourceOptions:
        data = config.data
        return cls(
            spec=str(config.dataset),
            data_dir=str(data.data_dir),
            manual_dir=str(data.manual_dir),
            train_split=str(data.train_split),
            eval_split=str(data.eval_split),
            shuffle_buffer=int(data.shuffle_buffer),
            synthetic_train_size=int(data.synthetic_train_size),
            synthetic_eval_size=int(data.synthetic_eval_size),
            synthetic_image_size=int(data.synthetic_image_size),
        )


def get_source(options: SourceOptions):
    """The source for a dataset spec (cached per process: scans run once)."""
    return _get_source(options)


@functools.lru_cache(maxsize=8)
def _get_source(options: SourceOptions):
    kind, _, rest = options.spec.partition(':')
    if kind == 'synthetic':
        return SyntheticSource(rest or 'default', options)
    if kind == 'imagefolder' and rest:
        return ImageFolderSource(rest, options)
    if kind == 'tfds' and rest:
        return TfdsSource(rest, options)
    raise ValueError(
        f"unknown dataset spec '{options.spec}': use 'tfds:NAME[/CONFIG]', "
        "'imagefolder:PATH' (PATH/<split>/<label>/*.jpg|png) or 'synthetic[:VARIANT]'"
    )


class SyntheticSource:
    """The embedded motif dataset (synthetic.py), indexed."""

    indexed = True
    eval_center_crop = False  # Motifs may sit at the border: eval resizes the whole image.
    # Random crops keep >= 70% of the image: motifs stay in view and near their eval scale.
    train_crop_scale = (0.7, 1.0)

    def __init__(self, variant: str, options: SourceOptions):
        self._variant_name = variant
        self._variant = synthetic.get_variant(variant)
        self._options = options
        self.class_names = self._variant.class_names
        self.num_skipped = 0
        self.image_size = self._variant.image_size or options.synthetic_image_size

    def _split(self, split: str) -> tuple[synthetic.SyntheticSplit, int, int]:
        spec = order.parse_split(split)
        n = synthetic.split_size(
            self._variant,
            spec.name,
            self._options.synthetic_train_size,
            self._options.synthetic_eval_size,
        )
        lo, hi = spec.bounds(n)
        return synthetic.load_split(self._variant_name, spec.name, n, self.image_size), lo, hi

    def num_examples(self, split: str) -> int:
        _, lo, hi = self._split(split)
        return hi - lo

    def load(self, split: str, index: int) -> tuple[np.ndarray, int]:
        data, lo, _ = self._split(split)
        return data.images[lo + index], int(data.labels[lo + index])

    def boxes(self, split: str, index: int) -> np.ndarray:
        """Motif boxes (M, 4) as (y0, x0, y1, x1) in native synthetic pixels."""
        data, lo, _ = self._split(split)
        return data.boxes[lo + index]


def _list_dirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir())


def _check_readable(path: str) -> str | None:
    """None if the file decodes completely, else the one-line reason."""
    try:
        preprocess.open_rgb(path, draft_size=_SCAN_DRAFT_SIZE)
    except ValueError as e:
        return str(e)
    return None


class ImageFolderSource:
    """PATH/<split>/<label>/*.{jpg,jpeg,png}, indexed.

    Mirrors tfds.folder_dataset.ImageFolder: splits are the sub-directories,
    files are matched by extension (case-insensitive), listed in sorted
    (label, file) order, then shuffled with random.Random(split_name) -- so
    'train[:70%]' takes a class-mixed slice exactly like TFDS would order it.
    ImageFolder itself is not used because it decodes with TF (one bad file
    aborts the pipeline) and merges the labels of all splits; here the class
    mapping is the sorted label dirs of the train split and every other split
    must have the same label dirs. Each file is decoded once by a scan (PIL,
    threads); unreadable ones are skipped, counted and reported.
    """

    indexed = True
    eval_center_crop = True
    train_crop_scale = None  # From config.data.crop_min_area.

    def __init__(self, root: str, options: SourceOptions):
        self.root = os.path.abspath(os.path.expanduser(root))
        if not os.path.isdir(self.root):
            raise ValueError(
                f"imagefolder path '{self.root}' is not a directory: expected PATH/<split>/<label>/*.jpg"
            )
        self._splits = _list_dirs(self.root)
        self._train_name = order.parse_split(options.train_split).name
        self.class_names = tuple(self._labels_of(self._train_name))
        if not self.class_names:
            raise ValueError(
                f"imagefolder '{self.root}': train split '{self._train_name}' has no label directories"
            )
        self._files: dict[str, tuple[tuple[str, int], ...]] = {}
        self._skipped: dict[str, int] = {}
        for split in (options.train_split, options.eval_split):
            self._readable(order.parse_split(split).name)

    @property
    def num_skipped(self) -> int:
        """Unreadable files skipped, summed over the split directories scanned."""
        return sum(self._skipped.values())

    def _labels_of(self, split_name: str) -> list[str]:
        if split_name not in self._splits:
            raise ValueError(
                f"imagefolder '{self.root}' has no split directory '{split_name}': found {self._splits}"
            )
        return _list_dirs(os.path.join(self.root, split_name))

    def _readable(self, split_name: str) -> tuple[tuple[str, int], ...]:
        if split_name in self._files:
            return self._files[split_name]
        labels = self._labels_of(split_name)
        if tuple(labels) != self.class_names:
            missing = sorted(set(self.class_names) - set(labels))
            extra = sorted(set(labels) - set(self.class_names))
            raise ValueError(
                f"imagefolder '{self.root}': split '{split_name}' label dirs differ from train split "
                f"'{self._train_name}' (missing {missing}, extra {extra}); the class mapping is the "
                'sorted label dirs of the train split, so give every split the same label dirs'
            )
        examples = []
        for label_id, label in enumerate(labels):
            label_dir = os.path.join(self.root, split_name, label)
            examples.extend(
                (os.path.join(label_dir, f), label_id)
                for f in sorted(os.listdir(label_dir))
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
        random.Random(split_name).shuffle(examples)
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            problems = list(pool.map(_check_readable, [path for path, _ in examples]))
        bad = [path for path, problem in zip(examples, problems) if problem is not None]
        if bad:
            names = ', '.join(os.path.relpath(p, self.root) for p, _ in bad[:_NAMES_IN_WARNING])
            more = ', ...' if len(bad) > _NAMES_IN_WARNING else ''
            logger.warning(
                "imagefolder '%s': skipped %d unreadable image file(s) in split '%s': %s%s",
                self.root, len(bad), split_name, names, more,
            )
        readable = tuple(ex for ex, problem in zip(examples, problems) if problem is None)
        self._files[split_name] = readable
        self._skipped[split_name] = len(bad)
        return readable

    def _slice(self, split: str) -> tuple[tuple[tuple[str, int], ...], int, int]:
        spec = order.parse_split(split)
        files = self._readable(spec.name)
        lo, hi = spec.bounds(len(files))
        return files, lo, hi

    def num_examples(self, split: str) -> int:
        _, lo, hi = self._slice(split)
        return hi - lo

    def load(self, split: str, index: int) -> tuple[Image.Image, int]:
        files, lo, _ = self._slice(split)
        path, label = files[lo + index]
        return preprocess.open_rgb(path), label


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """Bounds every blocking socket call, so an offline download fails fast."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _unavailable(name: str, error: BaseException) -> DatasetUnavailableError:
    reason = ' '.join(str(error).split('\n', 1)[0].split())[:200] or type(error).__name__
    return DatasetUnavailableError(
        f'tfds dataset {name!r} is not prepared and cannot be downloaded here '
        f'({type(error).__name__}: {reason}); set config.data.data_dir to a TFDS data_dir '
        'where it is prepared, config.data.manual_dir to a folder holding its manual '
        "downloads, or use dataset='imagefolder:PATH' with PATH/<split>/<label>/*.jpg"
    )


class TfdsSource:
    """tfds:NAME[/CONFIG] through tfds.builder, streamed (see module docstring)."""

    indexed = False
    eval_center_crop = True
    train_crop_scale = None

    def __init__(self, name: str, options: SourceOptions):
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

        with contextlib.suppress(RuntimeError):  # Keep TF off accelerators JAX uses.
            tf.config.set_visible_devices([], 'GPU')
        self._tf, self._tfds = tf, tfds
        self.name = name
        self._shuffle_buffer = options.shuffle_buffer
        try:
            builder = tfds.builder(name, data_dir=options.data_dir or None, try_gcs=False)
        except Exception as e:  # DatasetNotFoundError, bad config, registry errors.
            raise _unavailable(name, e) from None
        if not builder.is_prepared():
            config = tfds.download.DownloadConfig(manual_dir=options.manual_dir or None)
            try:
                with _socket_timeout(_DOWNLOAD_SOCKET_TIMEOUT_S):
                    builder.download_and_prepare(download_config=config)
            except Exception as e:  # Network, checksum, manual-dir and import errors alike.
                raise _unavailable(name, e) from None
        self._builder = builder
        keys = builder.info.supervised_keys
        self._image_key, self._label_key = keys if keys else ('image', 'label')
        features = builder.info.features
        if self._image_key not in features or self._label_key not in features:
            raise ValueError(
                f"tfds dataset {name!r} has no ('image', 'label') features: found {list(features)}"
            )
        self.class_names = tuple(features[self._label_key].names)
        self.num_skipped = 0

    def num_examples(self, split: str) -> int:
        try:
            return int(self._builder.info.splits[split].num_examples)
        except (KeyError, ValueError):
            raise ValueError(
                f'tfds dataset {self.name!r} has no split {split!r}: '
                f'available {list(self._builder.info.splits)}'
            ) from None

    def records(self, split: str, *, shuffle_seed: int | None = None, skip: int = 0) -> Iterator[tuple[bytes, int]]:
        """Encoded images and labels of one pass over split, in a fixed order."""
        tf, tfds = self._tf, self._tfds
        ds = self._builder.as_dataset(
            split=split,
            shuffle_files=False,
            decoders={self._image_key: tfds.decode.SkipDecoding()},
        )
        ds = ds.map(lambda ex: (ex[self._image_key], ex[self._label_key]))
        if shuffle_seed is not None:
            ds = ds.shuffle(self._shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        options = tf.data.Options()
        options.deterministic = True
        ds = ds.skip(skip).prefetch(tf.data.AUTOTUNE).with_options(options)
        for image, label in ds.as_numpy_iterator():
            yield image, int(label)

    def train_stream(self, split: str, seed: int, start: int) -> Iterator[tuple[bytes, int]]:
        """The endless training stream from global position `start` (epochs concatenated).

        Epoch e is the split shuffled by a buffer seeded with (seed, e); skipping to
        `start` reads but does not decode the skipped records.
        """
        n = self.num_examples(split)
        if n == 0:
            raise ValueError(f'tfds dataset {self.name!r}: split {split!r} is empty')
        epoch, offset = divmod(start, n)
        while True:
            shuffle_seed = int(np.random.SeedSequence([2, seed, epoch]).generate_state(1)[0])
            yield from self.records(split, shuffle_seed=shuffle_seed, skip=offset)
            epoch, offset = epoch + 1, 0

    @staticmethod
    def decode(encoded: bytes) -> Image.Image:
        return preprocess.open_rgb(encoded)
