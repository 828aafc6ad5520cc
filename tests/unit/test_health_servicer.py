"""grpc.health.v1 on a real aio server on loopback: Check, Watch, and a
graceful stop that no Watch stream holds up."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imagesearch.health_servicer import NOT_SERVING, SERVING, HealthServicer

Request = health_pb2.HealthCheckRequest


def _name(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


async def _serve(health: HealthServicer) -> tuple[grpc.aio.Server, grpc.aio.Channel]:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


def test_check_answers_set_statuses_and_not_found_for_unknown_names():
    async def scenario():
        health = HealthServicer()
        server, channel = await _serve(health)
        stub = health_pb2_grpc.HealthStub(channel)
        assert _name(await stub.Check(Request(service=""))) == "SERVING"
        await health.set("api", NOT_SERVING)
        assert _name(await stub.Check(Request(service="api"))) == "NOT_SERVING"
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Check(Request(service="nothing"))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'nothing'" in error.value.details()
        await channel.close()
        await server.stop(None)

    asyncio.run(scenario())


def test_watch_follows_changes_then_ends_at_shutdown_so_the_stop_is_not_held():
    """Two watchers (one of a name never set) see each change once; at
    shutdown both get NOT_SERVING and their streams end OK, so a stop with a
    30 s grace returns at once; later sets change nothing. A name never set
    ends as SERVICE_UNKNOWN. A Watch begun during shutdown, on the
    health-only port that still answers then, gets NOT_SERVING and stays
    open (a client re-opening it at once must not spin) until that server
    stops."""
    async def scenario():
        health = HealthServicer()
        await health.set("api", NOT_SERVING)
        server, channel = await _serve(health)
        health_only, health_channel = await _serve(health)
        stub = health_pb2_grpc.HealthStub(channel)
        api, unknown = stub.Watch(Request(service="api")), stub.Watch(Request(service="later"))
        never = stub.Watch(Request(service="never"))
        assert _name(await api.read()) == "NOT_SERVING"
        assert _name(await unknown.read()) == "SERVICE_UNKNOWN"
        assert _name(await never.read()) == "SERVICE_UNKNOWN"
        await health.set("api", SERVING)
        await health.set("later", SERVING)
        assert _name(await api.read()) == "SERVING"
        assert _name(await unknown.read()) == "SERVING"

        await health.enter_graceful_shutdown()
        await health.set("api", SERVING)  # ignored from now on
        started = time.monotonic()
        stopping = asyncio.create_task(server.stop(30))
        for watch in (api, unknown):
            assert _name(await watch.read()) == "NOT_SERVING"
        for watch in (api, unknown, never):
            assert await watch.read() is grpc.aio.EOF
            assert await watch.code() == grpc.StatusCode.OK
        await stopping
        assert time.monotonic() - started < 5  # nothing in flight: no grace spent
        await channel.close()

        late = health_pb2_grpc.HealthStub(health_channel).Watch(Request(service="api"))
        assert _name(await late.read()) == "NOT_SERVING"
        reading = asyncio.ensure_future(late.read())
        done, _ = await asyncio.wait({reading}, timeout=0.5)
        assert not done  # open, not ended
        await health_only.stop(None)
        with pytest.raises(grpc.aio.AioRpcError):
            await reading
        await health_channel.close()

    asyncio.run(scenario())
