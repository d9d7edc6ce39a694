"""Input pipeline: dataset specs, torchvision preprocessing, per-process batches.

Specs: `tfds:NAME[/CONFIG]`, `imagefolder:PATH` (PATH/<split>/<label>/*.jpg|png)
and `synthetic[:VARIANT]` (the embedded motif dataset, synthetic.py).
"""

from bagjax.data.pipeline import DatasetInfo
from bagjax.data.pipeline import dataset_info
from bagjax.data.pipeline import eval_batches
from bagjax.data.pipeline import train_batches
from bagjax.data.preprocess import load_image_file
from bagjax.data.preprocess import MEAN_RGB
from bagjax.data.preprocess import preprocess_for_eval
from bagjax.data.preprocess import STDDEV_RGB
from bagjax.data.sources import DatasetUnavailableError

__all__ = [
    'DatasetInfo',
    'DatasetUnavailableError',
    'MEAN_RGB',
    'STDDEV_RGB',
    'dataset_info',
    'eval_batches',
    'load_image_file',
    'preprocess_for_eval',
    'train_batches',
]
