"""build_report: the HTML page and the PDF, their content, omitted sections, atomic writes."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest

from gradflow.errors import GradflowError
from gradflow.report import build_report, load_runs, plan

from .synth import RUNS, make_run, make_study

ALL_SECTIONS = ["summary", "gradnorms", "distance", "spectra", "products", "gates", "clipping"]
FIGURE_SECTIONS = ["gradnorms", "distance", "spectra", "products", "gates", "clipping"]


class Page(HTMLParser):
    """Collects ids, img srcs, hrefs, every src/href-like attribute, script/link tags."""

    def __init__(self):
        super().__init__()
        self.ids, self.imgs, self.hrefs, self.refs, self.tags = set(), [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs.append(a)
        if tag == "a" and "href" in a:
            self.hrefs.append(a["href"])
        for k in ("src", "href", "srcset", "poster", "data"):
            if k in a:
                self.refs.append(a[k])


def parse(path: Path) -> Page:
    p = Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_writes_both_files_and_returns_their_paths(built):
    paths, _ = built
    assert set(paths) == {"html", "pdf"}
    assert paths["html"].read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert paths["pdf"].read_bytes().startswith(b"%PDF")
    assert [p.name for p in paths["html"].parent.iterdir() if p.name.startswith(".")] == []  # no temp files


def test_html_has_every_section_figure_and_toc_entry(built):
    paths, _ = built
    page = parse(paths["html"])
    for sid in ALL_SECTIONS + ["runs", "data", "toc"]:
        assert sid in page.ids, sid
    for sid in FIGURE_SECTIONS:
        assert f"fig-{sid}" in page.ids
        assert f"#{sid}" in page.hrefs  # table of contents
    assert len(page.imgs) == len(FIGURE_SECTIONS)
    for img in page.imgs:
        assert img["src"].startswith("data:image/svg+xml;base64,")
        svg = base64.b64decode(img["src"].split(",", 1)[1])
        assert svg.lstrip().startswith(b"<?xml") and b"<svg" in svg
        assert img.get("alt")
    assert "omitted" not in page.ids  # every section has data here


def test_html_is_self_contained(built):
    paths, _ = built
    text = paths["html"].read_text(encoding="utf-8")
    page = parse(paths["html"])
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    for ref in page.refs:
        assert not re.match(r"^(https?:|file:|//)", ref), ref
    for img in page.imgs:
        assert img["src"].startswith("data:")
    assert not re.search(r"url\((?!['\"]?data:)", text)  # no CSS fetch
    assert "@import" not in text


def test_html_links_to_raw_tables_resolve(built):
    paths, study = built
    html = paths["html"]
    page = parse(html)
    files = [h for h in page.hrefs if not h.startswith("#")]
    assert files
    for h in files:
        assert not os.path.isabs(unquote(h))
        assert (html.parent / unquote(h)).resolve().exists(), h
    rs = load_runs([study])
    for r in rs.runs:
        for name in r.tables:
            target = (r.path / f"{name}.csv").resolve()
            assert any((html.parent / unquote(h)).resolve() == target for h in files), (r.label, name)


def test_html_shows_metadata_verdicts_and_flags_diverged_run(built):
    paths, _ = built
    text = paths["html"].read_text(encoding="utf-8")
    assert 'id="flagged"' in text and "irnn: diverged at step 60" in text
    assert "⚠ diverged at step 60" in text
    assert "LSTM and GRU keep gradients" in text  # the study's claim
    for label in RUNS:
        assert f"<td>{label.replace('+', '+')}</td>" in text
    assert "clip norm ≤ 1" in text and "adding, T=80" in text
    assert "0.9 (chance 0.167), solved" in text and "torch 2.5.0, gradflow 0.1.0" in text
    assert text.count("How to read it") == len(ALL_SECTIONS)
    assert 'class="vanishing' in text and 'class="exploding' in text


def test_html_explains_each_figure(built):
    paths, study = built
    sections, _ = plan(load_runs([study]))
    text = paths["html"].read_text(encoding="utf-8")
    from markupsafe import escape

    assert [s.id for s in sections] == ALL_SECTIONS
    for s in sections:
        block = text[text.index(f'<section id="{s.id}"'):]
        block = block[: block.index("</section>")]
        assert str(escape(s.explanation)) in block
        for note in s.notes:
            assert str(escape(note)) in block


def test_sections_without_data_are_omitted_with_a_note(tmp_path):
    d = make_run(tmp_path / "runs" / "rnn", "rnn_tanh", tables=("metrics", "distance"))
    out = build_report([d], html=tmp_path / "r" / "index.html")
    page = parse(out["html"])
    assert {"distance", "clipping", "omitted"} <= page.ids
    for sid in ("summary", "gradnorms", "spectra", "products", "gates"):
        assert sid not in page.ids
    assert len(page.imgs) == 2
    text = out["html"].read_text(encoding="utf-8")
    assert "No run has gates.csv with rows" in text
    assert "decay.csv is absent" in text
    assert "clip_timesteps.csv is absent" in text


def test_combines_runs_and_studies(tmp_path):
    study_dir = make_study(tmp_path / "cells", labels=("rnn_tanh", "lstm"), tables=("distance", "decay", "gradnorms"))
    extra = make_run(tmp_path / "more" / "lstm2", "lstm", tables=("distance", "decay"))
    meta = json.loads((extra / "run.json").read_text())
    meta["label"] = "lstm (seed 2)"
    (extra / "run.json").write_text(json.dumps(meta))
    for f in ("distance.csv", "decay.csv"):
        (extra / f).write_text((extra / f).read_text().replace("lstm,", "lstm (seed 2),"))
    out = build_report([study_dir, extra], html=tmp_path / "cmp.html")
    assert set(out) == {"html"}
    text = out["html"].read_text(encoding="utf-8")
    assert "lstm (seed 2)" in text and "Study cells" in text
    assert "Not shown for lstm (seed 2): no rows in gradnorms.csv." in text
    rs = load_runs([study_dir, extra])
    assert rs.labels == ("rnn_tanh", "lstm", "lstm (seed 2)")
    assert rs.run("lstm (seed 2)").study is None


def test_title_and_default_title(tmp_path):
    study_dir = make_study(tmp_path / "cells", labels=("rnn_tanh", "lstm"), tables=("summary",))
    out = build_report([study_dir], html=tmp_path / "a.html", title="My <study>")
    text = out["html"].read_text(encoding="utf-8")
    assert "<title>My &lt;study&gt;</title>" in text and "<h1>My &lt;study&gt;</h1>" in text
    out = build_report([study_dir], html=tmp_path / "b.html")
    assert "<title>gradflow report: cells</title>" in out["html"].read_text(encoding="utf-8")
    out = build_report([study_dir / "runs" / "lstm"], html=tmp_path / "c.html")
    assert "<title>gradflow report: lstm</title>" in out["html"].read_text(encoding="utf-8")


def test_nothing_to_write(study_dir):
    with pytest.raises(GradflowError, match="nothing to write"):
        build_report([study_dir])


def test_bad_input_leaves_no_report(tmp_path, fresh_study):
    (fresh_study / "runs" / "lstm" / "decay.csv").write_text("run,key\nlstm,\"unterminated\n")
    html, pdf = tmp_path / "r" / "index.html", tmp_path / "r" / "report.pdf"
    with pytest.raises(GradflowError) as e:
        build_report([fresh_study], html=html, pdf=pdf)
    assert "decay.csv" in str(e.value) and "\n" not in str(e.value)
    assert not html.exists() and not pdf.exists()


def test_failed_second_write_removes_the_first_and_keeps_old_files(tmp_path, small_run):
    out = tmp_path / "out"
    out.mkdir()
    html = out / "index.html"
    html.write_text("old report")
    blocker = out / "blocker"
    blocker.write_text("a file where a directory is needed")
    with pytest.raises(GradflowError) as e:
        build_report([small_run], html=out / "new.html", pdf=blocker / "report.pdf")
    assert "\n" not in str(e.value) and "blocker" in str(e.value)
    assert not (out / "new.html").exists()
    assert html.read_text() == "old report"
    assert sorted(p.name for p in out.iterdir()) == ["blocker", "index.html"]


def test_report_path_is_a_directory(tmp_path, small_run):
    with pytest.raises(GradflowError, match="is a directory"):
        build_report([small_run], html=tmp_path)


def test_plotting_is_lazy_and_the_users_backend_is_kept(tmp_path, small_run):
    """``import gradflow`` loads no plotting library (the report layer is imported lazily); a user
    who chose a backend keeps it after building a report, and no figure stays registered with pyplot."""
    code = (
        "import sys, gradflow\n"
        "print(any(m.split('.')[0] in ('matplotlib', 'seaborn') for m in sys.modules))\n"
        "import matplotlib; matplotlib.use('template'); import matplotlib.pyplot as plt\n"
        "from gradflow.report import build_report\n"
        f"build_report([{str(small_run)!r}], html={str(tmp_path / 'x.html')!r})\n"
        "print(matplotlib.get_backend(), len(plt.get_fignums()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "template", "0"]


def test_verdict_table_classifies_verdicts(runset):
    from gradflow.report import verdict_table

    v = verdict_table(runset.table("summary"))
    assert list(v.columns) == ["run", "state", "verdict", "detail", "kind"]
    assert dict(zip(v["run"] + " " + v["state"], v["kind"]))["rnn_tanh rnn/l0/d0/h"] == "vanishing"
    assert set(v["kind"]) == {"vanishing", "ok", "exploding"}
    import pandas as pd

    more = pd.DataFrame({"run": ["a"] * 3, "key": ["k"] * 3, "verdict": [
        "non-finite: 3 NaN/Inf gradient(s), first at t=4", "stable within the sequence: ...", "no evidence"],
        "detail": [""] * 3})
    assert list(verdict_table(more)["kind"]) == ["nonfinite", "ok", "neutral"]


def test_stylesheet_is_inlined_verbatim(built):
    """The CSS is package data, inlined unescaped (an escaped quote would void a whole rule)."""
    from importlib import resources

    paths, _ = built
    css = resources.files("gradflow.report").joinpath("templates", "report.css").read_text(encoding="utf-8")
    text = paths["html"].read_text(encoding="utf-8")
    assert css.strip() in text
    assert "&#34;" not in text[: text.index("</style>")]


def test_decay_without_distance_shows_the_table_only(tmp_path):
    d = make_run(tmp_path / "runs" / "rnn", "rnn_tanh", tables=("decay",))
    sections, omitted = plan(load_runs([d]))
    (dist,) = [s for s in sections if s.id == "distance"]
    assert dist.draw is None and dist.table is not None and len(dist.table.rows) == 1
    assert any("distance.csv is absent" in n for n in dist.notes)
    out = build_report([d], html=tmp_path / "r.html")
    page = parse(out["html"])
    assert "distance" in page.ids and not page.imgs


@pytest.mark.parametrize("status, words", [("running", "still running"), ("failed", "failed: its tables may be")])
def test_unfinished_runs_are_flagged(tmp_path, status, words):
    d = make_run(tmp_path / "runs" / "rnn", "rnn_tanh", tables=("summary",))
    meta = json.loads((d / "run.json").read_text())
    meta["status"] = status
    (d / "run.json").write_text(json.dumps(meta))
    text = build_report([d], html=tmp_path / "r.html")["html"].read_text(encoding="utf-8")
    assert 'id="flagged"' in text and f"rnn_tanh: {status}" in text
    assert words in text


def test_token_classes_are_named_from_the_task(runset):
    from gradflow.report.sections import name_token_classes

    g = name_token_classes(runset.table("gates"), runset)
    assert set(g["token_class"]) == {"relevant", "irrelevant"}
    assert (runset.table("gates")["token_class"] == "0").any()  # the input is left alone
    sections, _ = plan(runset)
    (gates,) = [s for s in sections if s.id == "gates"]
    fig = gates.draw()
    legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert legend == ["relevant", "irrelevant"]


def test_diverged_run_without_a_decay_fit_reads_as_such(tmp_path):
    """A run whose gradients are all NaN has no fit: the table says so instead of printing "nan"."""
    import numpy as np
    import pandas as pd

    d = make_run(tmp_path / "runs" / "irnn", "irnn", tables=("distance", "decay"))
    dec = pd.read_csv(d / "decay.csv").assign(decay_rate=np.nan, ci_low=np.nan, ci_high=np.nan, horizon=np.nan)
    dec.to_csv(d / "decay.csv", index=False)
    dist = pd.read_csv(d / "distance.csv").assign(q05=np.nan, q25=np.nan, q50=np.nan, q75=np.nan, q95=np.nan,
                                                   frac_nonfinite=1.0, frac_zero=0.0)
    dist.to_csv(d / "distance.csv", index=False)
    sections, _ = plan(load_runs([d]))
    (s,) = [x for x in sections if x.id == "distance"]
    (row,) = s.table.rows
    assert "nan" not in " ".join(row).lower()
    assert row[2:6] == ("—", "—", "—", "— (no finite gradient to fit)")
    assert "irnn: NaN/Inf gradients at every distance (red crosses at the top)." in s.notes
