"""The report files of a scored run: report.json, report.md (its tables) and the plots.

The report itself, and what each of its numbers means, is ``occmllm.scoring``'s (``build_report``).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from occmllm import fileio
from occmllm.scoring import OCCLUSION_EDGES, key_order

FILES = {"json": "report.json", "markdown": "report.md", "accuracy_plot": "accuracy.png",
         "occlusion_plot": "accuracy_vs_occlusion.png", "confusion_plot": "confusion.png", "gains_plot": "gains.png"}


# --- markdown ----------------------------------------------------------------------------------

def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _with_se(accuracy: float | None, se: float | None) -> str:
    return "-" if accuracy is None else f"{accuracy:.3f} ± {se:.3f}"


def _bin_label(rng) -> str:
    if rng is None:
        return "occ ?"
    lo, hi = rng
    return f"occ [{lo:.1f},{hi:.1f}{']' if hi >= OCCLUSION_EDGES[-1] else ')'}"


def markdown_table(report: dict) -> str:
    """Rows = checkpoint x mode; columns = per-question accuracy, final accuracy, occlusion bins, samples/s."""
    rows = report["rows"]
    keys = sorted({k for r in rows for k in r["accuracy"]}, key=key_order)
    bins = []
    for r in rows:
        for b in r["by_occlusion"]:
            if b["range"] not in bins:
                bins.append(b["range"])
    header = ["checkpoint", "mode", "n", *keys, "final ± se", "most-occluded third ± se",
              *(_bin_label(b) for b in bins), "samples/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for r in rows:
        occ = {tuple(b["range"]) if b["range"] else None: b for b in r["by_occlusion"]}
        third = r["most_occluded_third"]
        cells = [r["checkpoint"], r["mode"], str(r["n"]), *(_fmt(r["accuracy"].get(k)) for k in keys),
                 _with_se(r["final_accuracy"], r["final_se"]),
                 "-" if not third["n"] else f"{_with_se(third['accuracy'], third['se'])} ({third['n']})"]
        for rng in bins:
            b = occ.get(tuple(rng) if rng else None)
            cells.append("-" if b is None or not b["n"] else f"{b['accuracy']:.3f} ({b['n']})")
        cells.append("-" if r["samples_per_s"] is None else f"{r['samples_per_s']:.2f}")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def cot_table(report: dict) -> str:
    rows = [r for r in report["rows"] if "cot" in r]
    if not rows:
        return ""
    lines = ["| checkpoint | mode | gate | gate's gain where chosen / on views it was not chosen on (5-95%) "
             "| check AUC | looked again | calibration | No. when wrong | Yes. when right | render: wrong->right "
             "| render: right->wrong |",
             "|" + " --- |" * 11]
    for r in rows:
        c = r["cot"]
        lines.append(f"| {r['checkpoint']} | {r['mode']} | {_fmt(c.get('gate'))} | {_gate_gains(c.get('gate_choice'))} | "
                     f"{_fmt(c.get('check_auc'))} | {_fmt(c['no_rate'])} | {_fmt(c['calibration'])} | "
                     f"{_fmt(c['no_when_wrong'])} | {_fmt(c['yes_when_right'])} | {c['wrong_to_right']} | "
                     f"{c['right_to_wrong']} |")
    return "\n".join(lines)


def _gate_gains(choice: dict | None) -> str:
    """A stored gate's gain in points on the views it was chosen on, and on views it was not."""
    if choice is None:
        return "-"
    fresh = choice.get("gain_on_fresh_views")
    where = f"{choice['fitted_gain']:+.1f}"
    return where if fresh is None else f"{where} / {fresh['mean']:+.1f} ({fresh['p5']:+.1f} to {fresh['p95']:+.1f})"


def _signed(diff: dict) -> str:
    if diff["delta"] is None:
        return "-"
    p = "p < 0.001" if diff["p"] < 0.001 else f"p {diff['p']:.3f}"
    return f"{diff['delta']:+.3f} ± {diff['se']:.3f} (+{diff['gained']} / -{diff['lost']}, {p})"


def gains_table(report: dict) -> str:
    if not report.get("gains"):
        return ""
    lines = ["| row | against | final: gain ± se (records gained / lost, McNemar's p) | most-occluded third: gain ± se |",
             "|" + " --- |" * 4]
    for g in report["gains"]:
        lines.append(f"| {g['row'][0]} ({g['row'][1]}) | {g['against'][0]} ({g['against'][1]}) | "
                     f"{_signed(g['final'])} | {_signed(g['most_occluded_third'])} |")
    return "\n".join(lines)


def unlabelled_table(report: dict) -> str:
    """Rows of an unlabelled run: what was answered and how fast (and, for the chain of thought,
    how often the gate took the second look)."""
    lines = ["| checkpoint | mode | n | looked again (CoT) | samples/s |", "|" + " --- |" * 5]
    for r in report["rows"]:
        said_no = _fmt(r["cot"]["no_rate"]) if "cot" in r else "-"
        speed = "-" if r["samples_per_s"] is None else f"{r['samples_per_s']:.2f}"
        lines.append(f"| {r['checkpoint']} | {r['mode']} | {r['n']} | {said_no} | {speed} |")
    return "\n".join(lines)


def training_table(report: dict) -> str:
    """One line per trained checkpoint (``report["training"]``); empty where none logged."""
    def loss(x):
        return "-" if x is None else f"{x:.4g}"
    lines = [f"| {t['checkpoint']} | {t['steps'] if t['steps'] is not None else '-'} | "
             f"{loss(t['first_loss'])} -> {loss(t['last_loss'])} | {t['plot']} |" for t in report.get("training", [])]
    if not lines:
        return ""
    return "\n".join(["| checkpoint | last logged step | loss, first -> last logged | plot |",
                      "| --- | --- | --- | --- |", *lines])


def markdown(report: dict) -> str:
    if report.get("unlabelled"):
        return "\n".join([f"# Answers to {report['test_file']}", "",
                          f"{report['n']} test records, unlabelled: they hold questions without reference answers, "
                          "so no accuracy is computed. The model's answers are in `predictions.jsonl`.", "",
                          unlabelled_table(report), ""])
    maj = report["q1_majority_rate"]
    partly = ("" if report.get("labelled", report["n"]) == report["n"] else
              f" Only {report['labelled']} of them have reference answers; accuracy is over those.")
    text = [f"# Accuracy on {report['test_file']}", "",
            f"{report['n']} test records.{partly} Q1 chance rate {report['q1_chance_rate']:.3f}; majority class "
            + (f"{report['q1_majority_class']} at {maj:.3f}." if maj is not None else "unknown."),
            "", markdown_table(report), "",
            ("Accuracy is the fraction of answers scored right (category questions by the category named, yes/no "
             "questions by polarity); `final` is the answer to the category question, with its binomial standard "
             "error (the spread over test sets of this size; whether one row beats another, see the paired "
             "gains below); the most-occluded third "
             "is the final accuracy on the third of the records with the highest occlusion ratio (the same "
             "records for every row; their number in brackets); occlusion bins show the final accuracy and, in "
             "brackets, the number of records. Plots: "
             f"`{FILES['accuracy_plot']}`, `{FILES['occlusion_plot']}`, `{FILES['confusion_plot']}`."), ""]
    paired = gains_table(report)
    if paired:
        text += ["## Gains, record by record", "",
                 ("Each row against the last plain row above it: a stage against the stage before it, another mode "
                  "against the same model asked plainly. The gain is the difference in final accuracy on the same "
                  "records and its standard error is that of the per-record differences: rows that agree on most "
                  "records differ "
                  "with a far smaller se than either accuracy has, so a gain over about twice this se is signal on "
                  "this test set. Records gained / lost: right only in the row / only in the one it is compared "
                  "with; McNemar's p: the chance of a split at least this uneven were each changed record as "
                  "likely gained as lost (honest where a handful changed: 4 gained and 0 lost is p 0.125). "
                  f"Plot: `{FILES['gains_plot']}`."),
                 "", paired, ""]
    training = training_table(report)
    if training:
        text += ["## Training", "",
                 ("Each checkpoint's own training, from the log its trainer wrote beside it (`train_log.jsonl`; "
                  "`training.png` plots every logged figure against the step): a checkpoint whose loss never "
                  "fell is no stage to compare."), "", training, ""]
    cot = cot_table(report)
    if cot:
        text += ["## Chain of thought", "",
                 ("Q1 is the first answer and `final` the answer after the render. `gate`: the second look is taken "
                  "where P(No.) reaches it. Where it is the checkpoint's own (chosen on validation, "
                  "`python -m occmllm.chain gate`), its gain in points over the first answers on the views it was "
                  "chosen on, which it was fitted to, and on views it was not chosen on (a bootstrap over those "
                  "views): the second is the one to trust. `check AUC`: the chance that the check's P(No.) "
                  "ranks a wrong first answer above a right one (0.5: it tells them apart no better than a coin). "
                  "`looked again`: the share of samples whose check, read at the gate, took the second look "
                  "(Q6 `No.`); calibration: the share where it said `No.` exactly when its first answer was wrong; the last "
                  "columns count answers the render changed."), "", cot, ""]
    return "\n".join(text)


# --- plots -------------------------------------------------------------------------------------

def _figure(width: float, height: float):
    # The object-oriented API: no pyplot global state and no display backend (Agg renders the PNG).
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _legend_outside(ax) -> None:
    """The legend right of the axes: with many rows, inside it would hide the data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _no_data(fig, ax, path: Path, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center")
    ax.set_axis_off()
    fig.savefig(path, format="png")


UNLABELLED = "unlabelled test set: no accuracy"


def plot_accuracy(report: dict, path: Path) -> None:
    """Grouped bars: per question (and the final answer), one bar per checkpoint/mode."""
    if report.get("unlabelled"):
        return _no_data(*_figure(6.0, 3.6), path, UNLABELLED)
    rows = report["rows"]
    keys = sorted({k for r in rows for k in r["accuracy"]}, key=key_order)
    groups = [*keys, "final"]
    fig, ax = _figure(min(12.0, max(5.0, 1.0 + 0.9 * len(groups) * max(1, len(rows)) ** 0.5)) + 2.0, 3.6)
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        values = [r["accuracy"].get(k) for k in keys] + [r["final_accuracy"]]
        xs = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))]
        # a question the row did not ask gets no bar (NaN), not a zero one
        ax.bar(xs, [v if v is not None else float("nan") for v in values], width,
               label=f"{r['checkpoint']} ({r['mode']})")
    if report["q1_majority_rate"] is not None:
        ax.axhline(report["q1_majority_rate"], color="grey", ls="--", lw=1, label="Q1 majority class")
    ax.axhline(report["q1_chance_rate"], color="grey", ls=":", lw=1, label="Q1 chance")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy per question")
    _legend_outside(ax)
    fig.savefig(path, format="png")


def plot_occlusion(report: dict, path: Path) -> None:
    """Final accuracy against occlusion ratio (bin centres), one line per checkpoint/mode."""
    if report.get("unlabelled"):
        return _no_data(*_figure(6.0, 3.6), path, UNLABELLED)
    fig, ax = _figure(7.5, 3.6)
    for i, r in enumerate(report["rows"]):
        pts = [((b["range"][0] + b["range"][1]) / 2, b["accuracy"]) for b in r["by_occlusion"]
               if b["range"] is not None and b["n"]]
        if pts:  # ten colours in the cycle: the line style tells rows 11-20 apart
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls=("-", "--", ":")[i // 10 % 3],
                    label=f"{r['checkpoint']} ({r['mode']})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xticks(OCCLUSION_EDGES)
    ax.set_xlabel("occlusion ratio (1 - visible / amodal area)")
    ax.set_ylabel("final accuracy")
    ax.set_title("Accuracy against occlusion")
    _legend_outside(ax)
    fig.savefig(path, format="png")


def plot_confusion(report: dict, path: Path) -> None:
    conf = report["confusion"]
    fig, ax = _figure(6.0, 5.0)
    if conf is None:
        return _no_data(fig, ax, path, UNLABELLED if report.get("unlabelled") else "no predictions")
    else:
        matrix = conf["matrix"]
        image = ax.imshow(matrix, cmap="Blues")
        fig.colorbar(image, ax=ax, shrink=0.8)
        top = max((max(row) for row in matrix), default=0)
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                if count:
                    ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                            color="white" if count > top / 2 else "black")
        ax.set_xticks(range(len(conf["predicted"])), conf["predicted"], rotation=45, ha="right")
        ax.set_yticks(range(len(conf["truth"])), conf["truth"])
        ax.set_xlabel("named in the final answer")
        ax.set_ylabel("true category")
        ax.set_title(f"Categories: {conf['checkpoint']} ({conf['mode']})")
    fig.savefig(path, format="png")


def plot_gains(report: dict, path: Path) -> None:
    """Each paired gain in points with a bar of two standard errors either side, on all records and
    on the most-occluded third: a bar that crosses zero is within the noise of this test set."""
    gains = report.get("gains") or []
    fig, ax = _figure(10.0, 1.2 + 0.45 * max(1, len(gains)))
    if not gains:
        return _no_data(fig, ax, path, UNLABELLED if report.get("unlabelled") else "no rows to compare")
    for offset, part, marker, label in ((-0.15, "final", "o", "all records"),
                                        (0.15, "most_occluded_third", "s", "most-occluded third")):
        shown = [(i, g[part]) for i, g in enumerate(gains) if g[part]["delta"] is not None]
        ax.errorbar([100 * d["delta"] for _, d in shown], [i + offset for i, _ in shown],
                    xerr=[200 * d["se"] for _, d in shown], fmt=marker, capsize=3, label=label)
    ax.axvline(0.0, color="grey", lw=1)
    ax.set_yticks(range(len(gains)), [f"{g['row'][0]} ({g['row'][1]}) vs {g['against'][0]} ({g['against'][1]})"
                                      for g in gains])
    ax.invert_yaxis()  # in the table's order, top to bottom
    ax.set_xlabel("gain in final accuracy, points (bars: ± 2 paired standard errors)")
    ax.set_title("Gains, record by record")
    _legend_outside(ax)
    fig.savefig(path, format="png")


def write_report(out_dir: str | os.PathLike, report: dict) -> dict[str, Path]:
    """Write report.json, report.md and the four plots into ``out_dir``. Every file is rendered to
    a temporary name first and all of them replace their targets only once all are done, so a
    failure leaves no partial report. Returns the paths by kind."""
    out_dir = Path(out_dir)
    paths = {kind: out_dir / name for kind, name in FILES.items()}
    with contextlib.ExitStack() as stack:  # exits in reverse: every file renamed only if all succeeded
        tmp = {kind: stack.enter_context(fileio.atomic_path(p)) for kind, p in paths.items()}
        tmp["json"].write_text(json.dumps(report, ensure_ascii=False, indent=2, allow_nan=False) + "\n",
                               encoding="utf-8")
        tmp["markdown"].write_text(markdown(report), encoding="utf-8")
        plot_accuracy(report, tmp["accuracy_plot"])
        plot_occlusion(report, tmp["occlusion_plot"])
        plot_confusion(report, tmp["confusion_plot"])
        plot_gains(report, tmp["gains_plot"])
    return paths
