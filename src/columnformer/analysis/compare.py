"""`columnformer compare RUN_A RUN_B ...`: a side-by-side table of what the runs learned.

Runs without a current ``analysis.json`` (missing, or made from another checkpoint file, split or checkpoint choice) are analysed first.
"""

from __future__ import annotations

from pathlib import Path

COLUMNS = (
    ("run", None),
    ("test acc", ("headline", "test_acc")),
    ("params", ("headline", "num_params")),
    ("λ wiring", ("model", "wiring_lambda")),
    ("weights", None),
    ("geometry", ("model", "geometry", "name")),
    ("conn", ("model", "connectivity")),
    ("wiring Σ A·d", ("headline", "wiring_length")),
    ("init Σ A·d", ("headline", "init_wiring_length")),
    ("locality", ("headline", "locality")),
    ("smoothness", ("headline", "smoothness")),
    ("shuffled", ("headline", "smoothness_shuffled")),
    ("w-smooth", ("headline", "weight_smoothness")),
    ("modularity", ("headline", "modularity")),
    ("σ small-world", ("headline", "small_world_sigma")),
    ("feed-fwd", ("headline", "flow_feedforward")),
    ("feedback", ("headline", "flow_feedback")),
)


def load_or_analyze(run_dir: str | Path, analyze_opts=None) -> dict:
    """The run's analysis for ``analyze_opts`` (split, checkpoint): analysis.json when it is current, else made anew."""
    from .analyze import current_analysis

    return current_analysis(run_dir, analyze_opts, quiet=True)


def _get(d, path):
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def compare_rows(analyses: list[dict]) -> list[dict]:
    rows = []
    for a in analyses:
        row = {}
        for name, path in COLUMNS:
            if name == "run":
                row[name] = a.get("name") or Path(a["run"]).name
            elif name == "weights":
                row[name] = "untied" if a["model"].get("untied") else "tied"
            else:
                row[name] = _get(a, path)
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    def fmt(v):
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, int) and abs(v) >= 10_000:
            return f"{v:,}"
        return str(v)

    names = [c for c, _ in COLUMNS if any(r.get(c) is not None for r in rows)]
    cells = [[fmt(r.get(c)) for c in names] for r in rows]
    widths = [max(len(n), *(len(row[i]) for row in cells)) for i, n in enumerate(names)]
    line = lambda vals: "  ".join(v.ljust(w) if i < 1 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731
    out = [line(names), line(["-" * w for w in widths])]
    out.extend(line(c) for c in cells)
    return "\n".join(out)


def compare(run_dirs: list[str | Path], analyze_opts=None) -> str:
    return format_table(compare_rows([load_or_analyze(r, analyze_opts) for r in run_dirs]))
