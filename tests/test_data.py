"""bagjax.data on Grain: determinism contract, reads per process, exactly-once eval, odd images, offline errors."""

import functools
import io
import logging
import pathlib
import subprocess
import sys
import tempfile

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from bagjax import data
from bagjax.data import pipeline
from bagjax.data import preprocess
from bagjax.data import sources
from bagjax.data import splits
from bagjax.data import synthetic


def make_config(dataset='synthetic', **data_overrides):
    cfg = ml_collections.ConfigDict({
        'dataset': dataset,
        'image_size': 32,
        'batch_size': 8,
        'eval_batch_size': 4,
        'seed': 3,
        'data': {
            'data_dir': '',
            'manual_dir': '',
            'train_split': 'train',
            'eval_split': 'validation',
            'crop_min_area': 0.08,
            'flip': True,
            'crop_fraction': 0.875,
            'workers': 0,
            'synthetic_train_size': 40,
            'synthetic_eval_size': 13,
            'synthetic_image_size': 32,
        },
    })
    cfg.data.update(data_overrides)
    return cfg


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def concat(batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


class CountingRecords:
    """A source's records that log every index read (to count what a process reads)."""

    def __init__(self, records, log):
        self.records, self.log = records, log

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        self.log.append(int(index))
        return self.records[index]


def count_reads(cfg, monkeypatch):
    """Makes the (cached) source of cfg log the record indices it reads; returns that log."""
    source = sources.get_source(sources.SourceOptions.from_config(cfg))
    log = []
    records = source.records
    monkeypatch.setattr(source, 'records', lambda split: CountingRecords(records(split), log))
    return log


def check_train_contract(cfg, monkeypatch, steps=7):
    """Determinism, resume, 2- and 4-process slicing equality, and what each process reads."""
    one = take(data.train_batches(cfg, process_index=0, process_count=1), steps)
    again = take(data.train_batches(cfg, process_index=0, process_count=1), steps)
    assert_batches_equal(one, again)
    resumed = take(data.train_batches(cfg, start_step=steps - 2, process_index=0, process_count=1), 2)
    assert_batches_equal(one[steps - 2:], resumed)
    for process_count in (2, 4):
        parts = [take(data.train_batches(cfg, process_index=p, process_count=process_count), steps)
                 for p in range(process_count)]
        for step in range(steps):
            assert parts[0][step]['image'].shape[0] == cfg.batch_size // process_count
            assert_batches_equal([one[step]], [concat([part[step] for part in parts])])
    # Reads: a resumed process reads only its own share of its own steps, nothing before.
    log = count_reads(cfg, monkeypatch)
    global_order = []
    for step in (steps - 2, steps - 1):
        reads = []
        for p in range(2):
            log.clear()
            batch = pipeline.train_dataset(cfg, start_step=step, process_index=p, process_count=2)[0]
            assert len(log) == cfg.batch_size // 2 == len(batch['label'])
            reads += log
        global_order.append(reads)
        log.clear()
        pipeline.train_dataset(cfg, start_step=step, process_index=0, process_count=1)[0]
        assert log == reads  # The two halves are the global batch, in order.
    return one, global_order


def collect_eval(cfg, process_count):
    per_process = [
        list(data.eval_batches(cfg, process_index=p, process_count=process_count))
        for p in range(process_count)
    ]
    counts = {len(batches) for batches in per_process}
    assert len(counts) == 1, f'processes yield different numbers of eval batches: {counts}'
    images, labels = [], []
    for step in range(counts.pop()):  # Global order: step, then process.
        for p in range(process_count):
            batch = per_process[p][step]
            assert batch['image'].shape[0] == cfg.eval_batch_size // process_count
            assert batch['mask'].dtype == bool
            images.append(batch['image'][batch['mask']])
            labels.append(batch['label'][batch['mask']])
            assert np.all(batch['image'][~batch['mask']] == 0)
    return np.concatenate(images), np.concatenate(labels)


# ----------------------------------------------------------------- synthetic


def test_synthetic_batches_shapes_normalization_and_contract(monkeypatch):
    cfg = make_config()
    batches, _ = check_train_contract(cfg, monkeypatch)
    batch = batches[0]
    assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.uint8
    assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
    normalized = np.asarray(jax.jit(data.normalize)(batch['image']))  # What the jitted steps do.
    np.testing.assert_allclose(normalized, preprocess.normalize(batch['image']), rtol=1e-6, atol=1e-6)
    unit = normalized * np.asarray(data.STDDEV_RGB) + np.asarray(data.MEAN_RGB)
    np.testing.assert_allclose(unit, batch['image'] / 255.0, atol=1e-5)
    assert data.MEAN_RGB == (0.485, 0.456, 0.406) and data.STDDEV_RGB == (0.229, 0.224, 0.225)


def epoch_reads(cfg, monkeypatch, epoch, steps_per_epoch):
    log = count_reads(cfg, monkeypatch)
    for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
        pipeline.train_dataset(cfg, start_step=step, process_index=0, process_count=1)[0]
    return list(log)


def test_synthetic_each_epoch_is_a_permutation_keyed_by_seed(monkeypatch):
    cfg = make_config()  # 40 train examples, 10 classes, batch 8: 5 steps = one epoch.
    info = data.dataset_info(cfg)
    assert (info.num_classes, info.num_train, info.num_eval, info.num_skipped) == (10, 40, 13, 0)
    assert info.class_names[:2] == ('hstripes', 'vstripes')
    epochs = [epoch_reads(cfg, monkeypatch, e, 5) for e in range(3)]
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(40))
    assert epochs[0] != epochs[1] != epochs[2]
    labels = np.concatenate([b['label'] for b in take(data.train_batches(cfg, process_index=0, process_count=1), 5)])
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 4))
    cfg.seed += 1
    assert epoch_reads(cfg, monkeypatch, 0, 5) != epochs[0]


def test_synthetic_generation_is_deterministic_with_boxes():
    variant = synthetic.get_variant('default')
    a_image, a_label, a_boxes = synthetic.make_example(variant, 48, 0, 17)
    b_image, b_label, b_boxes = synthetic.make_example(variant, 48, 0, 17)
    np.testing.assert_array_equal(a_image, b_image)
    np.testing.assert_array_equal(a_boxes, b_boxes)
    assert a_label == b_label == 7 and a_image.dtype == np.uint8
    assert 1 <= len(a_boxes) <= 3 and np.all(a_boxes[:, 2:] - a_boxes[:, :2] >= 11)
    assert not np.array_equal(a_image, synthetic.make_example(variant, 48, 1, 17)[0])


@pytest.mark.parametrize('process_count', [1, 2])
def test_synthetic_eval_exactly_once_with_padding(process_count):
    cfg = make_config()  # 13 eval examples, global eval batch 4 -> 4 batches, 3 padded slots.
    images, labels = collect_eval(cfg, process_count)
    split = synthetic.load_split('default', 'validation', 13, 32)
    np.testing.assert_array_equal(labels, split.labels)
    expected = np.stack([preprocess.resize_full(im, 32) for im in split.images])
    np.testing.assert_array_equal(images, expected)


def test_synthetic_tiny_variant_and_slicing():
    cfg = make_config('synthetic:tiny', train_split='train[:75%]', eval_split='train[75%:]')
    info = data.dataset_info(cfg)
    assert (info.num_classes, info.num_train, info.num_eval) == (4, 36, 12)
    cfg.batch_size = 6
    assert next(data.train_batches(cfg, process_index=0, process_count=1))['image'].shape == (6, 32, 32, 3)



def test_synthetic_crowded_variant_spreads_the_class_motif():
    """The robustness demo's set: 6-9 copies of the class motif, each image generated at 64 px."""
    cfg = make_config('synthetic:crowded')
    cfg.image_size = 64
    info = data.dataset_info(cfg)
    assert info.num_classes == 10
    split = synthetic.load_split('crowded', 'validation', 20, 64)
    counts = [len(b) for b in split.boxes]
    assert min(counts) >= 6 and max(counts) <= 9 and len(set(counts)) > 1
    assert next(data.train_batches(cfg, process_index=0, process_count=1))['image'].shape[1:] == (64, 64, 3)

def test_bad_specs_and_batches_are_one_line_errors():
    with pytest.raises(ValueError, match='unknown dataset spec'):
        data.dataset_info(make_config('mnist'))
    with pytest.raises(ValueError, match='unknown synthetic variant'):
        data.dataset_info(make_config('synthetic:nope'))
    with pytest.raises(ValueError, match='multiple of the process count'):
        next(data.train_batches(make_config(), process_index=0, process_count=3))
    with pytest.raises(ValueError, match='bad split'):
        splits.parse_split('train[:70%')


def test_split_slicing_matches_tfds_rounding():
    assert splits.parse_split('train[:70%]').bounds(3670) == (0, 2569)
    assert splits.parse_split('train[70%:90%]').bounds(3670) == (2569, 3303)
    assert splits.parse_split('train[-10:]').bounds(100) == (90, 100)
    assert splits.parse_split('validation').bounds(7) == (0, 7)


# ----------------------------------------------------------------- preprocessing


def test_random_resized_crop_box_follows_torchvision_bounds():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = preprocess.random_resized_crop_box(rng, 120, 200, (0.08, 1.0))
        assert 0 <= top and top + h <= 120 and 0 <= left and left + w <= 200
        assert 0.08 * 0.9 <= h * w / (120 * 200) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # No crop of a 1 x 100 strip fits the aspect range: center fallback, ratio clamped.
    assert preprocess.random_resized_crop_box(rng, 1, 100, (0.5, 1.0)) == (0, 49, 1, 1)


def test_preprocess_for_eval_resize_then_center_crop():
    ramp = np.broadcast_to(np.arange(400, dtype=np.float64) * 255 / 399, (300, 400))
    image = np.stack([ramp, np.full((300, 400), 128.0), np.zeros((300, 400))], -1).astype(np.uint8)
    out = data.preprocess_for_eval(image, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # Shorter side 300 -> 256, width 341, center crop keeps columns 58..282 of 341.
    red = out[..., 0] / 255.0
    assert abs(red[:, 0].mean() - 58 / 340) < 0.01 and abs(red[:, -1].mean() - 281 / 340) < 0.01
    np.testing.assert_array_equal(out[..., 1], 128)
    with pytest.raises(ValueError, match='crop_fraction'):
        data.preprocess_for_eval(image, 224, crop_fraction=0.0)



@pytest.mark.parametrize('height,width', [(300, 400), (333, 250), (256, 256), (500, 281)])
def test_eval_preprocessing_equals_torchs_antialiased_resize_and_center_crop(height, width):
    """torchvision's Resize(256) + CenterCrop(224), rebuilt from torch ops: the shorter side goes to 256 and the
    longer to int(256 * long / short), antialiased bilinear resize (torch.nn.functional.interpolate, what
    torchvision's tensor Resize calls), crop offsets int(round((size - 224) / 2)). Uniform noise: a crop one
    pixel off, or another filter, differs by ~40 grey levels; PIL's uint8 output differs only by rounding."""
    torch = pytest.importorskip('torch')
    image = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    short, long = sorted((height, width))
    new_long = int(256 * long / short)
    new_h, new_w = (new_long, 256) if height > width else (256, new_long)
    resized = torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].double(),
                                              size=(new_h, new_w), mode='bilinear', align_corners=False,
                                              antialias=True)[0].permute(1, 2, 0).numpy()
    top, left = int(round((new_h - 224) / 2.0)), int(round((new_w - 224) / 2.0))
    expected = resized[top:top + 224, left:left + 224]
    got = data.preprocess_for_eval(image, 224).astype(np.float64)  # uint8 grey levels
    assert got.shape == expected.shape == (224, 224, 3)
    difference = np.abs(got - expected)
    assert difference.max() <= 1.01 and difference.mean() < 0.4, (difference.max(), difference.mean())

# ----------------------------------------------------------------- imagefolder

LABELS = ('cat', 'dog', 'fish')


def _rgb(rng, h, w):
    return (rng.random((h, w, 3)) * 255).astype(np.uint8)


def _save(path, image, fmt, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **kw)


def make_image_folder(root, rng, train_per_label=3, val_per_label=2, labels=LABELS, val_labels=None):
    for split, count, split_labels in (
        ('train', train_per_label, labels),
        ('val', val_per_label, labels if val_labels is None else val_labels),
    ):
        for label in split_labels:
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = rng.integers(20, 60, size=2)
                _save(root / split / label / f'{i}.jpg', Image.fromarray(_rgb(rng, h, w)), 'JPEG')


def add_odd_images(root, rng):
    """Odd but readable formats (converted) and unreadable files (skipped). Returns #unreadable."""
    base = root / 'train'
    rgb = Image.fromarray(_rgb(rng, 40, 50))
    _save(base / 'cat' / 'gray.png', rgb.convert('L'), 'PNG')
    _save(base / 'cat' / 'rgba.PNG', rgb.convert('RGBA'), 'PNG')
    _save(base / 'dog' / 'palette.png', rgb.convert('P'), 'PNG')
    _save(base / 'dog' / 'cmyk.jpeg', rgb.convert('CMYK'), 'JPEG')
    _save(base / 'fish' / 'sixteen.png', Image.fromarray(np.full((30, 30), 32896, np.uint16)), 'PNG')
    (base / 'fish' / 'notes.txt').write_text('not an image, not listed')
    (base / 'cat' / 'garbage.jpg').write_bytes(rng.bytes(500))
    (base / 'dog' / 'empty.png').write_bytes(b'')
    buf = io.BytesIO()
    Image.fromarray(_rgb(rng, 64, 64)).save(buf, 'JPEG')
    (base / 'fish' / 'truncated.jpg').write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / 'val' / 'dog' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\nnope')
    return 4


def test_load_image_file_converts_odd_modes(tmp_path):
    rng = np.random.default_rng(0)
    make_image_folder(tmp_path, rng)
    add_odd_images(tmp_path, rng)
    for name in ('cat/gray.png', 'cat/rgba.PNG', 'dog/palette.png', 'dog/cmyk.jpeg', 'fish/sixteen.png'):
        image = data.load_image_file(str(tmp_path / 'train' / name))
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3, name
    sixteen = data.load_image_file(str(tmp_path / 'train' / 'fish' / 'sixteen.png'))
    assert np.all(sixteen == 128)  # 16-bit 32896 scales to 128, not clipped to 255.
    for name in ('cat/garbage.jpg', 'dog/empty.png', 'fish/truncated.jpg', 'nothere.jpg'):
        with pytest.raises(ValueError, match='unreadable image') as err:
            data.load_image_file(str(tmp_path / 'train' / name))
        assert '\n' not in str(err.value)


def test_imagefolder_skips_and_reports_unreadable_files(tmp_path, caplog, monkeypatch):
    rng = np.random.default_rng(1)
    make_image_folder(tmp_path, rng)
    unreadable = add_odd_images(tmp_path, rng)
    cfg = make_config(f'imagefolder:{tmp_path}', eval_split='val', crop_min_area=0.2)
    cfg.batch_size, cfg.eval_batch_size, cfg.image_size = 8, 4, 24
    with caplog.at_level(logging.WARNING):
        info = data.dataset_info(cfg)
    assert info.class_names == LABELS and info.num_classes == 3
    assert (info.num_train, info.num_eval, info.num_skipped) == (9 + 5, 6, unreadable)
    warnings = ' '.join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert 'skipped 3 unreadable' in warnings and 'garbage.jpg' in warnings
    assert 'skipped 1 unreadable' in warnings and 'broken.png' in warnings
    batches, _ = check_train_contract(cfg, monkeypatch, steps=4)  # 4 * 8 > 14: crosses epoch boundaries.
    assert batches[0]['image'].shape == (8, 24, 24, 3)
    for process_count in (1, 2):
        images, labels = collect_eval(cfg, process_count)
        assert images.shape == (6, 24, 24, 3)
        np.testing.assert_array_equal(np.bincount(labels), [2, 2, 2])


@pytest.mark.parametrize(
    'val_labels, word', [(('cat', 'dog'), "missing ['fish']"), (LABELS + ('owl',), "extra ['owl']")]
)
def test_imagefolder_label_dirs_must_match_train(tmp_path, val_labels, word):
    make_image_folder(tmp_path, np.random.default_rng(2), train_per_label=1, val_per_label=1, val_labels=val_labels)
    with pytest.raises(ValueError, match='class mapping') as err:
        data.dataset_info(make_config(f'imagefolder:{tmp_path}', eval_split='val'))
    assert word in str(err.value) and '\n' not in str(err.value)


def test_imagefolder_missing_split_or_path(tmp_path):
    make_image_folder(tmp_path, np.random.default_rng(3), train_per_label=1, val_per_label=1)
    with pytest.raises(ValueError, match="no split directory 'validation'"):
        data.dataset_info(make_config(f'imagefolder:{tmp_path}'))
    with pytest.raises(ValueError, match='is not a directory'):
        data.dataset_info(make_config(f'imagefolder:{tmp_path / "nope"}'))


def test_imagefolder_needs_two_classes_and_no_empty_class_dir(tmp_path, caplog):
    make_image_folder(tmp_path / 'one', np.random.default_rng(4), train_per_label=1, val_per_label=1,
                      labels=('cat',))
    with pytest.raises(ValueError, match='at least 2 classes') as err:
        data.dataset_info(make_config(f'imagefolder:{tmp_path / "one"}', eval_split='val'))
    assert '\n' not in str(err.value)
    root = tmp_path / 'empty'
    make_image_folder(root, np.random.default_rng(5), train_per_label=1, val_per_label=1)
    (root / 'train' / 'owl').mkdir()
    (root / 'val' / 'owl').mkdir()
    (root / 'train' / 'owl' / 'notes.txt').write_text('not an image')
    with pytest.raises(ValueError, match=r"label dir\(s\) \['owl'\] of split 'train' hold no") as err:
        data.dataset_info(make_config(f'imagefolder:{root}', eval_split='val'))
    assert '\n' not in str(err.value)
    (root / 'train' / 'owl' / 'notes.txt').rename(root / 'train' / 'owl' / 'owl.jpg')
    Image.fromarray(_rgb(np.random.default_rng(6), 30, 30)).save(root / 'train' / 'owl' / 'owl.jpg')
    with caplog.at_level(logging.WARNING):  # An empty eval class dir: a warning, the class stays.
        info = data.dataset_info(make_config(f'imagefolder:{root}', eval_split='val'))
    assert info.class_names == LABELS + ('owl',) and info.num_eval == 3
    assert "['owl'] of split 'val' hold no" in caplog.text


def test_imagefolder_symlink_loop_is_a_one_line_error(tmp_path):
    make_image_folder(tmp_path, np.random.default_rng(7), train_per_label=1, val_per_label=1)
    (tmp_path / 'train' / 'loop').symlink_to(tmp_path / 'train' / 'loop')
    with pytest.raises(ValueError, match="cannot read 'train/loop'.*symlink loop") as err:
        data.dataset_info(make_config(f'imagefolder:{tmp_path}', eval_split='val'))
    assert '\n' not in str(err.value)


def test_jpeg_draft_mode_for_large_crops(tmp_path):
    rng = np.random.default_rng(8)
    smooth = Image.fromarray(_rgb(rng, 30, 40)).resize((1600, 1200), Image.BICUBIC)
    smooth.save(tmp_path / 'big.jpg', quality=95)
    full = preprocess.load_image_file(str(tmp_path / 'big.jpg'))
    lazy = preprocess.open_image(str(tmp_path / 'big.jpg'))
    out = preprocess.preprocess_for_train(lazy, np.random.default_rng(1), 64, scale=(0.5, 1.0), flip=False)
    assert lazy.size[0] <= 800  # Decoded at 1/2 scale or less: every crop here is >= 8x the output.
    reference = preprocess.preprocess_for_train(full, np.random.default_rng(1), 64, scale=(0.5, 1.0), flip=False)
    assert out.dtype == np.uint8 and np.abs(out.astype(float) - reference).mean() < 2.0  # Same crop.
    lazy = preprocess.open_image(str(tmp_path / 'big.jpg'))
    out = data.preprocess_for_eval(lazy, 64)
    assert lazy.size[0] <= 800
    assert np.abs(out.astype(float) - data.preprocess_for_eval(full, 64)).mean() < 2.0
    small = preprocess.open_image(str(tmp_path / 'big.jpg'))  # Crop < 2x the output: full decode.
    preprocess.preprocess_for_eval(small, 1024)
    assert small.size == (1600, 1200)


def test_worker_processes_give_the_same_batches_and_survive_a_bad_file(tmp_path):
    rng = np.random.default_rng(9)
    make_image_folder(tmp_path, rng, train_per_label=3, val_per_label=2)
    cfg = make_config(f'imagefolder:{tmp_path}', eval_split='val')
    cfg.eval_batch_size = 4
    in_process = take(data.train_batches(cfg, process_index=0, process_count=1), 3)
    evaluated = list(data.eval_batches(cfg, process_index=0, process_count=1))
    files = sources.get_source(sources.SourceOptions.from_config(cfg)).records('val').files
    (tmp_path / 'val' / 'cat' / '0.jpg').write_bytes(b'broken after the scan')
    bad = [i for i, (path, _) in enumerate(files) if path.endswith('cat/0.jpg')][0]
    cfg.data.workers = 2
    assert_batches_equal(in_process, take(data.train_batches(cfg, process_index=0, process_count=1), 3))
    with_workers = list(data.eval_batches(cfg, process_index=0, process_count=1))
    masks = concat(with_workers)['mask']
    assert masks.sum() == 5 and not masks[bad]  # Left out of the evaluation, the pipeline goes on.
    for k in ('image', 'label'):
        np.testing.assert_array_equal(concat(with_workers)[k][masks], concat(evaluated)[k][masks])



@pytest.mark.parametrize('script_kind', ['unguarded', 'guarded', 'guarded and edited while running',
                                         'guarded inside a with block, with another condition'])
def test_worker_batches_at_a_scripts_top_level_fail_in_one_line_instead_of_hanging(tmp_path, script_kind):
    # Spawned workers rerun the main script's top level: unguarded, the parent used to wait forever.
    body = ('cfg = make_config(workers=1)\n'
            'print(next(data.train_batches(cfg, process_index=0, process_count=1))["image"].shape)\n')
    if script_kind == 'guarded and edited while running':  # Its saved lines no longer match the running code.
        body = 'src = open(__file__).read(); time.sleep(0.05); open(__file__, "w").write("\\n" * 30 + src)\n' + body
    if script_kind == 'guarded inside a with block, with another condition':
        body = ("with contextlib.nullcontext():\n    if __name__ == '__main__' and len(sys.argv) == 1:\n"
                + ''.join(f'        {line}\n' for line in body.splitlines()))
    elif script_kind != 'unguarded':
        body = "if __name__ == '__main__':\n" + ''.join(f'    {line}\n' for line in body.splitlines())
    script = tmp_path / 'user_script.py'
    tests = pathlib.Path(__file__).parent
    # An annotated def: the script must compile as it ran, without pipeline.py's `from __future__ import annotations`.
    script.write_text(f'import contextlib, sys, time\nsys.path[:0] = [{str(tests)!r}, {str(tests.parent)!r}]\n'
                      f'from test_data import make_config\nfrom bagjax import data\ndef f(x: int) -> int: return x\n'
                      f'{body}')
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    if script_kind == 'unguarded':
        assert result.returncode == 1
        assert f"{script}:7 asks for batches from 1 worker processes at the script's top level" in result.stderr
        assert "if __name__ == '__main__':" in result.stderr.splitlines()[-1]
    else:
        assert result.returncode == 0 and '(8, 32, 32, 3)' in result.stdout, result.stderr[-2000:]


# ----------------------------------------------------------------- tfds


@pytest.mark.parametrize('name', ['tf_flowers'])  # An unknown name: test_unknown_tfds_names_...
def test_tfds_offline_error_is_one_actionable_line(tmp_path, name):
    from tensorflow_datasets.core.download import downloader

    from bagjax.data import sources

    retries = downloader.MAX_RETRIES  # TFDS's retry constant (a rename would silently bring back 205 s offline)
    with sources._failing_fast(1.0, 2):
        assert downloader.MAX_RETRIES == 2
    cfg = make_config(f'tfds:{name}', data_dir=str(tmp_path / 'tfds'), manual_dir=str(tmp_path / 'manual'))
    with pytest.raises(data.DatasetUnavailableError) as err:
        data.dataset_info(cfg)
    assert downloader.MAX_RETRIES == retries  # bagjax's fast-fail bound is lifted again
    message = str(err.value)
    assert '\n' not in message and name in message
    for way_out in ('data_dir', 'manual_dir', 'imagefolder:'):
        assert way_out in message


@functools.cache  # TFDS registers a builder class by name, once per process.
def tfds_builder():
    """A TFDS builder of the tests' own: 11 train / 5 test PNG images, built offline (no download)."""
    tfds = pytest.importorskip('tensorflow_datasets')
    epath = pytest.importorskip('etils.epath')

    class BagjaxTestShapes(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version('1.0.0')
        pkg_dir_path = epath.Path(tempfile.mkdtemp())  # No package metadata: a class defined in a test.

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict({
                    'image': tfds.features.Image(shape=(None, None, 3)),
                    'label': tfds.features.ClassLabel(names=['a', 'b']),
                }),
                supervised_keys=('image', 'label'),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {'train': self._generate_examples(11, 0), 'test': self._generate_examples(5, 1)}

        def _generate_examples(self, n, seed):
            rng = np.random.default_rng(seed)
            for i in range(n):
                yield i, {'image': _rgb(rng, 20 + i, 30), 'label': i % 2}

    return BagjaxTestShapes


def test_a_failed_preparation_that_is_not_the_network_is_not_blamed_on_it(tmp_path):
    (tmp_path / 'file').write_text('in the way')  # data_dir below a file: TFDS cannot write there
    builder = tfds_builder()(data_dir=str(tmp_path / 'file' / 'tfds'))
    with pytest.raises(data.DatasetUnavailableError) as err:
        sources.download_and_prepare(builder, 'bagjax_test_shapes', '')
    message = str(err.value)
    assert message.startswith("tfds dataset 'bagjax_test_shapes' could not be prepared in ") and '\n' not in message
    assert '(NotADirectoryError: ' in message and 'cannot be downloaded' not in message


def test_tfds_tfrecord_is_refused_then_converted_by_prepare(tmp_path, monkeypatch, capsys):
    tfds = pytest.importorskip('tensorflow_datasets')
    from bagjax.data import prepare

    data_dir = str(tmp_path / 'tfds')
    tfds_builder()(data_dir=data_dir).download_and_prepare(file_format='tfrecord')
    cfg = make_config('tfds:bagjax_test_shapes', data_dir=data_dir, eval_split='test')
    with pytest.raises(data.DatasetUnavailableError) as err:
        data.dataset_info(cfg)
    command = f'python -m bagjax.data.prepare tfds:bagjax_test_shapes --data_dir {data_dir}'
    assert command in str(err.value) and '\n' not in str(err.value)
    prepare.main(['tfds:bagjax_test_shapes', '--data_dir', data_dir])
    assert 'converted 2 shard(s)' in capsys.readouterr().out
    assert 'nothing to do' in prepare.prepare('bagjax_test_shapes', data_dir)

    cfg.eval_batch_size = 4
    info = data.dataset_info(cfg)
    assert (info.class_names, info.num_train, info.num_eval) == (('a', 'b'), 11, 5)
    batches, reads = check_train_contract(cfg, monkeypatch, steps=7)  # 56 examples: five epochs of 11.
    assert all(0 <= i < 11 for step in reads for i in step)
    labels = np.concatenate([b['label'] for b in batches])[:55]
    # Each epoch is a permutation of the 11 examples (6 label a, 5 label b).
    np.testing.assert_array_equal(labels.reshape(5, 11).sum(1), [5] * 5)
    stored = tfds.builder('bagjax_test_shapes', data_dir=data_dir).as_dataset(split='test')
    expected = [(data.preprocess_for_eval(ex['image'], 32), ex['label']) for ex in tfds.as_numpy(stored)]
    for process_count in (1, 2):
        images, labels = collect_eval(cfg, process_count)
        np.testing.assert_array_equal(labels, [label for _, label in expected])
        np.testing.assert_array_equal(images, np.stack([image for image, _ in expected]))
    cfg.data.eval_split = 'train[50%:]'  # TFDS slicing: examples 6..10 of 11.
    assert data.dataset_info(cfg).num_eval == 5
    assert collect_eval(cfg, 2)[1].shape == (5,)


def test_tfds_prepare_builds_array_record_directly(tmp_path):
    pytest.importorskip('tensorflow_datasets')
    from bagjax.data import prepare

    builder = tfds_builder()
    data_dir = str(tmp_path / 'tfds')
    assert 'prepared bagjax_test_shapes in ArrayRecord' in prepare.prepare('bagjax_test_shapes', data_dir)
    assert builder(data_dir=data_dir).info.file_format.value == 'array_record'
    cfg = make_config('tfds:bagjax_test_shapes', data_dir=data_dir, eval_split='test[:3]')
    assert data.dataset_info(cfg).num_eval == 3
    batch = next(data.train_batches(cfg, process_index=0, process_count=1))
    assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.uint8


def test_synthetic_pipeline_never_imports_tensorflow():
    # The GPU machine has no TensorFlow: the synthetic path must run without it.
    code = (
        'import sys, ml_collections as mc, bagjax.data as d\n'
        "c = mc.ConfigDict({'dataset': 'synthetic:tiny', 'image_size': 16, 'batch_size': 4, 'eval_batch_size': 4,"
        " 'seed': 0, 'data': {'data_dir': '', 'manual_dir': '', 'train_split': 'train', 'eval_split': 'validation',"
        " 'crop_min_area': 0.08, 'flip': True, 'crop_fraction': 0.875, 'workers': 0,"
        " 'synthetic_train_size': 0, 'synthetic_eval_size': 0, 'synthetic_image_size': 0}})\n"
        'next(d.train_batches(c, process_index=0, process_count=1))\n'
        'list(d.eval_batches(c, process_index=0, process_count=1))\n'
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize('spec, expected', [
    ('tfds:tf_flower', "unknown tfds dataset 'tf_flower' (did you mean 'tf_flowers'"),
    ('tfds:no_such_dataset_bagjax', "unknown tfds dataset 'no_such_dataset_bagjax'"),
    ('tfds:tf_flowers/bad', "tfds dataset 'tf_flowers' has no config 'bad': it has none, use tfds:tf_flowers"),
])
def test_unknown_tfds_names_and_configs_are_one_line_with_suggestions(spec, expected, tmp_path, monkeypatch):
    """A misspelt name was 'not prepared and cannot be downloaded here' in train.py and TFDS's 460-line list
    of datasets in prepare; TFDS's own message for a bad config ends in an empty list."""
    from bagjax.data import prepare

    cfg = make_config(spec, data_dir=str(tmp_path))
    with pytest.raises(data.DatasetUnavailableError) as err:
        data.dataset_info(cfg)
    assert str(err.value).startswith(expected) and '\n' not in str(err.value), str(err.value)
    assert 'cannot be downloaded' not in str(err.value)
    with pytest.raises(SystemExit) as exit_:
        prepare.main([spec, '--data_dir', str(tmp_path)])
    assert exit_.value.code == f'error: {err.value}'
    monkeypatch.setenv('BAGJAX_TRACEBACK', '1')  # As train.py: the traceback on request.
    with pytest.raises(data.DatasetUnavailableError):
        prepare.main([spec, '--data_dir', str(tmp_path)])


@pytest.mark.parametrize('argv, expected', [
    ([], 'error: the following arguments are required: dataset (see python -m bagjax.data.prepare --help)'),
    (['imagefolder:x'], "error: expected tfds:NAME[/CONFIG], got 'imagefolder:x' (imagefolder and synthetic "),
    (['tfds:x', '--bogus'], 'error: unrecognized arguments: --bogus (see python -m bagjax.data.prepare --help)'),
])
def test_prepare_command_line_mistakes_are_one_line(argv, expected, capsys):
    from bagjax.data import prepare

    with pytest.raises(SystemExit) as exit_:
        prepare.main(argv)
    assert isinstance(exit_.value.code, str) and exit_.value.code.startswith(expected), exit_.value.code
    assert '\n' not in exit_.value.code and capsys.readouterr().err == ''
