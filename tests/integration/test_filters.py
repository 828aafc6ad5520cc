"""Filters, paging and score thresholds on both backends (Milvus Lite and the
real server): each returns exactly what it names, hostile values included."""
from __future__ import annotations

import json
import math

import grpc
import pytest

from imagesearch.client import IngestItem, IngestResult
from imagesearch.synthetic import LABELS, caption
from imagesearch.v1 import search_pb2
from tests.services import EVAL_PER_LABEL, imgsearch, photo, status_of

# Values that would break or widen a naively concatenated expression, and
# characters that are wildcards in LIKE patterns.
HOSTILE = ['a"b', "a\\b", '" or 1==1 or "', "it's", "a_b", "a%b", "axb", "日本語", "x\\\" ) or (\""]


def search_json(service, *args: str) -> list[dict]:
    run = imgsearch(service.address, "search", *args, "--json")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_filter_label_returns_only_that_label_ranked(search_service, ingested):
    """The issue's example: --filter label=red_circle, even for a query about blue squares."""
    for query in (caption("red_circle"), "a photo of a blue square"):
        hits = search_json(search_service, query, "-k", "30", "--filter", "label=red_circle")
        assert len(hits) == EVAL_PER_LABEL  # all of them, and nothing else
        assert {h["metadata"]["label"] for h in hits} == {"red_circle"}
        scores = [h["score"] for h in hits]
        assert scores == sorted(scores, reverse=True)


def test_filter_membership_and_conjunction(search_service, ingested):
    hits = search_json(search_service, caption("red_circle"), "-k", "100",
                       "--filter", "label=red_circle", "--filter", "label=blue_square")
    assert sorted(h["metadata"]["label"] for h in hits) == ["blue_square"] * EVAL_PER_LABEL + \
        ["red_circle"] * EVAL_PER_LABEL
    # Two keys must both hold: no image has two labels, so nothing matches.
    hits = search_json(search_service, caption("red_circle"), "-k", "100",
                       "--filter", "label=red_circle", "--filter", "missing_key=x")
    assert hits == []


def test_uri_prefix(search_service, eval_images, ingested):
    root = str((eval_images / "train").resolve())
    hits = search_json(search_service, caption("red_circle"), "-k", "100",
                       "--uri-prefix", f"{root}/red_")
    assert {h["metadata"]["label"] for h in hits} == {f"red_{s}" for s in ("circle", "square", "triangle")}
    assert len(hits) == 3 * EVAL_PER_LABEL
    assert all(h["uri"].startswith(f"{root}/red_") for h in hits)
    # "_" is a literal, not a one-character wildcard.
    assert search_json(search_service, "x", "-k", "10", "--uri-prefix", f"{root}/red") and \
        search_json(search_service, "x", "-k", "10", "--uri-prefix", f"{root}/re_") == []


def test_offset_pages_through_the_ranking(search, ingested):
    query = caption("green_triangle")
    top = [h.id for h in search.search_text(query, top_k=12)]
    pages = [[h.id for h in search.search_text(query, top_k=4, offset=o)] for o in (0, 4, 8)]
    assert sum(pages, []) == top


def test_min_score_drops_weak_hits(search, ingested):
    query = caption(LABELS[5])
    everything = search.search_text(query, top_k=len(LABELS) * EVAL_PER_LABEL)
    threshold = everything[len(everything) // 3].score
    kept = search.search_text(query, top_k=len(everything), min_score=threshold)
    assert kept == [h for h in everything if h.score >= threshold]
    assert 0 < len(kept) < len(everything)


def test_filters_quote_hostile_values_exactly(search):
    """Each hostile value, as metadata key, value and uri, matches only its own image."""
    items = [IngestItem(image=photo(100 + i), uri=f"/hostile/{value}/{i}",
                        metadata={"label": value, value: "v"}) for i, value in enumerate(HOSTILE)]
    results = list(search.ingest(items, collection="hostile"))
    assert [r.status for r in results] == [IngestResult.STATUS_INSERTED] * len(HOSTILE)
    for i, value in enumerate(HOSTILE):
        for options in ({"where": {"label": value}}, {"where": {value: "v"}},
                        {"uri_prefix": f"/hostile/{value}/"}):
            hits = search.search_text("anything", top_k=50, collection="hostile", **options)
            assert [h.uri for h in hits] == [f"/hostile/{value}/{i}"], (value, options)


@pytest.mark.parametrize("fields, needle", [
    ({"filter": search_pb2.Filter(metadata={"label": search_pb2.AnyOf()})}, "has no values"),
    ({"filter": search_pb2.Filter(metadata={"": search_pb2.AnyOf(values=["x"])})},
     "metadata key must be 1 to 1024 bytes"),
    ({"filter": search_pb2.Filter(metadata={"k": search_pb2.AnyOf(values=["a\x00b"])})},
     "control character"),
    ({"filter": search_pb2.Filter(metadata={f"k{i}": search_pb2.AnyOf(values=["x"])
                                            for i in range(17)})}, "17 metadata keys"),
    ({"filter": search_pb2.Filter(uri_prefix="x" * 1025)}, "uri_prefix must be 1 to 1024 bytes"),
    ({"offset": -1}, "offset must be 0 or more, got -1"),
    ({"offset": 16384}, "top_k + offset must be at most 16384"),
    ({"min_score": 1.5}, "min_score must be between -1 and 1"),
    ({"min_score": math.nan}, "min_score must be between -1 and 1"),
])
def test_bad_search_options(search_stub, fields, needle):
    for request in (search_pb2.SearchByTextRequest(query="a red circle", top_k=5, **fields),
                    search_pb2.SearchByImageRequest(image=photo(), top_k=5, **fields)):
        method = search_stub.SearchByText if hasattr(request, "query") else search_stub.SearchByImage
        error = status_of(method, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in error.details()


def test_cli_rejects_a_filter_without_equals(search_service):
    run = imgsearch(search_service.address, "search", "x", "--filter", "label")
    assert run.returncode == 2 and "--filter 'label' is not KEY=VALUE" in run.stderr
