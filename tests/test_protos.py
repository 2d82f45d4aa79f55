"""The checked-in generated code is exactly what protoc emits from protos/."""

from __future__ import annotations

from pathlib import Path

from embedq.tools import protogen

SRC = Path(protogen.REPO_ROOT) / "src"


def generated_files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file() and "_pb2" in path.name and path.suffix in (".py", ".pyi")
    }


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    protogen.generate(tmp_path)
    fresh = generated_files(tmp_path)
    assert fresh, "protoc produced nothing"
    checked_in = generated_files(SRC)
    assert sorted(fresh) == sorted(checked_in), "run `python -m embedq.tools.protogen` and commit"
    for name, content in fresh.items():
        assert checked_in[name] == content, f"{name} is stale or hand-edited: regenerate it"


def test_every_rpc_is_documented() -> None:
    text = (protogen.PROTO_ROOT / "embedq/v1/embedq.proto").read_text()
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.strip().startswith(("rpc ", "message ", "enum ")):
            assert lines[index - 1].strip().startswith("//"), f"undocumented: {line}"
