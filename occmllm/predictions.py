"""Predictions files: the log ``inference.py`` writes as it runs, and every format of a model's
answers the recipe reads.

The log, in a run folder (each file's format is in ``inference.py --help``): ``predictions.jsonl``,
one line per checkpoint, mode and record, appended as each batch finishes, in a fixed order, so an
interrupted run started again with the same arguments finishes the file an uninterrupted run
writes; ``timing.jsonl``, generation seconds per batch; ``run.json``, the settings a resumed run
must match.

A model's answers to the category question, read to label stage data or to score the reference's:
- the reference's predictions: a JSON object ``{id: "The object is X."}``;
- the reference's wrong-answer list: a JSON list ``[{"answer": id}, ...]`` of ids answered wrongly;
- this project's ``predictions.jsonl``: the plain-mode Q1 answer of each line is the one used.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from occmllm import fileio
from occmllm.errors import OccError
from occmllm.questions import parse_category

PREDICTIONS, TIMING, RUN = "predictions.jsonl", "timing.jsonl", "run.json"


# --- the log of a run ----------------------------------------------------------------------------

class PredictionLog:
    """A run folder's predictions.jsonl and timing.jsonl, read back (an unfinished last line cut)
    and appended batch by batch while open (``with log: ...``)."""

    def __init__(self, out: Path):
        self.path, self.timing_path = out / PREDICTIONS, out / TIMING
        self.done = done_predictions(self.path)   # {(checkpoint, mode, id): line}
        read_lines(self.timing_path, repair=True)  # cut an unfinished line before appending
        self._open = contextlib.ExitStack()
        self._files = None

    def __enter__(self) -> PredictionLog:
        self._files = tuple(self._open.enter_context(open(p, "a", encoding="utf-8"))
                            for p in (self.path, self.timing_path))
        return self

    def __exit__(self, *exc) -> None:
        self._open.close()
        self._files = None

    def todo(self, name: str, mode: str, samples: list) -> list:
        """The samples without a prediction of this checkpoint and mode yet."""
        return [s for s in samples if (name, mode, s.id) not in self.done]

    def append(self, name: str, mode: str, batch: list, results: list[dict], seconds: float) -> None:
        """One batch's predictions (a result's ``"also"`` rows, e.g. TTA's best-of-K, beside its
        own) and its generation time."""
        _, time_fh = self._files
        lines = [{"checkpoint": name, "mode": row_mode, "id": s.id, "answers": r["answers"], "final": r["final"],
                  "question_ids": s.question_ids, **({"chain": r["chain"]} if "chain" in r else {})}
                 for s, result in zip(batch, results)
                 for row_mode, r in [(mode, result), *result.get("also", {}).items()]]
        self._write(lines)
        time_fh.write(fileio.dumps({"checkpoint": name, "mode": mode, "n": len(batch),
                                    "seconds": round(seconds, 4)}) + "\n")
        time_fh.flush()

    def copy(self, name: str, mode: str, source: str, samples: list) -> None:
        """``source``'s answers in ``mode`` to ``samples``, written as ``name``'s (``answered_alike``:
        the same checkpoint asked the same way). No timing line: nothing was generated."""
        self._write([{**self.done[(source, mode, s.id)], "checkpoint": name} for s in samples])

    def _write(self, lines: list[dict]) -> None:
        """Prediction lines in one write, flushed and synced (a kill leaves at most one unfinished
        line), and remembered as done."""
        pred_fh, _ = self._files
        fileio.append_jsonl(pred_fh, lines)
        for line in lines:
            self.done[(line["checkpoint"], line["mode"], line["id"])] = line

    def runs(self, ids: list) -> list[dict]:
        """One run per checkpoint and mode in the folder that answered every id (a later run in
        another mode adds its rows), in the order they were first written, for the report."""
        spent = timings(self.timing_path)
        runs = []
        for name, mode in dict.fromkeys((c, m) for c, m, _ in self.done):
            if all((name, mode, i) in self.done for i in ids):
                seconds, timed = spent.get((name, mode), (None, None))
                runs.append({"checkpoint": name, "mode": mode, "seconds": seconds, "timed": timed,
                             "predictions": {i: self.done[(name, mode, i)] for i in ids}})
        return runs


REMEDY = "remove it (or use another --out) to start over"


def read_lines(path: Path, repair: bool) -> list[dict]:
    """Complete lines of a run's appended log (``fileio.read_appended``)."""
    return fileio.read_appended(path, repair, REMEDY)


def done_predictions(path: Path) -> dict[tuple, dict]:
    """``{(checkpoint, mode, id): line}`` of a predictions file (after dropping an unfinished last line)."""
    done = {}
    for k, rec in enumerate(read_lines(path, repair=True), start=1):
        if not {"checkpoint", "mode", "id", "answers", "final"} <= rec.keys():
            raise OccError(f"{path}:{k}: not a predictions line (needs checkpoint, mode, id, answers, final)")
        key = (rec["checkpoint"], rec["mode"], rec["id"])
        if key in done:
            raise OccError(f"{path}:{k}: duplicate prediction for {key}; the file was edited or mixed from "
                           "several runs: remove it (or use another --out) to start over")
        done[key] = rec
    return done


def check_run_settings(out: Path, data: Path, max_new_tokens: int, checkpoints: list[tuple[str, Path]],
                       resuming: bool, recon: Path | None = None, clip: Path | None = None,
                       recon_resolution: int | None = None, mode: str = "plain",
                       answering: dict[str, dict] | None = None) -> None:
    """Record the settings in run.json; a resumed run must use the same ones, or its predictions
    would mix answers made differently (and the cached renders would be another model's).
    ``answering``: each checkpoint's settings that decide its answers in ``mode`` (blend weight,
    gate, ...), kept per checkpoint and mode."""
    path = out / RUN
    settings = {"data": str(data.resolve()), "max_new_tokens": max_new_tokens,
                "checkpoints": {name: str(p.resolve()) for name, p in checkpoints},
                "recon": str(recon.resolve()) if recon is not None else None,
                "recon_resolution": recon_resolution if recon is not None else None,
                "clip": str(clip.resolve()) if clip is not None else None,
                "answering": {f"{name} ({mode})": s for name, s in (answering or {}).items()}}
    old = fileio.read_json(path) if path.is_file() else {}
    problems = []
    if resuming and old:
        problems += [f"--{k.replace('_', '-')} was {old.get(k)!r}, now {settings[k]!r}"
                     for k in ("data", "max_new_tokens") if old.get(k) != settings[k]]
        for name, p in settings["checkpoints"].items():
            if old.get("checkpoints", {}).get(name, p) != p:
                problems.append(f"checkpoint {name!r} was {old['checkpoints'][name]}, now {p}")
        settings["checkpoints"] = {**old.get("checkpoints", {}), **settings["checkpoints"]}
        for row, now in settings["answering"].items():
            was = old.get("answering", {}).get(row, now)
            if was != now:
                problems.append(f"{row} answered with {_described(was)}, now {_described(now)}")
        settings["answering"] = {**old.get("answering", {}), **settings["answering"]}
    for model in ("recon", "recon_resolution", "clip"):
        if old.get(model) and settings[model] and old[model] != settings[model]:
            why = f" (its renders are cached in {out})" if model.startswith("recon") else ""
            problems.append(f"--{model.replace('_', '-')} was {old[model]}, now {settings[model]}{why}")
        settings[model] = settings[model] or old.get(model)
    if problems:
        raise OccError(f"{out / PREDICTIONS} holds predictions made with other settings ({'; '.join(problems)}); "
                       "use another --out, or remove the folder to start over")
    fileio.write_json(path, settings)


def answered_alike(out: Path, name: str, mode: str) -> list[str]:
    """The other checkpoint names that run.json records with ``name``'s checkpoint folder and the
    same settings in ``mode``: whatever they answered, ``name`` would answer the same."""
    settings = fileio.read_json(out / RUN)
    paths, answering = settings["checkpoints"], settings["answering"]
    row = answering.get(f"{name} ({mode})")
    return [other for other, path in paths.items()
            if other != name and path == paths[name] and f"{other} ({mode})" in answering
            and answering[f"{other} ({mode})"] == row]


def _described(settings: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.items()) or "no settings"


def timings(path: Path) -> dict[tuple[str, str], tuple[float, int]]:
    """``{(checkpoint, mode): (seconds, samples)}`` summed over the batches of timing.jsonl."""
    out: dict = {}
    for rec in read_lines(path, repair=True):
        key = (rec.get("checkpoint"), rec.get("mode"))
        seconds, n = out.get(key, (0.0, 0))
        out[key] = (seconds + float(rec.get("seconds", 0.0)), n + int(rec.get("n", 0)))
    return out


# --- a model's Q1 answers, in any format ---------------------------------------------------------

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
