"""Sweep worker processes never import modules from the current directory (issue 12 item 4): a
planted ``selectors.py`` (imported by multiprocessing, subprocess, asyncio ...) must not run, nor a
planted ``scipy.py`` (Ray put the driver's directory first on its workers' path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import sweep_text

PLANT = "import os\nopen(os.path.join({marker!r}, 'planted-%d' % os.getpid()), 'w').close()\n" \
        "raise SystemExit('planted module ran')\n"
SCRIPT = "import sys\nfrom gradflow.cli.main import cli\nif __name__ == '__main__':\n    sys.exit(cli())\n"  # as the console script does


NAMES = ("selectors", "sitecustomize", "tqdm", "scipy")  # imported at start-up, by torch/gradflow, lazily


def _sweep(tmp_path: Path, engine: str, names=NAMES):
    work, bin_, marks = tmp_path / "work", tmp_path / "bin", tmp_path / "marks"
    for d in (work, bin_, marks):
        d.mkdir()
    for n in names:
        (work / f"{n}.py").write_text(PLANT.format(marker=str(marks)))
    (work / "s.toml").write_text(sweep_text({"cell": ["gru"], "seed": [0, 1]}))
    (bin_ / "gradflow").write_text(SCRIPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).parents[2])  # this checkout; the cwd is not on the main's path
    r = subprocess.run([sys.executable, str(bin_ / "gradflow"), "sweep", "s.toml", "--out", "o", "-q",
                        "--workers", "2", "--engine", engine], cwd=work, env=env, capture_output=True, text=True,
                       timeout=300)
    return r, sorted(p.name for p in marks.iterdir()), work


@pytest.mark.slow
def test_local_workers_do_not_import_from_cwd(tmp_path):
    r, planted, work = _sweep(tmp_path, "local")
    assert planted == [], (planted, r.stderr[-2000:])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (work / "o" / "sweep.csv").exists()


@pytest.mark.slow
def test_ray_workers_do_not_import_from_cwd(tmp_path):
    pytest.importorskip("ray")
    r, planted, work = _sweep(tmp_path, "ray")
    if r.returncode != 0 and "ray" in r.stderr.lower() and not planted and "init" in r.stderr.lower():
        pytest.skip(f"ray could not start: {r.stderr.strip().splitlines()[-1]}")
    assert planted == [], (planted, r.stderr[-2000:])
    assert r.returncode == 0, r.stderr[-2000:]
