"""``pip install -e .`` / ``pip install .``: the package builds from pyproject.toml and imports outside the checkout."""

import pathlib
import shutil
import subprocess
import sys
import zipfile

from packaging.requirements import Requirement

from trainutil import ROOT


def test_wheel_holds_every_module_and_imports_outside_the_checkout(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "bagjax", source / "bagjax", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("bagjax-*.whl")
    shipped = [*(ROOT / "bagjax").rglob("*.py"), *(ROOT / "bagjax" / "assets").iterdir()]  # + explore's page
    modules = sorted(p.relative_to(ROOT).as_posix() for p in shipped)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert modules and set(modules) <= set(names)
    # requirements.txt stays the one list of runtime dependencies.
    required = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    requires_dist = {Requirement(line.split(": ", 1)[1]) for line in metadata.splitlines()
                     if line.startswith("Requires-Dist: ")}
    runtime = {str(r) for r in requires_dist if r.marker is None}  # the rest belong to extras (export)
    assert runtime == {str(Requirement(r)) for r in required if r}
    assert any(r.name == "jax2onnx" and r.marker.evaluate({"extra": "export"}) for r in requires_dist)
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run([sys.executable, "-c", "import bagjax, bagjax.models, bagjax.patches; print(bagjax.__file__)"],
                         cwd=elsewhere, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert pathlib.Path(run.stdout.strip()).is_relative_to(tmp_path / "site")
