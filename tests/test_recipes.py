"""The folder recipe (bagjax.recipes, configs/folder.py): what it reads off a folder and off pretrained weights,
its refusals, and the from-scratch recipe against logistic regression on real images (scikit-learn's digits)."""

import json

import numpy as np
import pytest
from PIL import Image

from bagjax import recipes
from bagjax.errors import UserError
from digits import digits_split, write_split_folder
from trainutil import read_metrics, run_train

# The digits tests train the recipe once at a small compute budget (configs/folder.py:PATH,budget=BUDGET). Measured
# over seeds 0-2 at this budget (bench/folder_recipe.py, docs/own_images.md), its eval accuracy minus logistic
# regression's on the same 32 px images of the 1,400 / 397 split was +1.01 / +1.51 / +0.51 points (at budget 0.5:
# +1.76 / +1.51 / +1.26, at budget 1, seed 0: +2.02); CI trains seed 0 and asks for MARGIN, below the worst seed's.
BUDGET = 0.3
MARGIN = 0.005


def _folder(root, side, classes=("a", "b"), per_class=3, mode="RGB"):
    for split in ("train", "validation"):
        for label in classes:
            (root / split / label).mkdir(parents=True)
            for i in range(per_class):
                Image.new(mode, (side, side), 80 * i).save(root / split / label / f"{i}.png")
    return root


@pytest.mark.parametrize("typical,size,model", [(6, 40, "bagnet17"), (32, 40, "bagnet17"), (40, 40, "bagnet17"),
                                                (64, 64, "bagnet33"), (224, 224, "bagnet33")])
def test_the_patch_covers_a_third_to_0_6_of_the_image_with_a_3x3_grid(typical, size, model):
    from bagjax.models import bagnet

    stages = (1, 1, 1, 1)
    assert recipes.size_and_model(typical, stages) == (size, model)
    rf = bagnet.receptive_field(bagnet.KERNEL3[model], stages)[0]
    assert bagnet.grid_size(size, bagnet.KERNEL3[model], stages) >= 3
    assert typical >= 224 or 1 / 3 <= rf / size <= 0.6


def test_from_scratch_recipe_follows_the_data(tmp_path, capsys):
    from configs import folder

    config = folder.get_config(str(_folder(tmp_path, 32, mode="L")))
    assert (config.model, config.image_size, config.dataset) == ("bagnet17", 40, f"imagefolder:{tmp_path}")
    assert (config.data.train_split, config.data.eval_split) == ("train", "validation")
    assert not config.data.flip and config.data.crop_min_area == 1.0 and config.batch_size == 16
    assert not config.init_from and not config.freeze_backbone and not config.cache_features
    line = capsys.readouterr().out
    assert "bagnet17 (receptive field 17 px = 42% of the side" in line and "upscaled from 32 px" in line


def test_the_budget_scales_the_epochs_and_says_so(tmp_path, capsys):
    from configs import folder

    path = _folder(tmp_path, 32)
    full = folder.get_config(str(path))
    assert "(budget " not in capsys.readouterr().out
    half = folder.get_config(f"{path},budget=0.5")
    assert (full.num_epochs, half.num_epochs) == (30, 15) and half.batch_size == full.batch_size
    line = capsys.readouterr().out
    assert "15 epochs" in line and "budget 0.5: 0.5x the recipe's epochs" in line


@pytest.mark.parametrize("arg,fragment", [("{p}", "train/<label>"), ("{p},init=x", "unknown option 'init=x'"),
                                          ("{p},head_only", "head_only needs pretrained weights"),
                                          ("{p}/validation/a,init_from={p}", "has no train/ directory"),
                                          ("{p},init_from={p}/nowhere", "does not exist"),
                                          ("{p},budget=0", "budget=0 is not a positive number"),
                                          ("{p},budget=x", "budget=0.5")])
def test_folder_arguments_that_cannot_work_are_one_line(tmp_path, arg, fragment):
    from configs import folder

    _folder(tmp_path / "f", 32)
    path = tmp_path / "f" / "train" if arg == "{p}" else tmp_path / "f"
    with pytest.raises(UserError, match=fragment):
        folder.get_config(arg.format(p=path))


def _workdir(root, classes, model="bagnet17", size=48):
    """A training workdir's record (config.json, dataset.json, checkpoints/) as train.py writes it."""
    from bagjax.training import checkpoints
    from configs import default

    config = default.get_config()
    config.model, config.head, config.image_size = model, "hadamard", size
    config.model_kwargs.width, config.model_kwargs.stage_sizes = 16, (1, 1, 1, 1)
    config.data.crop_min_area, config.data.crop_fraction = 0.5, 1.0
    (root / "checkpoints").mkdir(parents=True)
    checkpoints.write_config(root, config)
    checkpoints.write_dataset_info(root, tuple(classes), 10, 4)
    return root


@pytest.mark.parametrize("classes,reinit,fragment", [
    (("a", "b"), False, "head kept: the same classes"), (("c", "d"), True, "new head: other class names"),
    (("a", "b", "c"), True, "new head: 2 classes, not the source's 3")])
def test_fine_tuning_adopts_a_workdirs_architecture_and_preprocessing_and_checks_the_classes(
        tmp_path, capsys, classes, reinit, fragment):
    from configs import folder

    source = _workdir(tmp_path / "source", classes)
    config = folder.get_config(f"{_folder(tmp_path / 'f', 32)},init_from={source}")
    assert (config.model, config.head, config.image_size) == ("bagnet17", "hadamard", 48)
    assert (config.model_kwargs.width, tuple(config.model_kwargs.stage_sizes)) == (16, (1, 1, 1, 1))
    assert (config.data.crop_min_area, config.data.crop_fraction) == (0.5, 1.0)
    assert config.init_from == str(source) and config.reinit_head == reinit and not config.freeze_backbone
    assert fragment in capsys.readouterr().out
    head = folder.get_config(f"{tmp_path / 'f'},init_from={source},head_only")
    assert head.freeze_backbone and head.cache_features
    assert head.optimizer.learning_rate > config.optimizer.learning_rate


def test_init_from_given_only_as_a_config_override_is_refused(tmp_path):
    """The recipe chose the model without the weights: one line that says where to give them."""
    folder = _folder(tmp_path / "f", 32)
    proc = run_train(f"folder.py:{folder}", tmp_path / "run", f"--config.init_from={tmp_path}", check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1:] == [
        f"error: configs/folder.py chose its model for init_from='', not '{tmp_path}': give the weights in the "
        f"config argument, --config configs/folder.py:PATH,init_from={tmp_path}"], proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cache_features_without_a_frozen_backbone_or_on_anchornet_is_refused(tmp_path):
    proc = run_train("demo.py:smoke", tmp_path / "a", "--config.cache_features=True", check=False)
    assert proc.returncode == 1 and "--config.freeze_backbone=True" in proc.stderr.strip().splitlines()[-1]
    proc = run_train("anchornet_demo.py:smoke", tmp_path / "b", "--config.cache_features=True",
                     "--config.freeze_backbone=True", check=False)
    assert proc.returncode == 1 and "anchornet's classifiers are not one head" in proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """The recipe from scratch on the issue's comparison, trained once as a user runs it: scikit-learn's 1,797
    digits as 32 px PNGs, a seeded 1,400 / 397 split. Returns (folder, workdir, train.py's stdout)."""
    root = tmp_path_factory.mktemp("digits_recipe")
    folder = write_split_folder(root / "digits", *digits_split(seed=0))
    # One evaluation, at the end: the recipe's four earlier ones change no weight and no final statistic (precise
    # BN recomputes them from the training batches alone), so they would only cost time.
    proc = run_train(f"folder.py:{folder},budget={BUDGET}", root / "run", "--config.heatmap_images=0",
                     "--config.eval_every_steps=100000", timeout=1500)
    return folder, root / "run", proc.stdout


def test_from_scratch_recipe_beats_logistic_regression_on_real_digits(digits_run):
    """Logistic regression on the same pixels; the recipe must match or beat it by MARGIN."""
    from sklearn.linear_model import LogisticRegression

    folder, workdir, _ = digits_run
    pixels = lambda split: np.stack([np.asarray(Image.open(p).convert("L"), np.float32).ravel() / 255  # noqa: E731
                                     for p in sorted((folder / split).glob("*/*.png"))])
    labels = lambda split: np.array([int(p.parent.name) for p in sorted((folder / split).glob("*/*.png"))])  # noqa
    logistic = LogisticRegression(max_iter=5000).fit(pixels("train"), labels("train"))
    baseline = float((logistic.predict(pixels("validation")) == labels("validation")).mean())
    final = [m for m in read_metrics(workdir) if "guard_eval_accuracy" in m][-1]
    print(json.dumps({**final, "logistic_regression": baseline}))
    assert final["eval_count"] == 397 and final["eval_accuracy"] >= baseline + MARGIN, (final, baseline)


def test_the_recipes_eval_mode_is_trustworthy_on_real_digits(digits_run):
    """Precise BatchNorm: eval mode within 2 points of batch statistics on real images, and no guard warning (the
    BagNet stem's official 0.999 momentum cannot follow a few hundred steps: without precise BN, eval mode gave
    78.0 % on the digits where the same weights with batch statistics gave 96.4 %)."""
    _, workdir, stdout = digits_run
    assert f"budget {BUDGET:g}" in stdout and "warning:" not in stdout, stdout[-2000:]
    final = [m for m in read_metrics(workdir) if "guard_eval_accuracy" in m][-1]
    assert abs(final["guard_eval_accuracy"] - final["guard_batch_stats_accuracy"]) <= 0.02, final
