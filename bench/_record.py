"""The last step every bench shares: print its table, keep it in the record, write the JSON."""
from __future__ import annotations

import json
from pathlib import Path


def emit(record: dict, table: str, out: str | Path) -> Path:
    """Print ``table``, store it as ``record["table"]`` and write ``record`` as JSON to
    ``out`` (parent folders created; values JSON cannot hold are written with ``str``)."""
    record["table"] = table
    print(table)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str))
    print(f"results: {path}")
    return path
