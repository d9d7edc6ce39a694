"""Every ``tfds:`` dataset a shipped config names gets past TFDS's imports offline and fails only at the download.

A missing TFDS dependency (``importlib_resources``) used to surface as "cannot be downloaded here" before any
download was tried. Here each builder is built and prepared in an empty data_dir with every HTTP(S) request sent
to a closed local port, so the only failure left is the download itself (or, for a dataset that needs manual
downloads such as imagenet2012, the missing manual_dir).
"""

import importlib
import logging
import re
import sys

import pytest

from trainutil import ROOT, run_cmd, train_env

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


def _offline(monkeypatch):
    """Every HTTP(S) request goes to a closed local port, online or not."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, DEAD_PROXY)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)


def test_the_shipped_configs_name_tfds_datasets():
    assert {"tfds:tf_flowers", "tfds:oxford_flowers102", "tfds:imagenet2012"} <= set(SPECS)


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_tfds_builder_gets_past_import_and_fails_only_at_the_download(spec, tmp_path, monkeypatch):
    from tensorflow_datasets.core.download import downloader

    from bagjax import data

    _offline(monkeypatch)
    monkeypatch.setattr(downloader, "MAX_RETRIES", 0)  # TFDS retries 10 times with backoff (~3 min)
    config = importlib.import_module(f"configs.{SPECS[spec]}").get_config()
    config.data.data_dir = str(tmp_path)
    with pytest.raises(data.DatasetUnavailableError) as error:
        data.dataset_info(config)
    message = str(error.value)
    assert "No module named" not in message and "ImportError" not in message, message
    name = spec.split(':', 1)[1]
    if spec == "tfds:imagenet2012":  # it needs the ILSVRC2012 tars in config.data.manual_dir, not a network
        assert f"tfds dataset {name!r} needs files downloaded by hand" in message, message
        assert "config.data.manual_dir" in message and "ILSVRC2012_img_train.tar" in message, message
    else:
        assert f"tfds dataset {name!r} is not prepared and cannot be downloaded here" in message
        # the host quoted whole (the cause used to be cut at 200 characters, mid-word)
        assert "ProxyError" in message and re.search(r"cannot reach [\w.]+(: ProxyError)?\): ", message), message


def test_offline_download_error_quotes_its_cause_whole_and_hides_urllib3_retries(tmp_path, monkeypatch, caplog):
    """The cause is the host it could not reach (it was cut at 200 characters, mid-word), and urllib3's
    warning for each of the (bounded) retries is not shown above the error line."""
    from bagjax import data

    _offline(monkeypatch)
    config = importlib.import_module(f"configs.{SPECS['tfds:tf_flowers']}").get_config()
    config.data.data_dir = str(tmp_path)
    with caplog.at_level(logging.WARNING), pytest.raises(data.DatasetUnavailableError) as error:
        data.dataset_info(config)
    message = str(error.value)
    assert "(ProxyError: cannot reach 127.0.0.1): prepare it where there is a network " \
           "(`python -m bagjax.data.prepare tfds:tf_flowers --data_dir DIR`, which gives up after 4 retries per " \
           "file: rerun it after a network failure, finished downloads are kept) and point config.data.data_dir" \
           in message
    assert not [r for r in caplog.records if r.name.startswith("urllib3")], caplog.text
    assert logging.getLogger("urllib3.connectionpool").level == logging.NOTSET  # restored


def test_prepare_offline_fails_in_one_line_instead_of_hanging(tmp_path, monkeypatch):
    """``python -m bagjax.data.prepare tfds:tf_flowers`` offline waited out TFDS's 10 retries per URL (~205 s);
    it now bounds them as train.py does and ends with one line naming the ways out."""
    _offline(monkeypatch)
    proc = run_cmd([sys.executable, "-m", "bagjax.data.prepare", "tfds:tf_flowers", "--data_dir", str(tmp_path)],
                   train_env(), check=False, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr
    assert "Traceback" not in proc.stderr and "Retrying" not in proc.stderr, proc.stderr
    assert "tfds dataset 'tf_flowers' is not prepared and cannot be downloaded here" in errors[0]
    for way_out in ("--data_dir", "--manual_dir", "imagefolder:"):
        assert way_out in errors[0]


@pytest.mark.parametrize("manual", ["none", "missing", "wrong_files"])
def test_prepare_imagenet_without_its_tars_names_manual_dir_and_the_files(manual, tmp_path):
    """The README's ImageNet command without (or with a wrong) --manual_dir was a 36-line traceback."""
    from bagjax.data import prepare

    argv = ["tfds:imagenet2012", "--data_dir", str(tmp_path / "tfds")]
    if manual != "none":
        argv += ["--manual_dir", str(tmp_path / "manual")]
    if manual == "wrong_files":
        (tmp_path / "manual").mkdir()
        (tmp_path / "manual" / "imagenet.zip").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_:
        prepare.main(argv)
    message = exit_.value.code
    assert isinstance(message, str) and "\n" not in message, message
    assert message.startswith("error: tfds dataset 'imagenet2012' needs files downloaded by hand, in the folder "
                              "given as --manual_dir (")
    assert "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar" in message
    where = {"none": str(tmp_path / "tfds" / "downloads" / "manual"), "missing": str(tmp_path / "manual"),
             "wrong_files": str(tmp_path / "manual" / "ILSVRC2012_img_")}
    assert where[manual] in message
