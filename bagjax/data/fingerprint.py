"""The dataset fingerprint a workdir keeps (in ``dataset.json``), so a resume can tell whether its data changed.

A fingerprint records the dataset spec, where the data is (``location``: an image folder's root, a TFDS
``data_dir``), the class list, and for the train and eval split its split string, the example count, a digest
of each class's members (image folders: file names and sizes; TFDS: name, version and split size; synthetic:
variant and sizes) and a stamp of their mtimes. ``check`` compares the saved fingerprint with this run's:

- another class list, or the same classes holding each other's images (a renamed or swapped folder): refused,
  always (the checkpoints' logits mean the old classes);
- other members with the same classes (files added, removed or rewritten): refused unless
  ``config.data.allow_changed_data=True``, which resumes and says what changed;
- the same members somewhere else (a moved or copied folder, a new ``data_dir``): resumed, with one line;
- no saved fingerprint (a workdir written before fingerprints existed): resumed, with one line saying the data
  cannot be checked.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, NamedTuple, Sequence

from bagjax.errors import UserError

FORMAT = 1


class DataChangedError(UserError):
    """A workdir would resume on other data than it was trained on."""


class Verdict(NamedTuple):
    """What ``check`` found: the line to print (None: nothing to say), and whether resuming on changed data."""

    line: str | None
    changed: bool = False


def digest(items: Iterable[str]) -> str:
    """SHA-256 (hex, 32 digits) of lines of text."""
    h = hashlib.sha256()
    for item in items:
        h.update(item.encode('utf-8', 'surrogateescape') + b'\n')
    return h.hexdigest()[:32]


def membership(count: int, class_digests: Sequence[str], stamp: str = '') -> dict[str, Any]:
    """A split's entry: its example count, one digest per class (or one for the whole split) and a stamp."""
    return {'count': int(count), 'classes': list(class_digests), 'stamp': stamp}


def of_source(source, spec: str, splits: dict[str, str]) -> dict[str, Any]:
    """The fingerprint of a source's splits, by role (``{'train': 'train[:80%]', 'eval': ...}``), so another split
    string for a role is other data. Every source has ``location``, ``class_names`` and ``membership``."""
    return {'format': FORMAT, 'spec': spec, 'location': source.location, 'class_names': list(source.class_names),
            'splits': {role: {'split': split, **source.membership(split)} for role, split in splits.items()}}


def _renames(old: dict[str, Any], new: dict[str, Any], split: str) -> list[str]:
    """'a -> c' for each class whose images now sit under another class name (same digest, other name)."""
    try:
        before = dict(zip(old['splits'][split]['classes'], old['class_names']))
        after = dict(zip(new['class_names'], new['splits'][split]['classes']))
    except (KeyError, TypeError):
        return []
    digests = old['splits'][split]['classes']
    if len(digests) != len(old['class_names']) or len(set(digests)) != len(digests):  # e.g. two empty classes
        return []
    return [f'{before[d]} -> {name}' for name, d in after.items() if d in before and before[d] != name]


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs in the members of the splits both fingerprints have."""
    out = []
    for role, now in new['splits'].items():
        was = old.get('splits', {}).get(role, {})
        split = f"{role} split '{now['split']}'" + (f" (was '{was.get('split')}')" if was.get('split') != now['split']
                                                    else '')
        if was.get('count') != now['count']:
            out.append(f"the {split} has {now['count']} examples, was {was.get('count')}")
        elif was.get('classes') != now['classes']:
            changed = [name for name, a, b in zip(new['class_names'], was.get('classes', []), now['classes'])
                       if a != b] if len(now['classes']) == len(new['class_names']) else []
            out.append(f'the {split} holds other examples' + (f' (classes {changed})' if changed else ''))
    return out


def check(saved: dict[str, Any] | None, now: dict[str, Any], workdir: str, *, allow_changed: bool) -> Verdict:
    """What to say before resuming ``workdir`` on data fingerprinted ``now``.

    Raises DataChangedError, naming what changed and the ways out, when the data must not be resumed on.
    """
    if not saved or saved.get('format') != FORMAT:
        return Verdict(f'data: {workdir} records no dataset fingerprint (written before bagjax checked its data): '
                       'resuming without checking that the data is the same')
    fine_tune = f'use a new --workdir, or fine-tune from this one with --workdir NEW --config.init_from={workdir}'
    if list(saved['class_names']) != list(now['class_names']):
        old, new = saved['class_names'], now['class_names']
        renamed = _renames(saved, now, 'train')
        what = (f"renamed {', '.join(renamed)}" if renamed else
                f'removed {sorted(set(old) - set(new))}, added {sorted(set(new) - set(old))}'
                if set(old) != set(new) else 'the same names in another order')
        raise DataChangedError(
            f'the classes of {now["spec"]} changed since {workdir} was trained: {old} -> {new} ({what}); its '
            f'checkpoints would predict the old classes under the new names: {fine_tune}')
    renamed = _renames(saved, now, 'train')
    if renamed:
        raise DataChangedError(
            f'the label mapping of {now["spec"]} changed since {workdir} was trained: images moved between '
            f"class folders ({', '.join(renamed)}; swapped or renamed folders), so its checkpoints would learn "
            f'and predict the wrong labels: {fine_tune}')
    changes = _changes(saved, now)
    moved = saved.get('location') != now['location']
    if not changes and not moved and any(
            saved['splits'].get(k, {}).get('stamp') != v['stamp'] for k, v in now['splits'].items()):
        changes = ['files were rewritten in place (same names and sizes, new modification times)']
    if changes:
        if not allow_changed:
            raise DataChangedError(
                f"the data of {now['spec']} changed since {workdir} was trained ({'; '.join(changes)}): "
                f'{fine_tune}, or resume on the changed data with --config.data.allow_changed_data=True')
        return Verdict(f"data: resuming on changed data ({'; '.join(changes)}; allow_changed_data=True), "
                       'recorded in metrics.jsonl', changed=True)
    if moved:
        return Verdict(f"data: the same data as {workdir} was trained on, now at {now['location']} "
                       f"(was {saved.get('location')}): resuming")
    return Verdict(None)
