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

LINE_KEYS = ("model", "method", "scope", "mode", "selector", "allocation", "normalize", "owl_m", "owl_lambda")
PHASES = ("load", "eval_dense", "zeroshot_dense", "statistics", "allocate", "score+select", "mask", "solve", "eval",
          "zeroshot", "save")
COLUMNS = ("job", "model", "method", "scope", "selector", "mode", "allocation", "normalize", "owl_m", "owl_lambda",
           "target_sparsity", "achieved_sparsity", "perplexity", "dense_perplexity", "mean_acc", "dense_mean_acc",
           *(f"{p}_s" for p in PHASES), "peak_rss_gib", "peak_gpu_gib", "world_size")


def rows(sweep_dir: Path) -> list[dict]:
    out = []
    for path in sorted(sweep_dir.glob(f"*/{REPORT}")):
        r = json.loads(path.read_text())
        ppl = r.get("perplexity") or {}
        zs = r.get("zeroshot") or {}
        out.append({
            "job": path.parent.name, "model": _model_name(r), "method": r["method"],
            "scope": f"n:{r['m']}" if r["scope"] == "nm" else r["scope"],  # N:M with M=4 reads n:4
            "selector": r["selector"],
            "mode": r.get("mode") or "-",
            "allocation": "-" if r["scope"] == "global" else r.get("allocation", "uniform"),  # one threshold decides
            "normalize": r.get("normalize", "none"),
            "owl_m": r.get("owl_m"), "owl_lambda": r.get("owl_lambda"),
            "target_sparsity": r["target_sparsity"],
            "achieved_sparsity": round(r["achieved_sparsity"], 6), "perplexity": ppl.get("pruned"),
            "dense_perplexity": ppl.get("dense"),
            "mean_acc": zs.get("mean_acc", {}).get("pruned"), "dense_mean_acc": zs.get("mean_acc", {}).get("dense"),
            **{f"{p}_s": r["seconds"].get(p) for p in PHASES},
            "peak_rss_gib": r.get("peak_rss_gib"), "peak_gpu_gib": r.get("peak_gpu_gib"),
            "world_size": r["world_size"],
            **{f"{task}_{m}": v for task, got in zs.get("pruned", {}).items() for m, v in got.items()},
        })
    return sorted(out, key=lambda x: (x["model"], x["method"], x["scope"], x["mode"], x["allocation"], x["normalize"],
                                      x["owl_m"] or 0, x["owl_lambda"] or 0, x["target_sparsity"]))


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
    # the zero-shot tasks' accuracies of the pruned model (TASK_acc, TASK_acc_norm) after the fixed columns
    columns = [*COLUMNS, *sorted({k for r in table for k in r} - set(COLUMNS))]
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, restval="")
        w.writeheader()
        w.writerows(table)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in table]
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
    x = x_axis(table)
    title, groups = series(table, x)
    models = sorted({r["model"] for r in table})
    dash = dict(zip(models, ("-", "--", ":", "-."), strict=False))  # a line style per model, a colour per method
    colours = {m: f"C{i}" for i, m in enumerate(sorted({method for _, method, _ in groups}))}
    level = iter(("-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1))) * 8)
    for (label, method, model), points in sorted(groups.items()):
        xs, ys = zip(*sorted(points, key=lambda p: (p[0] is None, p)), strict=True)
        if xs[0] is None:  # a job without the swept x (e.g. a uniform job among owl_lambda values): a level
            ax.axhline(ys[0], color=colours[method], linestyle=next(level), linewidth=1.2,
                       label=f"{label} ({ys[0]:.4g})")
        else:
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
    ax.set_xlabel("sparsity (fraction of decoder linear weights pruned)" if x == "target_sparsity" else
                  "owl_lambda (block sparsities spread over sparsity +- owl_lambda)")
    ax.set_ylabel("perplexity (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # beside the data
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def x_axis(table: list[dict]) -> str:
    """Sparsity along the x axis; owl_lambda when every job has the same sparsity and the
    jobs sweep owl_lambda."""
    one = len({r["target_sparsity"] for r in table}) == 1
    return "owl_lambda" if one and len({r.get("owl_lambda") for r in table} - {None}) > 1 else "target_sparsity"


def series(table: list[dict], x: str = "target_sparsity") -> tuple[str, dict[tuple[str, str, str], list[tuple]]]:
    """The picture's title (the settings every job shares) and its lines: one per
    combination of the settings that differ between jobs, besides the x axis' key, keyed by
    (label, label without the model, model) and holding (x, perplexity) points; x is None
    for a job without that key (drawn as a level)."""
    varying = [k for k in LINE_KEYS if k != x and len({_shown(r, k) for r in table} - {None}) > 1] or ["method"]
    groups: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for r in table:
        if r["perplexity"] is not None:
            label = ", ".join(v for k in varying if (v := _shown(r, k)) is not None)
            method = ", ".join(v for k in varying if k != "model" and (v := _shown(r, k)) is not None)
            groups.setdefault((label or method, method, r["model"]), []).append((r[x], r["perplexity"]))
    same = [v if k in ("model", "normalize", "owl_m", "owl_lambda") else f"{k} {v}" for k in LINE_KEYS
            if k not in varying and k != x for v in sorted({_shown(r, k) for r in table} - {None})]
    return ", ".join(same), groups


def _shown(row: dict, key: str) -> str | None:
    """What a line's label or the title shows of a setting: nothing for a method's mode
    that does not apply ("-") or for a selector that the scope or method implies (row and
    N:M use kthvalue; a solve, e.g. sparsegpt-layer, chooses its own mask), for normalize
    where nothing global reads it, for owl's settings of another allocation."""
    v = row.get(key)
    if v is None:
        return None
    if key == "normalize":
        return f"normalize {v}" if "global" in (row["scope"], row.get("allocation")) else None
    if key in ("owl_m", "owl_lambda"):
        return f"{'M' if key == 'owl_m' else 'lambda'} {v:g}"
    if key == "allocation" and row["scope"] in ("global", "nm"):
        return None
    implied = row["scope"] not in ("global", "layer") or str(v).startswith(f"{row['method']}-")
    if v == "-" or (key == "selector" and implied):
        return None
    return str(v)


def plot_allocation(report: dict, path: Path) -> None:
    """Target sparsity of every layer of one job: decoder blocks along the x axis, one line
    per layer type (the layer's name after its block index, e.g. mlp.down_proj)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    lines: dict[str, list[tuple[int, float]]] = {}
    for r in report["layers"]:
        parts = r["name"].split(".")
        kind = ".".join(parts[parts.index(str(r["block"])) + 1:]) if str(r["block"]) in parts else r["name"]
        lines.setdefault(kind, []).append((r["block"], r["target"] / r["numel"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=150)
    for kind, points in lines.items():
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker=".", label=kind)
    ax.axhline(report["target_sparsity"], color="gray", linestyle="--", linewidth=1,
               label=f"model {report['target_sparsity']:g}")
    how = "" if report["scope"] == "global" else f", allocation {report['allocation']}"
    if report["allocation"] == "owl":
        how += f" (M {report['owl_m']:g}, lambda {report['owl_lambda']:g})"
    if report["normalize"] != "none":
        how += f", normalize {report['normalize']}"
    ax.set_title(f"{_model_name(report)}, {report['method']} {report['scope']}{how}", fontsize=10)
    ax.set_xlabel("decoder block")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("target sparsity of the layer")
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


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
