"""Analysis specs: one TOML file per study, validated into a :class:`StudySpec`.

A spec states a claim and the runs that test it::

    name = "checksum"                      # optional (default: the file's stem)
    title = "Checksum: who remembers the first token?"
    claim = "A tanh RNN cannot carry the checksum token over 50 steps; LSTM and GRU can."

    [task]                                 # gradflow.tasks.get_task(name, **options)
    name = "checksum"
    T = 50

    [model]                                # defaults for every run (gradflow.models.get_model)
    hidden = 32

    [train]                                # gradflow.training.TrainConfig
    steps = 300
    lr = 0.01
    record_every = 25                      # or record_per_decade = 4
    clip = { mode = "norm", threshold = 1.0 }

    [analysis]
    warmup = 5                             # Lyapunov warm-up steps
    horizon_fraction = 1e-3                # memory horizon: gradient below this fraction of ...
    horizon_reference = 1                  # ... its value at this distance (1: past the readout)
    max_rank = 32                          # singular values kept per Jacobian in spectra.csv
    batch_limit = 16                       # sequences used for spectra, products and Lyapunov
    memory = "2GB"                         # budget of the analysis (gradflow.analysis.AnalysisConfig
                                           #   lists every key)

    [[runs]]                               # one table per run: cell and any overrides
    label = "tanh RNN"
    cell = "rnn_tanh"
    [[runs]]
    cell = "lstm"
    task = { T = 100 }                     # per-run task / model / train overrides
    train = { clip = { mode = "none" } }

Unknown keys are errors naming the file, the table and the nearest valid key.
"""

from __future__ import annotations

import copy
import difflib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from . import kinds
from .errors import SpecError
from .spec_values import check_model, check_run, check_task, check_train

__all__ = ["StudySpec", "RunSpec", "load_spec", "parse_spec", "check_run_dirs", "run_dirname"]

# names gradflow itself writes into a study / sweep directory (a run directory must not take one)
RESERVED_NAMES = frozenset({"study.json", "sweep.csv", ".gradflow-sweep.lock"})

TOP_KEYS = {"name", "title", "claim", "task", "model", "train", "analysis", "runs"}
# generic model keys, and every cell kind's own options (an LSTM's forget_bias, an LRU's r_min ...)
MODEL_KEYS = {"hidden", "layers", "dropout", "init", "gain", *kinds.model_options()}
TRAIN_KEYS = {"steps", "batch", "optimizer", "lr", "momentum", "seed", "device", "clip", "eval_batch",
              "record_every", "record_per_decade", "record_steps", "flush_every"}
CLIP_KEYS = {"mode", "threshold"}
RUN_KEYS = {"label", "cell", "task", "model", "train"} | MODEL_KEYS


@dataclass(frozen=True)
class RunSpec:
    label: str
    cell: str
    task: Mapping[str, Any]
    model: Mapping[str, Any]
    train: Mapping[str, Any]

    @property
    def dirname(self) -> str:
        return run_dirname(self.label)

    def resolved(self) -> dict:
        return {"label": self.label, "cell": self.cell, "task": dict(self.task), "model": dict(self.model),
                "train": copy.deepcopy(dict(self.train))}


@dataclass(frozen=True)
class StudySpec:
    name: str
    title: str
    claim: str
    runs: tuple[RunSpec, ...]
    analysis: Any = None  # gradflow.analysis.AnalysisConfig (the defaults when None)
    source: str = "<spec>"

    def __post_init__(self):
        from .analysis.config import AnalysisConfig

        object.__setattr__(self, "analysis", AnalysisConfig.from_mapping(self.analysis, where=f"{self.source}: [analysis]"))

    def resolved(self) -> dict:
        return {"name": self.name, "title": self.title, "claim": self.claim,
                "analysis": self.analysis.to_dict(), "runs": [r.resolved() for r in self.runs]}


def _where(src: str, table: str) -> str:
    return f"{src}: [{table}]" if table else f"{src}:"


def _check_keys(d: Mapping, allowed: set, src: str, table: str) -> None:
    if not isinstance(d, Mapping):
        raise SpecError(f"{_where(src, table)} must be a table, got {type(d).__name__}")
    for k in d:
        if k not in allowed:
            m = difflib.get_close_matches(str(k), sorted(allowed), n=1, cutoff=0.5)
            hint = f"; did you mean {m[0]!r}?" if m else ""
            raise SpecError(f"{_where(src, table)} unknown key {k!r}{hint} (valid: {', '.join(sorted(allowed))})")


def _typed(v, types, src, table, key, what):
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise SpecError(f"{_where(src, table)} {key} must be {what}, got {v!r}")
    if not isinstance(v, types):
        raise SpecError(f"{_where(src, table)} {key} must be {what}, got {v!r}")
    return v


def run_dirname(label: str) -> str:
    """The directory name of a run inside its study directory: the label with every run of characters
    other than letters, digits, '.', '_' and '-' replaced by '_' (then stripped of '_'); "run" if empty."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run"


def check_run_dirs(labels, source: str = "<spec>") -> None:
    """One-line SpecError naming ``source`` and the label(s) unless every label maps to its own safe
    directory directly inside the study directory: no two labels may share a directory (compared
    case-insensitively: one directory on macOS and Windows), and none may map to ".", "..", a hidden
    name (gradflow keeps its temporary and trash entries there) or a file gradflow writes there."""
    seen: dict[str, str] = {}
    for label in labels:
        d = run_dirname(label)
        if d in (".", ".."):
            raise SpecError(f"{source}: run label {label!r} would make the run directory {d!r} (the study "
                            f"directory itself or its parent); give it a label with letters or digits")
        if d.startswith("."):
            raise SpecError(f"{source}: run label {label!r} would make the hidden run directory {d!r}; "
                            f"start the label with a letter or digit")
        if d in RESERVED_NAMES:
            raise SpecError(f"{source}: run label {label!r} would make the run directory {d!r}, a file gradflow "
                            f"writes in the study directory; choose another label")
        key = d.casefold()
        if key in seen:
            raise SpecError(f"{source}: runs {seen[key]!r} and {label!r} would share the directory {d!r}; "
                            f"give them labels that differ in letters or digits")
        seen[key] = label


def _merge(*ds: Mapping | None) -> dict:
    out: dict = {}
    for d in ds:
        if d:
            for k, v in d.items():
                if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
                    out[k] = _merge(out[k], v)
                else:
                    out[k] = copy.deepcopy(v)
    return out


def parse_spec(doc: Mapping[str, Any], source: str = "<spec>", default_name: str = "study", *,
               from_sweep: bool = False) -> StudySpec:
    """Validate a parsed TOML document (see the module docstring). Raises SpecError naming ``source``.
    ``from_sweep``: the runs were expanded from a sweep's axes (:func:`gradflow.sweep.expand_sweep`), so
    an error names the run by its label under ``[sweep]`` instead of a ``[[runs]]`` table the file lacks."""
    if not from_sweep:
        return _parse_spec(doc, source, default_name)
    try:
        return _parse_spec(doc, source, default_name)
    except SpecError as exc:
        msg = str(exc)
        m = re.match(re.escape(source) + r": \[runs\.(\d+)(?:\.([\w.]+))?\]", msg)
        if not m:
            raise
        label = doc["runs"][int(m[1])].get("label")
        head = f"{source}: [sweep] run {label!r}" + (f" [{m[2]}]" if m[2] else ":")
        raise SpecError(head + msg[m.end():]) from None


def _parse_spec(doc: Mapping[str, Any], source: str, default_name: str) -> StudySpec:
    from .models import list_cells
    from .tasks import list_tasks

    _check_keys(doc, TOP_KEYS, source, "")
    name = _typed(doc.get("name", default_name), str, source, "", "name", "a string")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise SpecError(f"{source}: name {name!r} may contain only letters, digits, '.', '_' and '-'")
    claim = doc.get("claim")
    if not isinstance(claim, str) or not claim.strip():
        raise SpecError(f"{source}: missing 'claim' (a sentence stating what this study tests)")
    title = _typed(doc.get("title", name), str, source, "", "title", "a string")
    task = doc.get("task")
    if task is None:
        raise SpecError(f"{source}: missing [task] table (with at least name = \"...\")")
    if not isinstance(task, Mapping):
        raise SpecError(f"{source}: [task] must be a table, got {type(task).__name__}")
    _check_keys(task, set(task) | {"name"}, source, "task")
    if "name" not in task:
        raise SpecError(f"{source}: [task] needs name = one of {', '.join(list_tasks())}")
    check_task(task, f"{source}: [task]")
    model = doc.get("model", {})
    _check_keys(model, MODEL_KEYS, source, "model")
    check_model(model, f"{source}: [model]")
    model = dict(model)
    train = doc.get("train", {})
    _check_keys(train, TRAIN_KEYS, source, "train")
    if "clip" in train:
        _check_keys(train["clip"], CLIP_KEYS, source, "train.clip")
    check_train(train, f"{source}: [train]")
    train = dict(train)
    from .analysis.config import AnalysisConfig  # every [analysis] value checked here, before any training

    analysis = AnalysisConfig.from_mapping(doc.get("analysis", {}), where=f"{source}: [analysis]")
    runs = doc.get("runs")
    if not isinstance(runs, list) or not runs:
        raise SpecError(f"{source}: needs at least one [[runs]] table with cell = one of {', '.join(list_cells())}")
    out = []
    labels = set()
    for i, r in enumerate(runs):
        where = f"runs.{i}"
        _check_keys(r, RUN_KEYS, source, where)
        cell = r.get("cell")
        if not isinstance(cell, str):
            raise SpecError(f"{source}: [{where}] needs cell = one of {', '.join(list_cells())}")
        if cell not in list_cells():
            m = difflib.get_close_matches(cell, list_cells(), n=1, cutoff=0.4)
            raise SpecError(f"{source}: [{where}] unknown cell {cell!r}" + (f"; did you mean {m[0]!r}?" if m else "")
                            + f" (known: {', '.join(list_cells())})")
        label = _typed(r.get("label", cell), str, source, where, "label", "a string")
        if label in labels:
            raise SpecError(f"{source}: [{where}] duplicate label {label!r}; give each run a distinct label")
        labels.add(label)
        for sub, allowed in (("model", MODEL_KEYS), ("train", TRAIN_KEYS)):
            if sub in r:
                _check_keys(r[sub], allowed, source, f"{where}.{sub}")
        check_model({k: v for k, v in r.items() if k in MODEL_KEYS}, f"{source}: [{where}]")
        if "model" in r:
            check_model(r["model"], f"{source}: [{where}.model]")
        if "train" in r:
            if "clip" in r["train"]:
                _check_keys(r["train"]["clip"], CLIP_KEYS, source, f"{where}.train.clip")
            check_train(r["train"], f"{source}: [{where}.train]")
        if "task" in r:
            if not isinstance(r["task"], Mapping):
                raise SpecError(f"{source}: [{where}] task must be a table, got {type(r['task']).__name__}")
            _check_keys(r["task"], set(r["task"]), source, f"{where}.task")
            check_task(r["task"], f"{source}: [{where}.task]", need_name=False)
        rmodel = _merge(model, {k: v for k, v in r.items() if k in MODEL_KEYS}, r.get("model"))
        rtrain = _merge(train, r.get("train"))
        if "clip" in rtrain:
            _check_keys(rtrain["clip"], CLIP_KEYS, source, f"{where}.train.clip")
            if rtrain["clip"].get("mode") == "none":
                rtrain["clip"] = {"mode": "none"}
        out.append(RunSpec(label=label, cell=cell, task=_merge(task, r.get("task")), model=rmodel, train=rtrain))
    check_run_dirs([r.label for r in out], source)
    spec = StudySpec(name=name, title=title, claim=claim.strip(), runs=tuple(out), analysis=analysis, source=source)
    seen_keys: set = set()
    for r in spec.runs:  # every run checked as a whole, building nothing large, before anything runs
        have = check_run(r, source, spec.analysis)
        seen_keys |= set(have or ())
    if spec.analysis.keys != "all":
        missing = [k for k in spec.analysis.keys if k not in seen_keys]
        if missing:
            raise SpecError(f"{source}: [analysis] keys {missing!r} name no state key of any run "
                            f"(they have: {', '.join(sorted(seen_keys))})")
    return spec


def read_toml(path: str | Path) -> dict:
    """Parse a spec file; a missing, non-UTF-8 or invalid file is a one-line SpecError naming it."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a UTF-8 text file") from None


def load_spec(path: str | Path) -> StudySpec:
    path = Path(path)
    return parse_spec(read_toml(path), str(path), default_name=path.stem)


def train_config(train: Mapping[str, Any]):
    from .training import Clip, Schedule, TrainConfig

    t = dict(train)
    sched = Schedule(every=t.pop("record_every", 0), per_decade=t.pop("record_per_decade", 0),
                     steps=tuple(t.pop("record_steps", ())))
    if not (sched.every or sched.per_decade or sched.steps):
        sched = Schedule(every=max(1, int(t.get("steps", 1000)) // 10))
    clip = t.pop("clip", None)
    clip = Clip(**clip) if clip else Clip()
    return TrainConfig(clip=clip, schedule=sched, **t)


def build_run(r: RunSpec, source: str = "<spec>"):
    """(task, model factory kwargs, TrainConfig) for a run; errors are prefixed with the file and run."""
    from .errors import GradflowError
    from .models import model_for_task
    from .tasks import get_task

    try:
        opts = dict(r.task)
        task = get_task(opts.pop("name"), **opts)
        cfg = train_config(r.train)
        model = model_for_task(task, r.cell, seed=cfg.seed, **dict(r.model))
    except TypeError as exc:
        raise SpecError(f"{source}: run {r.label!r}: {exc}") from None
    except GradflowError as exc:
        raise SpecError(f"{source}: run {r.label!r}: {exc}") from None
    return task, model, cfg
