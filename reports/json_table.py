"""JSON: the comparison table as data (columns with their metric, rows with cells and bests)."""

from __future__ import annotations

import json
import math
from typing import Any

from merge_harness.reports.frame import Block, ComparisonTable


def _number(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _cell_data(block: Block, row: str, column: str) -> dict[str, Any]:
    cell = block.cell(row, column)
    stderr = block.stderr.at[row, column] if block.stderr is not None and column in block.stderr else None
    return {"value": _number(block.values.at[row, column]), "stderr": _number(stderr), "best": cell.best,
            "lowest": cell.lowest, "significant": bool(cell.mark)}


def table_data(table: ComparisonTable) -> dict[str, Any]:
    rows = []
    for row, meta in table.rows.iterrows():
        rows.append({
            "id": row, "title": meta["title"], "kind": meta["kind"],
            "method": meta["method"] if isinstance(meta["method"], str) else None,
            "parameters": meta["params"],
            "blocks": {b.name: {c: _cell_data(b, row, c) for c in b.values.columns} for b in table.blocks},
        })
    return {
        "experiment": table.experiment,
        "family": table.family,
        "columns": [{"task": c.task, "metric": c.metric, "title": c.title} for c in table.columns],
        "blocks": [{"name": b.name, "title": b.title, "columns": list(b.values.columns)}
                   for b in table.blocks],
        "rows": rows,
        "notes": table.all_notes(),
    }


def render_json(table: ComparisonTable) -> str:
    return json.dumps(table_data(table), indent=2, ensure_ascii=False, sort_keys=False) + "\n"
