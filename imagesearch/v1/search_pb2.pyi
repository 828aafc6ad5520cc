from imagesearch.v1 import embedder_pb2 as _embedder_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IngestRequest(_message.Message):
    __slots__ = ("collection", "items")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    items: _containers.RepeatedCompositeFieldContainer[IngestItem]
    def __init__(self, collection: _Optional[str] = ..., items: _Optional[_Iterable[_Union[IngestItem, _Mapping]]] = ...) -> None: ...

class IngestItem(_message.Message):
    __slots__ = ("image", "uri", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    uri: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, image: _Optional[bytes] = ..., uri: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class IngestResponse(_message.Message):
    __slots__ = ("results", "consistency_token")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[IngestResult]
    consistency_token: bytes
    def __init__(self, results: _Optional[_Iterable[_Union[IngestResult, _Mapping]]] = ..., consistency_token: _Optional[bytes] = ...) -> None: ...

class IngestResult(_message.Message):
    __slots__ = ("index", "id", "uri", "status", "error")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[IngestResult.Status]
        STATUS_INSERTED: _ClassVar[IngestResult.Status]
        STATUS_ALREADY_PRESENT: _ClassVar[IngestResult.Status]
        STATUS_FAILED: _ClassVar[IngestResult.Status]
    STATUS_UNSPECIFIED: IngestResult.Status
    STATUS_INSERTED: IngestResult.Status
    STATUS_ALREADY_PRESENT: IngestResult.Status
    STATUS_FAILED: IngestResult.Status
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    id: str
    uri: str
    status: IngestResult.Status
    error: str
    def __init__(self, index: _Optional[int] = ..., id: _Optional[str] = ..., uri: _Optional[str] = ..., status: _Optional[_Union[IngestResult.Status, str]] = ..., error: _Optional[str] = ...) -> None: ...

class SearchByTextRequest(_message.Message):
    __slots__ = ("query", "top_k", "collection", "filter", "offset", "min_score", "consistency_token")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    query: str
    top_k: int
    collection: str
    filter: Filter
    offset: int
    min_score: float
    consistency_token: bytes
    def __init__(self, query: _Optional[str] = ..., top_k: _Optional[int] = ..., collection: _Optional[str] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., offset: _Optional[int] = ..., min_score: _Optional[float] = ..., consistency_token: _Optional[bytes] = ...) -> None: ...

class SearchByImageRequest(_message.Message):
    __slots__ = ("image", "top_k", "collection", "filter", "offset", "min_score", "consistency_token")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    top_k: int
    collection: str
    filter: Filter
    offset: int
    min_score: float
    consistency_token: bytes
    def __init__(self, image: _Optional[bytes] = ..., top_k: _Optional[int] = ..., collection: _Optional[str] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., offset: _Optional[int] = ..., min_score: _Optional[float] = ..., consistency_token: _Optional[bytes] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("metadata", "uri_prefix")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: AnyOf
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[AnyOf, _Mapping]] = ...) -> None: ...
    METADATA_FIELD_NUMBER: _ClassVar[int]
    URI_PREFIX_FIELD_NUMBER: _ClassVar[int]
    metadata: _containers.MessageMap[str, AnyOf]
    uri_prefix: str
    def __init__(self, metadata: _Optional[_Mapping[str, AnyOf]] = ..., uri_prefix: _Optional[str] = ...) -> None: ...

class AnyOf(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("id", "score", "uri", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    uri: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., uri: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SearchByTextResponse(_message.Message):
    __slots__ = ("hits", "next_offset")
    HITS_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    next_offset: int
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., next_offset: _Optional[int] = ...) -> None: ...

class SearchByImageResponse(_message.Message):
    __slots__ = ("hits", "next_offset")
    HITS_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    next_offset: int
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., next_offset: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("ids", "collection")
    IDS_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    collection: str
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., collection: _Optional[str] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "missing", "consistency_token")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    missing: _containers.RepeatedScalarFieldContainer[str]
    consistency_token: bytes
    def __init__(self, deleted: _Optional[int] = ..., missing: _Optional[_Iterable[str]] = ..., consistency_token: _Optional[bytes] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ("collection", "consistency_token")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    collection: str
    consistency_token: bytes
    def __init__(self, collection: _Optional[str] = ..., consistency_token: _Optional[bytes] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("collection", "count", "model")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    collection: str
    count: int
    model: _embedder_pb2.ModelIdentity
    def __init__(self, collection: _Optional[str] = ..., count: _Optional[int] = ..., model: _Optional[_Union[_embedder_pb2.ModelIdentity, _Mapping]] = ...) -> None: ...
