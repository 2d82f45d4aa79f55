from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_BINARY: _ClassVar[DType]
    DTYPE_UBINARY: _ClassVar[DType]

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_UNSPECIFIED: _ClassVar[Precision]
    PRECISION_FLOAT32: _ClassVar[Precision]
    PRECISION_FLOAT16: _ClassVar[Precision]
    PRECISION_INT8: _ClassVar[Precision]
    PRECISION_UINT8: _ClassVar[Precision]
    PRECISION_BINARY: _ClassVar[Precision]
    PRECISION_UBINARY: _ClassVar[Precision]

class Truncation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRUNCATION_UNSPECIFIED: _ClassVar[Truncation]
    TRUNCATION_END: _ClassVar[Truncation]
    TRUNCATION_REJECT: _ClassVar[Truncation]

class Metric(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRIC_UNSPECIFIED: _ClassVar[Metric]
    METRIC_COSINE: _ClassVar[Metric]
    METRIC_DOT: _ClassVar[Metric]
    METRIC_EUCLIDEAN: _ClassVar[Metric]
    METRIC_MANHATTAN: _ClassVar[Metric]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_INT8: DType
DTYPE_UINT8: DType
DTYPE_BINARY: DType
DTYPE_UBINARY: DType
PRECISION_UNSPECIFIED: Precision
PRECISION_FLOAT32: Precision
PRECISION_FLOAT16: Precision
PRECISION_INT8: Precision
PRECISION_UINT8: Precision
PRECISION_BINARY: Precision
PRECISION_UBINARY: Precision
TRUNCATION_UNSPECIFIED: Truncation
TRUNCATION_END: Truncation
TRUNCATION_REJECT: Truncation
METRIC_UNSPECIFIED: Metric
METRIC_COSINE: Metric
METRIC_DOT: Metric
METRIC_EUCLIDEAN: Metric
METRIC_MANHATTAN: Metric

class EncodeOptions(_message.Message):
    __slots__ = ("model", "normalize", "truncation", "dimension", "precision", "prompt", "prompt_name", "ranges")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_NAME_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    model: str
    normalize: bool
    truncation: Truncation
    dimension: int
    precision: Precision
    prompt: str
    prompt_name: str
    ranges: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, model: _Optional[str] = ..., normalize: _Optional[bool] = ..., truncation: _Optional[_Union[Truncation, str]] = ..., dimension: _Optional[int] = ..., precision: _Optional[_Union[Precision, str]] = ..., prompt: _Optional[str] = ..., prompt_name: _Optional[str] = ..., ranges: _Optional[_Iterable[float]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("texts", "options")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    options: EncodeOptions
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., options: _Optional[_Union[EncodeOptions, _Mapping]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("model", "dimension", "dtype", "count", "embeddings", "cached")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    model: str
    dimension: int
    dtype: DType
    count: int
    embeddings: bytes
    cached: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, model: _Optional[str] = ..., dimension: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., count: _Optional[int] = ..., embeddings: _Optional[bytes] = ..., cached: _Optional[_Iterable[bool]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "retry_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    retry_after_ms: int
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class EncodeStreamRequest(_message.Message):
    __slots__ = ("id", "texts", "options", "timeout_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    options: EncodeOptions
    timeout_ms: int
    def __init__(self, id: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., options: _Optional[_Union[EncodeOptions, _Mapping]] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class EncodeStreamResponse(_message.Message):
    __slots__ = ("id", "model", "dimension", "dtype", "count", "embeddings", "cached", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    dimension: int
    dtype: DType
    count: int
    embeddings: bytes
    cached: _containers.RepeatedScalarFieldContainer[bool]
    error: Error
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., dimension: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., count: _Optional[int] = ..., embeddings: _Optional[bytes] = ..., cached: _Optional[_Iterable[bool]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class TextPair(_message.Message):
    __slots__ = ("a", "b")
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    a: str
    b: str
    def __init__(self, a: _Optional[str] = ..., b: _Optional[str] = ...) -> None: ...

class PairList(_message.Message):
    __slots__ = ("pairs",)
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    pairs: _containers.RepeatedCompositeFieldContainer[TextPair]
    def __init__(self, pairs: _Optional[_Iterable[_Union[TextPair, _Mapping]]] = ...) -> None: ...

class QueryCandidates(_message.Message):
    __slots__ = ("query", "candidates")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    query: str
    candidates: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, query: _Optional[str] = ..., candidates: _Optional[_Iterable[str]] = ...) -> None: ...

class SimilarityRequest(_message.Message):
    __slots__ = ("pairs", "ranking", "metric", "top_k", "options")
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    pairs: PairList
    ranking: QueryCandidates
    metric: Metric
    top_k: int
    options: EncodeOptions
    def __init__(self, pairs: _Optional[_Union[PairList, _Mapping]] = ..., ranking: _Optional[_Union[QueryCandidates, _Mapping]] = ..., metric: _Optional[_Union[Metric, str]] = ..., top_k: _Optional[int] = ..., options: _Optional[_Union[EncodeOptions, _Mapping]] = ...) -> None: ...

class Match(_message.Message):
    __slots__ = ("index", "score")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    index: int
    score: float
    def __init__(self, index: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class SimilarityResponse(_message.Message):
    __slots__ = ("model", "metric", "scores", "matches")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    model: str
    metric: Metric
    scores: _containers.RepeatedScalarFieldContainer[float]
    matches: _containers.RepeatedCompositeFieldContainer[Match]
    def __init__(self, model: _Optional[str] = ..., metric: _Optional[_Union[Metric, str]] = ..., scores: _Optional[_Iterable[float]] = ..., matches: _Optional[_Iterable[_Union[Match, _Mapping]]] = ...) -> None: ...

class SimilarityStreamRequest(_message.Message):
    __slots__ = ("id", "request", "timeout_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    request: SimilarityRequest
    timeout_ms: int
    def __init__(self, id: _Optional[str] = ..., request: _Optional[_Union[SimilarityRequest, _Mapping]] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class SimilarityStreamResponse(_message.Message):
    __slots__ = ("id", "response", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    response: SimilarityResponse
    error: Error
    def __init__(self, id: _Optional[str] = ..., response: _Optional[_Union[SimilarityResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("texts", "sha256", "options")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    sha256: _containers.RepeatedScalarFieldContainer[bytes]
    options: EncodeOptions
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., sha256: _Optional[_Iterable[bytes]] = ..., options: _Optional[_Union[EncodeOptions, _Mapping]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("model", "dimension", "dtype", "found", "embeddings", "count")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    model: str
    dimension: int
    dtype: DType
    found: _containers.RepeatedScalarFieldContainer[bool]
    embeddings: bytes
    count: int
    def __init__(self, model: _Optional[str] = ..., dimension: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., found: _Optional[_Iterable[bool]] = ..., embeddings: _Optional[bytes] = ..., count: _Optional[int] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("texts", "options")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    options: EncodeOptions
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., options: _Optional[_Union[EncodeOptions, _Mapping]] = ...) -> None: ...

class TokenizedText(_message.Message):
    __slots__ = ("ids", "tokens", "truncated", "full_length")
    IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    FULL_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    truncated: bool
    full_length: int
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[str]] = ..., truncated: _Optional[bool] = ..., full_length: _Optional[int] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("model", "texts")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    texts: _containers.RepeatedCompositeFieldContainer[TokenizedText]
    def __init__(self, model: _Optional[str] = ..., texts: _Optional[_Iterable[_Union[TokenizedText, _Mapping]]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "fingerprint", "dimension", "pooling", "max_seq_length", "normalize", "workers_alive", "source", "prompts", "default_prompt_name", "capacity_texts_per_s")
    class PromptsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LENGTH_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    WORKERS_ALIVE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PROMPT_NAME_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_TEXTS_PER_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    fingerprint: str
    dimension: int
    pooling: str
    max_seq_length: int
    normalize: bool
    workers_alive: int
    source: str
    prompts: _containers.ScalarMap[str, str]
    default_prompt_name: str
    capacity_texts_per_s: float
    def __init__(self, name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., dimension: _Optional[int] = ..., pooling: _Optional[str] = ..., max_seq_length: _Optional[int] = ..., normalize: _Optional[bool] = ..., workers_alive: _Optional[int] = ..., source: _Optional[str] = ..., prompts: _Optional[_Mapping[str, str]] = ..., default_prompt_name: _Optional[str] = ..., capacity_texts_per_s: _Optional[float] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_batch_texts", "max_text_bytes", "max_message_bytes", "max_candidates")
    MAX_BATCH_TEXTS_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    max_batch_texts: int
    max_text_bytes: int
    max_message_bytes: int
    max_candidates: int
    def __init__(self, max_batch_texts: _Optional[int] = ..., max_text_bytes: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_candidates: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("models", "default_model", "limits", "version")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model: str
    limits: Limits
    version: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., version: _Optional[str] = ...) -> None: ...
