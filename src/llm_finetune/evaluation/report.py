"""The evaluation report: report.json (everything), report.md (for people and the model card), PNG
plots (loss curves, metric comparison, answer lengths) and the short table printed in the terminal.

Input is the dict from `evaluate.compare_models` plus what the caller adds ("leaks", "meta").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..manifest import write_json, write_text
from .leakage import find_leaks, format_leaks

# Rows of the tables: key in a model's "metrics", label, how to show it.
ROWS = [
    ("exact_match", "exact match", "pct"),
    ("normalized_match", "normalised match", "pct"),
    ("contains", "answer contains the reference", "pct"),
    ("json", "JSON with the reference's keys", "pct"),
    ("format", "format accuracy", "pct"),
    ("rougeL", "ROUGE-L F1", "pct"),
    ("chrf", "chrF", "pct"),
    ("stop_rate", "stopped by EOS", "pct"),
    ("answer_tokens", "answer length (tokens, mean)", "num"),
    ("answer_chars", "answer length (chars, mean)", "num"),
    ("consistency", "consistency (agreement of k samples)", "pct"),
    ("consistency_all_agree", "all k samples agree", "pct"),
]
PLOTS = ("loss_curves.png", "metrics.png", "answer_lengths.png")


def _names(report: dict[str, Any]) -> list[str]:
    return list(report.get("order") or [n for n in ("base", "tuned") if n in report])


def _fmt(value: float, how: str, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{value:{sign}.1%}" if how == "pct" else f"{value:{sign}.1f}"


def _cell(m: dict[str, Any], how: str) -> str:
    count = f" ({m['k']}/{m['n']})" if "k" in m else f" (n={m['n']})"
    return f"{_fmt(m['value'], how)}{count} [{_fmt(m['ci95'][0], how)}, {_fmt(m['ci95'][1], how)}]"


def _diff_cell(d: dict[str, Any], how: str) -> str:
    mark = " *" if d.get("significant") else ""
    return f"{_fmt(d['value'], how, True)} [{_fmt(d['ci95'][0], how, True)}, {_fmt(d['ci95'][1], how, True)}]{mark}"


def metric_rows(report: dict[str, Any], headline_only: bool = False,
                only: tuple[str, ...] | None = None) -> list[tuple[str, ...]]:
    """(label, value per model..., difference) rows shared by the terminal and the markdown table."""
    names = _names(report)
    diffs = report.get("difference", {}).get("metrics", {})
    rows: list[tuple[str, ...]] = []
    loss_diff = []
    if "difference" in report:
        d = diffs.get("eval_loss") or {"value": report["difference"]["eval_loss"]}
        ci = f" [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]{' *' if d.get('significant') else ''}" if "ci95" in d else ""
        loss_diff = [f"{d['value']:+.3f}{ci}"]
    rows.append(("eval loss (per token)", *(f"{report[n]['eval_loss']:.3f}" for n in names), *loss_diff))
    rows.append(("perplexity", *(f"{report[n]['perplexity']:.2f}" for n in names),
                 *(["" ] if "difference" in report else [])))
    headline = report[names[-1]]["metric"]
    keys = [(k, label, how) for k, label, how in ROWS if k in report[names[-1]].get("metrics", {})]
    if headline_only:
        keys = [r for r in keys if r[0] in (headline, "chrf", "format", "stop_rate")]
    if only:
        keys = [r for r in keys if r[0] in only]
    for key, label, how in keys:
        label = f"{label} (headline)" if key == headline and not headline_only else label
        cells = [_cell(report[n]["metrics"][key], how) for n in names]
        if "difference" in report:
            cells.append(_diff_cell(diffs[key], how) if key in diffs else "")
        rows.append((label, *cells))
    return rows


def _align(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def summary_table(report: dict[str, Any]) -> str:
    """The terminal table: loss, the headline metric, format and stop rate, each with n and 95% CI."""
    names = _names(report)
    header = ("", *names, *(["difference (95% CI)"] if "difference" in report else []))
    lines = [_align([header, *metric_rows(report, headline_only=True)])]
    if "difference" in report:
        d = report["difference"]
        metric = report[names[-1]]["metric"]
        lines.append(f"{names[1]} - {names[0]} {metric}: {d['score']:+.1%}, 95% CI [{d['ci95'][0]:+.1%}, "
                     f"{d['ci95'][1]:+.1%}] (paired bootstrap); eval loss {d['eval_loss']:+.3f}")
    if "regression" in report and "difference" in report["regression"]:
        r = report["regression"]
        lo, hi = r["difference"]["eval_loss_ci95"]
        lines.append(f"regression set ({r[names[-1]]['n']} general prompts): eval loss "
                     f"{r[names[0]]['eval_loss']:.3f} -> {r[names[-1]]['eval_loss']:.3f} "
                     f"({r['difference']['eval_loss']:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}]), answer contains the "
                     f"reference {r[names[0]]['score']:.0%} -> {r[names[-1]]['score']:.0%}")
    if "leaks" in report:
        lines.append(format_leaks(report["leaks"]))
    elif report.get("meta", {}).get("leak_check"):
        lines.append(f"leak check {report['meta']['leak_check']}")
    if report.get("meta", {}).get("best_checkpoint_selection"):
        lines.append(f"note: {report['meta']['best_checkpoint_selection']}")
    return "\n".join(lines)


def _md_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    esc = [tuple(c.replace("|", "\\|") for c in r) for r in (header, *rows)]
    out = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(out)


def markdown_table(report: dict[str, Any], only: tuple[str, ...] | None = None) -> str:
    """The full metric table in markdown: what goes into the adapter folder and the model card."""
    names = _names(report)
    header = ("metric", *names, *(["difference (95% CI)"] if "difference" in report else []))
    n = report[names[-1]]["n"]
    note = f"{n} examples. Rates show (k/n) and a 95% Wilson interval; scores a 95% bootstrap interval."
    if "difference" in report:
        note += " Differences are paired bootstrap intervals over the same examples, * where the interval excludes 0."
    return _md_table(header, metric_rows(report, only=only)) + "\n\n" + note + "\n"


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _val(v: Any) -> str:
    return ("yes" if v else "no") if isinstance(v, bool) else f"{v:.2f}"


def _examples_md(report: dict[str, Any], indices: list[int]) -> str:
    names = _names(report)
    metric = report[names[-1]]["metric"]
    rows = []
    for i in indices:
        ex = report["examples"][i]
        rows.append((ex["source"], _short(ex["prompt"], 80), _short(ex["reference"], 80),
                     *(f"{_short(ex[n]['prediction'], 80)} ({metric} {_val(ex[n][metric])}, chrF "
                       f"{ex[n]['chrf']:.2f}, loss {ex[n]['loss']:.2f})" for n in names)))
    return _md_table(("example", "prompt", "reference", *names), rows) if rows else "(none)"


def markdown_report(report: dict[str, Any]) -> str:
    names = _names(report)
    meta = report.get("meta", {})
    parts = ["# Evaluation report", ""]
    if meta:
        shown_below = ("best_checkpoint_selection", "leak_check")
        parts += [f"- {k}: {v}" for k, v in meta.items()
                  if not isinstance(v, (dict, list)) and k not in shown_below] + [""]
    labels = report.get("labels", {})
    if labels:
        parts += [f"- **{n}**: {labels[n]}" for n in names if n in labels] + [""]
    if meta.get("best_checkpoint_selection"):
        parts += [f"> **Note:** {meta['best_checkpoint_selection']}.", ""]
    parts += ["## Metrics", "", markdown_table(report)]
    if "difference" in report:
        d = report["difference"]
        verdict = ("a real gain" if d["ci95"][0] > 0 else "a real loss" if d["ci95"][1] < 0
                   else "not distinguishable from noise at this sample size")
        parts += [f"**Verdict on the headline metric:** {names[1]} - {names[0]} = {d['score']:+.1%} "
                  f"(95% CI [{d['ci95'][0]:+.1%}, {d['ci95'][1]:+.1%}]): {verdict}.", ""]
    for n in names:
        length = report[n]["length"]["tokens"]
        if length.get("n"):
            parts.append(f"- {n} answer length (tokens): mean {length['mean']:.1f}, median {length['median']}, "
                         f"p90 {length['p90']}, min {length['min']}, max {length['max']}")
    parts.append("")
    if "leaks" not in report and meta.get("leak_check"):
        parts += ["## Leak check", "", f"leak check {meta['leak_check']}", ""]
    if "leaks" in report:
        leaks = report["leaks"]
        parts += ["## Leak check", "", format_leaks(leaks), ""]
        for hit in leaks["listed"]:
            parts.append(f"- eval {hit['eval']} = train {hit['train']} ({hit['match']})")
        parts.append("")
    if "regression" in report:
        r = report["regression"]
        parts += ["## Regression set (general ability)", "",
                  "General prompts unrelated to the task: what the fine-tune cost elsewhere. Headline: the answer "
                  "contains the reference.", "",
                  markdown_table(r, only=("contains", "normalized_match", "rougeL", "chrf", "stop_rate",
                                          "answer_tokens"))]
    if "changed" in report:
        parts += ["## Examples that changed most", "", "### Improved", "",
                  _examples_md(report, report["changed"]["improved"]), "", "### Regressed", "",
                  _examples_md(report, report["changed"]["regressed"]), ""]
    plots = report.get("plots", [])
    if plots:
        parts += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Plots


def read_metrics_log(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash does not spoil the plot
    return records


def plot_loss_curves(records: list[dict[str, Any]], path: Path) -> bool:
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return False
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss (token-weighted)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_metrics(report: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt
    import numpy as np

    names = _names(report)
    keys = [(k, label) for k, label, how in ROWS if how == "pct" and k in report[names[-1]].get("metrics", {})]
    if not keys:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(keys)), 3.8))
    x = np.arange(len(keys))
    width = 0.8 / len(names)
    for j, n in enumerate(names):
        ms = [report[n]["metrics"][k] for k, _ in keys]
        values = np.array([m["value"] for m in ms])
        err = np.array([[v - m["ci95"][0] for v, m in zip(values, ms)], [m["ci95"][1] - v for v, m in zip(values, ms)]])
        ax.bar(x + (j - (len(names) - 1) / 2) * width, values, width, yerr=np.clip(err, 0, None), capsize=3, label=n)
    ax.set_xticks(x, [label for _, label in keys], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rate / score (95% CI)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_lengths(report: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt

    names = _names(report)
    examples = report.get("examples", [])
    if not examples:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, unit in ((axes[0], "tokens", "tokens"), (axes[1], "chars", "characters")):
        series = {n: [ex[n]["tokens"] if key == "tokens" else len(ex[n]["prediction"]) for ex in examples]
                  for n in names}
        if key == "chars":
            series["reference"] = [len(ex["reference"]) for ex in examples]
        top = max(max(v) for v in series.values()) or 1
        bins = min(30, max(5, top))
        for n, v in series.items():
            ax.hist(v, bins=bins, range=(0, top), alpha=0.5, label=n)
        ax.set_xlabel(f"answer length ({unit})")
        ax.set_ylabel("examples")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(report: dict[str, Any], out_dir: str | Path, metrics_log: str | Path | None = None
                 ) -> dict[str, Path]:
    """Write report.json, report.md and the plots into out_dir; return their paths."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot's first import to matter
    out = Path(out_dir)
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    made = []
    records = read_metrics_log(metrics_log) if metrics_log else []
    for name, ok in (("loss_curves.png", lambda p: plot_loss_curves(records, p)),
                     ("metrics.png", lambda p: plot_metrics(report, p)),
                     ("answer_lengths.png", lambda p: plot_lengths(report, p))):
        if ok(plots_dir / name):
            made.append(f"plots/{name}")
    report["plots"] = made
    write_json(out / "report.json", report)
    md = out / "report.md"
    write_text(md, markdown_report(report))
    return {"json": out / "report.json", "md": md, **{Path(p).stem: out / p for p in made}}


def selection_note(best: dict | None, same_set: bool) -> str | None:
    """Why the numbers may be optimistic: the final adapter is the checkpoint with the lowest eval loss
    on the very set the report scores (train.eval_steps with train.load_best_at_end), so the choice
    has already seen these examples. None when no checkpoint was chosen, or it was chosen elsewhere."""
    if not best or not best.get("final_adapter_is_best") or not same_set:
        return None
    return (f"optimistic: the adapter is the best of {len(best.get('evaluations') or [])} checkpoints by eval "
            f"loss on this same eval set ({best.get('checkpoint')}), so these numbers favour it; score a set "
            "that took no part in the choice for an unbiased estimate")


def add_context(report: dict[str, Any], cfg, eval_examples: list, source=None, best: dict | None = None,
                labels: dict[str, str] | None = None, trained=None, leak_note: str | None = None,
                best_on_same_set: bool = True) -> dict[str, Any]:
    """What the numbers are about: eval file, model, labels of the two sides, how the adapter was chosen,
    and the leak check against `trained` (a `leakage.TrainIndex` of the examples the run trained on, or
    None when they are not known: then `leak_note` says why in meta.leak_check). A `leak_note` next to
    `trained` qualifies the check (e.g. the training data changed since the run)."""
    import time

    model = (source.hub_id or str(source.load_path)) if source is not None else cfg.model.name_or_path
    report["meta"] = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "eval_file": cfg.data.eval_file,
                      "examples": len(eval_examples), "model": model, "headline_metric": cfg.eval.metric,
                      "max_new_tokens": cfg.eval.max_new_tokens, "regression_file": cfg.eval.regression_file,
                      "consistency_samples": cfg.eval.consistency_samples}
    if best:
        report["meta"]["best_checkpoint"] = best["checkpoint"]
        note = selection_note(best, best_on_same_set)
        report["meta"]["optimistic"] = note is not None
        if note:
            report["meta"]["best_checkpoint_selection"] = note
    report["labels"] = labels or {"base": f"base model {model}", "tuned": "base model + the adapter of this run"}
    if trained is not None:
        report["leaks"] = {"train_file": cfg.data.train_file, **find_leaks(eval_examples, trained)}
        if leak_note:
            report["leaks"]["note"] = leak_note
    elif leak_note:
        report["meta"]["leak_check"] = f"not run: {leak_note}"
    return report


def write_into_adapter(adapter_dir: str | Path, report: dict[str, Any]) -> None:
    """The evaluation goes into the already saved adapter folder: eval_report.json and eval_report.md
    (the table for the model card), each written to a temporary name and renamed into place."""
    adapter_dir = Path(adapter_dir)
    write_json(adapter_dir / "eval_report.json", report)
    write_text(adapter_dir / "eval_report.md", markdown_table(report))
