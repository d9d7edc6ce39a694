"""The one-line warning for the original BagNet weights run below float32 (issue 13; README, official weights)."""

import json

import pytest

from bagjax.convert import reduced_precision_warning
from bagjax.training import loop
from configs import demo


def converted_dir(tmp_path, model):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "model.json").write_text(json.dumps({"model": model, "num_classes": 10}))
    (tmp_path / "variables").mkdir()
    return str(tmp_path)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_converted_bagnet_below_float32_warns(tmp_path, dtype):
    warning = reduced_precision_warning(converted_dir(tmp_path, "bagnet33"), dtype)
    assert warning.startswith("warning: ") and "\n" not in warning
    assert "66.7 %" in warning and "58.0 %" in warning and "--config.dtype=float32" in warning


def test_no_warning_in_float32_for_other_models_or_workdirs(tmp_path):
    assert reduced_precision_warning(converted_dir(tmp_path / "a", "bagnet17"), "float32") is None
    assert reduced_precision_warning(converted_dir(tmp_path / "b", "resnet50"), "bfloat16") is None
    assert reduced_precision_warning(str(tmp_path / "workdir"), "bfloat16") is None  # a training workdir
    assert reduced_precision_warning("", "bfloat16") is None


def test_train_prints_the_warning_once(tmp_path, capsys):
    config = demo.get_config("smoke")
    config.unlock()
    config.init_from, config.dtype = converted_dir(tmp_path / "w", "bagnet17"), "bfloat16"
    loop.check_config(config, tmp_path / "run", num_classes=10)
    assert sum("warning:" in line for line in capsys.readouterr().out.splitlines()) == 1
