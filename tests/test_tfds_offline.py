"""Every ``tfds:`` dataset a shipped config names gets past TFDS's imports offline and fails only at the download.

A missing TFDS dependency (``importlib_resources``) used to surface as "cannot be downloaded here" before any
download was tried. Here each builder is built and prepared in an empty data_dir with every HTTP(S) request sent
to a closed local port, so the only failure left is the download itself (or, for a dataset that needs manual
downloads such as imagenet2012, the missing manual_dir).
"""

import importlib

import pytest

from trainutil import ROOT

DEAD_PROXY = "http://127.0.0.1:9"  # nothing listens on the discard port: every download fails at once


def _tfds_configs() -> dict[str, str]:
    """{dataset spec: config name} of the shipped configs that read TFDS."""
    specs = {}
    for path in sorted((ROOT / "configs").glob("*.py")):
        if path.name in ("__init__.py", "folder.py"):  # folder.py reads the image folder its argument names
            continue
        config = importlib.import_module(f"configs.{path.stem}").get_config()
        if config.dataset.startswith("tfds:"):
            specs.setdefault(config.dataset, path.stem)
    return specs


SPECS = _tfds_configs()


def test_the_shipped_configs_name_tfds_datasets():
    assert {"tfds:tf_flowers", "tfds:oxford_flowers102", "tfds:imagenet2012"} <= set(SPECS)


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_tfds_builder_gets_past_import_and_fails_only_at_the_download(spec, tmp_path, monkeypatch):
    from tensorflow_datasets.core.download import downloader

    from bagjax import data

    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, DEAD_PROXY)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setattr(downloader, "MAX_RETRIES", 0)  # TFDS retries 10 times with backoff (~3 min)
    config = importlib.import_module(f"configs.{SPECS[spec]}").get_config()
    config.data.data_dir = str(tmp_path)
    with pytest.raises(data.DatasetUnavailableError) as error:
        data.dataset_info(config)
    message = str(error.value)
    assert "No module named" not in message and "ImportError" not in message, message
    assert f"tfds dataset {spec.split(':', 1)[1]!r} is not prepared and cannot be downloaded here" in message
    manual = spec == "tfds:imagenet2012"
    assert ("manual" in message.lower()) if manual else ("ProxyError" in message or "127.0.0.1" in message), message
