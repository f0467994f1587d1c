"""Corrupt files (issue 12 item 6 and the acceptance's corrupt-file fuzzer).

Every reader of a run directory — :func:`gradflow.load`, :meth:`gradflow.Trace.load`,
:func:`gradflow.report.load_runs` and ``gradflow report DIR`` — either reads a damaged file or fails
with ONE line (a GradflowError; on the CLI ``Error: ...`` and exit 1) that names the damaged file.
Never a traceback, never another exception type.

The fuzzer takes a real study written by ``gradflow run`` (one LSTM run with every table and its
trace) and damages each file it holds in turn, with a seeded generator: truncation, bit flips,
byte insertion, other text encodings, and wrong types (JSON values replaced by values of another
type, CSV cells by other tokens, npz arrays by arrays of another dtype/shape). The named cases of
the issue come first as explicit tests.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import gradflow
from gradflow.cli.main import cli
from gradflow.errors import GradflowError
from gradflow.report import load_runs
from gradflow.trace import Trace

SPEC = """
name = "tiny"
title = "Tiny study"
claim = "A tiny study for the corrupt-file fuzzer."

[task]
name = "checksum"
T = 6

[model]
hidden = 4

[train]
steps = 3
batch = 3
eval_batch = 3
lr = 0.01
record_every = 2

[analysis]
warmup = 1
max_rank = 3

[[runs]]
cell = "lstm"
train = { clip = { mode = "norm", threshold = 0.5 } }
"""


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A study directory as ``gradflow run`` writes it: study.json, one run with all tables, its trace."""
    from gradflow.spec import load_spec
    from gradflow.study import run_study

    root = tmp_path_factory.mktemp("corrupt")
    spec = root / "tiny.toml"
    spec.write_text(textwrap.dedent(SPEC))
    run_study(load_spec(spec), root / "study", progress=False, echo=lambda s: None)
    # a sweep directory also holds sweep.csv (as gradflow sweep writes it: run, dir, axes, results)
    pd.DataFrame([dict(run="lstm", dir="lstm", cell="lstm", gain=g, status="finished", eval_metric=0.4 + g / 10,
                       chance=0.25, solved=False, diverged_at=None, key="rnn/l0/d0/h", decay_rate=-0.1, ci_low=-0.2,
                       ci_high=0.0, horizon=5.0 * g, horizon_censored=False, error=None) for g in (0.5, 1.0)]
                 ).to_csv(root / "study" / "sweep.csv", index=False)
    return root / "study"


@pytest.fixture
def study(pristine, tmp_path) -> Path:
    d = tmp_path / "study"
    shutil.copytree(pristine, d)
    return d


def _run(study: Path) -> Path:
    return study / "lstm"


# ---------------------------------------------------------------------------------------- readers
def _readers_for(study: Path, f: Path, light: bool = False):
    """(name, callable) for every reader that reads ``f``. ``light``: for a table, only the per-file
    reader that :func:`load_runs` applies to it (the fuzzer checks every fifth damaged table through
    the whole of ``gradflow.load``/``load_runs`` and the rest through this, to stay fast)."""
    run = _run(study)
    if f.parent.name == "trace":
        def trace_api():
            tr = Trace.load(f.parent)
            tr.to_frame(), tr.nonfinite(), repr(tr)
        return [("Trace.load", trace_api), ("gradflow.load(trace)", lambda: gradflow.load(f.parent).to_frame())]
    if f.name in ("study.json", "sweep.csv"):
        return [("load_runs(study)", lambda: load_runs([study]))]
    if f.suffix == ".csv" and light:
        from gradflow.report.load import read_table

        return [("read_table", lambda: read_table(f, f.stem))]
    if f.suffix == ".csv":
        return [("gradflow.load(run)", lambda: gradflow.load(run))]
    return [("gradflow.load(run)", lambda: gradflow.load(run)), ("load_runs(study)", lambda: load_runs([study]))]


def _check_one_line(fn, f: Path, what: str):
    """``fn()`` succeeds or raises a one-line GradflowError naming ``f``; anything else fails."""
    try:
        fn()
    except GradflowError as exc:
        msg = str(exc)
        assert "\n" not in msg, f"{what}: {msg!r}"
        assert len(msg.replace(str(f.parent), "")) < 400, f"{what}: a readable line, not {len(msg)} characters"
        assert f.name in msg, f"{what}: error does not name {f.name}: {msg}"
        return msg
    except BaseException as exc:  # noqa: BLE001 -- the point of the test
        raise AssertionError(f"{what}: {type(exc).__name__} escaped: {exc!s:.300}") from exc
    return None


def _check_cli_report(study: Path, f: Path, out: Path, what: str):
    target = study if f.name in ("study.json", "sweep.csv") or f.parent.name == "trace" else _run(study)
    r = CliRunner().invoke(cli, ["report", str(target), "--html", str(out)])
    if r.exit_code == 0:
        return None
    assert r.exit_code == 1, f"{what}: exit {r.exit_code}: {r.output[-800:]}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), f"{what}: {r.output[-800:]}"
    assert f.name in lines[0], f"{what}: {lines[0]}"
    return lines[0]


# ------------------------------------------------------------------------- the named cases
def test_run_json_not_utf8(study):
    f = _run(study) / "run.json"
    f.write_bytes(f.read_bytes().replace(b'"lstm"', b'"ls\xff\xfetm"', 1))
    for name, fn in _readers_for(study, f):
        msg = _check_one_line(fn, f, name)
        assert msg and "UTF-8" in msg, msg


@pytest.mark.parametrize("fname", ["run.json", "trace/trace.json", "../study.json"])
def test_json_with_a_5000_digit_integer(study, fname):
    f = (_run(study) / fname).resolve()
    doc = json.loads(f.read_text())
    doc["schema_version"] = "@@"
    f.write_text(json.dumps(doc).replace('"@@"', "9" * 5000))

    for name, fn in _readers_for(study, f):
        assert _check_one_line(fn, f, name), name


def test_table_with_a_5000_digit_integer(study):
    t = _run(study) / "products.csv"
    df = pd.read_csv(t, dtype=str)
    df.loc[0, "distance"] = "9" * 5000
    df.to_csv(t, index=False)
    msg = _check_one_line(lambda: gradflow.load(_run(study)), t, "5000 digits in products.csv")
    assert msg and "row 2" in msg


@pytest.mark.parametrize("fname", ["run.json", "trace/trace.json", "../study.json"])
def test_deeply_nested_json(study, fname):
    f = (_run(study) / fname).resolve()
    f.write_text('{"kind": ' + "[" * 200_000 + "]" * 200_000 + "}")
    for name, fn in _readers_for(study, f):
        assert _check_one_line(fn, f, name), name


def test_negative_singular_values_in_spectra(study):
    f = _run(study) / "spectra.csv"
    df = pd.read_csv(f)
    df.loc[3, "sigma"] = -0.5
    df.to_csv(f, index=False)
    for name, fn in _readers_for(study, f):
        msg = _check_one_line(fn, f, name)
        assert msg and "'sigma'" in msg and "row 5" in msg and "-0.5" in msg, msg


def _edit_trace_json(study, edit):
    f = _run(study) / "trace" / "trace.json"
    doc = json.loads(f.read_text())
    edit(doc)
    f.write_text(json.dumps(doc))
    return f


TRACE_JSON_DAMAGE = {
    "KeyError: no keys": lambda d: d.pop("keys"),
    "KeyError: key without layer": lambda d: d["keys"][0].pop("layer"),
    "KeyError: unit without cell": lambda d: d["units"][0].pop("cell"),
    "TypeError: units is a number": lambda d: d.update(units=3),
    "TypeError: cell has an unknown field": lambda d: d["units"][0]["cell"].update(colour="red"),
    "TypeError: states is a number": lambda d: d["units"][0]["cell"].update(states=5),
    "IndexError: unit of two fields": lambda d: d["units"][0].update(unit=["rnn", 0]),
    "ValueError: layer is text": lambda d: d["keys"][0].update(layer="zero"),
    "keep is a list": lambda d: d.update(keep=["norms"]),
    "meta is a string": lambda d: d.update(meta="x"),
    "top level is a list": lambda d: d.clear() or d.update({"__list__": 1}),
    "more keys than arrays": lambda d: d["keys"].append(dict(d["keys"][0], state="z")),
}


@pytest.mark.parametrize("damage", list(TRACE_JSON_DAMAGE), ids=list(TRACE_JSON_DAMAGE))
def test_trace_load_on_damaged_trace_json(study, damage):
    f = _edit_trace_json(study, TRACE_JSON_DAMAGE[damage])
    if damage == "top level is a list":
        f.write_text("[1, 2]")
    for name, fn in _readers_for(study, f):
        assert _check_one_line(fn, f, name), name


def _npz_bytes(arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _arrays(f):
    with np.load(f) as z:
        return {k: z[k] for k in z.files}


NPZ_DAMAGE = {
    "truncated (BadZipFile)": lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]),
    "empty file": lambda f: f.write_bytes(b""),
    "plain garbage": lambda f: f.write_bytes(b"this is not an archive at all\n" * 10),
    "a CSV file": lambda f: f.write_bytes(b"a,b\n1,2\n"),
    "an npy file, not npz": lambda f: np.save(f.open("wb"), np.zeros(3)),
    "zip of a text file": lambda f: f.write_bytes(_zip({"hello.txt": b"hi"})),
    "missing mask": lambda f: f.write_bytes(_npz_bytes({k: v for k, v in _arrays(f).items() if not k.startswith("mask")})),
    "norm of wrong shape": lambda f: f.write_bytes(_npz_bytes({**_arrays(f), "norm_0": np.zeros((2, 2, 2))})),
    "norm as text": lambda f: f.write_bytes(_npz_bytes({**_arrays(f), "norm_0": np.array([["a"]])})),
    "mask as floats": lambda f: f.write_bytes(_npz_bytes({**_arrays(f), "mask_0": _arrays(f)["mask_0"] * 0.5})),
    "object array (pickled)": lambda f: f.write_bytes(_npz_bytes({**_arrays(f), "norm_0": np.array([{}], dtype=object)})),
}


def _zip(members) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k, v in members.items():
            z.writestr(k, v)
    return buf.getvalue()


@pytest.mark.parametrize("damage", list(NPZ_DAMAGE), ids=list(NPZ_DAMAGE))
def test_trace_load_on_damaged_arrays_npz(study, damage):
    f = _run(study) / "trace" / "arrays.npz"
    NPZ_DAMAGE[damage](f)
    for name, fn in _readers_for(study, f):
        msg = _check_one_line(fn, f, name)
        assert msg, name
        if damage != "object array (pickled)":
            assert "pickle" not in msg, msg


# ---------------------------------------------------------------------------------- the fuzzer
TOKENS = ["", "abc", "-1", "-1e300", "1e999", "-inf", "inf", "nan", "NaN", "True", "0x1f", "9" * 400, "1.5",
          "\"", "é", "\x00"]
JSON_VALUES = [None, True, False, -1, 0, 2.5, 10 ** 4000, float("inf"), float("nan"), "", "x", "finished", [],
               [1, "a"], {}, {"a": {"b": []}}, [[[[]]]]]


def _json_paths(obj, path=()):
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_paths(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _json_paths(v, path + (i,))


def _set(obj, path, value):
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


def _wrong_json_type(data: bytes, rng: random.Random) -> bytes:
    doc = json.loads(data)
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in _json_paths(doc) if p]
        if not paths:
            break
        p = rng.choice(paths)
        if rng.random() < 0.2:
            parent = doc
            for q in p[:-1]:
                parent = parent[q]
            parent.pop(p[-1])
        else:
            _set(doc, p, rng.choice(JSON_VALUES))
    return json.dumps(doc).encode()


def _wrong_csv_cells(data: bytes, rng: random.Random) -> bytes:
    rows = data.decode("utf-8").split("\n")
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(rows) - 1) if len(rows) > 1 else 0
        cells = rows[i].split(",")
        j = rng.randrange(len(cells))
        cells[j] = rng.choice(TOKENS)
        rows[i] = ",".join(cells)
    if rng.random() < 0.15:  # a column dropped or duplicated
        cells = [r.split(",") for r in rows]
        j = rng.randrange(len(cells[0]))
        rows = [",".join(c[:j] + c[j + 1:] if rng.random() < 0.5 else c + c[j:j + 1]) for c in cells]
    return "\n".join(rows).encode("utf-8", "surrogatepass")


def _wrong_npz_arrays(data: bytes, rng: random.Random) -> bytes:
    with np.load(io.BytesIO(data)) as z:
        arrays = {k: z[k] for k in z.files}
    k = rng.choice(sorted(arrays))
    choice = rng.randrange(8)
    a = arrays[k]
    if choice == 0:
        arrays.pop(k)
    elif choice == 1:
        arrays[k] = a.astype(str)
    elif choice == 2:
        arrays[k] = a.reshape(-1)
    elif choice == 3:
        arrays[k] = a[..., :1] if a.ndim else a
    elif choice == 4:
        arrays[k] = np.asarray(a, dtype=np.float64)[None]
    elif choice == 5:
        arrays[k] = a.astype(np.complex64) if a.dtype != bool else a.astype(np.int8)
    elif choice == 6:
        arrays[k] = np.zeros((0,) + a.shape[1:], a.dtype)
    else:
        arrays[k] = np.full(a.shape, np.nan) if a.dtype != bool else ~a
    return _npz_bytes(arrays)


def _mutants(f: Path, data: bytes, rng: random.Random, n: int):
    """n damaged versions of ``data``: (description, bytes)."""
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            cut = rng.randrange(len(data)) if data else 0
            out.append((f"truncated at {cut}", data[:cut]))
        elif kind == 1:
            b = bytearray(data)
            for _ in range(rng.choice([1, 1, 2, 8])):
                pos = rng.randrange(len(b))
                b[pos] ^= 1 << rng.randrange(8)
            out.append(("bit flips", bytes(b)))
        elif kind == 2:
            b = bytearray(data)
            pos = rng.randrange(len(b) + 1)
            b[pos:pos] = rng.choice([b"\xff\xfe", b"\x00", b"\xc3(", b"\xef\xbb\xbf", b"\n\n,,\n", b'"'])
            out.append(("bytes inserted", bytes(b)))
        elif kind == 3:
            if f.suffix == ".npz":
                out.append(("wrong arrays", _wrong_npz_arrays(data, rng)))
            else:
                enc = rng.choice(["utf-16", "utf-32", "latin-1", "cp500"])
                text = data.decode("utf-8") + ("é" if enc == "latin-1" else "")
                out.append((f"re-encoded {enc}", text.encode(enc, "replace")))
        else:
            if f.suffix == ".json":
                out.append(("wrong types", _wrong_json_type(data, rng)))
            elif f.suffix == ".csv":
                out.append(("wrong cells", _wrong_csv_cells(data, rng)))
            else:
                out.append(("wrong arrays", _wrong_npz_arrays(data, rng)))
    return out


MUTANTS_PER_FILE = 30
CLI_CASES = 4  # damaged files that load are also fed to `gradflow report DIR` (it draws: slow)


def test_corrupt_file_fuzzer(study, tmp_path):
    rng = random.Random(12)
    files = sorted(p for p in study.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"run.json", "study.json", "sweep.csv", "trace.json", "arrays.npz", "norms.csv",
                                       "spectra.csv", "metrics.csv", "gradnorms.csv", "summary.csv"}
    tried, refused, cli_done, failures = 0, 0, 0, []
    cli_candidates = []
    for f in files:
        original = f.read_bytes()
        for i, (what, data) in enumerate(_mutants(f, original, rng, MUTANTS_PER_FILE)):
            f.write_bytes(data)
            label = f"{f.relative_to(study)} ({what})"
            ok = True
            for name, fn in _readers_for(study, f, light=i % 5 != 0):
                tried += 1
                try:
                    refused += _check_one_line(fn, f, f"{name} on {label}") is not None
                except AssertionError as exc:
                    failures.append(str(exc))
                    ok = False
            if ok and f.parent.name != "trace" and rng.random() < 0.2:
                cli_candidates.append((f, data, label))
        f.write_bytes(original)
    for f, data, label in cli_candidates[:CLI_CASES]:
        original = f.read_bytes()
        f.write_bytes(data)
        try:
            _check_cli_report(study, f, tmp_path / f"r{cli_done}.html", f"gradflow report on {label}")
        except AssertionError as exc:
            failures.append(str(exc))
        cli_done += 1
        f.write_bytes(original)
    print(f"corrupt-file fuzzer: {len(files)} files, {tried} reads of damaged files, {refused} refused in one "
          f"line, {cli_done} through gradflow report")
    assert not failures, f"{len(failures)} of {tried} reads failed:\n" + "\n".join(failures[:25])
    assert refused > tried // 3  # most damage is noticed, not silently read
    assert cli_done >= 2


def test_gradflow_report_names_the_damaged_file(study, tmp_path):
    for rel, data in [("lstm/run.json", b"\xff\xfe{}"), ("lstm/spectra.csv", b"run,key,t,b,rank,sigma\nlstm,x,0,0,0,-1\n"),
                      ("study.json", b"[" * 100_000), ("sweep.csv", b"run,key,eval_metric,horizon\nlstm,k,high,3\n")]:
        f = study / rel
        original = f.read_bytes()
        f.write_bytes(data)
        line = _check_cli_report(study, f, tmp_path / "r.html", rel)
        assert line and f.name in line
        f.write_bytes(original)


@pytest.mark.parametrize("data", [b"a,b\n\xff\xfe,1\n", b"", b'a,b\n"unterminated,1\n'], ids=["not utf-8", "empty", "quote"])
def test_plain_csv_reader_is_one_line(tmp_path, data):
    from gradflow import _io

    f = tmp_path / "metrics.csv"
    f.write_bytes(data)
    with pytest.raises(GradflowError) as e:
        _io.read_csv(f)
    assert "metrics.csv" in str(e.value) and "\n" not in str(e.value)
