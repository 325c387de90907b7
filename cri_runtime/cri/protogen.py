"""Generate the CRI v1 gRPC stubs (cri_runtime/cri/gen/) from the upstream cri-api definition.

    python -m cri_runtime.cri.protogen            regenerate cri_runtime/cri/gen/*
    python -m cri_runtime.cri.protogen --check    exit 1, listing the stale files, if any

Why not import the maintained package's stubs directly: container-runtime-interface-api 2.0.1
(kubernetes/cri-api v1, including RuntimeConfig and UpdatePodSandboxResources) ships stubs
generated for protobuf 6 / grpcio 1.73 and pins `protobuf~=6.31`, which cannot be installed next
to our protobuf 7. Its compiled descriptor, though, *is* the upstream api.proto, field for field.
So this generator downloads that exact wheel from PyPI (pinned by version and sha256), takes the
serialized `v1/api.proto` descriptor out of it without importing it, and compiles it with our
pinned grpcio-tools (`protoc --descriptor_set_in`). The stubs match our runtime, the wire names
(`/runtime.v1.RuntimeService/...`) are upstream's, and nothing is copied by hand. Outputs are
checked in, so the runtime needs neither the wheel nor protoc; a test runs --check.
"""

from __future__ import annotations

import ast
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from vgpu_common.generated import generator_main

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "container-runtime-interface-api==2.0.1"
WHEEL = "container_runtime_interface_api-2.0.1-py3-none-any.whl"
WHEEL_SHA256 = "3c48c7492585b4387bd704ea30907ccd0200dcd845eb89eb2ddee1582c2845df"
UPSTREAM_MODULE = "cri_api/v1/api_pb2.py"
GEN = Path("cri_runtime/cri/gen")
PROTO_NAME = str(GEN / "api.proto")
OUTPUTS = ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py")
CACHE = ROOT / "build" / "cri-api"


def fetch_wheel(cache: Path = CACHE) -> Path:
    """The pinned wheel, downloaded once into cache and verified by sha256 every time."""
    wheel = cache / WHEEL
    if not wheel.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
             "--no-deps", "--only-binary=:all:", "-d", str(cache), PACKAGE],
            check=True,
        )  # fmt: skip
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise RuntimeError(f"{WHEEL}: sha256 {digest} is not the pinned {WHEEL_SHA256}")
    return wheel


def upstream_descriptor(wheel: Path) -> descriptor_pb2.FileDescriptorProto:
    """v1/api.proto as compiled upstream, read from the wheel's module text (never imported)."""
    with zipfile.ZipFile(wheel) as zf:
        tree = ast.parse(zf.read(UPSTREAM_MODULE))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "AddSerializedFile"
            and isinstance(node.args[0], ast.Constant)
        ):
            fd = descriptor_pb2.FileDescriptorProto.FromString(node.args[0].value)
            if fd.package != "runtime.v1" or fd.dependency:
                raise RuntimeError(f"unexpected descriptor {fd.name} ({fd.package})")
            return fd
    raise RuntimeError(f"no serialized descriptor in {wheel}:{UPSTREAM_MODULE}")


def generate(out: Path, cache: Path = CACHE) -> None:
    """Compile the descriptor into out/GEN/ under our package path (so imports resolve)."""
    fd = upstream_descriptor(fetch_wheel(cache))
    fd.name = PROTO_NAME
    (out / GEN).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        desc = Path(tmp) / "api.desc"
        desc.write_bytes(descriptor_pb2.FileDescriptorSet(file=[fd]).SerializeToString())
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"--descriptor_set_in={desc}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                PROTO_NAME,
            ]
        )
    if rc != 0:
        raise RuntimeError(f"protoc failed on {PROTO_NAME} (exit {rc})")


def main(argv: Sequence[str] | None = None) -> int:
    return generator_main(
        argv,
        prog="python -m cri_runtime.cri.protogen",
        description=(__doc__ or "").split("\n")[0],
        root=ROOT,
        gen=GEN,
        outputs=OUTPUTS,
        generate=lambda _root, out: generate(out),  # the source is the pinned wheel, not root
    )


if __name__ == "__main__":
    sys.exit(main())
