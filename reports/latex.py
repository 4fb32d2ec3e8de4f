"""LaTeX: booktabs tables ready for a paper; best per column in \\textbf, lowest cost in \\textit.

One `table` float per block (scores, normalized scores, delta vs task arithmetic), rows grouped
by kind (pre-trained | fine-tunes | merges) with \\midrule between groups; the caption says the
metrics, what bold means, and the merges' hyper-parameters. Headers break before "(", and a table
wider than the text is scaled down to \\linewidth (graphicx's \\resizebox; a narrower one keeps its
natural size), so 20+ rows with stderr and cost columns stay on the page.

`render_latex(table)` is a fragment to \\input after \\usepackage{booktabs} (and graphicx, which
the fitting needs; without it a table keeps its natural width);
`render_latex(table, standalone=True)` is a complete document that compiles with pdflatex.
"""

from __future__ import annotations

import re

from merge_harness.reports.frame import Block, ComparisonTable

_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
            "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}",
            "Δ": r"$\Delta$", "–": "--", "—": "---", "−": "-", "→": r"$\to$", "±": r"$\pm$",
            "×": r"$\times$", "≤": r"$\leq$", "≥": r"$\geq$", "λ": r"$\lambda$", "α": r"$\alpha$",
            "β": r"$\beta$", "γ": r"$\gamma$", "ε": r"$\epsilon$", "τ": r"$\tau$"}
_PATTERN = re.compile("|".join(re.escape(k) for k in _SPECIAL))
PACKAGES = ("booktabs", "graphicx")  # \toprule...; \resizebox (without it: natural size)
GEOMETRY = "a4paper,margin=2cm"
# Scale a table down to the line width when it is wider, never up (\width: its natural width);
# a document without graphicx still compiles, with the table at its natural size.
FIT = (r"\providecommand{\mhfittowidth}[1]{\ifdefined\resizebox"
       r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{#1}\else#1\fi}")


def escape(text: str) -> str:
    """Text safe in a LaTeX document compiled by pdflatex (specials escaped)."""
    return _PATTERN.sub(lambda match: _SPECIAL[match.group()], str(text))


def number(block: Block, row: str, column: str) -> str:
    cell = block.cell(row, column, missing="--")
    text = cell.text
    if text.startswith("-") and text != "--":
        text = "$-$" + text[1:]
    text = text.replace(" ± ", r"\,$\pm$\,") + ("$^{*}$" if cell.mark else "")
    return rf"\textbf{{{text}}}" if cell.best else rf"\textit{{{text}}}" if cell.lowest else text


def header(title: str) -> str:
    """'GSM8K (fixture)' -> two centred lines, 'GSM8K' over '(fixture)': narrower columns."""
    head, paren, rest = title.partition(" (")
    if not paren:
        return escape(title)
    return rf"\begin{{tabular}}[b]{{@{{}}c@{{}}}}{escape(head)}\\{escape('(' + rest)}\end{{tabular}}"


def render_block(table: ComparisonTable, block: Block, label: str) -> list[str]:
    columns = list(block.values.columns)
    lines = [r"\begin{table}[tbp]", r"\centering", r"\small", r"\mhfittowidth{%",
             rf"\begin{{tabular}}{{l{'r' * len(columns)}}}", r"\toprule",
             "Model & " + " & ".join(header(c) for c in columns) + r" \\", r"\midrule"]
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
    return [*lines, r"\bottomrule", r"\end{tabular}}", rf"\caption{{{escape(caption)}}}",
            rf"\label{{{label}}}", r"\end{table}"]


def render_latex(table: ComparisonTable, label: str | None = None, *, standalone: bool = False) -> str:
    """The tables of one experiment: a fragment to \\input into a document that loads booktabs (and
    graphicx, to fit wide tables), or with `standalone` a whole article (booktabs, graphicx,
    geometry) for pdflatex."""
    stem = label or "tab:" + re.sub(r"[^A-Za-z0-9:-]+", "-", table.experiment)
    lines = [f"% merge-harness comparison tables: experiment {table.experiment}"]
    if not standalone:
        lines.append(r"% needs \usepackage{booktabs}; with \usepackage{graphicx}, wide tables fit the page")
    lines.append(FIT)
    for block in table.blocks:
        suffix = "" if block.name == "score" else f"-{block.name}"
        lines += render_block(table, block, stem + suffix) + [""]
    if not standalone:
        return "\n".join(lines)
    preamble = [r"\documentclass{article}", rf"\usepackage[{GEOMETRY}]{{geometry}}",
                *(rf"\usepackage{{{package}}}" for package in PACKAGES),
                r"\emergencystretch=2em  % long notes in captions wrap instead of overflowing",
                r"\begin{document}", ""]
    return "\n".join([lines[0], *preamble, *lines[1:], r"\end{document}", ""])
