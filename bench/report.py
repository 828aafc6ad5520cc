"""What every benchmark reports with: its JSON result (printed, and kept
where `--out` says), sections that fail without stopping the rest, and the
machine's load, which decides how far a figure from a shared machine holds."""
from __future__ import annotations

import json
import os
from pathlib import Path


def emit(result: dict, out: str | Path | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def guarded(out: dict, key: str, fn) -> None:
    """Run one section; a failure is recorded, and the rest still runs."""
    try:
        out[key] = fn()
    except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not stop
        out[key] = {"error": f"{type(exc).__name__}: {exc}"}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
