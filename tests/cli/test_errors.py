"""One error convention for the whole CLI (issue 12, item 12): a usage error (unknown command or
option, missing argument, bad option value) exits 2, every other error exits 1, and both print
exactly one line on stderr, starting with ``Error: ``."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from gradflow.cli.main import cli

USAGE = [
    (["nosuchcommand"], "No such command 'nosuchcommand'"),
    (["run"], "Missing argument 'SPEC'"),
    (["run", "x.toml", "--bogus"], "No such option '--bogus'"),
    (["demo", "--steps", "0"], "Invalid value for '--steps'"),
    (["inspect", "m:f", "--loss", "middle"], "Invalid value for '--loss'"),
    (["report"], "Missing argument 'DIRS...'"),
    (["--nope"], "No such option '--nope'"),
]

OTHER = [
    (["run", "nope.toml"], "nope.toml: spec file not found"),
    (["report", "missing_dir", "--html", "x.html"], "missing_dir"),
    (["inspect", "nomodule:make", "--shape", "2,2,3"], "cannot import module 'nomodule'"),
]


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return CliRunner()


def _one_line(r):
    assert r.stdout == "", r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("Error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("args,pattern", USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_usage_error_is_one_line_exit_2(runner, args, pattern):
    r = runner.invoke(cli, args)
    assert r.exit_code == 2, r.output
    line = _one_line(r)
    assert pattern in line
    assert "--help" in line  # where to look next, on the same line


@pytest.mark.parametrize("args,pattern", OTHER, ids=[" ".join(a) for a, _ in OTHER])
def test_other_error_is_one_line_exit_1(runner, args, pattern):
    r = runner.invoke(cli, args)
    assert r.exit_code == 1, r.output
    assert pattern in _one_line(r)


def test_help_and_version_still_exit_0(runner):
    for args in (["--help"], ["run", "--help"], ["--version"]):
        r = runner.invoke(cli, args)
        assert r.exit_code == 0 and r.stdout.strip() and not r.stderr, args


def test_bare_gradflow_shows_the_help_as_a_usage_error(runner):
    r = runner.invoke(cli, [])
    assert r.exit_code == 2 and "Commands:" in r.output and "run" in r.output


def test_console_entry_point_prints_one_line(tmp_path):
    """Through the real entry point (gradflow.cli:main) in a fresh process, not CliRunner."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    run = tmp_path / "r"
    run.mkdir()
    (run / "run.json").write_bytes(b'{"kind": "run", "name": "\xff"}')
    for args, code, text in ((["run"], 2, "Missing argument 'SPEC'"), (["report", str(run)], 1, "run.json: not UTF-8")):
        r = subprocess.run([sys.executable, "-c", "from gradflow.cli import main; main()", *args], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == code and r.stdout == "", (args, r.returncode, r.stdout, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("Error: ") and text in r.stderr, r.stderr
