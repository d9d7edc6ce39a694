"""BagNet-9 trained from scratch on ImageNet (Brendel & Bethge 2019): imagenet_bagnet33.py with a 9 px patch.

    python train.py --config configs/imagenet_bagnet9.py --workdir runs/imagenet_bagnet9 \
        --config.data.manual_dir=/data/imagenet  # holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar
"""

from configs import default, imagenet_bagnet33


def get_config(arg: str | None = None):
    config = imagenet_bagnet33.get_config()
    config.model = "bagnet9"
    return default.with_arg(config, arg)
