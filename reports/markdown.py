"""Markdown: the comparison table (one pipe table per block): the best merge per column in bold,
the lowest cost in italic, "*" on scores that differ from the baseline (paired test)."""

from __future__ import annotations

from merge_harness.reports.frame import Block, ComparisonTable


def _cell(block: Block, row: str, column: str) -> str:
    cell = block.cell(row, column)
    text = cell.text + cell.mark
    return f"**{text}**" if cell.best else f"*{text}*" if cell.lowest else text


def render_block(table: ComparisonTable, block: Block) -> list[str]:
    columns = list(block.values.columns)
    lines = ["| Model | " + " | ".join(columns) + " |",
             "|:--|" + "--:|" * len(columns)]
    for row, title in table.rows["title"].items():
        cells = [_cell(block, row, c) for c in columns]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(table: ComparisonTable, heading_level: int = 2) -> str:
    """The whole table of one experiment: a heading, a table per block, then the notes."""
    hashes = "#" * heading_level
    lines = [f"{hashes} {table.experiment} ({table.family})", ""]
    for block in table.blocks:
        lines += [f"{hashes}# {block.title}", "", *render_block(table, block), ""]
    lines += [f"- {note}" for note in table.all_notes()]
    return "\n".join(lines) + "\n"
