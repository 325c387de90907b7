"""Generate gpu-proxy's gRPC code from the protos in gpu_proxy/proto/ (events, control).

    python -m gpu_proxy.proto.protogen            regenerate gpu_proxy/proto/gen/*
    python -m gpu_proxy.proto.protogen --check    exit 1, listing the stale files, if any

The outputs are checked in so gpu-proxy needs no protoc at run time; grpcio-tools is pinned, so
regeneration is byte-identical and a test runs --check. The protos are compiled under the
virtual path gpu_proxy/proto/gen/ so the generated grpc modules import their messages by their
real package path (protoc's usual output imports a top-level `events_pb2`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

from vgpu_common.generated import generator_main

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = Path("gpu_proxy/proto")
PROTOS = ("events.proto", "control.proto")
GEN = Path("gpu_proxy/proto/gen")
OUTPUTS = tuple(
    f"{name.removesuffix('.proto')}{suffix}"
    for name in PROTOS
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
)


def generate(root: Path, out: Path) -> None:
    """Compile every proto under root into out/GEN/ (raises RuntimeError if protoc fails)."""
    well_known = resources.files("grpc_tools") / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{GEN}={root / PROTO_DIR}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *(str(GEN / name) for name in PROTOS),
        ]
    )
    if rc != 0:
        raise RuntimeError(f"protoc failed on {root / PROTO_DIR} (exit {rc})")


def main(argv: Sequence[str] | None = None) -> int:
    return generator_main(
        argv,
        prog="python -m gpu_proxy.proto.protogen",
        description=(__doc__ or "").split("\n")[0],
        root=ROOT,
        gen=GEN,
        outputs=OUTPUTS,
        generate=generate,
    )


if __name__ == "__main__":
    sys.exit(main())
