"""`python -m embedder_service`: check the flags, load the model, warm up, serve until SIGTERM."""
from __future__ import annotations

import signal
import sys

# Installed before anything slow (imports, the model): as PID 1 in a
# container without an init, a process ignores any signal it has no handler
# for, so SIGTERM during start-up would wait for the model to load. The
# server's own handler replaces this one once it serves.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

import asyncio
import logging

from prometheus_client import Gauge

from embedder_service import checkpoint
from embedder_service.config import parse_config
from imagesearch import tracing
from imagesearch.flags import check_server_flags, exit_startup
from imagesearch.observability import setup_logging
from imagesearch.serving import serve
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc

log = logging.getLogger("embedder_service")
MODEL_LOAD = Gauge("embedder_model_load_seconds", "Seconds the model took to load at start-up")


def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv)
    setup_logging(config.log_level, config.log_format)
    check_server_flags(config, "embedder")
    if config.image_decode == "gpu" and config.device == "cpu":
        exit_startup("--image-decode gpu: GPU JPEG decoding needs a CUDA device, not --device cpu")
    tracing.setup("imagesearch-embedder")
    try:
        hub = checkpoint.locate(config.model, config.model_revision)
    except checkpoint.ModelLoadError as exc:
        exit_startup(str(exc))
    # torch and the model code load only now, so that a flag or file mistake
    # is reported in a second, not after the seconds torch takes to import.
    import torch

    from embedder_service.device_images import DeviceDecodeUnavailable
    from embedder_service.model import ClipEncoder
    from embedder_service.servicer import EmbedderServicer

    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    log.info("loading model %s%s", config.model,
             f" at revision {config.model_revision}" if config.model_revision else "")
    try:
        encoder = ClipEncoder(config.model, config.device, config.dtype, config.batch_size,
                              cuda_graphs=config.cuda_graphs, revision=config.model_revision,
                              hub=hub)
    except checkpoint.ModelLoadError as exc:
        exit_startup(str(exc))
    MODEL_LOAD.set(encoder.load_seconds)
    try:
        servicer = EmbedderServicer(encoder, config)
    except DeviceDecodeUnavailable as exc:
        exit_startup(f"--image-decode gpu: {exc}")
    service_name = embedder_pb2.DESCRIPTOR.services_by_name["EmbedderService"].full_name
    asyncio.run(serve(
        config, name="embedder", service_names=[service_name],
        register=lambda server: embedder_pb2_grpc.add_EmbedderServiceServicer_to_server(servicer, server),
        ready=servicer.warm_up, watch=servicer.health.watch))


if __name__ == "__main__":
    main()
