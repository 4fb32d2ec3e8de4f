"""Diagnostics tables as Markdown (a frame's index is the first column, numbers to 4 digits)."""

from __future__ import annotations

import math

import pandas as pd


def markdown_table(table: pd.DataFrame, index_name: str = "", digits: int = 4) -> str:
    header = [index_name, *map(str, table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in table.iterrows():
        lines.append("| " + " | ".join([str(index), *(_cell(v, digits) for v in row)]) + " |")
    return "\n".join(lines) + "\n"


def _cell(value, digits: int) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)
