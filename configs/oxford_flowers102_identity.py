"""The thesis's transfer setup with the fixed identity classifier (Qian 2020, section 3.4, Table 5.5).

Same as oxford_flowers102_learned.py, but the classifier layer is removed: the logits are the first 102 of
ResNet-50's 2,048 pooled channels.

    python train.py --config configs/oxford_flowers102_identity.py --workdir runs/flowers102_identity
"""

from configs import default, oxford_flowers102_learned


def get_config(arg: str | None = None):
    config = oxford_flowers102_learned.get_config()
    config.head = "identity"
    return default.with_arg(config, arg)
