"""`python -m distprune.summarize SWEEP_DIR`: one table and one picture from the job reports
under a sweep directory (every SWEEP_DIR/*/distprune_report.json), so an interrupted sweep
still gets a summary of the jobs that finished."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

from distprune.checkpoint import REPORT

LINE_KEYS = ("model", "method", "scope", "mode", "selector")
PHASES = ("load", "eval_dense", "statistics", "score+select", "mask", "solve", "eval", "save")
COLUMNS = ("job", "model", "method", "scope", "selector", "mode", "target_sparsity", "achieved_sparsity", "perplexity",
           "dense_perplexity", *(f"{p}_s" for p in PHASES), "peak_rss_gib", "peak_gpu_gib", "world_size")


def rows(sweep_dir: Path) -> list[dict]:
    out = []
    for path in sorted(sweep_dir.glob(f"*/{REPORT}")):
        r = json.loads(path.read_text())
        ppl = r.get("perplexity") or {}
        out.append({
            "job": path.parent.name, "model": _model_name(r), "method": r["method"],
            "scope": f"n:{r['m']}" if r["scope"] == "nm" else r["scope"],  # N:M with M=4 reads n:4
            "selector": r["selector"],
            "mode": r.get("mode") or "-", "target_sparsity": r["target_sparsity"],
            "achieved_sparsity": round(r["achieved_sparsity"], 6), "perplexity": ppl.get("pruned"),
            "dense_perplexity": ppl.get("dense"),
            **{f"{p}_s": r["seconds"].get(p) for p in PHASES},
            "peak_rss_gib": r.get("peak_rss_gib"), "peak_gpu_gib": r.get("peak_gpu_gib"),
            "world_size": r["world_size"],
        })
    return sorted(out, key=lambda x: (x["model"], x["method"], x["scope"], x["mode"], x["target_sparsity"]))


def _model_name(report: dict) -> str:
    """The model's name in the config (a preset, or the checkpoint's directory name)."""
    return (report.get("config") or {}).get("model", {}).get("name") or Path(report["model"]).name


def _cell(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write(sweep_dir: Path) -> list[dict]:
    """summary.csv, summary.md and summary.png in sweep_dir; returns the rows."""
    table = rows(sweep_dir)
    if not table:
        raise FileNotFoundError(f"no {REPORT} under {sweep_dir}/*/")
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(table)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in table]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    if any(r["perplexity"] is not None for r in table):
        plot(table, sweep_dir / "summary.png")
    else:  # no perplexity to plot: no picture of an earlier table either
        (sweep_dir / "summary.png").unlink(missing_ok=True)
    return table


def plot(table: list[dict], path: Path) -> None:
    """Perplexity against sparsity: one line per combination of the settings that differ
    between jobs, the settings they share in the title, dense perplexity as a reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=150)
    title, groups = series(table)
    models = sorted({r["model"] for r in table})
    dash = dict(zip(models, ("-", "--", ":", "-."), strict=False))  # a line style per model, a colour per method
    colours = {m: f"C{i}" for i, m in enumerate(sorted({method for _, method, _ in groups}))}
    for (label, method, model), points in sorted(groups.items()):
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", label=label, color=colours[method], linestyle=dash.get(model, "-"))
    dense = {r["model"]: r["dense_perplexity"] for r in table if r["dense_perplexity"] is not None}
    for model, value in sorted(dense.items()):
        name = f"dense {model}" if len(models) > 1 else "dense"
        style = dash.get(model, "-") if len(models) > 1 else "--"
        ax.axhline(value, color="gray", linestyle=style, linewidth=1, label=f"{name} ({value:.2f})")
    ax.set_title(title, fontsize=10)
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_tick))
    # minor ticks: every one when the axis spans about a decade, else only 2x and 5x
    few = high / low < 12
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda v, _pos: _tick(v) if few or round(v / 10 ** math.floor(math.log10(v)), 6) in (2, 5) else ""))
    ax.set_xlabel("sparsity (fraction of decoder linear weights pruned)")
    ax.set_ylabel("perplexity (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # beside the data
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def series(table: list[dict]) -> tuple[str, dict[tuple[str, str, str], list[tuple[float, float]]]]:
    """The picture's title (the settings every job shares) and its lines: one per
    combination of the settings that differ between jobs, besides sparsity, keyed by
    (label, label without the model, model) and holding (sparsity, perplexity) points."""
    varying = [k for k in LINE_KEYS if len({_shown(r, k) for r in table} - {None}) > 1] or ["method"]
    groups: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for r in table:
        if r["perplexity"] is not None:
            label = ", ".join(v for k in varying if (v := _shown(r, k)) is not None)
            method = ", ".join(v for k in varying if k != "model" and (v := _shown(r, k)) is not None)
            groups.setdefault((label, method, r["model"]), []).append((r["target_sparsity"], r["perplexity"]))
    same = [v if k == "model" else f"{k} {v}" for k in LINE_KEYS if k not in varying
            for v in sorted({_shown(r, k) for r in table} - {None})]
    return ", ".join(same), groups


def _shown(row: dict, key: str) -> str | None:
    """What a line's label or the title shows of a setting: nothing for a method's mode
    that does not apply ("-") or for a selector that the scope or method implies (row and
    N:M use kthvalue; a solve, e.g. sparsegpt-layer, chooses its own mask)."""
    v = row[key]
    implied = row["scope"] not in ("global", "layer") or str(v).startswith(f"{row['method']}-")
    if v == "-" or (key == "selector" and implied):
        return None
    return str(v)


def _tick(v: float, _pos=None) -> str:
    """26.1, 300, 20,000: plain numbers, not 2.61x10^1 or 2e+04."""
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m distprune.summarize SWEEP_DIR")
    try:
        table = write(Path(sys.argv[1]))
    except FileNotFoundError as e:
        sys.exit(f"distprune.summarize: {e}")
    print(f"{len(table)} jobs: {sys.argv[1]}/summary.csv, summary.md" +
          (", summary.png" if any(r["perplexity"] is not None for r in table) else ""))


if __name__ == "__main__":
    main()
