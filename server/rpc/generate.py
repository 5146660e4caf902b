"""Regenerate the gRPC stubs in server/rpc/ from proto/ with grpc_tools.protoc.

    python -m hedgerow.server.rpc.generate            # rewrite server/rpc/generation_pb2*.py(i)
    python -m hedgerow.server.rpc.generate --check    # exit 1 if the committed stubs are stale

protoc names modules after the .proto path (``hedgerow.v1.generation_pb2``); the stubs live in
``hedgerow.server.rpc`` instead (beside the code that uses them), so the
cross-module import and the module name are rewritten, always the same way. The descriptor keeps
its file name ``hedgerow/v1/generation.proto``, which is what reflection serves.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
PROTO = "hedgerow/v1/generation.proto"
OUT = Path(__file__).resolve().parent
FILES = ("generation_pb2.py", "generation_pb2.pyi", "generation_pb2_grpc.py")
REWRITES = (
    ("from hedgerow.v1 import generation_pb2 as", "from hedgerow.server.rpc import generation_pb2 as"),
    ("'hedgerow.v1.generation_pb2'", "'hedgerow.server.rpc.generation_pb2'"),
)


def generate() -> dict[str, bytes]:
    """Run protoc on the .proto; return the stubs' bytes by file name (nothing is written)."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        include = Path(protoc.__file__).parent / "_proto"  # well-known types shipped with grpc_tools
        argv = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", str(PROTO_ROOT / PROTO)]
        if protoc.main(argv) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_ROOT / PROTO}")
        out = {}
        for name in FILES:
            text = (Path(tmp) / "hedgerow" / "v1" / name).read_text()
            for old, new in REWRITES:
                text = text.replace(old, new)
            out[name] = text.encode()
    return out


def stale(stubs: dict[str, bytes], folder: Path = OUT) -> list[str]:
    """The stub files in ``folder`` that differ from ``stubs`` (or are missing)."""
    return [n for n, data in stubs.items() if not (folder / n).is_file() or (folder / n).read_bytes() != data]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hedgerow.server.rpc.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the committed stubs are current")
    args = parser.parse_args(argv)
    stubs = generate()
    if args.check:
        bad = stale(stubs)
        if bad:
            print(f"stale stubs: {', '.join(bad)}; run python -m hedgerow.server.rpc.generate", file=sys.stderr)
            return 1
        return 0
    for name, data in stubs.items():
        (OUT / name).write_bytes(data)
    print(f"wrote {', '.join(FILES)} to {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
