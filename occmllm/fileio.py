"""Files on disk: atomic writes, JSONL and JSON with file:line errors, images decoded safely, and
dataset-root-safe paths."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

from occmllm.errors import OccError, where


def _umask() -> int:
    """The process's umask, read where Linux shows it: setting it to read it back would leave, for
    an instant, a mask of 0 on files another thread creates."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _created_mode(path: Path) -> None:
    """Give a temporary file or folder the mode a plain create would have: mkstemp and mkdtemp
    make them private (0600 / 0700), which would leave outputs unreadable to a lab's other users."""
    path.chmod((0o777 if path.is_dir() else 0o666) & ~_umask())


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
        _created_mode(tmp)
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
        _created_mode(tmp)
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


def append_jsonl(fh, records: Iterable[Any]) -> None:
    """Append records to an open JSONL file in one write, flushed and synced: a kill leaves at
    most one unfinished last line, which ``read_appended`` drops."""
    fh.write("".join(dumps(rec) + "\n" for rec in records))
    fh.flush()
    os.fsync(fh.fileno())


def read_appended(path: str | os.PathLike, repair: bool, remedy: str = "remove it to start over") -> list[dict]:
    """Complete lines of a JSONL file that a run appends to as it goes. A last line without its
    newline is what a kill mid-write leaves: it is dropped (and, with ``repair``, cut from the file
    so appending goes on from a clean end). A malformed complete line is an error: the file was
    edited or mixed; ``remedy`` says what to do."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        print(f"{path}: dropping an unfinished last line (interrupted run); it is computed again", file=sys.stderr)
        if repair:
            with open(path, "r+b") as fh:
                fh.truncate(end)
    out = []
    for lineno, line in enumerate(data[:end].decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            raise OccError(f"{where(path, lineno)}: not a JSON object; the file is damaged: {remedy}")
        out.append(rec)
    return out


BOM = b"\xef\xbb\xbf"


def _decode(raw: bytes, path: Path, lineno: int | None) -> str:
    """UTF-8 text of one line (or file); a one-line error for anything else (a Latin-1 or UTF-16
    export, a binary file given by mistake)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = lineno if lineno is not None else raw.count(b"\n", 0, exc.start) + 1
        raise OccError(f"{where(path, line)}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as "
                       "UTF-8") from None


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file, with or without a byte-order mark; any line ending."""
    path = Path(path)
    if not path.is_file():
        raise OccError(f"{path}: file not found")
    raw = path.read_bytes()
    return _decode(raw[len(BOM):] if raw.startswith(BOM) else raw, path, None)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise OccError(f"{where(path, exc.lineno)}: invalid JSON ({exc.msg}); fix or regenerate the file") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each non-blank line; a malformed line is an error
    naming the file and line (never skipped silently). UTF-8 with or without a byte-order mark,
    LF or CRLF line ends."""
    path = Path(path)
    if not path.is_file():
        raise OccError(f"{path}: file not found")
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            line = _decode(raw, path, lineno)
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
    real_root = _real_folder(os.fspath(root))
    full = _realpath(os.path.join(real_root, relative))
    if full != real_root and not full.startswith(real_root.rstrip(os.sep) + os.sep):
        raise OccError(f"{context}: image path {relative!r} escapes the dataset root {real_root}")
    return Path(full)


@functools.lru_cache(maxsize=1 << 16)
def _real_folder(path: str) -> str:
    """``os.path.realpath`` of a folder, remembered: a dataset's files share a few thousand
    folders, and resolving every component of every path again costs a system call each."""
    return os.path.realpath(path)


def _realpath(path: str) -> str:
    """``os.path.realpath(path)``, the folder part from ``_real_folder``; the file itself is
    looked at afresh (a link is followed)."""
    folder, name = os.path.split(path)
    if name in ("", ".", "..") or os.path.islink(path):
        return os.path.realpath(path)
    return os.path.join(_real_folder(folder), name)


# --- images -------------------------------------------------------------------------------------

# The largest image any reader decodes: 8192 x 8192 pixels (192 MiB as 8-bit RGB). A header can
# claim any size in a few bytes (a decompression bomb); the check reads the header only.
MAX_IMAGE_PIXELS = 8192 * 8192


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of the image ``read_image`` returns (EXIF orientation applied), from the
    file's header alone: no pixels are decoded. Reading errors are ``read_image``'s to report."""
    from PIL import Image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            width, height = im.size
            turned = im.getexif().get(0x0112) in (5, 6, 7, 8)  # orientations that swap the axes
    return (height, width) if turned else (width, height)


def read_image(path: str | os.PathLike, label: str | None = None, mode: str | None = "RGB"):
    """Decode one image file into ``mode`` (a PIL image; None keeps the file's own values, as depth
    maps and label images need), whatever the file's own mode: grayscale,
    palette (with or without transparency), RGBA, CMYK, 16-bit and float images, any aspect ratio,
    and camera JPEGs turned upright by their EXIF orientation. A file that is missing, not an
    image, truncated or larger than ``MAX_IMAGE_PIXELS`` is a one-line error that starts with
    ``label`` (how the caller names the file, e.g. ``"test.jsonl:3: image 'a.png'"``; default: the path)."""
    import numpy as np
    from PIL import Image, ImageOps

    path = Path(path)
    label = label or str(path)
    if not path.is_file():
        raise OccError(f"{label}: file not found")
    try:
        with warnings.catch_warnings():  # PIL warns of a large header; the check below decides, in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            width, height = im.size
            if width * height > MAX_IMAGE_PIXELS:
                raise OccError(f"{label}: {width} x {height} pixels is over the {MAX_IMAGE_PIXELS:,}-pixel limit "
                               "(8192 x 8192); downscale it")
            im.load()
            im = ImageOps.exif_transpose(im)
            if mode is None:
                return im
            if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                # 16-bit, 32-bit integer and float images: scaled to 8 bits, not clipped at 255
                values = np.asarray(im, dtype=np.float64)
                top = 65535.0 if im.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
                if im.mode == "F" and values.max(initial=0) <= 1.0:
                    top = 1.0
                im = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
            elif im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")  # transparent palette entries go through alpha, as PIL asks
            return im.convert(mode)
    except OccError:
        raise
    except Image.DecompressionBombError:  # PIL's own, stricter check of the header
        raise OccError(f"{label}: over the {MAX_IMAGE_PIXELS:,}-pixel limit (8192 x 8192); downscale it") from None
    except (OSError, SyntaxError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OccError(f"{label} cannot be read ({first}): the file is not an image, or truncated or corrupt; "
                       "re-export or remove it") from None
