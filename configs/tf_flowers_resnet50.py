"""The blackout paper's ResNet-50 baseline (Zou, Yan, Liu, section 4.1, Table 1) on tf_flowers 70/20/10.

    python -m bagjax.convert --model resnet50 --torch-weights resnet50-0676ba61.pth --out weights/resnet50
    python train.py --config configs/tf_flowers_resnet50.py --workdir runs/flowers_resnet50
"""

from configs import default, tf_flowers_bagnet33


def get_config(arg: str | None = None):
    config = tf_flowers_bagnet33.get_config()
    config.model = "resnet50"
    config.init_from = "weights/resnet50"
    return default.with_arg(config, arg)
