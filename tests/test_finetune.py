"""Fine-tuning, the blackout paper's setup (Zou, Yan & Liu, section 4): ``init_from`` and ``freeze_backbone``.

A random-weight PyTorch BagNet-9 (tests/torch_reference.py, non-trivial BatchNorm statistics, 10 classes) goes
through ``bagjax.convert`` and is fine-tuned on the 4-class synthetic set with a frozen backbone; that workdir then
initialises a second run. Full-size BagNet-9 (the converter's layout) at 40 px keeps the compilation small.
"""

import jax
import numpy as np
import pytest

import torch_reference
from bagjax import convert
from bagjax.training.checkpoints import read_variables
from trainutil import restore_params, run_train

FULL_SIZE = ("--config.model=bagnet9", "--config.model_kwargs.width=64", "--config.model_kwargs.stage_sizes=(3,4,6,3)",
             "--config.heatmap_images=0", "--config.optimizer.name=sgd", "--config.optimizer.learning_rate=0.5",
             "--config.total_steps=2", "--config.checkpoint_every_steps=1", "--config.keep_checkpoints=2")


def _flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    """(converted variables, converted dir, workdir, train.py stdout) of a frozen-backbone fine-tune."""
    root = tmp_path_factory.mktemp("finetune")
    reference = torch_reference.build_reference("bagnet9", 10, seed=5)
    variables = convert.from_torch_state_dict("bagnet9", reference.state_dict())
    convert.write_pretrained(root / "converted", variables, model="bagnet9", num_classes=10)
    proc = run_train("demo.py:smoke", root / "frozen", *FULL_SIZE, f"--config.init_from={root / 'converted'}",
                     "--config.freeze_backbone=True")
    return variables, root / "converted", root / "frozen", proc.stdout


def test_frozen_backbone_keeps_every_backbone_array_and_statistic_bit_identical(frozen_run):
    converted, source, workdir, stdout = frozen_run
    assert f"initialised from bagnet9 weights converted from {source}; new head (2 arrays)" in stdout
    before = _flat(converted)
    steps = [_flat(restore_params(workdir, step)) for step in (1, 2)]
    assert set(steps[1]) == set(before)
    backbone = [k for k in before if "/head/" not in f"/{k}/"]
    assert len(backbone) == len(before) - 2 and any(k.startswith("batch_stats/") for k in backbone)
    for key in backbone:
        for after in steps:
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    # The head was re-initialised for the 4 classes (the converted one has 10) and it is what trains.
    for key in ("params/head/kernel", "params/head/bias"):
        assert steps[0][key].shape[-1] == 4 and before[key].shape[-1] == 10
        assert not np.array_equal(steps[0][key], steps[1][key]), key


def test_init_from_a_training_workdir_takes_every_array(frozen_run, tmp_path):
    """A workdir (its best checkpoint) initialises everything, the head too: with lr 0 (and the backbone frozen,
    so BatchNorm keeps its statistics) the first checkpoint holds exactly the arrays loaded."""
    _, _, workdir, _ = frozen_run
    proc = run_train("demo.py:smoke", tmp_path, *FULL_SIZE, f"--config.init_from={workdir}",
                     "--config.optimizer.learning_rate=0.0", "--config.total_steps=1", "--config.seed=1",
                     "--config.freeze_backbone=True")
    assert f"initialised from training workdir {workdir}\n" in proc.stdout
    loaded, after = _flat(read_variables(workdir)), _flat(restore_params(tmp_path, 1))
    assert set(after) == set(loaded) and "params/head/kernel" in loaded
    for key in loaded:
        np.testing.assert_array_equal(after[key], loaded[key], err_msg=key)


def test_init_from_a_directory_that_holds_no_weights_is_refused_before_the_workdir_is_touched(tmp_path):
    (tmp_path / "not_weights").mkdir()
    proc = run_train("demo.py:smoke", tmp_path / "run", f"--config.init_from={tmp_path / 'not_weights'}", check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'not_weights'} is not a converted checkpoint (no model.json + variables/): create one "
        "with python -m bagjax.convert"], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # no lock, no empty checkpoints/


# ----------------------------------------------------------------------------------------------- the folder recipe
@pytest.fixture(scope="module")
def official_bagnet33(tmp_path_factory):
    """Random-weight PyTorch BagNet-33 (the official layout, 10 classes) through bagjax.convert, and a small
    folder of JPEGs of another size (2 classes)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("official")
    reference = torch_reference.build_reference("bagnet33", 10, seed=3)
    convert.write_pretrained(root / "bagnet33", convert.from_torch_state_dict("bagnet33", reference.state_dict()),
                             model="bagnet33", num_classes=10, source="random.pth.tar")
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("validation", 1)):
        for label in ("cat", "dog"):
            (root / "jpegs" / split / label).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (150, 180, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "jpegs" / split / label / f"{i}.jpg")
    return root / "bagnet33", root / "jpegs"


@pytest.mark.parametrize("mode", ["", ",head_only"])
def test_folder_recipe_fine_tunes_the_official_bagnet33_at_224_px(official_bagnet33, tmp_path, mode):
    """Two steps in each mode. Full fine-tuning trains at 64 px here (--config.image_size): a backward pass of
    the full BagNet-33 at 224 px takes minutes on the CI's 2 cores; head-only runs at the recipe's 224 px."""
    weights, jpegs = official_bagnet33
    size = () if mode else ("--config.image_size=64",)
    proc = run_train(f"folder.py:{jpegs},init_from={weights}{mode}", tmp_path, "--config.batch_size=2",
                     "--config.eval_batch_size=2", "--config.total_steps=2", "--config.heatmap_images=0",
                     "--config.precise_bn.guard_batches=1", "--config.data.workers=0", *size)
    assert (f"fine-tune {'head only' if mode else 'every layer'}" in proc.stdout
            and f"of converted bagnet33 {weights}: bagnet33 (learned head) at 224 px" in proc.stdout
            and "new head: 2 classes, not the source's 10" in proc.stdout), proc.stdout[-2000:]
    assert "final eval:" in proc.stdout
    assert ("features: 6 images through the frozen backbone" in proc.stdout) == bool(mode)
    before, after = _flat(convert.read_pretrained(weights)[0]), _flat(restore_params(tmp_path, 2))
    assert after["params/head/kernel"].shape == (2048, 2)
    stem = "params/conv1/kernel"
    assert np.array_equal(after[stem], before[stem]) == bool(mode)  # head only: the backbone is untouched
