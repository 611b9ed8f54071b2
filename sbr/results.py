"""Predictions on disk and the paper's tables.

Predictions are JSON Lines, one question a line, appended and flushed as each batch is decoded: a
crash loses at most the batch in flight, and a rerun skips every question already written (keyed by
`sample_id`, as given in the annotation file). Each rank appends to its own file; rank 0 merges.

Table 2 (SEED-Bench-R1): accuracy % on L1, L2, each L3 domain and L3 overall.
Table 3 (LongVideoBench): accuracy % by duration group, perception and relation, and overall; the raw
question categories follow as a second table.
"""
import glob
import json
import os

from sbr.data import LVB_DURATION_GROUPS, LVB_LEVELS

DOMAINS = ["Daily life", "Hobbies", "Recreation", "Work"]


def key(sample_id) -> str:
    """A resumable key that keeps 1 and "1" apart."""
    return json.dumps(sample_id)


def read_predictions(paths: list[str]) -> tuple[dict, int]:
    """Rows of these files by key (a later duplicate wins), and how many torn lines were passed over
    (a line cut short by a crash: it is recomputed)."""
    rows, torn = {}, 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    rows[key(row["sample_id"])] = row
                except (json.JSONDecodeError, KeyError, TypeError):
                    torn += 1
    return rows, torn


def prediction_files(out_dir: str, split: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out_dir, "predictions", f"{split}.*.jsonl")))


class PredictionWriter:
    """Appends rows to `<out_dir>/predictions/<split>.rank<r>.jsonl`, flushing each batch."""
    def __init__(self, out_dir: str, split: str, rank: int):
        os.makedirs(os.path.join(out_dir, "predictions"), exist_ok=True)
        path = os.path.join(out_dir, "predictions", f"{split}.rank{rank}.jsonl")
        self.file = open(path, "a", encoding="utf-8")
        if self.file.tell() and not _ends_with_newline(path):
            self.file.write("\n")   # a torn last line stays a line of its own, and is passed over

    def write(self, rows: list[dict]) -> None:
        self.file.writelines(json.dumps(row) + "\n" for row in rows)
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.file.close()


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


# ---------------------------------------------------------------------------- tables
def _cell(rows: list[dict]) -> dict:
    n = len(rows)
    correct = sum(bool(r["correct"]) for r in rows)
    return {"accuracy": 100.0 * correct / n if n else None, "correct": correct, "questions": n,
            "no_answer": sum(r["extracted"] is None for r in rows)}


def seedbench_table(rows_by_level: dict[str, list[dict]]) -> dict:
    """{column: {accuracy, correct, questions, no_answer}} in Table 2's column order."""
    l3 = rows_by_level.get("L3", [])
    table = {"L1": _cell(rows_by_level.get("L1", [])), "L2": _cell(rows_by_level.get("L2", []))}
    for domain in DOMAINS:
        table[f"L3 {domain}"] = _cell([r for r in l3 if r.get("domain") == domain])
    table["L3 overall"] = _cell(l3)
    return table


def longvideobench_table(rows: list[dict]) -> dict:
    """Table 3 as published: the four duration groups, perception and relation (each record's `level`),
    then overall. Every column is always there ("-" when it has no question)."""
    table = {name: _cell([r for r in rows if r.get("duration_group") == group]) for group, name in LVB_DURATION_GROUPS.items()}
    for level, name in LVB_LEVELS.items():
        table[name] = _cell([r for r in rows if r.get("level") == level])
    table["overall"] = _cell(rows)
    return table


def category_table(rows: list[dict]) -> dict:
    """LongVideoBench's raw `question_category` breakdown (sorted codes), then overall."""
    table = {c: _cell([r for r in rows if r.get("question_category") == c])
             for c in sorted({str(r.get("question_category")) for r in rows})}
    table["overall"] = _cell(rows)
    return table


def markdown(table: dict, name: str) -> str:
    """One model's row with the question and no-answer counts beneath, as a Markdown table."""
    def fmt(cell):
        return "-" if cell["accuracy"] is None else f"{cell['accuracy']:.2f}"
    cols = list(table)
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|",
             f"| {name} | " + " | ".join(fmt(table[c]) for c in cols) + " |",
             "| questions | " + " | ".join(str(table[c]["questions"]) for c in cols) + " |",
             "| no parsable answer | " + " | ".join(str(table[c]["no_answer"]) for c in cols) + " |"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- comparisons and curves
def compare(run_dirs: list[str], names: list[str] | None = None) -> str:
    """Several evaluations' results.json side by side: one row a model, the paper's layout."""
    rows, cols = [], None
    for i, d in enumerate(run_dirs):
        with open(os.path.join(d, "results.json")) as f:
            table = json.load(f)["table"]
        cols = cols or list(table)
        name = names[i] if names else os.path.basename(os.path.normpath(d))
        rows.append(f"| {name} | " + " | ".join("-" if table[c]["accuracy"] is None else f"{table[c]['accuracy']:.2f}"
                                                 for c in cols) + " |")
    counts = "| questions | " + " | ".join(str(table[c]["questions"]) for c in cols) + " |"
    return "\n".join(["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|", *rows, counts])


def plot_curves(series: dict[str, tuple[str, str]], out_png: str) -> bool:
    """One panel a series: {title: (metrics.jsonl, metric key)}. Needs matplotlib (the `plot` extra);
    returns False, drawing nothing, without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.2))
    for ax, (title, (path, metric)) in zip(axes if len(series) > 1 else [axes], series.items()):
        rows = [json.loads(line) for line in open(path)]
        ax.plot([r["step"] for r in rows], [r[metric] for r in rows], lw=1)
        ax.set_title(title), ax.set_xlabel("step"), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    return True


if __name__ == "__main__":
    import sys
    print(compare(sys.argv[1:]))
