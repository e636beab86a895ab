"""Reading a model's answers to the category question, in every format the recipe meets.

- the reference's predictions: a JSON object ``{id: "The object is X."}``;
- the reference's wrong-answer list: a JSON list ``[{"answer": id}, ...]`` of ids answered wrongly;
- this project's ``predictions.jsonl`` (written by inference.py): one line per sample and
  checkpoint with ``id``, ``checkpoint``, ``mode`` and ``answers`` (``{"Q1": ..., ...}``); the
  plain-mode Q1 answer is the one used.

The result says, for each view id of a dataset, whether the model named the right category.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from occmllm import fileio
from occmllm.errors import OccError
from occmllm.questions import parse_category


@dataclass
class Predictions:
    source: Path
    answers: dict[str, str] = field(default_factory=dict)  # id -> the model's Q1 answer text
    wrong_ids: set[str] | None = None                      # set when only the wrong ids are known

    def correctness(self, truth: dict[str, str]) -> dict[str, bool]:
        """``{id: answered right}`` for every id of ``truth`` (id -> category). Ids missing from
        the predictions, or no overlap at all, are errors: the file belongs to another dataset."""
        if self.wrong_ids is not None:
            if self.wrong_ids and not self.wrong_ids & truth.keys():
                raise OccError(f"{self.source}: none of its {len(self.wrong_ids)} ids are in this dataset "
                               f"(e.g. {sorted(self.wrong_ids)[0]!r} vs {sorted(truth)[0]!r}); "
                               "it belongs to another dataset")
            return {i: i not in self.wrong_ids for i in truth}
        missing = [i for i in truth if i not in self.answers]
        if missing:
            overlap = len(truth) - len(missing)
            raise OccError(f"{self.source}: has answers for {overlap} of the dataset's {len(truth)} ids "
                           f"(missing e.g. {missing[0]!r}); run inference on this dataset's split first")
        return {i: parse_category(self.answers[i]) == truth[i] for i in truth}


def read_predictions(path: str | os.PathLike, checkpoint: str | None = None) -> Predictions:
    path = Path(path)
    if not path.is_file():
        raise OccError(f"{path}: predictions file not found")
    if path.suffix == ".jsonl":
        answers: dict[str, str] = {}
        checkpoints = set()
        for lineno, rec in fileio.iter_jsonl(path):
            answer = rec.get("answers", {}).get("Q1") if isinstance(rec.get("answers"), dict) else None
            if "id" not in rec or answer is None:
                raise OccError(f"{path}:{lineno}: a predictions line needs 'id' and an 'answers' object with 'Q1' "
                               "(as inference.py writes)")
            if rec.get("mode", "plain") != "plain":
                continue
            checkpoints.add(rec.get("checkpoint"))
            if checkpoint is None or rec.get("checkpoint") == checkpoint:
                answers[str(rec["id"])] = answer
        if checkpoint is None and len(checkpoints) > 1:
            raise OccError(f"{path}: holds several checkpoints ({', '.join(sorted(map(str, checkpoints)))}); "
                           "choose one with --checkpoint")
        if not answers:
            raise OccError(f"{path}: no Q1 predictions{' for checkpoint ' + checkpoint if checkpoint else ''}")
        return Predictions(path, answers=answers)
    data = fileio.read_json(path)
    if isinstance(data, dict):
        if not all(isinstance(v, str) for v in data.values()):
            raise OccError(f"{path}: expected {{id: answer text}}")
        return Predictions(path, answers={str(k): v for k, v in data.items()})
    if isinstance(data, list) and all(isinstance(x, dict) and "answer" in x for x in data):
        return Predictions(path, wrong_ids={str(x["answer"]) for x in data})
    raise OccError(f"{path}: not a predictions file: expected {{id: answer}}, [{{\"answer\": id}}], "
                   f"or predictions.jsonl lines ({json.dumps(data)[:60]}...)")
