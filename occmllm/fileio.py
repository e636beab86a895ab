"""Files on disk: atomic writes, JSONL with file:line errors, and dataset-root-safe paths."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from occmllm.errors import OccError, where


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds,
    so a failure never leaves a half-written file (or folder) behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def replace_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; when the block succeeds it replaces
    ``path`` (an existing folder is removed first), so ``path`` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def dumps(record: Any) -> str:
    """One JSON line, stable across runs (keys in insertion order, no NaN)."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False)


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> int:
    """Write records atomically; returns how many were written."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(dumps(rec) + "\n")
            count += 1
    return count


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=2, allow_nan=False)
        fh.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise OccError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise OccError(f"{where(path, exc.lineno)}: invalid JSON ({exc.msg}); fix or regenerate the file") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each non-blank line; a malformed line is an error
    naming the file and line (never skipped silently)."""
    path = Path(path)
    if not path.is_file():
        raise OccError(f"{path}: file not found")
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise OccError(f"{where(path, lineno)}: not valid JSON ({exc.msg} at column {exc.colno}); "
                               "each line must be one JSON object") from None
            if not isinstance(rec, dict):
                raise OccError(f"{where(path, lineno)}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


def resolve_in_root(root: str | os.PathLike, relative: str, context: str) -> Path:
    """``root/relative``, refusing absolute paths and paths that escape ``root`` (``..``, links)."""
    if not isinstance(relative, str) or not relative:
        raise OccError(f"{context}: image path must be a non-empty string, got {relative!r}")
    if os.path.isabs(relative):
        raise OccError(f"{context}: image path {relative!r} is absolute; paths must be relative to the dataset root")
    root = Path(root).resolve()
    full = (root / relative).resolve()
    if full != root and root not in full.parents:
        raise OccError(f"{context}: image path {relative!r} escapes the dataset root {root}")
    return full
