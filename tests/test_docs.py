"""The README and docs/ pages: their links resolve, the README's Python snippet runs, and every concrete
``python train.py ...`` and ``python -m bagjax...`` command they show parses its flags (in-process, stopped right
after parsing, so no command does its work)."""

import importlib
import os
import re
import shlex
import sys
import unicodedata

import pytest
from absl import flags

from bagjax import cli
from trainutil import ROOT

PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
PLACEHOLDER = re.compile(r"\.\.\.|[\[\]|*<>]|[A-Z]{3,}")  # configs/NAME.py[:ARG], DIR, ..., a|b: not concrete


def _text_outside_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = unicodedata.normalize("NFKD", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path) -> set[str]:
    return {_anchor(h) for h in re.findall(r"^#+ (.+)$", _text_outside_code(path.read_text()), re.M)}


def test_readme_fits_on_a_few_screens_and_every_page_is_linked():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
    linked = set()
    for page in PAGES:
        linked |= {(page.parent / t.split("#")[0]).resolve() for t in LINK.findall(page.read_text())}
    assert not [p.name for p in PAGES[1:] if p.resolve() not in linked]  # no page a reader cannot reach


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_image_resolves(page):
    for target in LINK.findall(_text_outside_code(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: {target} does not exist"
        assert ROOT in resolved.parents or resolved == ROOT, f"{page.name}: {target} leaves the repository"
        if anchor:
            assert anchor in _anchors(resolved), f"{page.name}: no heading for #{anchor} in {resolved.name}"


def test_the_readme_python_snippet_runs():
    snippets = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(snippets) == 1
    exec(compile(snippets[0], "README.md", "exec"), {})  # pylint: disable=exec-used


def test_the_readme_test_command_is_the_one_ci_runs():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python -m pytest")]
    assert len(ci) == 1 and ci[0] in (ROOT / "README.md").read_text()


def _commands() -> list[tuple[str, list[str]]]:
    """(page, argv) of every concrete command the pages show, in code blocks and in inline code."""
    found = []
    for page in PAGES:
        text = page.read_text()
        blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
        lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
        lines += re.findall(r"`(python [^`]+)`", _text_outside_code(text))
        for line in lines:
            for part in line.split("&&"):
                part = os.path.expandvars(part.split("  #")[0].strip())
                argv = shlex.split(part)[1:] if part.startswith("python ") else []
                named = argv[:1] == ["train.py"] or argv[:2] in (["-m", m] for m in argv[1:2] if m.startswith("bagjax"))
                if named and len(argv) > (1 if argv[0] == "train.py" else 2) and not PLACEHOLDER.search(part):
                    found.append((page.name, argv))  # a command with arguments, not the mention of a name
    return found


class _Parsed(Exception):
    pass


def _stop_after_parsing(monkeypatch):
    original = cli.ArgumentParser.parse_known_args

    def parse_known_args(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise _Parsed

    monkeypatch.setattr(cli.ArgumentParser, "parse_known_args", parse_known_args)


def test_every_command_in_the_docs_parses_its_flags(monkeypatch):
    from bagjax.experiments import heads

    _stop_after_parsing(monkeypatch)
    commands = _commands()
    checked = set()
    for page, argv in commands:
        if "--help" in argv or any(a.startswith("configs/folder.py:") or "folder.py:" in a for a in argv):
            continue  # --help parses nothing; folder.py:PATH reads the user's folder to choose its recipe
        where = f"{page}: {shlex.join(argv)}"
        if argv[0] == "train.py" or argv[:2] == ["-m", "bagjax.experiments.heads"]:
            flag_values = flags.FlagValues()
            if argv[0] == "train.py":
                cli.define_config_flags(flag_values, "workdir")
            else:
                heads.define_flags(flag_values)
            args = argv[1:] if argv[0] == "train.py" else argv[2:]
            args = [str(ROOT / a) if a.startswith("configs/") else
                    re.sub(r"^--config=configs/", f"--config={ROOT}/configs/", a) for a in args]
            monkeypatch.setattr(sys, "argv", ["cmd", *args])  # ml_collections reads the overrides from sys.argv
            try:
                cli.parse_config_flags(flag_values, sys.argv)
            except SystemExit as e:
                pytest.fail(f"{where}: {e.code}")
        else:
            assert argv[0] == "-m", where
            main = importlib.import_module(argv[1]).main
            with pytest.raises(_Parsed):
                try:
                    main(argv[2:])
                except SystemExit as e:
                    pytest.fail(f"{where}: {e.code}")
        checked.add(where)
    assert len(checked) >= 15, sorted(checked)
