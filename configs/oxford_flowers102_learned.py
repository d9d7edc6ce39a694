"""The thesis's transfer setup (Qian 2020, section 4.3.1, Table 4.3): ResNet-50 on Flowers-102, learned head.

SGD momentum 0.9, lr 0.01 divided by 10 at epoch 30 of 40, weight decay 1e-4, batch 64, from ImageNet weights.
Trains on TFDS train+validation (2,040 images), evaluates on test (6,149).

    python -m bagjax.convert --model resnet50 --torch-weights resnet50-0676ba61.pth --out weights/resnet50
    python train.py --config configs/oxford_flowers102_learned.py --workdir runs/flowers102_learned
"""

from configs import default


def get_config(arg: str | None = None):
    config = default.get_config()
    config.dataset = "tfds:oxford_flowers102"
    config.model = "resnet50"
    config.head = "learned"
    config.num_classes = 102
    config.image_size = 224
    config.batch_size = 64
    config.eval_batch_size = 128
    config.num_epochs = 40.0
    config.init_from = "weights/resnet50"
    config.data.train_split = "train+validation"
    config.data.eval_split = "test"
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.01
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 1e-4
    config.schedule.name = "step"
    config.schedule.decay_epochs = (30,)
    config.schedule.decay_factor = 0.1
    config.log_every_steps = 20
    return default.with_arg(config, arg)
