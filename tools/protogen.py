"""Regenerate the protobuf/gRPC Python code from protos/.

Run `python -m embedq.tools.protogen` after editing a .proto file. The output is
checked in; tests/test_protos.py proves it matches what protoc emits now.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import embedq.protos

# tools/protogen.py in a checkout: the repository is one folder up.
REPO_ROOT = Path(__file__).resolve().parents[1]
# Where the package's .proto files are: protos/ in a checkout, the installed copy otherwise.
PROTO_ROOT = embedq.protos.root()
DEFAULT_OUT = REPO_ROOT / "src"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    """Run protoc (from grpcio-tools) over every .proto into out_dir."""
    import importlib.resources

    from grpc_tools import protoc  # test/dev dependency only

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    for proto in proto_files():
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(proto.relative_to(PROTO_ROOT)),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root (default: src/)")
    args = parser.parse_args(argv)
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
