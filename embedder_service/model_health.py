"""Whether the model works, for readiness.

A replica whose every forward pass fails (a GPU gone bad, out of memory for
good) must leave the load balancer's rotation, or it keeps taking its share
of the calls and failing them. It goes NOT_SERVING after `threshold`
forward passes of one kind (text or image) in a row have failed with no
success of that kind between them; while it is down it probes both every
`interval_s`, and a probe that works makes it SERVING again.
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
        self._failures: dict[str, int] = {}  # kind -> forward passes failed in a row
        self._changed = asyncio.Event()

    @property
    def ok(self) -> bool:
        return all(count < self._threshold for count in self._failures.values())

    def record(self, kind: str, ok: bool, why: str = "") -> None:
        """How one forward pass of `kind` ended."""
        was = self.ok
        self._failures[kind] = 0 if ok else self._failures.get(kind, 0) + 1
        self._changed_from(was, f"{kind} passes failed {self._failures[kind]} times in a row "
                                f"(last: {why})")

    def _changed_from(self, was: bool, why: str) -> None:
        if was != self.ok:
            if self.ok:
                log.info("model works again: ready")
            else:
                log.error("model broken: %s: not ready until it works again", why)
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
                        was, self._failures = self.ok, {}
                        self._changed_from(was, "")
                    except Exception as exc:  # noqa: BLE001 - still broken; probe again later
                        log.debug("model probe failed: %s", exc)
            self._changed.clear()
            yield self.ok
