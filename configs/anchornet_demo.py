"""The AnchorNet demo: AnchorNet on the embedded synthetic dataset, on the CPU.

    python train.py --config configs/anchornet_demo.py --workdir runs/anchornet_demo
    python train.py --config configs/demo.py --workdir runs/demo
    python -m bagjax.experiments.lsp --workdir runs/anchornet_demo --downstream runs/demo

The synthetic images are rendered at 112 px (not upscaled), the smallest input AnchorNet takes (its 111 px
branch), so the 10-14 px class motifs are small against the 63/95/111 px patches; the branch grids are
7x7, 3x3 and 1x1 (section 3.1). The BagNet demo sees the same motifs at 0.75x this scale (64 px renders
at 48 px). AnchorNet trains at only 3-25 images/s on 2 shared CPU cores, so this is a short AdamW
run; its BatchNorm running averages (momentum 0.99, as torchvision's MobileNetV3) need a few hundred
steps before eval mode follows the batch statistics, hence the 375 steps.
``configs/anchornet_demo.py:smoke`` runs two steps at 112 px.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None):
    config = default.get_config()
    config.dataset = "synthetic"
    config.data.synthetic_image_size = 56  # upscaled 2x: 22-30 px motifs in a 112 px image
    config.model = "anchornet"
    config.model_kwargs = ml_collections.ConfigDict()
    config.model_kwargs.bn_momentum = 0.9
    config.image_size = 112
    config.batch_size = 32
    config.eval_batch_size = 100
    config.num_epochs = 10.0
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 3e-3
    config.optimizer.weight_decay = 1e-4
    config.schedule.name = "cosine"
    config.schedule.warmup_epochs = 0.25
    config.aux_loss_weight = 1.0
    config.log_every_steps = 25
    config.eval_every_steps = -1
    config.checkpoint_every_steps = 100
    return default.with_arg(config, arg)
