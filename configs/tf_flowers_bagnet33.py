"""The blackout paper's setup (Zou, Yan, Liu, sections 3-5): fine-tune BagNet-33 on TFDS tf_flowers.

tf_flowers has only a train split, so it is carved into deterministic 70/20/10 train/val/test slices (the paper
used the same split of a 4,242-image Kaggle release; TFDS's tf_flowers has 3,670 images of the same 5 classes).
The paper fine-tuned only the classifier of an ImageNet BagNet-33, so the backbone is frozen here.

    python -m bagjax.convert --model bagnet33 --torch-weights bagnet32-2ddd53ed.pth.tar --out weights/bagnet33
    python train.py --config configs/tf_flowers_bagnet33.py --workdir runs/flowers_bagnet33
    python -m bagjax.experiments.blackout --workdir runs/flowers_bagnet33

TFDS must reach the internet once, or --config.data.data_dir must point at a prepared tf_flowers.
"""

from configs import default


def get_config(arg: str | None = None):
    config = default.get_config()
    config.dataset = "tfds:tf_flowers"
    config.model = "bagnet33"
    config.num_classes = 5
    config.image_size = 224
    config.batch_size = 32
    config.eval_batch_size = 64
    config.num_epochs = 20.0
    config.init_from = "weights/bagnet33"
    config.freeze_backbone = True
    config.data.train_split = "train[:70%]"
    config.data.eval_split = "train[70%:90%]"   # validation; the test slice is train[90%:]
    config.data.crop_fraction = 1.0  # section 3: "resized to 224x224"; their code: Resize(224), CenterCrop(224)
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.01
    config.optimizer.weight_decay = 1e-4
    config.schedule.name = "cosine"
    config.log_every_steps = 20
    config.checkpoint_every_steps = 200
    return default.with_arg(config, arg)
