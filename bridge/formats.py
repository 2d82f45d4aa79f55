"""Message formats: input messages -> (id, text, object); results -> output messages.

Input (``--input-format``):
  json  a JSON object; the text at ``--text-field`` (a dotted path such as
        ``payload.body``), the id at ``--id-field`` (else the broker's id)
  text  the whole body, UTF-8, is the text; the id is the broker's
For Redis Streams the entry's field map is the object (values decoded as UTF-8),
whatever the input format.

Output (``--output-format``):
  json    the input object plus ``embedding`` (list of numbers), ``model`` and
          ``dimension`` (text input: ``{"id", "text", ...}``)
  binary  the packed little-endian vector as the body; ``id``, ``model``,
          ``dimension`` and ``dtype`` in headers (Redis Streams: fields, with
          the vector in field ``embedding``)

A message that cannot be read raises Poison with the reason.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency; json still works
    orjson = None

from embedq.v1 import embedq_pb2 as pb

from .brokers.base import Message, OutMessage

INPUT_FORMATS = ("json", "text")
OUTPUT_FORMATS = ("json", "binary")
DTYPE_NAMES = {
    pb.DTYPE_UNSPECIFIED: "float32",
    pb.DTYPE_FLOAT32: "float32",
    pb.DTYPE_FLOAT16: "float16",
    pb.DTYPE_INT8: "int8",
    pb.DTYPE_UINT8: "uint8",
    pb.DTYPE_BINARY: "binary",
    pb.DTYPE_UBINARY: "ubinary",
}
# Header names of dead letters.
REASON = "embedq-reason"
SOURCE = "embedq-source"
SOURCE_ID = "embedq-source-id"


class Poison(Exception):
    """A message that can never be embedded; str(error) is the reason."""


@dataclass(frozen=True)
class InputFormat:
    kind: str = "json"
    text_field: str = "text"
    id_field: str = "id"
    # Longest text in UTF-8 bytes (the server's max_text_bytes; 0: no check).
    max_text_bytes: int = 0


@dataclass(frozen=True)
class Parsed:
    id: str
    text: str
    # The object the output is built on.
    obj: dict[str, Any]


def _dotted(obj: dict[str, Any], path: str) -> tuple[bool, Any]:
    """(found, value) of a dotted path; an exact key containing dots wins."""
    if path in obj:
        return True, obj[path]
    value: Any = obj
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _decode_fields(fields: Any) -> dict[str, str]:
    obj = {}
    for key, value in fields.items():
        try:
            name = key.decode("utf-8") if isinstance(key, bytes) else str(key)
            obj[name] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        except UnicodeDecodeError:
            raise Poison(f"field {key!r} is not UTF-8") from None
    return obj


def parse(message: Message, fmt: InputFormat) -> Parsed:
    """The id, text and object of a message; Poison if it has none."""
    if message.fields is not None:
        obj: dict[str, Any] = _decode_fields(message.fields)
    else:
        try:
            body = (message.body or b"").decode("utf-8")
        except UnicodeDecodeError:
            raise Poison("body is not UTF-8") from None
        if fmt.kind == "text":
            text = body
            obj = {"id": message.message_id, "text": text}
            _check_size(text, fmt)
            return Parsed(message.message_id, text, obj)
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError) as error:  # RecursionError: nested too deep
            raise Poison(f"body is not JSON ({error})") from None
        if not isinstance(obj, dict):
            raise Poison(f"body is a JSON {type(obj).__name__}, not an object")
    found, text = _dotted(obj, fmt.text_field)
    if not found:
        raise Poison(f"no field {fmt.text_field!r}")
    if not isinstance(text, str):
        raise Poison(f"field {fmt.text_field!r} is a {type(text).__name__}, not a string")
    _check_size(text, fmt)
    found, ident = _dotted(obj, fmt.id_field)
    if not found or ident is None or isinstance(ident, dict | list) or _utf8(str(ident)) is None:
        ident = message.message_id  # an id no header could carry is not used
    return Parsed(str(ident), text, obj)


def _utf8(value: str) -> bytes | None:
    """`value` in UTF-8; None when it is not valid Unicode (a JSON escape can hold a lone
    surrogate, which no header or protobuf string can carry)."""
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        return None


def _check_size(text: str, fmt: InputFormat) -> None:
    """Poison unless the text can be sent: valid Unicode and within the server's limit."""
    data = _utf8(text)
    if data is None:
        raise Poison("text is not valid Unicode (a lone surrogate)")
    size = len(data)
    if fmt.max_text_bytes and size > fmt.max_text_bytes:
        raise Poison(f"text is {size} bytes, over the server's limit of {fmt.max_text_bytes}")


def _field_value(value: Any) -> str:
    return value if isinstance(value, str) else _json(value).decode("utf-8")


def _json(value: Any) -> bytes:
    """Compact UTF-8 JSON; numpy vectors directly (orjson, ~10x the json module on the
    384 floats of every message: profiled as the bridge's own largest cost)."""
    if orjson is not None:
        return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, dict):
        value = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in value.items()}
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def render(
    parsed: Parsed, vector: np.ndarray, model: str, dimension: int, dtype: int, kind: str
) -> OutMessage:
    """The output message of one embedded input."""
    dtype_name = DTYPE_NAMES.get(dtype, "float32")
    headers = {"id": parsed.id, "model": model, "dimension": str(dimension), "dtype": dtype_name}
    if kind == "binary":
        body = np.ascontiguousarray(vector).astype(vector.dtype.newbyteorder("<")).tobytes()
        fields: dict[str, bytes | str] = {**headers, "embedding": body}
        return OutMessage(body, headers, fields, parsed.id, "application/octet-stream")
    vector = np.ascontiguousarray(vector)
    obj = {**parsed.obj, "embedding": vector, "model": model, "dimension": dimension}
    body = _json(obj)
    fields = {key: _field_value(value) for key, value in obj.items()}
    return OutMessage(body, headers, fields, parsed.id, "application/json")


def original_body(message: Message) -> bytes:
    """The message's body as received; a Redis entry's field map as a JSON object
    (a value that is not UTF-8 as {"base64": ...})."""
    if message.fields is None:
        return message.body or b""
    obj: dict[str, Any] = {}
    for key, value in message.fields.items():
        name = key.decode("utf-8", "backslashreplace") if isinstance(key, bytes) else str(key)
        try:
            obj[name] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        except UnicodeDecodeError:
            obj[name] = {"base64": base64.b64encode(value).decode("ascii")}
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def dead_letter(message: Message, reason: str, source: str) -> OutMessage:
    """A dead letter: the original body, byte for byte, with the reason in headers
    (for a Redis stream sink: the original fields, or `body`, plus the headers)."""
    headers = {REASON: reason, SOURCE: source, SOURCE_ID: message.message_id}
    if message.fields is not None:
        fields: dict[str, bytes | str] = {
            (k.decode("utf-8", "backslashreplace") if isinstance(k, bytes) else str(k)): v
            for k, v in message.fields.items()
        }
        fields.update(headers)
    else:
        fields = {"body": message.body or b"", **headers}
    body = original_body(message)
    content_type = "application/json" if message.fields is not None else "application/octet-stream"
    return OutMessage(body, headers, fields, message.message_id, content_type)
