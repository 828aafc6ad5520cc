"""Flags, their environment twins and --help of both services."""
from __future__ import annotations

import subprocess
import sys

import pytest

from embedder_service.config import parse_config as embedder_config
from search_service.config import parse_config as search_config


def test_environment_twin_sets_default_and_flag_wins(monkeypatch):
    monkeypatch.setenv("EMBEDDER_MAX_BATCH_ITEMS", "17")
    monkeypatch.setenv("EMBEDDER_MODEL", "/models/clip")
    assert embedder_config([]).max_batch_items == 17
    assert embedder_config([]).model == "/models/clip"
    assert embedder_config(["--max-batch-items", "3"]).max_batch_items == 3


def test_search_milvus_token_only_from_environment(monkeypatch):
    monkeypatch.setenv("SEARCH_MILVUS_TOKEN", "root:secret")
    monkeypatch.setenv("SEARCH_MILVUS_URI", "http://milvus:19530")
    config = search_config([])
    assert config.milvus_token == "root:secret" and config.milvus_target == "http://milvus:19530"
    assert "secret" not in repr(config)
    with pytest.raises(SystemExit):
        search_config(["--milvus-token", "x"])


def test_lite_file_under_data_dir():
    assert search_config(["--data-dir", "/var/lib/x"]).milvus_target == "/var/lib/x/milvus.db"


def test_bad_environment_value_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("EMBEDDER_MAX_BATCH_ITEMS", "zero")
    with pytest.raises(SystemExit):
        embedder_config([])
    assert "EMBEDDER_MAX_BATCH_ITEMS='zero' is invalid" in capsys.readouterr().err


@pytest.mark.parametrize("module, twins", [
    ("embedder_service", ["EMBEDDER_MODEL", "EMBEDDER_DEVICE", "EMBEDDER_PORT"]),
    ("search_service", ["SEARCH_EMBEDDER", "SEARCH_MILVUS_URI", "SEARCH_DATA_DIR"]),
    ("imagesearch.cli", ["IMGSEARCH_SERVER"]),
])
def test_help(module, twins):
    run = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    for twin in twins:
        assert twin in run.stdout


def test_environment_value_outside_the_choices_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("EMBEDDER_DTYPE", "fp16")
    with pytest.raises(SystemExit):
        embedder_config([])
    assert "EMBEDDER_DTYPE='fp16' is invalid: choose from auto, float32" in capsys.readouterr().err


def test_metrics_are_off_unless_asked_for(monkeypatch):
    """Two local instances never clash on a metrics port; deployments set one."""
    monkeypatch.delenv("EMBEDDER_METRICS_PORT", raising=False)
    monkeypatch.delenv("SEARCH_METRICS_PORT", raising=False)
    assert embedder_config([]).metrics_port == search_config([]).metrics_port == 0
    monkeypatch.setenv("SEARCH_METRICS_PORT", "9102")
    assert search_config([]).metrics_port == 9102
