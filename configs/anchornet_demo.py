"""The AnchorNet demo: AnchorNet on the embedded synthetic dataset, on the CPU in about six minutes.

    python train.py --config configs/anchornet_demo.py --workdir runs/anchornet_demo
    python train.py --config configs/demo.py --workdir runs/demo
    python -m bagjax.experiments.lsp --workdir runs/anchornet_demo --downstream runs/demo --input-scale 0.5

AnchorNet needs at least 111 px (its largest branch; grids 7x7, 3x3 and 1x1 at 112 px, section 3.1). The
synthetic images are rendered at 56 px and upscaled 2x, so the class motifs are 22-30 px against the 63/95/111
px patches; at their native 11-15 px in a 112 px render the motifs cover ~1.5% of the image and a short run
does not find them. The BagNet demo sees the motifs at 1x (48 px renders at 48 px), hence ``--input-scale 0.5``
for the lsp command. BatchNorm keeps torchvision's momentum 0.99: in a run of 620 steps the feature scales
keep changing (AdamW on the small depthwise kernels) and a 100-step running average lags behind them, but
precise BN recomputes the statistics before every evaluation, so eval mode matches train mode. (With precise
BN off, ``--config.precise_bn.num_batches=0``, eval mode collapses to one class unless
``--config.model_kwargs.bn_momentum=0.9``.)
``configs/anchornet_demo.py:smoke`` runs two steps at 112 px.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None):
    config = default.get_config()
    config.dataset = "synthetic"
    config.data.synthetic_image_size = 56  # upscaled 2x: 22-30 px motifs in a 112 px image
    config.model = "anchornet"
    # se_size 'expansion' (MobileNetV3's SE, 2.53M parameters at 1000 classes): the README's demo numbers use it.
    config.model_kwargs = ml_collections.ConfigDict({"pooling": "sum", "bn_momentum": 0.99, "se_size": "expansion"})
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
