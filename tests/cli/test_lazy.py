"""``import gradflow`` and the CLI's help and ``list`` never import torch (or pandas, scipy,
matplotlib); the lazy public API resolves every name to the object its submodule exports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HEAVY = ("torch", "pandas", "scipy", "matplotlib", "seaborn", "numpy")
ROOT = Path(__file__).resolve().parents[2]

# runs the `gradflow` console script's entry point (gradflow.cli:main) with the given argv and
# prints, on its last line, which heavy modules the process imported
PROBE = textwrap.dedent("""
    import json, sys
    argv, HEAVY = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    sys.argv = ["gradflow", *argv]
    from gradflow.cli import main
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    else:
        code = 0
    print("\\nHEAVY " + json.dumps({"code": code, "heavy": [m for m in HEAVY if m in sys.modules]}))
""")


def _probe(args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args), json.dumps(HEAVY)], capture_output=True, text=True, cwd=cwd,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    out, _, tail = r.stdout.rpartition("\nHEAVY ")
    return out, json.loads(tail)


COMMANDS = ["--help", "--version", "list", "demo --help", "run --help", "report --help", "inspect --help",
            "sweep --help", "list --help"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_and_list_import_no_heavy_library(cmd, tmp_path):
    out, res = _probe(cmd.split(), tmp_path)
    assert res["code"] == 0, out
    assert res["heavy"] == [], f"gradflow {cmd} imported {res['heavy']}"
    assert out.strip(), "the command printed nothing"
    if cmd == "list":  # from a directory outside the checkout: every shipped analysis and sweep
        import gradflow.catalog as cat

        for name in [*cat.shipped_specs("study"), *cat.shipped_specs("sweep"), *cat.TASKS, *cat.CELLS]:
            assert f"  {name} " in out, name


def test_import_gradflow_is_light_and_names_resolve_lazily(tmp_path):
    code = textwrap.dedent("""
        import json, sys
        import gradflow
        before = [m for m in ("torch", "pandas", "numpy") if m in sys.modules]
        rec = gradflow.record
        print(json.dumps({"before": before, "after": "torch" in sys.modules, "v": gradflow.__version__}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["before"] == [] and res["after"] is True


def test_lazy_table_matches_the_submodules():
    import gradflow
    import gradflow.analysis
    import gradflow.loading
    import gradflow.recording
    import gradflow.trace

    expected = {}
    for sub in ("trace", "loading", "recording", "analysis"):
        expected.update(dict.fromkeys(getattr(gradflow, sub).__all__, sub))
    assert gradflow._LAZY == expected, "gradflow._LAZY must list exactly the submodules' __all__"
    for name, sub in gradflow._LAZY.items():
        assert getattr(gradflow, name) is getattr(getattr(gradflow, sub), name), name
    assert set(gradflow.__all__) <= set(dir(gradflow))
    from gradflow import Trace, distance_profile  # noqa: F401  (from-imports go through __getattr__)

    assert gradflow.report.build_report is not None  # submodules load on attribute access
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gradflow.nope


def test_version_has_one_source():
    import tomllib

    import gradflow
    from gradflow._version import __version__

    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in doc["project"]["dynamic"]
    assert doc["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "gradflow._version.__version__"}
    assert gradflow.__version__ == __version__
