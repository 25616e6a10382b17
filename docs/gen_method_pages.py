"""Writes ``docs/methods/<name>.md`` for every registered method, from its module docstring, paper reference,
config and rows of ``docs/paper_vs_code.md``; ``--check`` fails when a page on disk differs (CI runs it through
``tests/test_docs_site.py``).

    python docs/gen_method_pages.py          # regenerate
    python docs/gen_method_pages.py --check  # exit 1 if a page is stale
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "methods"


def _paper_vs_code_rows(class_name: str) -> list[str]:
    """The rows of the paper-vs-code table for ``class_name``, and the table's header."""
    lines = (ROOT / "docs" / "paper_vs_code.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    header = lines[start: start + 2]
    rows = [line for line in lines[start + 2:] if line.startswith(f"| {class_name} |")]
    return [*header, *rows] if rows else []


def _markdown(doc: str) -> str:
    """A module docstring as Markdown: its first line as the lead, reST's ``code`` as Markdown code, and its
    ``* item`` lists kept as lists (Markdown needs a blank line before a list)."""
    out: list[str] = []
    for line in doc.replace("``", "`").splitlines():
        if line.lstrip().startswith(("* ", "- ")) and out and out[-1].strip() and not out[-1].lstrip().startswith(
                ("* ", "- ")) and not out[-1].startswith("  "):
            out.append("")
        out.append(line)
    return "\n".join(out)


def page(key: str, cls: type) -> str:
    """The Markdown page of one method."""
    module = sys.modules[cls.__module__]
    paper = cls.paper
    lines = [f"# {cls.__name__} (`{key}`)", ""]
    if paper is not None:
        title = f"[{paper.title}](https://arxiv.org/abs/{paper.arxiv})" if paper.arxiv else paper.title
        lines += [f"**Paper:** {title}, {paper.venue}.", ""]
    lines += [_markdown((module.__doc__ or "").strip()), ""]
    config = ROOT / "configs" / "method" / f"{key}.yaml"
    lines += ["## Run it", "", "```bash",
              f"fedlt fit --config configs/quickstart.yaml --config configs/method/{key}.yaml", "```", ""]
    if config.is_file():
        lines += [f"`configs/method/{key}.yaml`:", "", "```yaml", config.read_text().strip(), "```", ""]
    traits = []
    if cls.__dict__.get("vectorizable", False):
        traits.append("trains vectorized cohorts (`trainer.vectorize_cohort: true`)")
    if cls.__dict__.get("lightning_client", False):
        traits.append("takes a user's LightningModule as its client step (`model.class_path`)")
    if getattr(cls, "needs_clip", False):
        traits.append("needs a CLIP model (`model.name: clip:<name>`)")
    if traits:
        lines += ["It " + "; ".join(traits) + ".", ""]
    lines += ["## Paper vs released code", ""]
    rows = _paper_vs_code_rows(cls.__name__)
    if rows:
        lines += ["Each difference is a constructor argument; `configs/paper/` sets the released code's values "
                  "(see [Paper vs released code](../paper_vs_code.md)).", "", *rows, ""]
    else:
        lines += ["No difference is recorded between the paper and the authors' released code.", ""]
    lines += ["## Arguments", "", f"::: {cls.__module__}.{cls.__name__}", "    options:",
              "      show_root_heading: false", "      members: false", "      show_bases: true", ""]
    return "\n".join(lines)


def index(methods: list[tuple[str, type]]) -> str:
    lines = ["# Methods", "", "Every registered method, its paper and its page. `fedlt methods` lists them too.", "",
             "| name | class | paper |", "|---|---|---|"]
    for key, cls in methods:
        paper = f"{cls.paper.title} ({cls.paper.venue})" if cls.paper else "-"
        lines.append(f"| [{key}]({key}.md) | `{cls.__name__}` | {paper} |")
    return "\n".join(lines) + "\n"


def pages() -> dict[Path, str]:
    from fedlt.methods import METHODS

    methods = list(METHODS.items())
    out = {OUT / f"{key}.md": page(key, cls) for key, cls in methods}
    out[OUT / "index.md"] = index(methods)
    return out


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for path, text in pages().items():
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("stale method pages (run python docs/gen_method_pages.py): " + ", ".join(map(str, stale)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
