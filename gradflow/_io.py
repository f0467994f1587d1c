"""Atomic file writes and pickle-free reads for run directories.

Files are data, never code: JSON, CSV and ``.npz`` (``allow_pickle=False``) only. Every write goes to
a temporary file in the same directory and is renamed into place, so a killed process never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import io
import json
import os
import secrets
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


def _stage(path: Path, write) -> str:
    """Write ``path``'s new content into a temporary file beside it (fsynced, final mode) and return
    the temporary file's name; ``path`` itself is untouched. OSError becomes a GradflowError naming
    ``path``; on any error the temporary file is removed."""
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
    except OSError as exc:
        _unlink_quiet(tmp)
        raise GradflowError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        _unlink_quiet(tmp)
        raise
    return tmp


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    tmp = _stage(path, write)
    try:
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quiet(tmp)
        raise GradflowError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        _unlink_quiet(tmp)
        raise


def write_files(files: "list[tuple[Path, bytes]]") -> None:
    """Replace several files together (a report's HTML and PDF): every new file is first written
    completely beside its target, and only then are they renamed into place. If staging fails no
    target changes; if a rename fails, the targets renamed before it get their previous content back
    (kept meanwhile as a hard link, or a copy where links are not possible; a target that did not
    exist is removed again). Raises a one-line GradflowError naming the file that failed."""
    staged: list[tuple[Path, str]] = []
    try:
        for path, data in files:
            staged.append((Path(path), _stage(path, lambda fh, d=data: fh.write(d))))
    except BaseException:
        for _, tmp in staged:
            _unlink_quiet(tmp)
        raise
    done: list[tuple[Path, str | None]] = []
    path = staged[0][0] if staged else Path()
    try:
        for path, tmp in staged:
            bak = _backup(path)
            try:
                os.replace(tmp, path)
            except BaseException:
                if bak:
                    _unlink_quiet(bak)
                raise
            done.append((path, bak))
    except BaseException as exc:
        for p, bak in reversed(done):
            try:
                if bak:
                    os.replace(bak, p)
                else:
                    os.unlink(p)
            except OSError:
                pass
        for _, tmp in staged:
            _unlink_quiet(tmp)
        if isinstance(exc, OSError):
            raise GradflowError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
    for _, bak in done:
        if bak:
            _unlink_quiet(bak)


def _backup(path: Path) -> str | None:
    """A second name for ``path``'s current content (hard link, else a copy); None if it has none."""
    if not path.is_file():
        return None
    bak = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.bak")
    try:
        os.link(path, bak)
    except OSError:
        import shutil

        try:
            shutil.copy2(path, bak)
        except OSError as exc:
            _unlink_quiet(bak)
            raise GradflowError(f"cannot keep the previous {path} while replacing it: {exc.strerror or exc}") from exc
    return bak


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


MAX_JSON_DEPTH = 64  # gradflow's own files nest a few levels; deeper is damage (or an attack on the parser)
MAX_INT_DIGITS = 20  # every integer gradflow writes fits in 64 bits


class _TooManyDigits(ValueError):
    pass


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _TooManyDigits(f"an integer of {len(text.lstrip('-'))} digits (gradflow's integers have at most "
                             f"{MAX_INT_DIGITS})")
    return int(text)


def _depth(obj: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_JSON_DEPTH:
                return d
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise GradflowError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise GradflowError(f"{path}: is a directory, not a file") from None
    except OSError as exc:
        raise GradflowError(f"{path}: cannot read ({exc.strerror or exc})") from None


def read_json(path: Path) -> Any:
    """Parse a JSON file; every way it can be damaged is one GradflowError naming ``path``: missing,
    unreadable, not UTF-8, not JSON, an integer of more than 20 digits, nested deeper than 64 levels."""
    path = Path(path)
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GradflowError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                            "gradflow's JSON files are UTF-8") from None
    try:
        obj = json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise GradflowError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except _TooManyDigits as exc:
        raise GradflowError(f"{path}: not a gradflow file: it holds {exc}") from None
    except RecursionError:
        raise GradflowError(f"{path}: not a gradflow file: JSON nested too deeply to read") from None
    except ValueError as exc:  # e.g. a number the float parser refuses
        raise GradflowError(f"{path}: not valid JSON ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if _depth(obj) > MAX_JSON_DEPTH:
        raise GradflowError(f"{path}: not a gradflow file: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return obj


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Uncompressed (zip members stored, each with its CRC-32): recorded float32 states and gradients
    compress by only ~10% with zlib, which cost 12 s of a 100 s inspect of a 2-layer LSTM(512)."""
    def w(fh):
        np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()})

    _atomic_write(path, w)


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members, an empty zip


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, read with ``allow_pickle=False``. A missing, truncated or
    damaged file, a file that is no zip archive at all, a member that is not an array and a member
    holding pickled Python objects each give one GradflowError naming ``path`` (and the member)."""
    import zipfile
    import zlib

    path = Path(path)
    raw = _read_bytes(path)
    if not raw.startswith(_ZIP_MAGIC):
        what = "an empty file" if not raw else ("a single .npy array" if raw.startswith(b"\x93NUMPY") else
                                                 "not a zip archive")
        raise GradflowError(f"{path}: not an .npz archive ({what})")
    member = None
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            out = {}
            for member in z.files:
                out[member] = z[member]
            return out
    except ValueError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        where = f"member {short_repr(member)}: " if member is not None else ""
        if "pickle" in msg or "Object arrays" in msg:
            raise GradflowError(f"{path}: {where}holds Python objects (pickled data), which gradflow never "
                                "loads") from None
        raise GradflowError(f"{path}: damaged .npz archive ({where}{msg})") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError, IndexError, TypeError,
            NotImplementedError, MemoryError, OverflowError, RuntimeError) as exc:
        where = f"member {short_repr(member)}: " if member is not None else ""
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GradflowError(f"{path}: damaged .npz archive ({where}{msg})") from None


def write_csv(path: Path, frame) -> None:
    """Write a pandas DataFrame as CSV (float64 round-trips exactly via repr formatting)."""
    write_text(path, frame.to_csv(index=False, float_format="%.17g"))


def exact_float_options() -> dict:
    """Keyword arguments of ``pandas.read_csv`` that parse every float64 exactly: pandas 2's default
    parser may be 1 ulp off, so it gets ``float_precision="round_trip"``; from pandas 3 the default is
    exact and that argument is deprecated (a warning on every read, an error in pandas 4)."""
    import pandas as pd

    major = int(pd.__version__.split(".", 1)[0])
    return {"float_precision": "round_trip"} if major < 3 else {}


def read_csv(path: Path):
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise GradflowError(f"{path}: file not found")
    try:
        return pd.read_csv(path, **exact_float_options())
    except pd.errors.EmptyDataError:
        raise GradflowError(f"{path}: empty file (expected a CSV header)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise GradflowError(f"{path}: malformed CSV ({msg})") from None


def short_repr(v: Any, limit: int = 40) -> str:
    """``repr(v)`` cut to ``limit`` characters, for error messages about damaged files."""
    text = repr(v)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_schema(path: Path, meta: Mapping[str, Any], kind: str) -> None:
    if not isinstance(meta, dict):
        raise GradflowError(f"{path}: not a gradflow {kind} file (expected a JSON object, found a "
                            f"{type(meta).__name__})")
    if meta.get("kind") != kind:
        raise GradflowError(f"{path}: not a gradflow {kind} file (kind={short_repr(meta.get('kind'))})")
    v = meta.get("schema_version")
    if v != SCHEMA_VERSION:
        raise GradflowError(
            f"{path}: schema_version {short_repr(v)} is not supported (this gradflow reads {SCHEMA_VERSION})"
        )
