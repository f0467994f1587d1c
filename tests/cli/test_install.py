"""Packaging: the analyses ship in the wheel, and a non-editable install works outside the checkout.

The slow test builds a wheel from a copy of this source tree, installs it with ``--no-deps`` into a
fresh virtual environment that shares this interpreter's site-packages (torch is not reinstalled),
and from a directory outside the checkout runs ``gradflow list`` and ``gradflow run checksum
--steps 5``, exactly as a user would after ``pip install gradflow``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_lists_every_package():
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    st = doc["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "gradflow").rglob("__init__.py")}
    assert set(st["packages"]) == on_disk | {"gradflow.analyses"}, "add new packages to pyproject.toml"
    assert st["package-dir"] == {"gradflow.analyses": "analyses"}
    assert set(st["package-data"]["gradflow.analyses"]) == {"*.toml", "sweeps/*.toml"}


def _no_pythonpath_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("gradflow", "analyses"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"), str(src)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(5, "--no-build-isolation")  # offline: build with the installed setuptools
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=_no_pythonpath_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp / "dist").glob("gradflow-*.whl")
    return wheel


@pytest.mark.slow
def test_wheel_installed_outside_the_checkout_lists_and_runs_the_analyses(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "analyses").rglob("*.toml"))
    assert len(shipped) == 13
    assert {f"gradflow/{p}" for p in shipped} <= names, "every analysis spec is in the wheel"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    py = venv / "bin" / "python"
    env = _no_pythonpath_env()
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = subprocess.run([str(py), "-c", "import gradflow, json; print(json.dumps(gradflow.__file__))"],
                       capture_output=True, text=True, cwd=work, env=env, timeout=60)
    assert Path(json.loads(r.stdout)).is_relative_to(venv), r.stdout + r.stderr  # the wheel, not the checkout

    gradflow = str(venv / "bin" / "gradflow")
    r = subprocess.run([gradflow, "list"], capture_output=True, text=True, cwd=work, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert str(venv) in r.stdout and "(none found)" not in r.stdout
    for p in shipped:
        assert f"  {Path(p).stem} " in r.stdout, p

    r = subprocess.run([gradflow, "run", "checksum", "--steps", "5", "-q"], capture_output=True, text=True,
                       cwd=work, env=env, timeout=240)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["runs/checksum", "reports/checksum/index.html", "reports/checksum/report.pdf"]
    study = json.loads((work / "runs/checksum/study.json").read_text())
    assert len(study["runs"]) == 3
    for run in study["runs"]:
        doc = json.loads((work / "runs/checksum" / run / "run.json").read_text())
        assert doc["status"] == "finished" and doc["spec"]["train"]["steps"] == 5, run
    assert (work / "reports/checksum/report.pdf").read_bytes()[:4] == b"%PDF"
