"""LaTeX: booktabs tables ready for a paper (\\usepackage{booktabs}); best per column in \\textbf.

One `table` float per block (scores, normalized scores, delta vs task arithmetic), rows grouped
by kind (pre-trained | fine-tunes | merges) with \\midrule between groups; the caption says the
metrics, what bold means, and the merges' hyper-parameters.
"""

from __future__ import annotations

import re

from merge_harness.reports.frame import Block, ComparisonTable

_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
            "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}",
            "Δ": r"$\Delta$", "–": "--", "−": "-", "→": r"$\to$"}
_PATTERN = re.compile("|".join(re.escape(k) for k in _SPECIAL))


def escape(text: str) -> str:
    """Text safe in a LaTeX document compiled by pdflatex (specials escaped)."""
    return _PATTERN.sub(lambda match: _SPECIAL[match.group()], str(text))


def number(block: Block, row: str, column: str) -> str:
    text = block.text(row, column, missing="--")
    if text.startswith("-") and text != "--":
        text = "$-$" + text[1:]
    return rf"\textbf{{{text}}}" if block.is_best(row, column) else text


def render_block(table: ComparisonTable, block: Block, label: str) -> list[str]:
    columns = list(block.values.columns)
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             rf"\begin{{tabular}}{{l{'r' * len(columns)}}}", r"\toprule",
             "Model & " + " & ".join(escape(c) for c in columns) + r" \\", r"\midrule"]
    previous = None
    for row, meta in table.rows.iterrows():
        if previous is not None and meta["kind"] != previous:
            lines.append(r"\midrule")
        previous = meta["kind"]
        cells = [number(block, row, c) for c in columns]
        lines.append("{}" + escape(meta["title"]) + " & " + " & ".join(cells) + r" \\")
    notes = [*table.notes, *block.notes]
    if params := table.parameter_notes():
        notes.append("Hyper-parameters: " + "; ".join(params) + ".")
    caption = f"{block.title}, {table.experiment} ({table.family}). " + " ".join(notes)
    return [*lines, r"\bottomrule", r"\end{tabular}", rf"\caption{{{escape(caption)}}}",
            rf"\label{{{label}}}", r"\end{table}"]


def render_latex(table: ComparisonTable, label: str | None = None) -> str:
    """The tables of one experiment; \\input them into a document that loads booktabs."""
    stem = label or "tab:" + re.sub(r"[^A-Za-z0-9:-]+", "-", table.experiment)
    lines = [f"% merge-harness comparison tables: experiment {table.experiment}"]
    for block in table.blocks:
        suffix = "" if block.name == "score" else f"-{block.name}"
        lines += render_block(table, block, stem + suffix) + [""]
    return "\n".join(lines)
