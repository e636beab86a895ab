"""Readers for the reference implementation's published data files (OCC-MLLM-CoT / V1).

- ``v1/train_Q1*.jsonl``, ``v1/train_Q1_Q6*.jsonl``, ``v1/train_Q1_Q6_Q0*.jsonl``: conversation
  records, read as they are;
- ``v1/*_dpo_*.jsonl``: preference records without ids (ids are filled from the image name);
- ``cot/predictions-*.json``: ``{id: "The object is X."}`` (see data_tools.predictions);
- ``cot/*wrong*.json``: ``[{"answer": id}]``, ids an earlier model answered wrongly;
- ``cot/obman_view_test_all.txt``: tab-separated id, reference view, view, image path.
"""
from __future__ import annotations

import collections
import os
from pathlib import Path

from occmllm import fileio, records
from occmllm.errors import OccError, where
from occmllm.questions import parse_category


def read_reference_jsonl(path: str | os.PathLike) -> tuple[str, list[dict]]:
    """``(kind, records)`` of a reference v1 file; the kind is told by the first record."""
    path = Path(path)
    first = next(fileio.iter_jsonl(path), (None, {}))[1]
    kind = "preference" if "chosen" in first else "conversation"
    return kind, records.read_records(path, kind)


def category_counts(recs: list[dict]) -> dict[str, int]:
    """Categories named by the first answer of each conversation record, most common first."""
    counts = collections.Counter(parse_category(r["conversations"][1]["value"]) for r in recs)
    return dict(counts.most_common())


def read_test_list(path: str | os.PathLike) -> list[dict]:
    """The ObMan test list: ``{"id", "ref_view", "view", "image"}`` per line. Image paths there
    are absolute paths on the authors' machines; only their file name is kept."""
    out = []
    for lineno, line in enumerate(fileio.read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 4 or not parts[1].strip().isdigit() or not parts[2].strip().isdigit():
            raise OccError(f"{where(path, lineno)}: expected 4 tab-separated fields (id, ref view number, view "
                           f"number, image), got {line[:80]!r}")
        out.append({"id": parts[0], "ref_view": int(parts[1]), "view": int(parts[2]),
                    "image": Path(parts[3].strip()).name})
    return out
