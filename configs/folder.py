"""Your own images: a BagNet for an image folder, from scratch or fine-tuned, with a recipe read off the data.

    python train.py --config configs/folder.py:/data/birds --workdir runs/birds
    python train.py --config configs/folder.py:/data/birds,init_from=weights/bagnet33 --workdir runs/birds_ft
    python train.py --config configs/folder.py:/data/birds,init_from=weights/bagnet33,head_only --workdir runs/bh

The folder holds ``train/<label>/*.jpg|png`` and an eval split ``validation/``, ``val/`` or ``test/``. The recipe
(``bagjax.recipes``; docs/own_images.md) prints what it chose; change anything with ``--config.KEY=VALUE``.
``configs/folder.py:smoke`` runs two steps on tiny synthetic data.
"""

from __future__ import annotations

from bagjax import recipes
from bagjax.errors import UserError
from configs import default


def get_config(arg: str | None = None):
    config = default.get_config()
    if arg == "smoke":
        config.model = "bagnet17"
        return default.with_arg(config, arg)
    if not arg:
        raise UserError("configs/folder.py needs the image folder: --config configs/folder.py:/path/to/images "
                        "(with train/<label>/*.jpg inside)")
    return recipes.folder_config(config, arg)
