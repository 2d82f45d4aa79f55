"""Generate docs/api.md, the API reference, from the comments in protos/.

Run `python -m embedq.tools.apidoc` after editing a public .proto file (next to
`python -m embedq.tools.protogen`). The output is checked in; tests/test_docs.py
proves it matches what this module generates now. `--check` only compares.

protoc (from grpcio-tools) parses the .proto with `--include_source_info`,
so comments come from the compiler's own source locations, not from a
hand-written parser.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

from embedq.tools.protogen import PROTO_ROOT, REPO_ROOT
from google.protobuf import descriptor_pb2

DEFAULT_OUT = REPO_ROOT / "docs" / "api.md"
# The public API: every .proto of package embedq.v1 (queue.proto is internal).
PUBLIC_DIR = "embedq/v1"

FDP = descriptor_pb2.FieldDescriptorProto
# Field numbers inside descriptor.proto, the path elements of source locations.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE, FILE_SYNTAX = 4, 5, 6, 12
MSG_FIELD, MSG_NESTED, MSG_ENUM, MSG_ONEOF, MSG_RESERVED = 2, 3, 4, 8, 9
ENUM_VALUE, ENUM_RESERVED = 2, 4
SERVICE_METHOD = 2

Path_ = tuple[int, ...]

# Served next to Embedder by every server (server/app.py); not in our .proto.
STANDARD_SERVICES = (
    "Every server also serves `grpc.health.v1.Health` (standard gRPC health checking: `Check` "
    "and `Watch`, for the empty service name and for `embedq.v1.Embedder`; SERVING while Redis "
    "answers) and server reflection (`grpc.reflection.v1alpha.ServerReflection`), so `grpcurl` "
    "and other tools work without stubs. Both stay open when bearer tokens are required."
)


def public_protos() -> list[str]:
    """The public .proto files, relative to protos/."""
    return sorted(
        str(path.relative_to(PROTO_ROOT)) for path in (PROTO_ROOT / PUBLIC_DIR).glob("*.proto")
    )


def load_descriptors(files: list[str]) -> list[descriptor_pb2.FileDescriptorProto]:
    """FileDescriptorProtos with source info (comments), straight from protoc."""
    import importlib.resources

    from grpc_tools import protoc  # test/dev dependency only

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "api.pb"
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *files,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(files)}")
        descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return list(descriptor_set.file)


# -- text helpers ---------------------------------------------------------------


def _escape_prose(text: str) -> str:
    """Escape what Markdown would take for HTML, outside `code spans`."""
    parts = text.split("`")
    for index in range(0, len(parts), 2):
        parts[index] = parts[index].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


LIST_MARKERS = ("* ", "- ", "+ ")


def block(comment: str) -> str:
    """A comment as Markdown paragraphs: dedented, prose escaped, indented
    code blocks left alone."""
    lines = textwrap.dedent(comment.strip("\n")).splitlines()
    out: list[str] = []
    in_code = in_list = False
    for line in lines:
        previous_blank = not out or not out[-1].strip()
        if line.startswith("    ") and (previous_blank or in_code):
            in_code = True
            out.append(line.rstrip())
            continue
        in_code = in_code and not line.strip()
        if line.startswith(LIST_MARKERS):
            in_list = True
        elif in_list and line.strip() and not line.startswith(" "):
            # An unindented line after a list ends it (in the comment's
            # layout); Markdown would glue it to the last item without this.
            out.append("")
            in_list = False
        out.append(_escape_prose(line.rstrip()))
    return "\n".join(out).strip("\n")


def cell(comment: str) -> str:
    """A comment as one table cell: lines joined, pipes escaped."""
    words = " ".join(line.strip() for line in comment.strip().splitlines() if line.strip())
    return _escape_prose(words).replace("|", "\\|")


class Comments:
    """Comments of one file, by source-location path."""

    def __init__(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        self._by_path: dict[Path_, descriptor_pb2.SourceCodeInfo.Location] = {}
        for location in proto.source_code_info.location:
            self._by_path.setdefault(tuple(location.path), location)

    def get(self, path: Path_, *, detached: bool = False) -> str:
        location = self._by_path.get(path)
        if location is None:
            return ""
        parts = list(location.leading_detached_comments) if detached else []
        parts += [location.leading_comments, location.trailing_comments]
        return "\n".join(textwrap.dedent(p).strip("\n") for p in parts if p.strip())


# -- types ----------------------------------------------------------------------

SCALARS = {
    value: name.removeprefix("TYPE_").lower()
    for name, value in FDP.Type.items()
    if name not in ("TYPE_MESSAGE", "TYPE_ENUM", "TYPE_GROUP")
}


class Renderer:
    def __init__(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        self.proto = proto
        self.package = proto.package
        self.comments = Comments(proto)
        # Full name (no leading dot) of every message and enum in this file.
        self.local: set[str] = set()
        self.map_entries: dict[str, descriptor_pb2.DescriptorProto] = {}
        for name, message, _path in self.messages():
            self.local.add(name)
            for nested in message.nested_type:
                if nested.options.map_entry:
                    self.map_entries[f"{name}.{nested.name}"] = nested
        for name, _enum, _path in self.enums():
            self.local.add(name)

    # -- walking ----------------------------------------------------------------

    def messages(self) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto, Path_]]:
        def walk(prefix: str, messages, path: Path_, element: int):
            for index, message in enumerate(messages):
                name = f"{prefix}.{message.name}"
                here = (*path, element, index)
                if message.options.map_entry:
                    continue
                yield name, message, here
                yield from walk(name, message.nested_type, here, MSG_NESTED)

        yield from walk(self.package, self.proto.message_type, (), FILE_MESSAGE)

    def enums(self) -> Iterator[tuple[str, descriptor_pb2.EnumDescriptorProto, Path_]]:
        for index, enum in enumerate(self.proto.enum_type):
            yield f"{self.package}.{enum.name}", enum, (FILE_ENUM, index)
        for name, message, path in self.messages():
            for index, enum in enumerate(message.enum_type):
                yield f"{name}.{enum.name}", enum, (*path, MSG_ENUM, index)

    # -- names and links --------------------------------------------------------

    def short(self, full_name: str) -> str:
        return full_name.removeprefix(self.package + ".")

    def link(self, type_name: str) -> str:
        full = type_name.lstrip(".")
        if full in self.local:
            return f"[`{self.short(full)}`](#{full})"
        return f"`{full}`"

    def field_type(self, field: descriptor_pb2.FieldDescriptorProto) -> str:
        if field.type in (FDP.TYPE_MESSAGE, FDP.TYPE_ENUM):
            entry = self.map_entries.get(field.type_name.lstrip("."))
            if entry is not None:
                key, value = entry.field
                return f"map&lt;{self.field_type(key)}, {self.field_type(value)}&gt;"
            return self.link(field.type_name)
        return f"`{SCALARS[field.type]}`"

    def label(self, message: descriptor_pb2.DescriptorProto, field) -> str:
        if field.proto3_optional:
            return "optional"
        if field.HasField("oneof_index"):
            return f"oneof `{message.oneof_decl[field.oneof_index].name}`"
        if field.label == FDP.LABEL_REPEATED:
            # A map field is a repeated map entry; its type column says map<K, V>.
            return "" if field.type_name.lstrip(".") in self.map_entries else "repeated"
        if field.label == FDP.LABEL_REQUIRED:
            return "required"
        return ""

    # -- sections ---------------------------------------------------------------

    def header(self) -> list[str]:
        comment = self.comments.get((FILE_SYNTAX,), detached=True)
        return [block(comment), ""] if comment else []

    def services(self) -> list[str]:
        out: list[str] = []
        for s_index, service in enumerate(self.proto.service):
            full = f"{self.package}.{service.name}"
            out += [f'<a name="{full}"></a>', "", f"## Service `{full}`", ""]
            comment = self.comments.get((FILE_SERVICE, s_index))
            if comment:
                out += [block(comment), ""]
            out += ["| RPC | request | response |", "| --- | --- | --- |"]
            for method in service.method:
                request = ("stream " if method.client_streaming else "") + self.link(
                    method.input_type
                )
                response = ("stream " if method.server_streaming else "") + self.link(
                    method.output_type
                )
                out.append(f"| [{method.name}](#{full}.{method.name}) | {request} | {response} |")
            out.append("")
            for m_index, method in enumerate(service.method):
                out += [f'<a name="{full}.{method.name}"></a>', "", f"### {method.name}", ""]
                request = ("stream " if method.client_streaming else "") + self.short(
                    method.input_type.lstrip(".")
                )
                response = ("stream " if method.server_streaming else "") + self.short(
                    method.output_type.lstrip(".")
                )
                out += [f"`rpc {method.name}({request}) returns ({response})`", ""]
                comment = self.comments.get((FILE_SERVICE, s_index, SERVICE_METHOD, m_index))
                if comment:
                    out += [block(comment), ""]
        if self.proto.service:
            out += ["## Standard services", "", STANDARD_SERVICES, ""]
        return out

    def message_sections(self) -> list[str]:
        out: list[str] = []
        for full, message, path in self.messages():
            out += [f'<a name="{full}"></a>', "", f"### {self.short(full)}", ""]
            comment = self.comments.get(path)
            if comment:
                out += [block(comment), ""]
            if message.field:
                out += [
                    "| field | number | type | label | description |",
                    "| --- | --- | --- | --- | --- |",
                ]
                for index, field in enumerate(message.field):
                    text = cell(self.comments.get((*path, MSG_FIELD, index)))
                    out.append(
                        f"| `{field.name}` | {field.number} | {self.field_type(field)} "
                        f"| {self.label(message, field)} | {text} |"
                    )
                out.append("")
            else:
                out += ["No fields.", ""]
            out += self._reserved(message, path, MSG_RESERVED, exclusive_end=True)
        return out

    def _reserved(self, descriptor, path: Path_, element: int, *, exclusive_end: bool):
        spans = []
        for r in descriptor.reserved_range:
            end = r.end - 1 if exclusive_end else r.end
            spans.append(str(r.start) if r.start == end else f"{r.start} to {end}")
        spans += [f'"{name}"' for name in descriptor.reserved_name]
        if not spans:
            return []
        comment = self.comments.get((*path, element))
        line = f"Reserved: {', '.join(spans)}."
        if comment:
            line += " " + cell(comment)
        return [line, ""]

    def enum_sections(self) -> list[str]:
        out: list[str] = []
        for full, enum, path in self.enums():
            out += [f'<a name="{full}"></a>', "", f"### {self.short(full)}", ""]
            comment = self.comments.get(path)
            if comment:
                out += [block(comment), ""]
            out += ["| name | number | description |", "| --- | --- | --- |"]
            for index, value in enumerate(enum.value):
                text = cell(self.comments.get((*path, ENUM_VALUE, index)))
                out.append(f"| `{value.name}` | {value.number} | {text} |")
            out.append("")
            out += self._reserved(enum, path, ENUM_RESERVED, exclusive_end=False)
        return out

    def render(self) -> list[str]:
        out = [f"Package `{self.package}`, file `protos/{self.proto.name}`.", ""]
        out += self.header()
        out += self.services()
        if self.proto.message_type:
            out += ["## Messages", ""] + self.message_sections()
        if any(True for _ in self.enums()):
            out += ["## Enums", ""] + self.enum_sections()
        return out


def render(files: list[str] | None = None) -> str:
    """docs/api.md as text."""
    files = files or public_protos()
    out = [
        "# embedq API reference",
        "",
        "<!-- Generated by `python -m embedq.tools.apidoc` from the comments in "
        + ", ".join(f"protos/{f}" for f in files)
        + ". Do not edit by hand: edit the .proto and regenerate. -->",
        "",
    ]
    for proto in load_descriptors(files):
        out += Renderer(proto).render()
    from embedq.server.http import routes_markdown  # the HTTP routes, from their own table

    out += routes_markdown()
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output file (default: docs/api.md)"
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the file differs instead of writing it"
    )
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run `python -m embedq.tools.apidoc`", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
