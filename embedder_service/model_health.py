"""Whether the model works, for readiness.

A replica whose every forward pass fails (a GPU gone bad, out of memory for
good) must leave the load balancer's rotation, or it keeps taking its share
of the calls and failing them. It goes NOT_SERVING after `threshold`
encodes in a row have failed with no success between them; while it is
down it probes the model every `interval_s`, and the first success (a probe
or a real call) makes it SERVING again.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Awaitable, Callable

log = logging.getLogger(__name__)


class ModelHealth:
    def __init__(self, probe: Callable[[], Awaitable[None]], threshold: int = 3,
                 interval_s: float = 2.0) -> None:
        self._probe = probe
        self._threshold = threshold
        self._interval_s = interval_s
        self._failures = 0
        self._changed = asyncio.Event()

    @property
    def ok(self) -> bool:
        return self._failures < self._threshold

    def record(self, ok: bool, why: str = "") -> None:
        """One encode's outcome."""
        was = self.ok
        self._failures = 0 if ok else self._failures + 1
        if was != self.ok:
            if self.ok:
                log.info("model works again: ready")
            else:
                log.error("model failed %d times in a row (last: %s): not ready until it "
                          "works again", self._failures, why)
            self._changed.set()

    async def watch(self) -> AsyncIterator[bool]:
        """Whether the model works: now, and on every change."""
        yield self.ok
        while True:
            if self.ok:
                await self._changed.wait()
            else:
                try:
                    await asyncio.wait_for(self._changed.wait(), self._interval_s)
                except asyncio.TimeoutError:
                    try:
                        await self._probe()
                        self.record(True)
                    except Exception as exc:  # noqa: BLE001 - still broken; probe again later
                        log.debug("model probe failed: %s", exc)
            self._changed.clear()
            yield self.ok
