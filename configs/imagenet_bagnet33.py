"""BagNet-33 trained from scratch on ImageNet (Brendel & Bethge 2019).

The standard ResNet-50 recipe the paper builds on: SGD with momentum 0.9, lr 0.1 per 256 images divided by 10
at epochs 30, 60 and 80 of 90, weight decay 1e-4, 224 px inception crops. ImageNet must be downloaded by hand:

    python train.py --config configs/imagenet_bagnet33.py --workdir runs/imagenet_bagnet33 \
        --config.data.manual_dir=/data/imagenet  # holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar
"""

from configs import default


def get_config(arg: str | None = None):
    config = default.get_config()
    config.dataset = "tfds:imagenet2012"
    config.model = "bagnet33"
    config.num_classes = 1000
    config.image_size = 224
    config.batch_size = 256
    config.eval_batch_size = 256
    config.num_epochs = 90.0
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.1 * config.batch_size / 256
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 1e-4
    config.schedule.name = "step"
    config.schedule.decay_epochs = (30, 60, 80)
    config.schedule.warmup_epochs = 1.0
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2000
    return default.with_arg(config, arg)
