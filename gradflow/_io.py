"""Atomic file writes and pickle-free reads for run directories.

Files are data, never code: JSON, CSV and ``.npz`` (``allow_pickle=False``) only. Every write goes to
a temporary file in the same directory and is renamed into place, so a killed process never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import GradflowError

SCHEMA_VERSION = 1


def _file_mode() -> int:
    """0o666 minus the process umask: what open() would give a new file (mkstemp uses 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _file_mode()


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise GradflowError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _MODE)
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quiet(tmp)
        raise GradflowError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        _unlink_quiet(tmp)
        raise


def _unlink_quiet(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda fh: fh.write(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GradflowError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise GradflowError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    def w(fh):
        np.savez_compressed(fh, **{k: np.asarray(v) for k, v in arrays.items()})

    _atomic_write(path, w)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise GradflowError(f"{path}: file not found") from None
    except ValueError as exc:
        raise GradflowError(f"{path}: not a plain-array .npz file ({exc})") from None


def write_csv(path: Path, frame) -> None:
    """Write a pandas DataFrame as CSV (float64 round-trips exactly via repr formatting)."""
    write_text(path, frame.to_csv(index=False, float_format="%.17g"))


def read_csv(path: Path):
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise GradflowError(f"{path}: file not found")
    return pd.read_csv(path, float_precision="round_trip")


def check_schema(path: Path, meta: Mapping[str, Any], kind: str) -> None:
    if meta.get("kind") != kind:
        raise GradflowError(f"{path}: not a gradflow {kind} file (kind={meta.get('kind')!r})")
    v = meta.get("schema_version")
    if v != SCHEMA_VERSION:
        raise GradflowError(
            f"{path}: schema_version {v!r} is not supported (this gradflow reads {SCHEMA_VERSION})"
        )
