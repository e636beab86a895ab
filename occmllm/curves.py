"""A training run's logged figures, kept beside its checkpoint: ``train_log.jsonl`` (one line per
logging step, as the trainer logged it) and ``training.png`` (each figure against the step).

Every stage writes both into its checkpoint folder (``occmllm.stage.PlotsTraining``), and so do the
reconstruction model (``reconstruction.train``) and the tower's pretraining (``occmllm.pretrain``):
a run whose loss never fell, or whose preference margin never grew, shows at a glance, without a
logging service.
"""
from __future__ import annotations

import math
from pathlib import Path

from occmllm import fileio

LOG = "train_log.jsonl"
PLOT = "training.png"
# logged, but not figures to plot against the step: the step itself, and bookkeeping
NOT_PLOTTED = frozenset({"step", "epoch", "seconds", "max_rss_mb", "num_tokens", "total_flos"})
# the Trainer's closing summary carries these; it is a line of the log, not a point of a curve
SUMMARY_KEYS = frozenset({"train_runtime", "train_loss"})
MAX_PANELS = 12
LOG_SCALE_RANGE = 20  # see log_scale
OPTIMISER_PANELS = ("grad_norm", "learning_rate")
PAIRED = frozenset({"chosen", "rejected", "margins"})  # TRL's figures of a preference pair's two answers


def logged_steps(log: list[dict]) -> list[dict]:
    """The entries of ``log`` that are points of a curve: each has its step, and none is the
    closing summary."""
    return [e for e in log if isinstance(e.get("step"), (int, float)) and not SUMMARY_KEYS & e.keys()]


def panels(log: list[dict]) -> dict[str, list[str]]:
    """The figures to plot, grouped by panel: every key ending in ``loss`` shares the panel
    ``loss``, which comes first; TRL's chosen-against-rejected figures (``rewards/chosen``,
    ``rewards/rejected``, ``rewards/margins``; ``logps/...``) share the panel of their prefix; any
    other numeric key (``rewards/accuracies``, stage 4's ``rl/reward`` and ``rl/kl``, each on a scale
    of its own) has a panel of its own. The optimiser's own figures (``OPTIMISER_PANELS``) come last."""
    out: dict[str, list[str]] = {"loss": []}
    for entry in logged_steps(log):
        for key, value in entry.items():
            if key in NOT_PLOTTED or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            prefix, _, name = key.rpartition("/")
            group = "loss" if key.endswith("loss") else prefix if name in PAIRED else key
            if key not in out.setdefault(group, []):
                out[group].append(key)
    last = [g for g in OPTIMISER_PANELS if g in out]
    return {g: keys for g, keys in out.items() if keys and g not in last} | {g: out[g] for g in last}


def log_scale(group: str, values: list[float]) -> bool:
    """Whether a panel's figures want a log scale: all positive and spanning more than
    ``LOG_SCALE_RANGE`` (a loss that falls tenfold early would flatten the rest of its curve); never
    the learning rate, whose schedule reads best as it is set."""
    return (group != "learning_rate" and bool(values) and min(values) > 0
            and max(values) > LOG_SCALE_RANGE * min(values))


def plot_training(log: list[dict], path: str | Path, title: str) -> list[str]:
    """``training.png``: one panel per group of ``panels`` (at most ``MAX_PANELS``), each figure
    against the step, written atomically to ``path``; returns the panels' names."""
    from matplotlib.figure import Figure

    steps = logged_steps(log)
    groups = dict(list(panels(log).items())[:MAX_PANELS])
    columns = 2 if len(groups) > 1 else 1
    rows = max(1, math.ceil(len(groups) / columns))
    width, height = 5.0 * columns, 2.6 * rows + 0.6
    fig = Figure(figsize=(width, height), dpi=100)
    # margins in inches, set by hand: matplotlib's constrained layout doubled the time a stage spends
    # on its plot
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.15 / width, top=1 - 0.85 / height, bottom=0.5 / height,
                        hspace=0.65, wspace=0.8 / 4.05)
    fig.suptitle(title)
    if not groups:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no logged steps (logging_steps larger than the run?)", ha="center", va="center")
        ax.set_axis_off()
    for k, (group, keys) in enumerate(groups.items()):
        ax = fig.add_subplot(rows, columns, k + 1)
        values = []
        for key in keys:
            points = [(e["step"], e[key]) for e in steps if isinstance(e.get(key), (int, float))
                      and math.isfinite(e[key])]
            values += [p[1] for p in points]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None,
                    label=key)
        if log_scale(group, values):
            ax.set_yscale("log")
        ax.set_title(group, fontsize="medium")
        ax.set_xlabel("step", fontsize="small")
        if group == "learning_rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if len(keys) > 1:
            ax.legend(fontsize="x-small")
    with fileio.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return list(groups)


def summary(folder: str | Path) -> dict | None:
    """A checkpoint's training at a glance, from its ``train_log.jsonl``: the last logged step and
    the loss at the first and last logged steps (None where it logged none); None without a log."""
    path = Path(folder) / LOG
    if not path.is_file():
        return None
    losses = [(e["step"], e["loss"]) for e in logged_steps([e for _, e in fileio.iter_jsonl(path)])
              if isinstance(e.get("loss"), (int, float))]
    return {"log": str(path), "plot": str(Path(folder) / PLOT), "steps": losses[-1][0] if losses else None,
            "first_loss": losses[0][1] if losses else None, "last_loss": losses[-1][1] if losses else None}


def save_training_log(log: list[dict], folder: str | Path, title: str) -> None:
    """``train_log.jsonl`` and ``training.png`` of ``log`` in ``folder``."""
    folder = Path(folder)
    fileio.write_jsonl(folder / LOG, log)
    plot_training(log, folder / PLOT, title)
