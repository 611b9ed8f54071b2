"""Predictions on disk and the paper's tables.

Predictions are JSON Lines, one question a line, appended and flushed as each batch is decoded: a
crash loses at most the batch in flight, and a rerun skips every question already written (keyed by
`sample_id`, as given in the annotation file). Each rank appends to its own file; rank 0 merges.

Table 2 (SEED-Bench-R1): accuracy % on L1, L2, each L3 domain and L3 overall.
Table 3 (LongVideoBench): accuracy % by duration group, perception and relation, and overall; the raw
question categories follow as a second table. Every cell carries its 95% Wilson interval, and
`paired_comparison` sets runs on the same questions side by side with exact paired statistics.
"""
import glob
import json
import os

from sbr.common import UserError
from sbr.curves import read_metrics
from sbr.data import LVB_DURATION_GROUPS, LVB_LEVELS
from sbr.stats import clustered_difference, mcnemar_exact, paired_difference, paired_table, wilson

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


def prediction_files(out_dir: str, split: str, folder: str = "predictions") -> list[str]:
    return sorted(glob.glob(os.path.join(out_dir, folder, f"{split}.*.jsonl")))


class PredictionWriter:
    """Appends rows to `<out_dir>/<folder>/<split>.rank<r>.jsonl`, flushing each batch (folder: predictions,
    or attention for the attention records)."""
    def __init__(self, out_dir: str, split: str, rank: int, folder: str = "predictions"):
        os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
        path = os.path.join(out_dir, folder, f"{split}.rank{rank}.jsonl")
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
    """Accuracy % with its 95% Wilson interval (sbr/stats.py), counts."""
    n = len(rows)
    correct = sum(bool(r["correct"]) for r in rows)
    lo, hi = wilson(correct, n) if n else (None, None)
    return {"accuracy": 100.0 * correct / n if n else None, "correct": correct, "questions": n,
            "ci95": [100.0 * lo, 100.0 * hi] if n else None, "no_answer": sum(r["extracted"] is None for r in rows)}


def seedbench_cells(rows_by_level: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """{column: its rows} in Table 2's column order: L1, L2, each L3 domain, L3 overall."""
    l3 = rows_by_level.get("L3", [])
    cells = {"L1": rows_by_level.get("L1", []), "L2": rows_by_level.get("L2", [])}
    for domain in DOMAINS:
        cells[f"L3 {domain}"] = [r for r in l3 if r.get("domain") == domain]
    cells["L3 overall"] = l3
    return cells


def longvideobench_cells(rows: list[dict]) -> dict[str, list[dict]]:
    """Table 3 as published: the four duration groups, perception and relation (each record's `level`),
    then overall. Every column is always there ("-" when it has no question)."""
    cells = {name: [r for r in rows if r.get("duration_group") == group] for group, name in LVB_DURATION_GROUPS.items()}
    for level, name in LVB_LEVELS.items():
        cells[name] = [r for r in rows if r.get("level") == level]
    cells["overall"] = rows
    return cells


def category_cells(rows: list[dict]) -> dict[str, list[dict]]:
    """LongVideoBench's raw `question_category` breakdown (sorted codes), then overall."""
    cells = {c: [r for r in rows if r.get("question_category") == c]
             for c in sorted({str(r.get("question_category")) for r in rows})}
    cells["overall"] = rows
    return cells


def seedbench_table(rows_by_level: dict[str, list[dict]]) -> dict:
    """{column: {accuracy, correct, questions, ci95, no_answer}} in Table 2's column order."""
    return {c: _cell(rows) for c, rows in seedbench_cells(rows_by_level).items()}


def longvideobench_table(rows: list[dict]) -> dict:
    return {c: _cell(r) for c, r in longvideobench_cells(rows).items()}


def category_table(rows: list[dict]) -> dict:
    return {c: _cell(r) for c, r in category_cells(rows).items()}


def markdown_table(cols: list[str], rows: list[list[str]], first: str = "model") -> str:
    """A Markdown table: a `first` column then `cols`; each row its label, then its cells."""
    return "\n".join([f"| {first} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|",
                      *("| " + " | ".join(row) + " |" for row in rows)])


def _accuracy(cell: dict) -> str:
    return "-" if cell["accuracy"] is None else f"{cell['accuracy']:.2f}"


def markdown(table: dict, name: str) -> str:
    """One model's row with its 95% intervals, the question and no-answer counts beneath, as a Markdown
    table."""
    def interval(cell):
        return "-" if cell.get("ci95") is None else f"{cell['ci95'][0]:.1f}-{cell['ci95'][1]:.1f}"
    cols = list(table)
    return markdown_table(cols, [[name, *(_accuracy(table[c]) for c in cols)],
                                  ["95% interval (Wilson)", *(interval(table[c]) for c in cols)],
                                  ["questions", *(str(table[c]["questions"]) for c in cols)],
                                  ["no parsable answer", *(str(table[c]["no_answer"]) for c in cols)]])


# ---------------------------------------------------------------------------- comparisons and curves
def read_results(run_dir: str) -> dict:
    """An evaluation folder's results.json."""
    with open(os.path.join(run_dir, "results.json")) as f:
        return json.load(f)


def _results_table(run_dir: str) -> dict:
    return read_results(run_dir)["table"]


def _data(results: dict) -> dict:
    """The annotation files' sha256 by split that an evaluation's predictions were made on."""
    return ((results.get("provenance") or {}).get("identity") or {}).get("data", {})


def compare(run_dirs: list[str], names: list[str] | None = None) -> str:
    """Several evaluations' results.json side by side: one row a model, the paper's layout."""
    tables = [_results_table(d) for d in run_dirs]
    names = names or [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    cols = list(tables[0])
    rows = [[name, *(_accuracy(t[c]) for c in cols)] for name, t in zip(names, tables)]
    return markdown_table(cols, rows + [["questions", *(str(tables[-1][c]["questions"]) for c in cols)]])


def load_run(run_dir: str | list[str]) -> tuple[str, dict[str, list[dict]], dict]:
    """(benchmark, {column: rows}, annotation sha256 by split) of an evaluation folder, from its
    results.json and merged predictions_<split>.jsonl files. A list of folders (one a seed) is pooled:
    its rows are put together, each question keyed by its folder's place in the list."""
    if isinstance(run_dir, (list, tuple)):
        parts = [load_run(d) for d in run_dir]
        cells = {c: [{**r, "sample_id": f"{i}:{r['sample_id']}"} for i, (_, part, _) in enumerate(parts) for r in part[c]]
                 for c in parts[0][1]}
        return parts[0][0], cells, {f"{i}:{s}": h for i, (_, _, data) in enumerate(parts) for s, h in data.items()}
    path = os.path.join(run_dir, "results.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no results.json (run evaluate.py into {run_dir} first)")
    results = read_results(run_dir)
    rows = {}
    for pred in sorted(glob.glob(os.path.join(run_dir, "predictions_*.jsonl"))):
        split = os.path.basename(pred)[len("predictions_"):-len(".jsonl")]
        with open(pred, encoding="utf-8") as f:
            rows[split] = [json.loads(line) for line in f]
    benchmark = results["benchmark"]
    cells = longvideobench_cells(rows.get("longvideobench", [])) if benchmark == "longvideobench" else seedbench_cells(rows)
    return benchmark, cells, _data(results)


def seeds_table(runs: dict[str, list[str]]) -> str:
    """{method: its evaluation folders, one a seed} -> Table 2's layout as mean ± std (sample std) of the
    accuracy % over seeds, with the number of seeds."""
    rows, cols = [], None
    for method, dirs in runs.items():
        tables = [_results_table(d) for d in dirs]
        cols = cols or list(tables[0])
        cells = [mean_std([t[c]["accuracy"] for t in tables if t[c]["accuracy"] is not None]) for c in cols]
        rows.append([seeds_label(method, len(dirs)), *cells])
    return markdown_table(cols, rows)


def seed_results(runs: dict[str, list[str]]) -> dict[str, list[dict]]:
    """{method: its evaluation folders, one a seed} -> {method: their results.json}, each method checked
    against the first: as many seeds, and each seed on the same annotation files (seeds given out of
    order are an error, never a silent difference)."""
    results = {m: [read_results(d) for d in dirs] for m, dirs in runs.items()}
    (base_name, base_dirs), *others = runs.items()
    for name, dirs in others:
        if len(dirs) != len(base_dirs):
            raise ValueError(f"{name}: {len(dirs)} seeds, {base_name}: {len(base_dirs)}")
        for d, b_dir, t, b in zip(dirs, base_dirs, results[name], results[base_name]):
            if _data(t) != _data(b):
                raise ValueError(f"{d} and {b_dir}: not the same annotation files (seeds out of order?)")
    return results


def seed_differences(runs: dict[str, list[str]]) -> str:
    """{method: its evaluation folders, one a seed, the seeds in the same order for every method}, the
    first method the baseline -> for each other method and column, the accuracy difference seed by seed
    (points), its mean ± std and in how many seeds the method is ahead: the training run's noise, which
    the pooled paired test (questions' noise only) leaves out."""
    (base_name, base), *others = seed_results(runs).items()
    out = []
    for name, tables in others:
        rows = []
        for c in base[0]["table"]:
            pairs = [(t["table"][c]["accuracy"], b["table"][c]["accuracy"]) for t, b in zip(tables, base)]
            diffs = [x - y for x, y in pairs if x is not None and y is not None]
            rows.append([c, ", ".join(f"{x:+.1f}" for x in diffs) or "-", mean_std(diffs, "+"),
                         f"{sum(x > 0 for x in diffs)} of {len(diffs)}"])
        out += [f"### {name} - {base_name}, seed by seed (points)", "",
                markdown_table(["each seed", "mean ± std", "seeds ahead"], rows, first="column"), ""]
    return "\n".join(out)


def attention_seeds(runs: dict[str, list[str]], columns: tuple = ("L1", "L2", "L3 overall"),
                    measures: tuple = ("visual_of_prompt", "video", "evenness", "coverage")) -> str:
    """{method: its evaluation folders made with --attention true, one a seed, the seeds in the same
    order for every method (checked: seed_results)} -> where the reasoning looks (sbr/attention.py's measures, x 100) as mean ±
    std over seeds of each seed's mean, then each method minus the first, seed by seed: mean ± std of
    the differences and in how many seeds it is higher. "" when a folder has no attention table."""
    results = seed_results(runs)
    if not all("attention" in r for rs in results.values() for r in rs):
        return ""
    def value(r, col, measure):
        v = r["attention"].get(col, {}).get(measure)
        return None if v is None else 100 * v[0]
    def rows(cell, methods):
        return [[f"{method}, {measure}", *(cell(method, col, measure) for col in columns)]
                for method in methods for measure in measures]
    def means(method, col, measure):
        return mean_std([v for r in results[method] if (v := value(r, col, measure)) is not None])
    (base, base_results), *others = results.items()
    def diffs(method, col, measure):
        pairs = [(value(r, col, measure), value(b, col, measure)) for r, b in zip(results[method], base_results)]
        d = [x - y for x, y in pairs if x is not None and y is not None]
        return f"{mean_std(d, '+')} ({sum(x > 0 for x in d)} of {len(d)} higher)"
    table = markdown_table(list(columns), rows(means, results), first="model, measure (x 100)")
    by_seed = markdown_table(list(columns), rows(diffs, [m for m, _ in others]), first=f"model - {base}, measure (x 100)")
    return f"{table}\n\n{by_seed}"


def seeds_label(method: str, n: int) -> str:
    return f"{method} ({n} seed{'' if n == 1 else 's'})"


def mean_std(xs: list[float], sign: str = "") -> str:
    """"mean ± sample std" to one decimal ("-" for no values; the mean alone for one: a single seed has
    no spread to show); sign "+" shows the mean's."""
    if not xs:
        return "-"
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{mean:{sign}.1f}"
    std = (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return f"{mean:{sign}.1f} ± {std:.1f}"


class CompareError(UserError, ValueError):
    """Runs that cannot be compared as given; the message says how they can be."""


def paired_comparison(run_dirs: list, names: list[str] | None = None, alpha: float = 0.05,
                      common: bool = False) -> str:
    """Every run against the first on the same questions, column by column: both accuracies, the
    difference (run - first) in points with its 95% interval (Newcombe's paired method 10) and the exact
    McNemar p-value; * marks p < alpha (each cell tested on its own, no multiplicity correction).
    Runs must have answered the same questions of the same annotation files; `common`: each column
    compares the questions both answered (their count is in the table), e.g. a run made with --limit. A run given as a list of
    folders (one a seed) is pooled: its (seed, question) pairs are kept together by question, each question
    resampled or sign-flipped whole (sbr.stats.clustered_difference), so the test reflects the questions'
    noise, not how much the methods vary from seed to seed (the mean ± std table shows that)."""
    names = names or [os.path.basename(os.path.normpath(d if isinstance(d, str) else d[0])) for d in run_dirs]
    runs = [load_run(d) for d in run_dirs]
    bench, base, base_data = runs[0]
    out = []
    for name, run_dir, (benchmark, cells, data) in zip(names[1:], run_dirs[1:], runs[1:]):
        if benchmark != bench:
            raise CompareError(f"{run_dir}: benchmark {benchmark}, but {run_dirs[0]} is {bench}: compare runs of one benchmark")
        changed = sorted(s for s in set(data) & set(base_data) if data[s] != base_data[s])
        if changed:
            raise CompareError(f"{run_dir}: other annotation files than {run_dirs[0]} for {', '.join(changed)} (their "
                               "sha256 in provenance.json differ): the same question id may be another question; "
                               "evaluate both on the same files")
        pooled = isinstance(run_dir, (list, tuple)) or isinstance(run_dirs[0], (list, tuple))
        test = "p (sign-flip over questions)" if pooled else "p (McNemar)"
        out += [f"### {name} vs {names[0]} (difference = {name} - {names[0]}, points)", "",
                "| column | " + ("seeds x questions" if pooled else "questions") + " | " + names[0] + " | " + name
                + f" | difference | 95% interval | {test} |", "|---|---|---|---|---|---|---|"]
        for column, rows in base.items():
            first = {key(r["sample_id"]): bool(r["correct"]) for r in rows}
            other = {key(r["sample_id"]): bool(r["correct"]) for r in cells[column]}
            if first.keys() != other.keys() and not common:
                raise CompareError(f"{column}: not the same questions ({len(first.keys() - other.keys())} only in "
                                   f"{run_dirs[0]}, {len(other.keys() - first.keys())} only in {run_dir}): compare "
                                   "on the common questions with --compare_common true, or evaluate both on the same "
                                   "questions (the same --limit and --levels)")
            shared = [k for k in first if k in other]           # the files' order: a set's would change the
            first, other = {k: first[k] for k in shared}, {k: other[k] for k in shared}   # bootstrap run to run
            if not first:
                out.append(f"| {column} | 0 | - | - | - | - | - |")
                continue
            a, b, c, d = paired_table(other, first)             # b: only the run right, c: only the first
            if pooled:                                          # keys "seed:question": each question whole
                by_question = {}
                for k in first:
                    by_question.setdefault(k.split(":", 1)[1], []).append((other[k], first[k]))
                theta, lo, hi, p = clustered_difference(by_question)
            else:
                theta, lo, hi = paired_difference(a, b, c, d)
                p = mcnemar_exact(b, c)
            n = len(first)
            out.append(f"| {column} | {n} | {100 * (a + c) / n:.2f} | {100 * (a + b) / n:.2f} | "
                       f"{100 * theta:+.2f}{' *' if p < alpha else ''} | {100 * lo:+.2f} to {100 * hi:+.2f} | {p:.3g} |")
        out.append("")
    pooled = any(isinstance(d, (list, tuple)) for d in run_dirs)
    if pooled:
        out.append(f"* p < {alpha} (per cell). Runs pooled over seeds: every question counts once with all its "
                   "seeds (sbr.stats.clustered_difference): the interval is a paired bootstrap over questions, "
                   "p a sign-flip test over questions; they measure the questions' noise for these trained "
                   "models, not the seeds' (the seed-by-seed table does).")
    else:
        out.append(f"* p < {alpha} (exact McNemar, per cell). Intervals: Newcombe (1998) method 10 for paired "
                   "proportions, with its continuity correction. Only questions one run got right and the "
                   "other wrong move either.")
    return "\n".join(out)


def training_summary(run_dir: str, parts: int = 10) -> str | None:
    """One line on a training run from `<run_dir>/metrics.jsonl`: its reward (GRPO) or loss (SFT), the
    mean over each of `parts` equal runs of logged steps (a remainder of fewer goes into the last), and
    where its curves are. None without a log."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = read_metrics(path) if os.path.exists(path) else []
    if not rows:
        return None
    metric = "reward" if "reward" in rows[0] else "loss"
    k = max(1, len(rows) // parts)
    groups = [rows[i:i + k] for i in range(0, len(rows), k)]
    if len(groups) > 1 and len(groups[-1]) < k:
        groups[-2:] = [groups[-2] + groups[-1]]
    means = " ".join(f"{sum(r[metric] for r in g) / len(g):.2f}" for g in groups)
    return (f"{run_dir}: training {metric}, the mean of each {k} logged step{'s' * (k > 1)} "
            f"(steps {rows[0]['step']} to {rows[-1]['step']}): {means}; "
            f"curves: tensorboard --logdir {os.path.join(run_dir, 'tb')}")


if __name__ == "__main__":
    import sys
    print(compare(sys.argv[1:]))
