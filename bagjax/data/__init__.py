"""Input pipeline on Grain: dataset specs, torchvision preprocessing, per-process uint8 batches.

Specs: `tfds:NAME[/CONFIG]` (ArrayRecord, see prepare.py), `imagefolder:PATH`
(PATH/<split>/<label>/*.jpg|png) and `synthetic[:VARIANT]` (the embedded motif
dataset, synthetic.py). Batches are uint8; apply `normalize` on the device.
"""

from bagjax.data.pipeline import Counted
from bagjax.data.pipeline import DatasetInfo
from bagjax.data.pipeline import counted_eval_batches
from bagjax.data.pipeline import dataset_info
from bagjax.data.pipeline import eval_batches
from bagjax.data.pipeline import eval_total
from bagjax.data.pipeline import train_batches
from bagjax.data.preprocess import load_image_file
from bagjax.data.preprocess import MEAN_RGB
from bagjax.data.preprocess import normalize
from bagjax.data.preprocess import preprocess_for_eval
from bagjax.data.preprocess import STDDEV_RGB
from bagjax.data.sources import DatasetUnavailableError

__all__ = [
    'Counted',
    'DatasetInfo',
    'DatasetUnavailableError',
    'MEAN_RGB',
    'STDDEV_RGB',
    'counted_eval_batches',
    'dataset_info',
    'eval_batches',
    'eval_total',
    'load_image_file',
    'normalize',
    'preprocess_for_eval',
    'train_batches',
]
