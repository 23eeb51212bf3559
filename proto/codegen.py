"""Regenerates the checked-in Python code for proto/phasesplit/v1/*.proto (run: make proto)."""

import pathlib
import sys

from grpc_tools import protoc

PROTO_ROOT = pathlib.Path(__file__).resolve().parent


def main() -> int:
    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.glob("phasesplit/v1/*.proto"))
    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={PROTO_ROOT}", f"--pyi_out={PROTO_ROOT}",
            f"--grpc_python_out={PROTO_ROOT}", *sources]
    return protoc.main(args)


if __name__ == "__main__":
    sys.exit(main())
