"""CSV: one line per model with every block's columns, for spreadsheets and pandas.

Numbers are full precision in points (no formatting); CSV has no bold, so the `best_in` column
lists the columns where the row is the best (the cells other formats print in bold).
"""

from __future__ import annotations

import io

from merge_harness.reports.frame import BLOCK_SUFFIX, ComparisonTable


def render_csv(table: ComparisonTable) -> str:
    frame = table.to_frame().reset_index()
    frame.insert(0, "experiment", table.experiment)
    frame["best_in"] = [
        "; ".join(c + BLOCK_SUFFIX[b.name] for b in table.blocks for c in b.values.columns
                  if b.is_best(row, c))
        for row in table.rows.index
    ]
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, float_format="%.6g", lineterminator="\n")
    return buffer.getvalue()
