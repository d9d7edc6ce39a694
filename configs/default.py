"""Defaults shared by every bagjax config; other configs import this and change a few fields.

Run any config with ``python train.py --config configs/NAME.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]``.
Every config's ``get_config`` accepts the argument ``smoke``: a couple of steps on tiny synthetic data.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # The keys every config has (DESIGN.md, Training contract).
    config.dataset = "synthetic"          # tfds:NAME[/CONFIG] | imagefolder:PATH | synthetic[:VARIANT]
    config.model = "bagnet33"             # bagnet9 | bagnet17 | bagnet33 | resnet50 | anchornet
    config.head = "learned"               # learned | orthogonal | orthogonal_hoffer | hadamard | identity
    config.num_classes = -1               # -1: take it from the dataset
    config.image_size = 224
    config.batch_size = 256               # global, over all devices and processes
    config.num_epochs = 90.0
    config.init_from = ""                 # a `python -m bagjax.convert` output or a training workdir
    config.seed = 0

    # Model options passed to create_model (width/stage_sizes shrink a BagNet; identity_expand: thesis 4.3.2).
    # bn_momentum (Flax convention, the weight of the old running average) overrides every BatchNorm's; unset,
    # the official momenta stay.
    config.model_kwargs = ml_collections.ConfigDict({"width": 64, "stage_sizes": (3, 4, 6, 3),
                                                     "identity_expand": False,
                                                     "bn_momentum": ml_collections.config_dict.placeholder(float)})
    config.dtype = "float32"              # compute dtype; "bfloat16" for mixed precision (params stay float32)

    config.data = ml_collections.ConfigDict()
    config.data.data_dir = ""             # TFDS data_dir ('' = TFDS default)
    config.data.manual_dir = ""           # TFDS manual_dir, e.g. for imagenet2012
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.crop_min_area = 0.08      # inception-style random resized crop: area scale (min, 1)
    config.data.crop_aspect_ratio = (3 / 4, 4 / 3)
    config.data.flip = True
    config.data.crop_fraction = 0.875     # eval: resize to image_size / crop_fraction, then center crop
    config.data.workers = -1              # Grain worker processes decoding images: -1 = number of cores, 0 = in-process
    config.data.cache_dir = ""            # image-folder indexes ('' = $XDG_CACHE_HOME/bagjax/folder-index)
    config.data.allow_changed_data = False  # resume although files were added/removed/changed (docs/data.md)
    config.data.synthetic_train_size = 2000
    config.data.synthetic_eval_size = 500
    config.data.synthetic_image_size = 64
    config.eval_batch_size = 256

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "sgd"         # sgd | adamw
    config.optimizer.learning_rate = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = False
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.weight_decay = 1e-4  # masked off BatchNorm parameters and biases
    config.optimizer.grad_clip_norm = 0.0  # 0: no clipping

    config.schedule = ml_collections.ConfigDict()
    config.schedule.name = "cosine"       # cosine | step | constant
    config.schedule.warmup_epochs = 0.0
    config.schedule.decay_epochs = (30, 60, 80)  # step schedule boundaries
    config.schedule.decay_factor = 0.1

    config.label_smoothing = 0.0
    config.freeze_backbone = False        # train only the head (the blackout paper's fine-tuning)
    config.cache_features = False         # with freeze_backbone: the head trains on features computed once per image
    #                                       (no augmentation; bagjax/training/features.py)
    config.reinit_head = False            # re-initialise the head from init_from even when it fits (other classes)
    # Set by a recipe (bagjax.recipes): the init_from it chose the model for; train.py refuses another one.
    config.recipe_init_from = ml_collections.config_dict.placeholder(str)
    config.aux_loss_weight = 1.0          # AnchorNet: weight of the auxiliary attention classifiers
    config.robust = ml_collections.ConfigDict({"clip": ""})  # "cbn": train on Clipped BagNet logits (bagjax.robust)
    config.skip_nonfinite_updates = False  # True: skip a step whose loss/grads are not finite instead of stopping

    # Precise BatchNorm (bagjax/training/precise_bn.py): before every evaluation and saved evaluation checkpoint,
    # each BatchNorm's statistics become the average over this many training batches with the current weights
    # (32 x 256 = pycls's 8,192 images). 0 switches it off. The final evaluation also compares eval mode with
    # batch statistics on guard_batches eval batches.
    config.precise_bn = ml_collections.ConfigDict()
    config.precise_bn.num_batches = 32
    config.precise_bn.guard_batches = 4

    config.total_steps = -1               # -1: num_epochs * steps_per_epoch
    config.log_every_steps = 50
    config.eval_every_steps = -1          # -1: once per epoch
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 2           # the last N
    config.keep_best_checkpoints = 1      # and the best N by eval accuracy
    config.heatmap_images = 8             # BagNets: heatmap figure of this many eval images at the end (0: none)

    config.distributed = ml_collections.ConfigDict()
    config.distributed.initialize = "auto"  # auto | always | never: jax.distributed.initialize
    config.distributed.coordinator_address = ""
    config.distributed.num_processes = -1
    config.distributed.process_id = -1
    config.fsdp = False                   # shard large parameters over the data axis

    return with_arg(config, arg)


def with_arg(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Apply a config's argument: none, or ``smoke``."""
    if arg == "smoke":
        return smoke(config)
    if arg:
        raise ValueError(f"unknown config argument {arg!r}: use 'smoke' or nothing")
    return config


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a config to a couple of steps on tiny synthetic data (what the tests run)."""
    config.dataset = "synthetic:tiny"
    config.num_classes = -1
    config.image_size = 40 if config.model != "anchornet" else 112
    config.batch_size = 8
    config.eval_batch_size = 8
    config.total_steps = 2
    config.log_every_steps = 1
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 1
    config.heatmap_images = 0             # the figure and explore.html: tests ask for them where they check them
    config.init_from = ""
    if "width" in config.model_kwargs:  # BagNet / ResNet: a narrow, shallow network
        config.model_kwargs.width = 8
        config.model_kwargs.stage_sizes = (1, 1, 1, 1)
    config.data.data_dir = ""
    config.data.workers = 0               # in-process: starting worker processes costs more than 2 steps
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.schedule.warmup_epochs = 0.0
    config.freeze_backbone = False
    config.cache_features = False
    config.reinit_head = False
    config.precise_bn.num_batches = 2
    config.precise_bn.guard_batches = 1
    return config
