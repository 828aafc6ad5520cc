"""The CLI as a new user meets it, against real services: one test per
point a first-hour user reported (ids, empty results, paths, flags, hints,
Ctrl-C, output)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

from PIL import Image

from tests.services import LITE_ONLY, ROOT, free_port, imgsearch, photo, start_search

ID = re.compile(r"\b[0-9a-f]{64}\b")


def _folder(root, name: str, seeds: range, labels=("cats", "dogs")):
    """`root/name/LABEL/N.jpg` for each seed, spread over `labels`."""
    for seed in seeds:
        path = root / name / labels[seed % len(labels)] / f"{seed}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(photo(seed))
    return root / name


def _run(server: str, *args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    """The CLI with `args` as given: global flags may come after the command."""
    return subprocess.run([sys.executable, "-m", "imagesearch.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "IMGSEARCH_SERVER": server})


@LITE_ONLY
def test_search_prints_full_ids_that_delete_takes(search_service, tmp_path):
    folder = _folder(tmp_path, "ids", range(1100, 1104))
    assert imgsearch(search_service.address, "--collection", "cli_ids", "ingest", str(folder),
                     "-q").returncode == 0
    run = imgsearch(search_service.address, "--collection", "cli_ids", "search", "--image",
                    str(next(folder.rglob("*.jpg"))), "-k", "1")
    [hit_id] = ID.findall(run.stdout)
    run = imgsearch(search_service.address, "--collection", "cli_ids", "delete", hit_id)
    assert run.returncode == 0 and "deleted 1" in run.stdout, run.stdout + run.stderr


@LITE_ONLY
def test_ingest_json_prints_each_id(search_service, tmp_path):
    folder = _folder(tmp_path, "json", range(1110, 1112))
    run = imgsearch(search_service.address, "--collection", "cli_json", "ingest", str(folder),
                    "-q", "--json")
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [(line["status"], bool(ID.fullmatch(line["id"]))) for line in lines] == [
        ("inserted", True)] * 2
    assert "2 images: 2 inserted" in run.stderr


def test_empty_results_say_why(search_service, tmp_path):
    folder = _folder(tmp_path, "empty", range(1120, 1122))
    server = search_service.address
    imgsearch(server, "--collection", "cli_empty", "ingest", str(folder), "-q")
    run = imgsearch(server, "--collection", "cli_empty", "search", "a photo", "--filter",
                    "label=birds", "--grid", str(tmp_path / "g.png"))
    assert run.returncode == 0 and run.stdout == ""
    assert "no hits: none of the 2 images of cli_empty matches the filter" in run.stderr
    assert "no grid written" in run.stderr and not (tmp_path / "g.png").exists()
    run = imgsearch(server, "--collection", "cli_empty", "search", "a photo", "--min-score", "0.999")
    assert re.search(r"no hits: the best score is -?\d\.\d{4}, below --min-score 0.999", run.stderr)
    # A filter that matches, and a threshold that removes what it matched:
    # the threshold is to blame, not the filter.
    run = imgsearch(server, "--collection", "cli_empty", "search", "a photo", "--filter",
                    "label=cats", "--uri-prefix", str(folder), "--min-score", "0.999")
    assert re.search(r"no hits: the best score among the images that match the filter is "
                     r"-?\d\.\d{4}, below --min-score 0.999", run.stderr), run.stderr
    ids = [line["id"] for line in map(json.loads, imgsearch(
        server, "--collection", "cli_empty", "ingest", str(folder), "-q", "--json").stdout.splitlines())]
    imgsearch(server, "--collection", "cli_empty", "delete", *ids)
    run = imgsearch(server, "--collection", "cli_empty", "search", "a photo")
    assert "no hits: cli_empty is empty: ingest images first" in run.stderr, run.stderr


@LITE_ONLY
def test_a_relative_uri_prefix_matches_as_ingest_stored_it(search_service, tmp_path):
    folder = _folder(tmp_path, "rel", range(1130, 1134))
    imgsearch(search_service.address, "--collection", "cli_rel", "ingest", str(folder), "-q")
    run = _run(search_service.address, "search", "a photo", "--collection", "cli_rel",
               "--uri-prefix", "rel/dogs/", "--json", cwd=tmp_path)
    hits = json.loads(run.stdout)
    assert len(hits) == 2 and all(h["uri"].startswith(str(folder / "dogs") + "/") for h in hits)


@LITE_ONLY
def test_global_flags_work_after_the_command(search_service):
    run = _run("127.0.0.1:1", "stats", "--server", search_service.address, "--timeout", "30")
    assert run.returncode == 0 and "collection images:" in run.stdout, run.stderr


@LITE_ONLY
def test_errors_name_who_failed_and_what_to_do(search_service, embedder_service, tmp_path):
    run = _run(embedder_service.address, "stats")  # the embedder's port by mistake
    assert "UNIMPLEMENTED" in run.stderr and "is not a search service (the embedder's port?)" in run.stderr
    run = _run(f"127.0.0.1:{free_port()}", "stats")
    assert "no search service answers at" in run.stderr
    lonely = start_search(tmp_path, f"127.0.0.1:{free_port()}").wait_ready()
    try:
        run = _run(lonely.address, "search", "a photo")
        assert "its embedder does not answer" in run.stderr, run.stderr
        assert "no search service answers" not in run.stderr
    finally:
        lonely.stop()


def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(search_service, tmp_path):
    folder = _folder(tmp_path, "ctrlc", range(1200, 1800), labels=("a", "b", "c"))
    command = [sys.executable, "-m", "imagesearch.cli", "--server", search_service.address,
               "--collection", "cli_ctrlc", "ingest", str(folder), "-q", "--json"]
    # Ctrl-C as at a terminal: a CLI started from a background job inherits
    # SIGINT ignored (as the shell asks for `&` commands) and rightly keeps it so.
    ingest = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                          signal.SIG_DFL))
    assert ingest.stdout.readline()  # the first result: the stream is under way
    assert ingest.poll() is None  # --json lines come as results do, even into a pipe
    ingest.send_signal(signal.SIGINT)
    out, err = ingest.communicate(timeout=30)
    assert ingest.returncode == 130, err
    assert "Traceback" not in err
    assert re.search(r"stopped: \d+ inserted, \d+ already present, 0 failed, \d+ not stored; "
                     r"run the same command again to resume", err), err
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    summary = re.search(r"600 images: (\d+) inserted, (\d+) already present, 0 failed", run.stderr)
    assert summary and int(summary[2]) > 0, run.stderr
    assert int(summary[1]) + int(summary[2]) == 600


@LITE_ONLY
def test_output_ranks_labels_files_and_grid_labels(search_service, tmp_path):
    folder = _folder(tmp_path, "out", range(1140, 1148))
    (folder / "notes.txt").write_text("not an image")
    single = tmp_path / "single.jpg"
    single.write_bytes(photo(1149))
    server = search_service.address
    run = imgsearch(server, "--collection", "cli_out", "ingest", str(folder), str(single), "-q")
    assert "9 images: 9 inserted, 0 already present, 0 failed; 1 other files skipped" in run.stdout
    run = imgsearch(server, "--collection", "cli_out", "search", "a photo", "--offset", "4", "-k",
                    "3", "--grid", str(tmp_path / "grid.png"))
    lines = run.stdout.splitlines()
    assert [int(line.split()[0]) for line in lines] == [5, 6, 7]
    assert {line.split()[3] for line in lines} <= {"cats", "dogs", tmp_path.name}  # labels
    assert len({line.index("/") for line in lines}) == 1  # the uri column is aligned
    imgsearch(server, "--collection", "cli_out", "search", "a photo", "-k", "3", "--no-labels",
              "--grid", str(tmp_path / "plain.png"))
    with Image.open(tmp_path / "grid.png") as labelled, Image.open(tmp_path / "plain.png") as plain:
        assert labelled.getpixel((75, 5)) == (0, 0, 0)  # the label band
        assert plain.getpixel((75, 5)) != (0, 0, 0)


@LITE_ONLY
def test_first_hour_rough_edges(search_service, tmp_path):
    """Unquoted query words are one query; a misspelled flag gets the
    subcommand's usage and the nearest flag; a folder given to --image is
    said to be one; a server without a port gets the search service's."""
    folder = _folder(tmp_path, "edges", range(1140, 1143))
    server = search_service.address
    imgsearch(server, "--collection", "cli_edges", "ingest", str(folder), "-q")
    run = imgsearch(server, "--collection", "cli_edges", "search", "a", "red", "square", "--top-k", "2")
    assert run.returncode == 0 and len(ID.findall(run.stdout)) == 2, run.stderr
    run = imgsearch(server, "search", "a red square", "--top-kk", "5")
    assert run.returncode == 2
    assert run.stderr.startswith("usage: imgsearch search")
    assert "unrecognized arguments: --top-kk 5 (did you mean --top-k?)" in run.stderr
    run = imgsearch(server, "search", "--image", str(folder))
    assert run.returncode == 2 and f"--image {folder} is a folder: give one image file" in run.stderr
    assert "Errno" not in run.stderr
    port = free_port()  # nothing listens there
    run = _run(f"127.0.0.1:{port}", "--server", "127.0.0.1", "stats", "--timeout", "5")
    assert "no search service answers at 127.0.0.1:50052" in run.stderr, run.stderr
