"""The GPU pod image the Dom0 suite runs in Xen zones, built on the host (Dom0 has no nvcc).

devkit's hello-vgpu (cudart static, built by nvcc) over busybox, with the host's shared libraries
it and libvgpu load (Dom0 and the zones run the same Debian release), written as uncompressed
layer tars plus the image config's ``config`` section under build/dom0/images/hello-vgpu/, which
the testbed payload carries. Inside Dom0, ``push`` uploads them to a real registry (Debian's
docker-registry on loopback) for vgpu-runtime to pull.
"""

import json
from pathlib import Path

from devkit.busybox import busybox_layer_tar, layer_tar
from devkit.cuda_image import PROGRAM, build_program, cuda_userland
from devkit.images import PATH_ENV, push_image
from devkit.registry import LocalRegistry

ROOT = Path(__file__).resolve().parents[2]
IMAGE_DIR = ROOT / "build" / "dom0" / "images" / "hello-vgpu"
PROGRAM_CACHE = ROOT / "build" / "cuda-programs"
CONFIG = "config.json"


def build_pod_image(out: Path = IMAGE_DIR) -> Path:
    """Write the image's layers and config into ``out`` (rebuilt each time: ~1 s after nvcc's
    cached build)."""
    program = build_program(PROGRAM_CACHE)
    out.mkdir(parents=True, exist_ok=True)
    layers = [busybox_layer_tar(), layer_tar(cuda_userland(program.path))]
    for index, tar in enumerate(layers):
        (out / f"layer-{index}.tar").write_bytes(tar)
    (out / CONFIG).write_text(json.dumps({"Env": [PATH_ENV], "Cmd": [PROGRAM]}))
    return out


def push(registry: LocalRegistry, repo: str, tag: str, image: Path = IMAGE_DIR) -> str:
    """Push what ``build_pod_image`` wrote; returns the reference vgpu-runtime pulls."""
    layers = sorted(image.glob("layer-*.tar"), key=lambda p: int(p.stem.split("-")[1]))
    if not layers:
        raise FileNotFoundError(f"no layers in {image}: the host builds them (build_pod_image)")
    config = json.loads((image / CONFIG).read_text())
    push_image(registry, repo, tag, [layer.read_bytes() for layer in layers], config)
    return f"{registry.host}/{repo}:{tag}"
