"""The least any search process does per ingested image, for a floor in bench/ingest_cpu.py.

    python -m bench.relay --port 50052 --embedder 127.0.0.1:50051

An `Ingest` that receives each message, sends its images to the embedder in
one `EncodeImage` request (joined in wire form as the search service does)
and answers INSERTED for each vector: no hashing, no checks, no Milvus. The
CPU it spends per image is what passing the bytes through Python gRPC costs
on this machine, in and out; the search service cannot spend less.
"""
from __future__ import annotations

import argparse
import asyncio

import grpc
from grpc_health.v1 import health_pb2_grpc

from imagesearch.channels import channel_options
from imagesearch.health_servicer import HealthServicer
from imagesearch.v1 import embedder_pb2, search_pb2, search_pb2_grpc
from search_service.embedder_client import _image_request

_MESSAGE_BYTES = 64 << 20
Result = search_pb2.IngestResult


class Relay(search_pb2_grpc.ImageSearchServiceServicer):
    def __init__(self, embedder: str) -> None:
        channel = grpc.aio.insecure_channel(embedder, channel_options(_MESSAGE_BYTES))
        self._encode = channel.unary_unary(
            "/imagesearch.v1.EmbedderService/EncodeImage", request_serializer=None,
            response_deserializer=embedder_pb2.EncodeImageResponse.FromString)

    async def Ingest(self, request_iterator, context):
        index = 0
        async for request in request_iterator:
            response = await self._encode(_image_request([item.image for item in request.items]))
            yield search_pb2.IngestResponse(results=[
                Result(index=index + i, status=Result.STATUS_INSERTED)
                for i, _ in enumerate(response.embeddings)])
            index += len(response.embeddings)


async def serve(host: str, port: int, embedder: str) -> None:
    server = grpc.aio.server(options=channel_options(_MESSAGE_BYTES))
    search_pb2_grpc.add_ImageSearchServiceServicer_to_server(Relay(embedder), server)
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--embedder", required=True, help="the embedder's address")
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.embedder))


if __name__ == "__main__":
    main()
