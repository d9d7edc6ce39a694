"""The demo: a small BagNet-17 on the embedded synthetic dataset, on the CPU in a little over a minute.

    python train.py --config configs/demo.py --workdir runs/demo

Synthetic images carry their class in small local motifs on cluttered backgrounds, so the BagNet's heatmaps
(runs/demo/heatmaps.png) show where the evidence is. ``configs/demo.py:smoke`` runs two steps.
"""

from configs import default


def get_config(arg: str | None = None):
    config = default.get_config()
    config.dataset = "synthetic"
    config.model = "bagnet17"
    config.image_size = 48
    config.data.synthetic_image_size = 48  # generated at the training size: resizing blurs the motifs
    config.model_kwargs.width = 16
    config.model_kwargs.stage_sizes = (1, 1, 1, 1)
    config.batch_size = 16  # on the CPU small batches run faster per image (422 vs 276 img/s at 64: cache)
    config.eval_batch_size = 250
    config.num_epochs = 10.0  # 1,250 steps
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 3e-3
    config.optimizer.weight_decay = 1e-4
    config.schedule.name = "cosine"
    config.schedule.warmup_epochs = 1.0
    config.log_every_steps = 25
    config.eval_every_steps = 625
    config.checkpoint_every_steps = 625
    config.data.workers = 0               # in-process: 48 px images decode fast, worker start-up would cost more
    config.precise_bn.num_batches = 64  # 1,024 images, half the train set
    return default.with_arg(config, arg)
