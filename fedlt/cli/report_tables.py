"""The tables of ``fedlt report``: markdown and LaTeX (booktabs) from the summary's per-cell statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Table:
    """The formatted report table: header, rows of (label, cells) and the bold marks. A cell is ``(value, n)``:
    ``mean ± std`` (only the mean for a single run) and the number of runs it aggregates."""

    corner: str
    header: list[str]
    body: list[tuple[str, list[tuple[str, int] | None], list[bool]]]
    note: str


def cell_value(mean: float, std: float, n: int, scale: float = 1.0) -> str:
    """``mean ± std`` with two decimals; a single run has no spread to show, only its value."""
    return f"{mean * scale:.2f}" if n == 1 else f"{mean * scale:.2f} ± {std * scale:.2f}"


def build_table(summary: dict[str, Any]) -> Table:
    """Formats ``summary`` (see :func:`summarize`): ``mean ± std`` and n per cell, best per column marked bold."""
    scale = 100.0 if summary["percent"] else 1.0
    labels, cells = summary["columns"], summary["cells"]
    body = []
    for row in summary["rows"]:
        texts: list[tuple[str, int] | None] = []
        bold = []
        for col in labels:
            c = cells.get(row, {}).get(col)
            texts.append(None if c is None else (cell_value(c["mean"], c["std"], c["n"], scale), c["n"]))
            bold.append(c is not None and summary["best"].get(col) is not None and row in summary["best"][col])
        body.append((row, texts, bold))
    note = (f"{summary.get('metric_label', summary['metric'])} ({summary['metric']}): mean ± sample std over seeds, "
            f"n runs per cell (n = 1: a single run, no std); "
            f"{describe_reduce(summary['reduce'], summary.get('rounds_used'))}; best per column in bold.")
    return Table(summary["rows_key"], list(labels), body, note)


def describe_reduce(mode: str, used: list[int] | tuple[int, int] | None = None) -> str:
    """Human words for a ``--reduce`` mode, with the number of evaluated rounds actually reduced (``used``: the
    fewest and most over the table's runs) when fewer than asked."""
    if mode == "best":
        return "best evaluated round"
    if mode == "last":
        return "last evaluated round"
    asked = int(mode[4:])
    lo, hi = used if used else (asked, asked)
    if hi >= asked and lo >= asked:
        return f"mean of the last {asked} evaluated rounds"
    have = f"{lo}" if lo == hi else f"{lo} to {hi}"
    return (f"mean of the last {asked} evaluated rounds asked; the runs have {have} evaluated rounds, all of "
            "them averaged")


def csv_text(summary: dict[str, Any]) -> str:
    """The table as CSV, one line per cell: row, column, mean, std, n, the seeds and whether it is the column's
    best (values in % for accuracies, as in the table)."""
    import csv
    import io

    scale = 100.0 if summary["percent"] else 1.0
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([summary["rows_key"], "column", "metric", "mean", "std", "n", "seeds", "best"])
    for row in summary["rows"]:
        for col in summary["columns"]:
            c = summary["cells"].get(row, {}).get(col)
            if c is not None:
                w.writerow([row, col, summary["metric"], f"{c['mean'] * scale:.6g}", f"{c['std'] * scale:.6g}", c["n"],
                            " ".join(map(str, c["seeds"])), int(row in summary["best"].get(col, []))])
    return buf.getvalue()


def markdown(table: Table, title: str | None = None) -> str:
    """The table in GitHub markdown."""
    lines = [f"**{title}**", ""] if title else []
    lines.append("| " + " | ".join([table.corner, *table.header]) + " |")
    lines.append("|:---|" + "---:|" * len(table.header))
    for label, texts, bold in table.body:
        cells = ["–" if t is None else (f"**{t[0]}** (n={t[1]})" if b else f"{t[0]} (n={t[1]})")
                 for t, b in zip(texts, bold)]
        lines.append("| " + " | ".join([str(label), *cells]) + " |")
    return "\n".join([*lines, "", table.note]) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(text: str) -> str:
    """Escapes LaTeX special characters."""
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def latex(table: Table, title: str | None = None) -> str:
    """The table as a booktabs ``tabular`` (needs ``\\usepackage{booktabs}``); n as a small suffix."""
    def cell(text: tuple[str, int] | None, bold: bool) -> str:
        if text is None:
            return "--"
        body = text[0].replace(" ± ", r" \pm ")
        return (rf"$\mathbf{{{body}}}$" if bold else f"${body}$") + rf" {{\scriptsize ({text[1]})}}"

    lines = [f"% {tex_escape(title)}"] if title else []
    lines += [f"% {tex_escape(table.note.replace('±', '+-'))}", r"\begin{tabular}{l" + "c" * len(table.header) + "}",
              r"\toprule", " & ".join(tex_escape(h) for h in [table.corner, *table.header]) + r" \\", r"\midrule"]
    for label, texts, bold in table.body:
        lines.append(" & ".join([tex_escape(label), *(cell(t, b) for t, b in zip(texts, bold))]) + r" \\")
    return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"]) + "\n"
