"""Model health: NOT_SERVING after failures in a row, SERVING after a probe works."""
from __future__ import annotations

import asyncio

from embedder_service.model_health import ModelHealth
from embedder_service.servicer import _row_chunks


def test_failures_in_a_row_take_it_down_and_a_working_probe_brings_it_back():
    async def run():
        broken = True

        async def probe():
            if broken:
                raise RuntimeError("still broken")
        health = ModelHealth(probe, threshold=3, interval_s=0.01)
        states = health.watch()
        assert await anext(states) is True
        health.record("image", False, "x")
        health.record("image", True)  # a success between failures resets the count
        for _ in range(2):
            health.record("image", False, "x")
        health.record("text", True)  # texts working says nothing of images
        assert health.ok
        health.record("image", False, "x")
        assert await anext(states) is False
        assert await anext(states) is False  # the probe failed
        broken = False
        while not await anext(states):
            pass
        return health.ok
    assert asyncio.run(run()) is True


def test_requests_are_cut_into_model_batches_across_parts():
    import numpy as np
    parts = [np.arange(5), np.arange(5, 8)]
    chunks = _row_chunks(parts, 3)
    assert [[list(p) for p in chunk] for chunk in chunks] == [[[0, 1, 2]], [[3, 4], [5]], [[6, 7]]]
