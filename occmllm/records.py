"""Conversation and preference records: the files every stage reads and writes.

Conversation record (InternVL fine-tuning JSONL)::

    {"id": str, "image": path | [paths], "conversations": [{"from": "human"|"gpt", "value": str}, ...],
     "render": path,  # optional: the dual visual path blends the (one) image's tokens with this render's
     "meta": {...}}   # meta is optional, never shown to the model

Preference record::

    {"id": str, "image": path | [paths], "question": str, "chosen": str, "rejected": str,
     "history": [{"from": "human"|"gpt", "value": str}, ...],  # optional: the turns before the question
     "meta": {...}}

Image paths are relative to a dataset root. Each ``<image>`` placeholder in the human turns takes
one image, in order. The reference implementation's preference file has no ``id`` and no
placeholder in its question; reading fills ``id`` from the image name and keeps every original
field as it was.

Every JSONL a generator writes has its InternVL meta JSON beside it (``<stem>.meta.json``), which
names the image root; a view's render lives at ``<renders>/<id>.png`` under it (``render_path``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from occmllm import fileio
from occmllm.errors import OccError, where
from occmllm.questions import IMAGE_TOKEN

ROLES = ("human", "gpt")


# where reconstruction.reconstruct writes its renders under a dataset root by default, and where stage
# 4's RL phase and benchmarks/probe_renders.py look for them
RECON_RENDERS = "renders/recon"


def render_path(renders: str, record_id) -> str:
    """Where the reconstruction (or oracle) render of a view or record lives: ``<renders>/<id>.png``,
    relative to the dataset root when ``renders`` is."""
    return f"{str(renders).rstrip('/')}/{record_id}.png"


def images_of(record: dict) -> list[str]:
    """The record's image paths as a list (``image`` may be one path or a list)."""
    image = record.get("image")
    if image is None:
        return []
    return list(image) if isinstance(image, list) else [image]


def render_of(record: dict) -> str | None:
    """The render a record's image is blended with (``render``, relative to the dataset root; the
    dual visual path, ``occmllm.dual``), or None."""
    return record.get("render")


def files_of(record: dict) -> list[str]:
    """Every file a record shows the model: its images, then its render when it has one."""
    render = render_of(record)
    return images_of(record) + ([render] if render else [])


def placeholders(turns) -> int:
    """The ``<image>`` placeholders in the texts of ``turns``."""
    return sum(turn["value"].count(IMAGE_TOKEN) for turn in turns)


def count_placeholders(conversation: list[dict]) -> int:
    """The placeholders of a conversation's human turns: each takes one image."""
    return placeholders(turn for turn in conversation if turn["from"] == "human")


def validate_conversation(record: dict, context: str, answers_optional: bool = False) -> dict:
    """Check one conversation record's structure; returns it unchanged. ``context`` is
    ``file:line`` for the message. Training records alternate human and gpt turns; with
    ``answers_optional`` (test records) a question may also stand without its answer, so a record
    of questions alone (human turns only) is valid: inference answers it and scores nothing."""
    if "id" not in record or not isinstance(record["id"], (str, int)):
        raise OccError(f"{context}: record has no string 'id'")
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise OccError(f"{context}: record {record['id']!r} has no 'conversations' list")
    for k, turn in enumerate(conv):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise OccError(f"{context}: turn {k} of record {record['id']!r} must be "
                           '{"from": "human"|"gpt", "value": str}')
        if "train" in turn and (turn["from"] != "gpt" or not isinstance(turn["train"], bool)):
            raise OccError(f"{context}: turn {k} of record {record['id']!r} has 'train': {turn['train']!r}; only a gpt "
                           "turn may carry it, as true or false (false: the answer is context, not a target)")
        if k == 0 and turn["from"] != "human":
            raise OccError(f"{context}: record {record['id']!r} starts with a gpt turn; a conversation starts with "
                           "the human's question")
        previous = conv[k - 1]["from"] if k else None
        if turn["from"] == "gpt" and previous == "gpt":
            raise OccError(f"{context}: record {record['id']!r} turn {k} is a second gpt turn in a row; each answer "
                           "follows its question (turns alternate human, gpt, starting with human)")
        if turn["from"] == "human" and previous == "human" and not answers_optional:
            raise OccError(f"{context}: record {record['id']!r} turn {k} is from 'human' after a human turn; training "
                           "records alternate human, gpt (a file of questions alone is for inference.py)")
    if not answers_optional and conv[-1]["from"] != "gpt":
        raise OccError(f"{context}: record {record['id']!r} ends with a question without its answer; training "
                       "records alternate human, gpt and answer every question (questions alone are for inference.py)")
    images = images_of(record)
    if not images:
        raise OccError(f"{context}: record {record['id']!r} has no 'image'; every record needs at least one")
    if not all(isinstance(p, str) and p for p in images):
        raise OccError(f"{context}: record {record['id']!r} 'image' must be a path or a list of paths")
    n = count_placeholders(conv)
    if n == 0:
        raise OccError(f"{context}: record {record['id']!r} has no {IMAGE_TOKEN} placeholder in its human "
                       f"turns; add one where the image goes")
    if n != len(images):
        raise OccError(f"{context}: record {record['id']!r} has {n} {IMAGE_TOKEN} placeholder(s) for "
                       f"{len(images)} image(s); each placeholder takes exactly one image")
    if "render" in record:
        if not isinstance(record["render"], str) or not record["render"]:
            raise OccError(f"{context}: record {record['id']!r} 'render' must be a path")
        if len(images) != 1:
            raise OccError(f"{context}: record {record['id']!r} has a 'render' and {len(images)} images; a render is "
                           "blended with the record's one image")
    if "meta" in record and not isinstance(record["meta"], dict):
        raise OccError(f"{context}: record {record['id']!r} 'meta' must be an object")
    return record


def validate_preference(record: dict, context: str) -> dict:
    """Check one preference record; fills ``id`` from the first image's file name when absent
    (the reference file has none). Returns the record."""
    for key in ("image", "question", "chosen", "rejected"):
        if key not in record:
            raise OccError(f"{context}: preference record has no {key!r}")
    for key in ("question", "chosen", "rejected"):
        if not isinstance(record[key], str):
            raise OccError(f"{context}: preference {key!r} must be a string")
    images = images_of(record)
    if not images or not all(isinstance(p, str) and p for p in images):
        raise OccError(f"{context}: preference 'image' must be a path or a list of paths")
    history = record.get("history", [])
    if not isinstance(history, list) or len(history) % 2 or any(
            not isinstance(turn, dict) or turn.get("from") != ROLES[k % 2] or not isinstance(turn.get("value"), str)
            for k, turn in enumerate(history)):
        raise OccError(f"{context}: preference 'history' must be a list of answered turns, "
                       '{"from": "human", "value": str} then {"from": "gpt", "value": str}, before the question')
    if placeholders(history) + record["question"].count(IMAGE_TOKEN) > len(images):
        raise OccError(f"{context}: preference question and history have more {IMAGE_TOKEN} placeholders than images")
    if record["chosen"].strip() == record["rejected"].strip():
        raise OccError(f"{context}: preference chosen and rejected are the same ({record['chosen']!r}); "
                       "a pair must differ")
    if "id" not in record:
        record = {"id": Path(images[0]).stem, **record}
    return record


def check_images(record: dict, root: str | os.PathLike, context: str, decoded: set | None = None) -> list[Path]:
    """Resolve the record's images under ``root`` and check each exists and decodes fully
    (a truncated file fails here, not mid-training). A caller checking many records passes one
    ``decoded`` set: a file many records share (each question of a view) is decoded once."""
    paths, decoded = [], set() if decoded is None else decoded
    for rel in images_of(record):
        path = fileio.resolve_in_root(root, rel, context)
        if path not in decoded:
            if not path.is_file():
                raise OccError(f"{context}: image {rel!r} not found under {root}")
            fileio.read_image(path, f"{context}: image {rel!r}")
            decoded.add(path)
        paths.append(path)
    return paths


def read_records(path: str | os.PathLike, kind: str = "conversation", root: str | os.PathLike | None = None,
                 verify_images: bool = False) -> list[dict]:
    """Read and validate a JSONL file of ``kind``: "conversation" (training: every question
    answered), "test" (conversations whose answers may be missing) or "preference".

    With ``root``, image paths are checked to stay inside it; with ``verify_images`` they must
    also exist and decode. Errors name the file and line; nothing is skipped.
    """
    validate = {"conversation": validate_conversation, "preference": validate_preference,
                "test": lambda rec, ctx: validate_conversation(rec, ctx, answers_optional=True)}[kind]
    records, seen, decoded = [], {}, set()
    for lineno, rec in fileio.iter_jsonl(path):
        ctx = where(path, lineno)
        rec = validate(rec, ctx)
        if root is not None:
            if verify_images:
                check_images(rec, root, ctx, decoded)
            else:
                for rel in files_of(rec):
                    fileio.resolve_in_root(root, rel, ctx)
        if kind != "preference":
            if rec["id"] in seen:
                raise OccError(f"{ctx}: duplicate id {rec['id']!r} (first on line {seen[rec['id']]})")
            seen[rec["id"]] = lineno
        records.append(rec)
    if not records:
        raise OccError(f"{path}: no records; the file is empty")
    return records


# --- InternVL meta JSON ----------------------------------------------------------------------

def write_meta(path: str | os.PathLike, name: str, root: str | os.PathLike, annotation: str | os.PathLike,
               length: int, repeat_time: float = 1.0, dataset: str | os.PathLike | None = None) -> None:
    """InternVL's dataset meta file: ``{name: {root, annotation, data_augment, repeat_time, length}}``.
    Paths are written relative to the meta file's folder so the set can be moved as a whole.
    ``dataset``: the dataset folder (its manifest), recorded as ``dataset`` where it is not the root,
    as for converted real data whose images stay in the source root; InternVL ignores the key."""
    base = Path(path).parent.resolve()
    entry = {"root": os.path.relpath(Path(root).resolve(), base),
             "annotation": os.path.relpath(Path(annotation).resolve(), base),
             "data_augment": False, "repeat_time": repeat_time, "length": length}
    if dataset is not None and Path(dataset).resolve() != Path(root).resolve():
        entry["dataset"] = os.path.relpath(Path(dataset).resolve(), base)
    fileio.write_json(path, {name: entry})


def iter_meta(path: str | os.PathLike) -> Iterator[tuple[str, Path, Path, float]]:
    """``(name, root, annotation, repeat_time)`` for each dataset of an InternVL meta JSON;
    relative paths are taken from the meta file's folder."""
    meta = fileio.read_json(path)
    if not isinstance(meta, dict) or not meta:
        raise OccError(f"{path}: an InternVL meta file is an object of datasets, each with root and annotation")
    base = Path(path).parent
    for name, entry in meta.items():
        if not isinstance(entry, dict) or "root" not in entry or "annotation" not in entry:
            raise OccError(f"{path}: dataset {name!r} needs 'root' and 'annotation'")
        repeat = entry.get("repeat_time", 1)
        if not isinstance(repeat, (int, float)) or repeat <= 0:
            raise OccError(f"{path}: dataset {name!r} repeat_time must be a positive number")
        yield name, base / entry["root"], base / entry["annotation"], float(repeat)


def meta_path(annotation: str | os.PathLike) -> Path:
    """The InternVL meta JSON written beside a stage or test JSONL: ``<stem>.meta.json``."""
    annotation = Path(annotation)
    return annotation.with_name(annotation.stem + ".meta.json")


def own_entries(annotation: str | os.PathLike, entries: list[tuple[Path, object]]) -> list:
    """Of a meta JSON's entries, given as (annotation path, value), the values of those naming
    ``annotation``; a lone entry is taken as its own whatever it names."""
    mine = [value for path, value in entries if path.resolve() == Path(annotation).resolve()]
    return mine if mine or len(entries) != 1 else [entries[0][1]]


def root_from_meta(annotation: str | os.PathLike, flag: str) -> Path:
    """The image root of a JSONL, as the meta JSON beside it names it (``own_entries``); ``flag``
    is the option that gives the root instead, for the messages."""
    annotation = Path(annotation)
    meta = meta_path(annotation)
    if not meta.is_file():
        raise OccError(f"{annotation}: no {flag} given and no {meta.name} beside it to say where images are")
    roots = own_entries(annotation, [(path, root) for _, root, path, _ in iter_meta(meta)])
    if len(roots) != 1:
        raise OccError(f"{meta}: does not name {annotation.name} as its annotation; pass {flag}")
    return roots[0]


def dataset_folder(annotation: str | os.PathLike, root: Path) -> Path:
    """The dataset folder (manifest, masks, depth) of a JSONL's views: the ``dataset`` its meta JSON
    names (converted real data, whose images stay in the source root), else ``root``."""
    meta = meta_path(annotation)
    if meta.is_file():
        entries = [e for e in fileio.read_json(meta).values() if isinstance(e, dict)]
        for entry in own_entries(annotation, [(meta.parent / str(e.get("annotation")), e) for e in entries]):
            if entry.get("dataset"):
                return meta.parent / entry["dataset"]
    return root


def load_training_records(train_data: str | os.PathLike, data_root: str | None = None, kind: str = "conversation",
                          verify_images: bool = False) -> list[tuple[Path, dict]]:
    """``(image root, record)`` pairs from a JSONL or an InternVL meta JSON, with repeat_time applied
    (a fraction keeps that share of the records, deterministically). ``kind`` and
    ``verify_images`` are ``read_records``'s."""
    path = Path(train_data)
    if path.suffix == ".json":
        out = []
        for _name, root, annotation, repeat in iter_meta(path):
            recs = read_records(annotation, kind, root=root, verify_images=verify_images)
            whole, frac = int(repeat), repeat - int(repeat)
            out += [(root, r) for r in recs] * whole + [(root, r) for r in recs[: int(round(frac * len(recs)))]]
        return out
    root = Path(data_root) if data_root is not None else root_from_meta(path, "--data_root")
    return [(root, r) for r in read_records(path, kind, root=root, verify_images=verify_images)]
