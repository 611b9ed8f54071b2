"""Training curves from runs' metrics.jsonl, like the paper's Figure 3 (accuracy reward and completion
length against the step), several runs and seeds on one figure:

    python -m sbr.curves runs/grpo runs/sft --out figure3.png
    python -m sbr.curves GRPO=runs/s0/grpo,runs/s1/grpo GRPO-CARE=runs/s0/care,runs/s1/care --smooth 10 \\
        --panels accuracy completion_length kl entropy --evals runs/eval/grpo runs/eval/care

A run is a folder or `label=folder,folder,...` (one a seed, one colour a run). Each panel draws every
seed's logged values as faint points and their trailing mean over `--smooth` steps as a line; its axes
say what and in which units; the legend names each run and its seeds. Panels of one quantity compare
methods, so they share one y-range whatever the run (`plot(..., sharey=...)` groups others). `--evals`
adds the evaluation accuracy (L1 %, and L3 overall % dashed) of evaluated exports, at their run's last
step. Needs matplotlib (the `plot` extra).
"""
import argparse
import json
import os

PANELS = {   # name: (metric keys tried in order, y label)
    "accuracy": (("rewards/accuracy", "reward"), "accuracy reward (mean over completions)"),
    "completion_length": (("completion_length",), "completion length (tokens)"),
    "kl": (("kl",), "KL to π_ref (nats a token)"),
    "entropy": (("entropy",), "entropy (nats a token)"),
    "reward": (("reward",), "reward (mean over completions)"),
    "loss": (("loss",), "loss"),
    "bonus_rate": (("care/bonus_rate",), "GRPO-CARE bonus rate (fraction of completions)"),
}


def trailing_mean(ys: list[float], k: int) -> list[float]:
    """y'_i = mean(y_max(0, i-k+1) .. y_i): each value with the k - 1 before it (fewer at the start)."""
    return [sum(ys[max(0, i + 1 - k):i + 1]) / min(i + 1, k) for i in range(len(ys))]


def read_metrics(path: str) -> list[dict]:
    """A run's metrics.jsonl rows; a torn last line (a killed run) is passed over."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:                       # a torn last line of a killed run
                pass
    return rows


def parse_run(spec: str) -> tuple[str, list[str]]:
    """"label=a,b" -> (label, [a, b]); a bare folder is its own label."""
    label, _, folders = spec.rpartition("=")
    folders = folders.split(",")
    return label or os.path.basename(os.path.normpath(folders[0])), folders


def plot(runs: dict[str, list[str]], panels: list[str], out_png: str, *, smooth: int = 1, evals: list[str] = (),
         sharey: list[list[str]] = (), titles: dict[str, str] | None = None) -> list | None:
    """runs {label: run folders, one a seed}; panels: names of PANELS, or "name:label" to draw that panel
    for one run only (the repro scripts' per-method panels); sharey: groups of panel names that share a
    y-range (a panel name repeated for several runs always does). Returns each panel's y-range, or None
    without matplotlib (nothing drawn)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    data = {label: [(f, read_metrics(os.path.join(f, "metrics.jsonl"))) for f in folders] for label, folders in runs.items()}
    colours = {label: f"C{i}" for i, label in enumerate(runs)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        name, _, only = panel.partition(":")
        keys, ylabel = PANELS[name]
        for label, seeds in data.items():
            if only and label != only:
                continue
            for i, (folder, rows) in enumerate(seeds):
                key = next((k for k in keys if rows and k in rows[0]), None)
                if key is None:
                    continue
                steps, ys = [r["step"] for r in rows], [r[key] for r in rows]
                ax.scatter(steps, ys, s=5, color=colours[label], alpha=0.35, linewidths=0)
                ax.plot(steps, trailing_mean(ys, smooth), lw=1.2, color=colours[label],
                        label=f"{label} ({len(seeds)} seed{'s' * (len(seeds) > 1)})" if i == 0 else None)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title((titles or {}).get(panel, ylabel.split(" (")[0] + (f": {only}" if only else "")), fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    names = [p.partition(":")[0] for p in panels]
    groups = [[i for i, n in enumerate(names) if n == name] for name in dict.fromkeys(names)]
    groups += [[i for i, n in enumerate(names) if n in g] for g in sharey]
    for group in groups:                                # one y-range for panels that compare
        if len(group) > 1:
            lows, highs = zip(*(axes[0][i].get_ylim() for i in group))
            for i in group:
                axes[0][i].set_ylim(min(lows), max(highs))
    fig.tight_layout()
    if evals:                                            # beside the panels, after the layout
        _evaluations(fig, runs, data, evals, colours)
    os.makedirs(os.path.dirname(out_png) or ".", exist_ok=True)
    fig.savefig(out_png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return [axes[0][i].get_ylim() for i in range(len(panels))]


def _evaluations(fig, runs, data, evals, colours):
    """A panel of evaluation accuracy: each evaluated export at its training run's last step."""
    ax = fig.add_axes([1.0, 0.15, 0.22, 0.7])
    for folder in evals:
        with open(os.path.join(folder, "results.json"), encoding="utf-8") as f:
            results = json.load(f)
        model = os.path.normpath(results.get("config", {}).get("model", ""))
        run = os.path.dirname(model) if os.path.basename(model) == "export" else None
        for label, seeds in data.items():
            for run_dir, rows in seeds:
                if run and rows and os.path.normpath(run_dir) == os.path.normpath(run):
                    table = results["table"]
                    for column, style in (("L1", "o"), ("L3 overall", "s")):
                        if table.get(column, {}).get("accuracy") is not None:
                            ax.plot(rows[-1]["step"], table[column]["accuracy"], style, color=colours[label],
                                    fillstyle="full" if style == "o" else "none")
    ax.set_xlabel("training step")
    ax.set_ylabel("evaluation accuracy % (o L1, □ L3 overall)")
    ax.grid(alpha=0.3)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders, or label=folder,folder (one a seed)")
    p.add_argument("--out", default="figure3.png")
    p.add_argument("--panels", nargs="+", default=["accuracy", "completion_length"], choices=sorted(PANELS))
    p.add_argument("--smooth", type=int, default=10)
    p.add_argument("--evals", nargs="*", default=[], help="evaluation folders of these runs' exports")
    args = p.parse_args(argv)
    runs = dict(parse_run(s) for s in args.runs)
    missing = [os.path.join(f, "metrics.jsonl") for fs in runs.values() for f in fs
               if not os.path.exists(os.path.join(f, "metrics.jsonl"))]
    missing += [os.path.join(e, "results.json") for e in args.evals if not os.path.exists(os.path.join(e, "results.json"))]
    if missing:
        raise SystemExit(f"error: no such file: {', '.join(missing)} (a training run's folder holds metrics.jsonl, "
                         "an evaluation's results.json)")
    if plot(runs, args.panels, args.out, smooth=args.smooth, evals=args.evals) is None:
        raise SystemExit('error: drawing needs matplotlib: pip install -e ".[plot]"')
    print(args.out)


if __name__ == "__main__":
    main()
