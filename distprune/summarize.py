"""`python -m distprune.summarize SWEEP_DIR`: one table and one picture from the job reports
under a sweep directory (every SWEEP_DIR/*/distprune_report.json), so an interrupted sweep
still gets a summary of the jobs that finished."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from distprune.checkpoint import REPORT

PHASES = ("load", "eval_dense", "statistics", "score+select", "mask", "eval", "save")
COLUMNS = ("job", "method", "scope", "selector", "mode", "target_sparsity", "achieved_sparsity", "perplexity",
           "dense_perplexity", *(f"{p}_s" for p in PHASES), "peak_rss_gib", "peak_gpu_gib", "world_size")


def rows(sweep_dir: Path) -> list[dict]:
    out = []
    for path in sorted(sweep_dir.glob(f"*/{REPORT}")):
        r = json.loads(path.read_text())
        ppl = r.get("perplexity") or {}
        out.append({
            "job": path.parent.name, "method": r["method"], "scope": r["scope"], "selector": r["selector"],
            "mode": r.get("mode") or "-", "target_sparsity": r["target_sparsity"],
            "achieved_sparsity": round(r["achieved_sparsity"], 6), "perplexity": ppl.get("pruned"),
            "dense_perplexity": ppl.get("dense"),
            **{f"{p}_s": r["seconds"].get(p) for p in PHASES},
            "peak_rss_gib": r.get("peak_rss_gib"), "peak_gpu_gib": r.get("peak_gpu_gib"),
            "world_size": r["world_size"],
        })
    return sorted(out, key=lambda x: (x["method"], x["scope"], x["target_sparsity"]))


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
    return table


def plot(table: list[dict], path: Path) -> None:
    """Perplexity against sparsity, one line per method and scope, dense as a reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=150)
    groups: dict[str, list[tuple[float, float]]] = {}
    for r in table:
        if r["perplexity"] is not None:
            groups.setdefault(f"{r['method']}, {r['scope']}", []).append((r["target_sparsity"], r["perplexity"]))
    for label, points in sorted(groups.items()):
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", label=label)
    dense = [r["dense_perplexity"] for r in table if r["dense_perplexity"] is not None]
    if dense:
        ax.axhline(dense[0], color="gray", linestyle="--", linewidth=1, label=f"dense ({dense[0]:.2f})")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:.4g}")  # 26.1, not 2.61x10^1
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("sparsity (fraction of decoder linear weights pruned)")
    ax.set_ylabel("perplexity (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
