"""The tables of ``fedlt report``: markdown and LaTeX (booktabs) from the summary's per-cell statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Table:
    """The formatted report table: header, rows of (label, cells) and the bold marks."""

    corner: str
    header: list[str]
    body: list[tuple[str, list[str | None], list[bool]]]
    note: str


def build_table(summary: dict[str, Any]) -> Table:
    """Formats ``summary`` (see :func:`summarize`): ``mean ± std`` per cell, best per column marked bold."""
    scale = 100.0 if summary["percent"] else 1.0
    labels, cells = summary["columns"], summary["cells"]
    n_max = max((c["n"] for row in cells.values() for c in row.values()), default=0)
    body = []
    for row in summary["rows"]:
        texts, bold = [], []
        for col in labels:
            c = cells.get(row, {}).get(col)
            texts.append(None if c is None else f"{c['mean'] * scale:.2f} ± {c['std'] * scale:.2f}"
                         + (f" (n={c['n']})" if c["n"] != n_max else ""))
            bold.append(c is not None and summary["best"].get(col) is not None and row in summary["best"][col])
        body.append((row, texts, bold))
    unit = " in %" if summary["percent"] else ""
    note = (f"{summary['metric']}{unit}, mean ± std over seeds (n = {n_max} per cell unless marked), "
            f"reduce: {describe_reduce(summary['reduce'])}; best per column in bold.")
    return Table(summary["rows_key"], list(labels), body, note)


def describe_reduce(mode: str) -> str:
    """Human words for a ``--reduce`` mode."""
    if mode == "best":
        return "best round"
    if mode == "last":
        return "last evaluated round"
    return f"mean of the last {mode[4:]} evaluated rounds"


def markdown(table: Table, title: str | None = None) -> str:
    """The table in GitHub markdown."""
    lines = [f"**{title}**", ""] if title else []
    lines.append("| " + " | ".join([table.corner, *table.header]) + " |")
    lines.append("|:---|" + "---:|" * len(table.header))
    for label, texts, bold in table.body:
        cells = ["–" if t is None else (f"**{t}**" if b else t) for t, b in zip(texts, bold)]
        lines.append("| " + " | ".join([str(label), *cells]) + " |")
    return "\n".join([*lines, "", table.note]) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(text: str) -> str:
    """Escapes LaTeX special characters."""
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def latex(table: Table, title: str | None = None) -> str:
    """The table as a booktabs ``tabular`` (needs ``\\usepackage{booktabs}``)."""
    def cell(text: str | None, bold: bool) -> str:
        if text is None:
            return "--"
        value, _, n = text.partition(" (")
        body = value.replace(" ± ", r" \pm ")
        out = rf"$\mathbf{{{body}}}$" if bold else f"${body}$"
        return out + (f" ({tex_escape(n)}" if n else "")

    lines = [f"% {tex_escape(title)}"] if title else []
    lines += [f"% {tex_escape(table.note.replace('±', '+-'))}", r"\begin{tabular}{l" + "c" * len(table.header) + "}",
              r"\toprule", " & ".join(tex_escape(h) for h in [table.corner, *table.header]) + r" \\", r"\midrule"]
    for label, texts, bold in table.body:
        lines.append(" & ".join([tex_escape(label), *(cell(t, b) for t, b in zip(texts, bold))]) + r" \\")
    return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"]) + "\n"
