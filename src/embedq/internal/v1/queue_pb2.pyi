from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_KIND_UNSPECIFIED: _ClassVar[JobKind]
    JOB_KIND_ENCODE: _ClassVar[JobKind]
    JOB_KIND_TOKENIZE: _ClassVar[JobKind]

class ErrorKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_KIND_UNSPECIFIED: _ClassVar[ErrorKind]
    ERROR_KIND_INVALID_INPUT: _ClassVar[ErrorKind]
    ERROR_KIND_TOO_LONG: _ClassVar[ErrorKind]
    ERROR_KIND_OVERLOADED: _ClassVar[ErrorKind]
    ERROR_KIND_UNAVAILABLE: _ClassVar[ErrorKind]
    ERROR_KIND_DEADLINE: _ClassVar[ErrorKind]
    ERROR_KIND_UNAUTHENTICATED: _ClassVar[ErrorKind]
    ERROR_KIND_PERMISSION: _ClassVar[ErrorKind]
    ERROR_KIND_NOT_FOUND: _ClassVar[ErrorKind]
    ERROR_KIND_INTERNAL: _ClassVar[ErrorKind]
JOB_KIND_UNSPECIFIED: JobKind
JOB_KIND_ENCODE: JobKind
JOB_KIND_TOKENIZE: JobKind
ERROR_KIND_UNSPECIFIED: ErrorKind
ERROR_KIND_INVALID_INPUT: ErrorKind
ERROR_KIND_TOO_LONG: ErrorKind
ERROR_KIND_OVERLOADED: ErrorKind
ERROR_KIND_UNAVAILABLE: ErrorKind
ERROR_KIND_DEADLINE: ErrorKind
ERROR_KIND_UNAUTHENTICATED: ErrorKind
ERROR_KIND_PERMISSION: ErrorKind
ERROR_KIND_NOT_FOUND: ErrorKind
ERROR_KIND_INTERNAL: ErrorKind

class Item(_message.Message):
    __slots__ = ("ticket", "text", "deadline_unix_ms")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ticket: int
    text: str
    deadline_unix_ms: int
    def __init__(self, ticket: _Optional[int] = ..., text: _Optional[str] = ..., deadline_unix_ms: _Optional[int] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("kind", "reply_to", "items", "normalize", "truncate", "variant", "deadline_unix_ms", "fingerprint", "prompt")
    KIND_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    kind: JobKind
    reply_to: str
    items: _containers.RepeatedCompositeFieldContainer[Item]
    normalize: bool
    truncate: bool
    variant: str
    deadline_unix_ms: int
    fingerprint: str
    prompt: str
    def __init__(self, kind: _Optional[_Union[JobKind, str]] = ..., reply_to: _Optional[str] = ..., items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., normalize: _Optional[bool] = ..., truncate: _Optional[bool] = ..., variant: _Optional[str] = ..., deadline_unix_ms: _Optional[int] = ..., fingerprint: _Optional[str] = ..., prompt: _Optional[str] = ...) -> None: ...

class Failure(_message.Message):
    __slots__ = ("ticket", "code", "message", "kind")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ticket: int
    code: int
    message: str
    kind: ErrorKind
    def __init__(self, ticket: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., kind: _Optional[_Union[ErrorKind, str]] = ...) -> None: ...

class Tokens(_message.Message):
    __slots__ = ("ticket", "ids", "tokens", "truncated", "full_length")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    FULL_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ticket: int
    ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    truncated: bool
    full_length: int
    def __init__(self, ticket: _Optional[int] = ..., ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[str]] = ..., truncated: _Optional[bool] = ..., full_length: _Optional[int] = ...) -> None: ...

class Reply(_message.Message):
    __slots__ = ("tickets", "vectors", "dimension", "failures", "tokens")
    TICKETS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tickets: _containers.RepeatedScalarFieldContainer[int]
    vectors: bytes
    dimension: int
    failures: _containers.RepeatedCompositeFieldContainer[Failure]
    tokens: _containers.RepeatedCompositeFieldContainer[Tokens]
    def __init__(self, tickets: _Optional[_Iterable[int]] = ..., vectors: _Optional[bytes] = ..., dimension: _Optional[int] = ..., failures: _Optional[_Iterable[_Union[Failure, _Mapping]]] = ..., tokens: _Optional[_Iterable[_Union[Tokens, _Mapping]]] = ...) -> None: ...

class ModelRegistration(_message.Message):
    __slots__ = ("name", "fingerprint", "dimension", "pooling", "max_seq_length", "normalize", "source", "registered_unix_ms", "prompts", "default_prompt_name")
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
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PROMPT_NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    fingerprint: str
    dimension: int
    pooling: str
    max_seq_length: int
    normalize: bool
    source: str
    registered_unix_ms: int
    prompts: _containers.ScalarMap[str, str]
    default_prompt_name: str
    def __init__(self, name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., dimension: _Optional[int] = ..., pooling: _Optional[str] = ..., max_seq_length: _Optional[int] = ..., normalize: _Optional[bool] = ..., source: _Optional[str] = ..., registered_unix_ms: _Optional[int] = ..., prompts: _Optional[_Mapping[str, str]] = ..., default_prompt_name: _Optional[str] = ...) -> None: ...

class HeldCalls(_message.Message):
    __slots__ = ("expires_unix_ms", "calls")
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    expires_unix_ms: int
    calls: _containers.RepeatedCompositeFieldContainer[HeldCall]
    def __init__(self, expires_unix_ms: _Optional[int] = ..., calls: _Optional[_Iterable[_Union[HeldCall, _Mapping]]] = ...) -> None: ...

class HeldCall(_message.Message):
    __slots__ = ("texts", "deadline_unix_ms")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    texts: int
    deadline_unix_ms: int
    def __init__(self, texts: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ...) -> None: ...

class StreamMessageId(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    def __init__(self, id: _Optional[bytes] = ...) -> None: ...
