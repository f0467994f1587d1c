"""Issue 12 item 7: a failed report write never costs the previous report. The new HTML and PDF are
written beside the old ones and renamed over them only once both are complete; a failure at any
point leaves the previous pair byte for byte, and no temporary file behind."""

from __future__ import annotations

import errno
import os

import pytest
from click.testing import CliRunner

from gradflow import _io
from gradflow.cli.main import cli
from gradflow.errors import GradflowError
from gradflow.report import build_report

OLD_HTML, OLD_PDF = b"<!DOCTYPE html>old report", b"%PDF-old"


@pytest.fixture
def previous(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.html").write_bytes(OLD_HTML)
    (out / "report.pdf").write_bytes(OLD_PDF)
    return out


def _intact(out, extra=()):
    assert (out / "index.html").read_bytes() == OLD_HTML
    assert (out / "report.pdf").read_bytes() == OLD_PDF
    assert sorted(p.name for p in out.iterdir()) == sorted(["index.html", "report.pdf", *extra])


def _fail_on(monkeypatch, fn_name, when):
    """Make ``os.<fn_name>`` inside gradflow._io raise ENOSPC when ``when(args)`` holds."""
    real = getattr(os, fn_name)

    def fake(*args, **kw):
        if when(args):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kw)

    monkeypatch.setattr(_io.os, fn_name, fake)


def test_pdf_directory_cannot_be_made_keeps_the_previous_html(small_run, previous):
    (previous / "blocker").write_text("a file where a directory is needed")
    with pytest.raises(GradflowError) as e:
        build_report([small_run], html=previous / "index.html", pdf=previous / "blocker" / "report.pdf")
    assert "blocker" in str(e.value) and "\n" not in str(e.value)
    _intact(previous, extra=["blocker"])


@pytest.mark.parametrize("which", ["html", "pdf"])
def test_disk_full_while_writing_either_file_keeps_both_old_files(small_run, previous, monkeypatch, which):
    ext = ".html." if which == "html" else ".pdf."
    # fsync is called with a descriptor: look its name up to decide
    _fail_on(monkeypatch, "fsync", lambda a: ext in os.readlink(f"/proc/self/fd/{a[0]}"))
    with pytest.raises(GradflowError, match="No space left"):
        build_report([small_run], html=previous / "index.html", pdf=previous / "report.pdf")
    _intact(previous)


def test_failed_rename_of_the_second_file_restores_the_first(small_run, previous, monkeypatch):
    _fail_on(monkeypatch, "replace", lambda a: str(a[1]).endswith("report.pdf"))
    with pytest.raises(GradflowError, match="report.pdf"):
        build_report([small_run], html=previous / "index.html", pdf=previous / "report.pdf")
    _intact(previous)


def test_success_replaces_both_and_leaves_no_temporary_file(small_run, previous):
    build_report([small_run], html=previous / "index.html", pdf=previous / "report.pdf")
    assert (previous / "index.html").read_bytes().startswith(b"<!DOCTYPE html>")
    assert (previous / "index.html").read_bytes() != OLD_HTML
    assert (previous / "report.pdf").read_bytes().startswith(b"%PDF-1")
    assert sorted(p.name for p in previous.iterdir()) == ["index.html", "report.pdf"]


def test_cli_report_failure_keeps_the_previous_report(small_run, previous, monkeypatch):
    monkeypatch.chdir(previous.parent)
    _fail_on(monkeypatch, "replace", lambda a: str(a[1]).endswith("report.pdf"))
    r = CliRunner().invoke(cli, ["report", str(small_run), "--html", "out/index.html", "--pdf", "out/report.pdf"])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "report.pdf" in r.stderr, r.output
    _intact(previous)
