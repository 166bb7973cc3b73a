"""Render benchmarks/results/*.jsonl into README.md's "Performance" section (never typed by hand).

Each results file is JSON lines; a line with `"machine"` describes where and how it ran (host facts and the
command), the other lines are rows. Every file becomes a table of its rows (columns: the union of keys in
first-seen order, long lists dropped; a table per `bench` when its rows name several) plus its PNG if one sits beside it. The section between
`<!-- performance:begin -->` and `<!-- performance:end -->` in README.md is replaced; run `make bench` (or
this script alone after a benchmark) to refresh it.

    python benchmarks/report.py [--results benchmarks/results] [--readme README.md] [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BEGIN, END = "<!-- performance:begin -->", "<!-- performance:end -->"
MAX_ROWS = 40


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, (list, dict)):
        return "..."
    return "" if value is None else str(value)


def render_file(path: Path, readme_dir: Path) -> str:
    machine, rows = None, []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)
        if "machine" in obj:
            machine = obj
        else:
            rows.append(obj)
    out = [f"### {path.stem}", ""]
    if machine:
        m = machine["machine"]
        facts = ", ".join(f"{k} {v}" for k, v in (m.items() if isinstance(m, dict) else [("host", m)]))
        out.append(f"Machine: {facts}. Command: `{machine.get('command', '?')}`.")
        out.append("")
    if any(r.get("row") == "summary" for r in rows):  # per-sample time series: the table shows the summaries
        total = len(rows)
        rows = [r for r in rows if r.get("row") == "summary"]
        out.append(f"Summary rows only; {total - len(rows)} samples over time are in the JSON lines and the plot.")
        out.append("")
    groups: dict[str, list[dict]] = {}  # a file whose rows name several kinds of measurement (`bench`) gets a table per kind
    for row in rows:
        groups.setdefault(row.get("bench", ""), []).append(row)
    for kind, group in groups.items():
        if len(groups) > 1:
            out += ([""] if out[-1] else []) + [f"#### {kind or 'other'}", ""]
            group = [{k: v for k, v in r.items() if k != "bench"} for r in group]  # the heading says it
        out += _table(group, path, readme_dir)
    png = path.with_suffix(".png")
    if png.exists():
        out += ["", f"![{path.stem}]({png.relative_to(readme_dir).as_posix()})"]
    return "\n".join(out) + "\n"


def _table(rows: list[dict], path: Path, readme_dir: Path) -> list[str]:
    """Rows as a markdown table: columns the union of keys in first-seen order; one value in every row is said once."""
    out: list[str] = []
    cols: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key not in cols and not isinstance(value, (list, dict)):
                cols.append(key)
    # a column with one value in every row is a fact of the run, not a result: say it once above the table
    constant = [c for c in cols if len(rows) > 1 and all(c in r for r in rows)
                and len({json.dumps(r[c]) for r in rows}) == 1]
    if constant:
        out.append("In every row: " + ", ".join(f"{c} {_fmt(rows[0][c])}" for c in constant) + ".")
        out.append("")
    cols = [c for c in cols if c not in constant]
    if rows:
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" * len(cols))
        for row in rows[:MAX_ROWS]:
            out.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
        if len(rows) > MAX_ROWS:
            out.append(f"\n({len(rows) - MAX_ROWS} more rows in `{path.relative_to(readme_dir)}`)")
    return out


def render(results: Path, readme_dir: Path) -> str:
    files = sorted(results.glob("*.jsonl"))
    if not files:
        return "No results yet: run `make bench`.\n"
    return "\n".join(render_file(f, readme_dir) for f in files)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="benchmarks/results")
    parser.add_argument("--readme", default="README.md")
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is not up to date")
    args = parser.parse_args(argv)
    readme = Path(args.readme)
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"{readme} has no {BEGIN} ... {END} markers", file=sys.stderr)
        return 2
    body = render(Path(args.results).resolve(), readme.resolve().parent)
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{body}{END}{tail}"
    if args.check:
        return 0 if new == text else 1
    readme.write_text(new)
    print(f"wrote the performance section of {readme} from {len(list(Path(args.results).glob('*.jsonl')))} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
