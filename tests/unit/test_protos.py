"""The committed stubs in imagesearch/v1 are what tools/gen_protos.py makes now."""
from __future__ import annotations

import importlib.util
import subprocess
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


BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"


def _buf(*args: str) -> subprocess.CompletedProcess:
    assert BUF.exists(), "buf is missing: run scripts/install.sh (it installs @bufbuild/buf)"
    return subprocess.run([str(BUF), *args], cwd=ROOT / "protos", capture_output=True, text=True,
                          timeout=120)


def test_protos_pass_buf_lint():
    run = _buf("lint")
    assert run.returncode == 0, run.stdout + run.stderr


def test_protos_keep_the_revised_v1_wire_contract():
    """protos/v1-baseline.binpb is the revised v1 (buf build -o); changes
    that would break a v1 client fail here. Replace it only for v2."""
    run = _buf("breaking", "--against", "v1-baseline.binpb")
    assert run.returncode == 0, run.stdout + run.stderr
