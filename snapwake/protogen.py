"""Regenerates snapwake/v1 from proto/ (``make proto``); ``--check`` fails when it is stale."""

from __future__ import annotations

import argparse
import filecmp
import pathlib
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "snapwake" / "v1"


def generate(out_root: pathlib.Path) -> list[pathlib.Path]:
    """Runs protoc over every proto file into ``out_root/snapwake/v1``; returns the files written."""
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "snapwake" / "v1").glob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    gen = out_root / "snapwake" / "v1"
    (gen / "__init__.py").write_text('"""Generated protobuf and gRPC code for snapwake.v1 (make proto)."""\n')
    return sorted(gen.iterdir())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    opts = parser.parse_args()
    if not opts.check:
        generate(ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = [p for p in generate(pathlib.Path(tmp)) if p.is_file()]
        stale = [p.name for p in fresh if not (OUT_DIR / p.name).exists()
                 or not filecmp.cmp(p, OUT_DIR / p.name, shallow=False)]
    if stale:
        print(f"generated code is stale ({', '.join(stale)}): run 'make proto'", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
