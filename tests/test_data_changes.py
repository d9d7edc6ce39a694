"""A run knows its data: resuming on a changed image folder is refused (renamed, added or swapped classes, added
files), moved data resumes, a folder without an eval split is split by a stable hash, the folder index is
built once and revalidated by stat, and ``data.workers`` is capped to the available cores.

One smoke run (train.py, two steps on a folder of 4 x 6 images without an eval split: the demo smoke's shapes,
so its programs come from the tests' compilation cache) is trained once; every case mutates its own copy of the
folder and the workdir.
"""

import json
import pathlib
import shutil
import zlib

import numpy as np
import pytest
from PIL import Image

from bagjax import data
from bagjax.data import fingerprint, folder_index, sources
from bagjax.training import checkpoints
from trainutil import read_metrics, run_train

SPLITS = ("train[:80%]", "train[80%:]")  # what configs/folder.py picks for a folder without an eval split


def _write_images(folder: pathlib.Path, label: str, names, colour) -> None:
    rng = np.random.default_rng(zlib.crc32(" ".join(names).encode()))
    (folder / label).mkdir(parents=True, exist_ok=True)
    for name in names:
        pixels = np.clip(rng.normal(colour, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / label / name, quality=90)


COLOURS = {"a": (200, 40, 40), "b": (40, 40, 200), "c": (40, 200, 40), "d": (200, 200, 40)}


def _make_folder(root: pathlib.Path) -> pathlib.Path:
    for label, colour in COLOURS.items():
        _write_images(root / "train", label, [f"{label}{i}.jpg" for i in range(6)], colour)
    return root


def _config(folder, cache_dir, **data_overrides):
    from configs import demo

    config = demo.get_config("smoke")
    config.dataset = f"imagefolder:{folder}"
    config.heatmap_images = 0
    config.data.train_split, config.data.eval_split = SPLITS
    config.data.cache_dir = str(cache_dir)
    for key, value in data_overrides.items():
        config.data[key] = value
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(folder, workdir, cache dir) of a two-step smoke run on a folder of four classes, no eval split."""
    root = tmp_path_factory.mktemp("data_changes")
    folder, workdir, cache = _make_folder(root / "images"), root / "run", root / "cache"
    run_train("demo.py:smoke", workdir, *_flags(folder, cache))
    return folder, workdir, cache


def _flags(folder, cache) -> list[str]:
    return [f"--config.dataset=imagefolder:{folder}", f"--config.data.train_split={SPLITS[0]}",
            f"--config.data.eval_split={SPLITS[1]}", f"--config.data.cache_dir={cache}", "--config.heatmap_images=0"]


@pytest.fixture
def copy(trained, tmp_path):
    """A private copy of the trained folder and workdir (the folder at the same path the workdir names)."""
    folder, workdir, cache = trained
    shutil.copytree(workdir, tmp_path / "run")
    shutil.copytree(folder, tmp_path / "images")
    saved = json.loads((tmp_path / "run" / "dataset.json").read_text())
    # The copy must look like the original: the same folder at the path the workdir recorded.
    saved["fingerprint"]["location"] = str(tmp_path / "images")
    (tmp_path / "run" / "dataset.json").write_text(json.dumps(saved))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["dataset"] = f"imagefolder:{tmp_path / 'images'}"
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    return tmp_path / "images", tmp_path / "run", cache


def _refused(folder, workdir, cache, *fragments, **overrides):
    """train_and_evaluate on the changed folder is refused in one line naming ``fragments``; nothing is written."""
    from bagjax.training.loop import train_and_evaluate

    before = {p.relative_to(workdir): p.stat().st_mtime_ns for p in workdir.rglob("*") if p.name != ".lock"}
    with pytest.raises(fingerprint.DataChangedError) as err:
        train_and_evaluate(_config(folder, cache, **overrides), str(workdir))
    message = str(err.value)
    assert "\n" not in message
    for fragment in (*fragments, "--workdir", f"--config.init_from={workdir}"):
        assert fragment in message, message
    after = {p.relative_to(workdir): p.stat().st_mtime_ns for p in workdir.rglob("*") if p.name != ".lock"}
    assert after == before  # no checkpoint set aside as corrupt, dataset.json and config.json untouched
    return message


def test_renamed_class_is_refused_naming_the_rename(copy):
    folder, workdir, cache = copy
    (folder / "train" / "a").rename(folder / "train" / "e")
    _refused(folder, workdir, cache, "['a', 'b', 'c', 'd'] -> ['b', 'c', 'd', 'e']", "renamed a -> e")


def test_added_class_is_refused_not_taken_for_corrupt_checkpoints(copy):
    folder, workdir, cache = copy
    _write_images(folder / "train", "e", [f"e{i}.jpg" for i in range(6)], (40, 200, 200))
    _refused(folder, workdir, cache, "added ['e']")


def test_swapped_class_folders_are_refused_as_a_new_label_mapping(copy):
    folder, workdir, cache = copy
    train = folder / "train"
    train.joinpath("a").rename(train / "tmp")
    train.joinpath("b").rename(train / "a")
    train.joinpath("tmp").rename(train / "b")
    _refused(folder, workdir, cache, "label mapping", "a -> b", "b -> a")


def test_added_files_are_refused_unless_allowed_and_then_recorded(copy):
    folder, workdir, cache = copy
    old = {split: {path for path, _ in _records(folder, cache, split)} for split in SPLITS}
    for label, colour in COLOURS.items():
        _write_images(folder / "train", label, [f"new{label}{i}.jpg" for i in range(3)], colour)
    _refused(folder, workdir, cache, f"the train split '{SPLITS[0]}' has", "examples, was", "allow_changed_data=True")
    # The stable hash split: no old train file moved into eval, and every old eval file stayed there.
    new = {split: {path for path, _ in _records(folder, cache, split)} for split in SPLITS}
    assert not old[SPLITS[0]] & new[SPLITS[1]] and old[SPLITS[1]] <= new[SPLITS[1]]
    assert old[SPLITS[0]] <= new[SPLITS[0]] and len(new[SPLITS[0]] | new[SPLITS[1]]) == 36
    # Opting in resumes (train.py, as a user runs it), says so, and records it in metrics.jsonl.
    proc = run_train("demo.py:smoke", workdir, *_flags(folder, cache), "--config.data.allow_changed_data=True")
    assert "data: resuming on changed data" in proc.stdout and "resuming from step 2" in proc.stdout, proc.stdout
    assert any("data_changed" in m for m in read_metrics(workdir))
    refreshed = json.loads((workdir / "dataset.json").read_text())
    assert refreshed["num_train"] + refreshed["num_eval"] == 36  # the new data is now the workdir's


def _records(folder, cache, split):
    options = sources.SourceOptions.from_config(_config(folder, cache))
    return sources.ImageFolderSource(str(folder), options).records(split).files


def test_moved_data_resumes_with_one_line_and_an_old_workdir_cannot_be_checked(copy, tmp_path):
    from bagjax.training.loop import check_data

    folder, workdir, cache = copy
    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved)  # copies keep the files' names and sizes (copy2 also keeps mtimes)
    config = _config(moved, cache)
    verdict = check_data(config, workdir, data.dataset_info(config))
    assert verdict.line.startswith("data: the same data") and str(moved) in verdict.line and not verdict.changed
    info = json.loads((workdir / "dataset.json").read_text())
    del info["fingerprint"]  # as written before fingerprints existed
    (workdir / "dataset.json").write_text(json.dumps(info))
    verdict = check_data(config, workdir, data.dataset_info(config))
    assert "no dataset fingerprint" in verdict.line and "resuming without checking" in verdict.line


@pytest.mark.filterwarnings("ignore:os.fork")  # JAX's warning, if an earlier test started it in this process
def test_folder_index_is_built_once_then_revalidated_by_stat(tmp_path, monkeypatch):
    monkeypatch.setattr(folder_index, "_PARALLEL_MIN_FILES", 8)  # the first scan runs on 2 workers
    monkeypatch.setattr(folder_index, "_fork_is_safe", lambda: True)  # processes, though jax may run here
    folder = _make_folder(tmp_path / "images") / "train"
    (folder / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    cache = tmp_path / "cache"
    first = folder_index.index_split(str(folder), list(COLOURS), cache_dir=str(cache), workers=2)
    assert first.decoded == 25 and len(first.readable) == 24
    assert [e.path for e in first.unreadable] == ["a/broken.jpg"] and "unreadable image" in first.unreadable[0].problem
    assert {(e.width, e.height) for e in first.readable} == {(32, 32)}
    assert list(cache.iterdir()) == [pathlib.Path(folder_index.index_file(str(folder), str(cache)))]
    assert not [p for p in folder.parent.rglob("*") if p.suffix == ".json"]  # nothing written into the folder
    again = folder_index.index_split(str(folder), list(COLOURS), cache_dir=str(cache), workers=2)
    assert again.decoded == 0 and again.entries == first.entries
    _write_images(folder, "b", ["b3.jpg"], (0, 0, 0))  # rewritten: another size or mtime, decoded again
    (folder / "a" / "a0.jpg").unlink()
    changed = folder_index.index_split(str(folder), list(COLOURS), cache_dir=str(cache), workers=2)
    assert changed.decoded == 1 and len(changed.readable) == 23


def test_workers_above_the_available_cores_are_capped_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(sources.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(sources, "_capped_warned", set())
    config = _config("unused", "unused", workers=64)
    assert data.pipeline.num_workers(config) == 2  # train, precise BN and eval all take their count here
    assert data.pipeline.num_workers(config) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "workers=64 capped to the 2 available cores" in out[0]
    config.data.workers = -1
    assert data.pipeline.num_workers(config) == 2
    config.data.workers = 1
    assert data.pipeline.num_workers(config) == 1
