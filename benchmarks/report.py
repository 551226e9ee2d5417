"""What every benchmark does with its result: print the markdown table, write it and the raw numbers to --out.

Scripts run as `python benchmarks/NAME.py` import it as a sibling (`from report import publish`): a site package owns
the top-level name `benchmarks`.
"""

from __future__ import annotations

import json
from pathlib import Path


def publish(table: str, result: object, out: Path, name: str) -> None:
    """Print `table`; write it to out/table.md and `result` to out/NAME.json."""
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
