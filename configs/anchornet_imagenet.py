"""AnchorNet on ImageNet 2012 with the paper's training recipe (Yang et al., section 4.1).

    python train.py --config configs/anchornet_imagenet.py --workdir runs/anchornet \
        --config.data.manual_dir=/path/to/imagenet/tars

Section 4.1: synchronous SGD, momentum 0.9, batch 256, weight decay 1e-4, 100 epochs, learning rate 0.1
divided by 10 every 30 epochs, standard augmentation (the paper cites He et al. 2016; here torchvision's
random resized crop and flip, the recipe of the reference ImageNet scripts), 224 px. The paper gives the auxiliary attention classifiers (section 3.2, "a FC layer and softmax ...
behind the attention features X") no weight of their own, so their cross-entropies are added to the
branch losses with weight 1 (``aux_loss_weight = 1.0``). AnchorNet has no width or stage options
(its architecture is Tables 1 and 2); ``model_kwargs`` holds its pooling reading, BatchNorm momentum
(torchvision MobileNetV3's, which the paper does not state) and SE reading (the one nearest the paper's 1.6M
parameters, ``bagjax.models.anchornet``). ``:smoke`` runs two steps.
Then localize patches with ``python -m bagjax.experiments.lsp --workdir runs/anchornet --downstream DIR``.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None):
    config = default.get_config()
    config.dataset = "tfds:imagenet2012"
    config.data.manual_dir = ""           # where the ImageNet tar files are (TFDS manual_dir)
    config.model = "anchornet"
    config.model_kwargs = ml_collections.ConfigDict({"pooling": "sum", "bn_momentum": 0.99, "se_size": "output"})
    config.image_size = 224
    config.batch_size = 256
    config.eval_batch_size = 256
    config.num_epochs = 100.0
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 1e-4
    config.schedule.name = "step"
    config.schedule.warmup_epochs = 0.0
    config.schedule.decay_epochs = (30, 60, 90)
    config.schedule.decay_factor = 0.1
    config.aux_loss_weight = 1.0
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2000
    return default.with_arg(config, arg)
