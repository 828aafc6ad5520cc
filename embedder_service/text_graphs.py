"""Text encoding replayed from CUDA graphs, one per (batch, length) bucket.

An eager forward pass of the 12-layer text transformer launches a few
hundred kernels one by one from Python; for one short query that launch
cost, not the GPU, sets the latency (about 5 to 9 ms on an H200). A CUDA
graph replays them all in one launch. Graphs need fixed shapes, so a batch
is padded up to the next bucket: rows to a power of two, tokens to 16, 32
or the full context. The padding is more pad tokens after the end-of-text
token, with no attention mask: CLIP's text transformer is causal, so the
pooled end-of-text position never sees what follows it, and the vectors are
the eager path's (tests/unit/test_gpu_paths.py checks this on CPU, where
`capture=False` runs the same padded inputs eagerly). A tokenizer that pads
on the left gets no graphs (model.py).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)


def _bucket(sizes: list[int], n: int) -> int:
    return next(size for size in sizes if size >= n)


class TextGraphs:
    """`run(input_ids)` -> L2-normalised float32 vectors through a captured
    graph. `forward(ids)` must return the normalised vectors; it is captured
    as is. Replay from one thread at a time (the graphs share one memory pool)."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], *, pad_id: int,
                 max_batch: int, max_tokens: int, device: torch.device, capture: bool = True) -> None:
        self._forward, self._pad_id, self._device = forward, pad_id, device
        self.batches = sorted({1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch}
                              | {max_batch})
        self.lengths = sorted({n for n in (16, 32) if n < max_tokens} | {max_tokens})
        self._graphs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph]] = {}
        if capture:
            self._capture()

    @torch.inference_mode()
    def _capture(self) -> None:
        """Largest first, so the smaller graphs reuse the pool's blocks."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self._device)
        for rows in reversed(self.batches):
            for length in reversed(self.lengths):
                ids = torch.full((rows, length), self._pad_id, dtype=torch.long, device=self._device)
                side.wait_stream(torch.cuda.current_stream(self._device))
                with torch.cuda.stream(side):  # warm-up: cuBLAS handles, kernel selection
                    for _ in range(2):
                        self._forward(ids)
                torch.cuda.current_stream(self._device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self._forward(ids)
                self._graphs[(rows, length)] = (ids, out, graph)
        torch.cuda.synchronize(self._device)
        log.info("captured %d text CUDA graphs (batches %s x tokens %s) in %.1f s",
                 len(self._graphs), self.batches, self.lengths, time.perf_counter() - started)

    def padded(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`input_ids` (n, l) on the CPU, padded to its (rows, tokens) bucket."""
        n, length = input_ids.shape
        out = torch.full((_bucket(self.batches, n), _bucket(self.lengths, length)), self._pad_id,
                         dtype=torch.long)
        out[:n, :length] = input_ids
        return out

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor) -> np.ndarray:
        n = len(input_ids)
        host = self.padded(input_ids)
        if not self._graphs:  # capture=False: the same padded inputs, eagerly
            return self._forward(host.to(self._device))[:n].cpu().numpy()
        ids, out, graph = self._graphs[tuple(host.shape)]
        ids.copy_(host)
        graph.replay()
        return out[:n].cpu().numpy()
