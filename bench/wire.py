"""What vectors cost on the wire: packed float32 bytes (what the API uses)
against `repeated float`, for 20,000 512-d vectors, encode and decode.

    python -m bench.wire

A `repeated float` message is built here from the same descriptor machinery
as the real one (a throwaway proto compiled at run time), so both sides run
the same protobuf runtime.
"""
from __future__ import annotations

import json
import time

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from imagesearch.v1 import embedder_pb2

COUNT, DIM = 20_000, 512


def _repeated_float_class():
    file = descriptor_pb2.FileDescriptorProto(name="bench_wire.proto", package="bench", syntax="proto3")
    message = file.message_type.add(name="FloatVector")
    message.field.add(name="values", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT,
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("bench.FloatVector"))


def _time(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    vectors = np.random.default_rng(0).standard_normal((COUNT, DIM)).astype("<f4")
    FloatVector = _repeated_float_class()

    packed = lambda: [embedder_pb2.Embedding(vector=v.tobytes()).SerializeToString() for v in vectors]
    repeated = lambda: [FloatVector(values=v.tolist()).SerializeToString() for v in vectors]
    packed_wire, repeated_wire = packed(), repeated()

    def unpack():
        for data in packed_wire:
            np.frombuffer(embedder_pb2.Embedding.FromString(data).vector, dtype="<f4")

    def unrepeat():
        for data in repeated_wire:
            np.asarray(FloatVector.FromString(data).values, dtype=np.float32)

    result = {"vectors": COUNT, "dim": DIM}
    for name, encode, decode, wire in (("packed_bytes", packed, unpack, packed_wire),
                                       ("repeated_float", repeated, unrepeat, repeated_wire)):
        seconds = _time(encode) + _time(decode)
        result[name] = {"bytes_per_vector": len(wire[0]),
                        "encode_plus_decode_s": round(seconds, 4),
                        "vectors_per_s": round(COUNT / seconds)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
