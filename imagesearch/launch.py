"""The `imgsearch-embedder` and `imgsearch-search` commands. Every install
has them; without the service's extra they say what to install instead of
failing with an import error."""
from __future__ import annotations

import importlib
import sys

_EXTRAS = {"embedder_service": "embedder", "search_service": "search"}


def _run(module: str) -> None:
    try:
        main = importlib.import_module(f"{module}.__main__").main
    except ModuleNotFoundError as exc:
        print(f"imgsearch-{_EXTRAS[module]} needs the {_EXTRAS[module]} extra ({exc.name} is "
              f"missing): pip install 'imagesearch[{_EXTRAS[module]}]'", file=sys.stderr)
        sys.exit(2)
    main()


def embedder() -> None:
    _run("embedder_service")


def search() -> None:
    _run("search_service")
