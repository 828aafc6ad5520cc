"""Messages the search service writes in wire form by hand parse back as
protobuf's own would: the EncodeImage request, the Milvus upsert."""
from __future__ import annotations

import json
import os

import numpy as np
from pymilvus import DataType

from imagesearch.v1 import embedder_pb2
from search_service.embedder_client import _image_request
from search_service.store.milvus import Row, _upsert_request


def test_image_request_is_the_message_protobuf_would_send():
    images = [os.urandom(n) for n in (0, 1, 127, 128, 16383, 16384, 70000, (2 << 20) + 3)]
    raw = _image_request(images)
    parsed = embedder_pb2.EncodeImageRequest.FromString(raw)
    assert list(parsed.images) == images and parsed.allow_partial
    assert parsed == embedder_pb2.EncodeImageRequest(images=images, allow_partial=True)
    assert len(raw) == embedder_pb2.EncodeImageRequest(images=images, allow_partial=True).ByteSize()


def test_upsert_request_columns_hold_every_row_exactly():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((5, 512)).astype(np.float32)
    rows = [Row(id=f"{i:064x}", vector=vectors[i] if i % 2 else vectors[i].tolist(),
                uri=f"file:///ü/{i}.jpg", metadata={"k": f"v{i}", "q": '"\\'}) for i in range(5)]
    request = _upsert_request("images", rows, {"update_timestamp": 7})
    assert request.collection_name == "images" and request.num_rows == 5
    assert request.schema_timestamp == 7
    columns = {field.field_name: field for field in request.fields_data}
    assert columns["id"].type == DataType.VARCHAR
    assert list(columns["id"].scalars.string_data.data) == [row.id for row in rows]
    assert columns["vector"].type == DataType.FLOAT_VECTOR and columns["vector"].vectors.dim == 512
    got = np.array(columns["vector"].vectors.float_vector.data, dtype=np.float32).reshape(5, 512)
    assert np.array_equal(got, vectors)
    assert list(columns["uri"].scalars.string_data.data) == [row.uri for row in rows]
    assert [json.loads(m) for m in columns["metadata"].scalars.json_data.data] == \
        [row.metadata for row in rows]
