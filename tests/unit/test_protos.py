"""The committed stubs in imagesearch/v1 are what tools/gen_protos.py makes now."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "tools" / "gen_protos.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(tmp_path)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*.py*")}
    committed = {p.relative_to(ROOT): p.read_bytes()
                 for p in (ROOT / "imagesearch" / "v1").glob("*_pb2*.py*")}
    assert fresh.keys() == committed.keys()
    stale = [str(name) for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run python tools/gen_protos.py"
