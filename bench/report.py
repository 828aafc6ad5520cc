"""Print a benchmark's JSON result, and keep a copy where `--out` says."""
from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
