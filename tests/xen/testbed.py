"""The nested Xen testbed: Debian's Xen 4.17 and a PV Dom0 under QEMU software emulation.

No machine here runs Xen, but Xen runs nested under QEMU/TCG (facts: ../shared/XEN-TESTBED.md).

    python -m tests.xen.testbed build                  build (or reuse) the cached Dom0 image
    python -m tests.xen.testbed run [--timeout S] -- CMD...
                                                       boot, run CMD in Dom0 inside the project
                                                       checkout, power off, report

The image (Xen ELF, Dom0 kernel + initrd, an ext4 root with xen-utils, python3 and the project's
Python dependencies, and the PV guest kernel + initramfs) is cached under $VGPU_TESTBED_CACHE
(default /var/cache/vgpu-testbed), keyed by everything that goes into it; building a new image
removes the images of older inputs. Each run gets a fresh
share (9p) holding the payload (the checkout's files as a tar) and receiving the results: the
command's exit code, Dom0's log, guest consoles, and whatever the command writes to
$TESTBED_SHARE. The serial log holds Xen's and the Dom0 kernel's consoles. The root disk is
attached with snapshot=on, so the cached image never changes.

Zones (issue 7) boot from the same image: QEMU attaches dom0.ext4 a second time, read-only, as
Dom0's /dev/vdb (never mounted in Dom0: a pristine copy), the root disk every zone shares; the
zone initramfs is built on the host for each run from the image's kernel and modules
(kernel_builder/zone_initramfs.py) and put in the share (share/zone/); the zones' kernel is the
image's guest vmlinux (/opt/testbed/guest/vmlinux, the same kernel). The image key does not
depend on the zone initramfs, so changing it costs no image rebuild.
"""

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kernel_builder import BootImageError
from kernel_builder.zone_initramfs import build_zone_image
from tests.xen.guest.build import build_guest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("VGPU_TESTBED_CACHE", "/var/cache/vgpu-testbed"))
IMAGE_FORMAT = 2  # bump when the build steps change in a way the key below does not see

SUITES = [
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
]
DOM0_PACKAGES = [
    "xen-hypervisor-4.17-amd64",
    "xen-utils-4.17",
    "xen-utils-common",
    "xenstore-utils",
    "linux-image-amd64",
    "python3",
    "kmod",
    "busybox",
    "procps",
    "runc",  # the zone agent runs containers in domUs whose root is a copy of this image
    "e2fsprogs",  # mke2fs -d: read-only ext4 disks of image rootfs for zones
    "docker-registry",  # the real OCI registry the Dom0 pod tests pull from (on loopback)
]
# What the Dom0 side of the tests imports; versions come from pyproject.toml (one place).
DOM0_PYTHON = [
    "cffi",
    "pydantic",
    "pydantic-settings",
    "structlog",
    "pyxs",
    "grpcio",
    "protobuf",
    "prometheus-client",
    "zstandard",
    "cuda-bindings",  # gpu-proxy imports it (CUresult names) even with the sim backend
    "pytest",
    "pytest-timeout",
    "hypothesis",
]
HOST_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "mmdebstrap": "mmdebstrap",
    "debugfs": "e2fsprogs",  # reads the zone initramfs's modules out of dom0.ext4
}

XEN_ARGS = "dom0_mem=1024M,max:1024M console=com1 com1=115200,8n1 spec-ctrl=eager-fpu loglvl=all"
DOM0_ARGS = "root=/dev/vda rw console=hvc0 earlyprintk=xen init=/opt/testbed/init quiet"
# Where Dom0 finds the zones' boot pieces (tests/xen/dom0/zone_image.py reads them).
ZONE_SHARE_DIR = "zone"
ZONE_ROOT_DISK = "/dev/vdb"


class TestbedError(RuntimeError):
    """The testbed could not be built or booted; the message says which step."""


@dataclass(frozen=True)
class Image:
    """A built testbed: everything QEMU needs to boot Xen and Dom0."""

    dir: Path

    @property
    def xen(self) -> Path:
        return self.dir / "xen.elf"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def disk(self) -> Path:
        return self.dir / "dom0.ext4"


@dataclass
class RunResult:
    """What came back from one boot."""

    rc: int | None
    timed_out: bool
    wall_s: float
    out_dir: Path
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def share(self) -> Path:
        return self.out_dir / "share"

    @property
    def serial_log(self) -> Path:
        return self.out_dir / "serial.log"

    @property
    def dom0_log(self) -> Path:
        return self.share / "dom0.log"

    def diagnosis(self) -> str:
        """Which layer failed, from the evidence the run left, with the logs' tails."""
        serial = self.serial_log.read_text(errors="replace") if self.serial_log.exists() else ""
        dom0 = self.dom0_log.read_text(errors="replace") if self.dom0_log.exists() else ""
        if self.rc == 0:
            verdict = "passed"
        elif not serial.strip():
            verdict = "the emulator failed: QEMU wrote nothing to the serial console"
        elif "(XEN)" not in serial:
            verdict = "Xen did not start (no Xen output on the serial console)"
        elif not dom0:
            verdict = "Dom0 did not reach the testbed init (kernel, initrd or root disk failed)"
        elif "TESTBED-FAIL" in dom0:
            line = next(ln for ln in dom0.splitlines() if "TESTBED-FAIL" in ln)
            verdict = f"Dom0 set-up failed: {line}"
        elif self.rc is None:
            verdict = "timed out" if self.timed_out else "Dom0 stopped before the command ended"
        else:
            verdict = f"the command failed in Dom0 with exit code {self.rc}"
        return (
            f"testbed: {verdict}\n"
            f"stages (Dom0 uptime s): {self.stages}\n"
            f"--- serial (Xen + Dom0 kernel), last 40 lines of {self.serial_log}:\n"
            f"{_tail(serial, 40)}\n"
            f"--- Dom0 log, last 60 lines of {self.dom0_log}:\n{_tail(dom0, 60)}"
        )


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


# -- building -------------------------------------------------------------------------------


def python_pins() -> list[str]:
    """DOM0_PYTHON with the exact versions pyproject.toml pins."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    by_name = {p.split("==")[0].lower(): p for p in pins}
    return [by_name[name] for name in DOM0_PYTHON]


def image_key() -> str:
    h = hashlib.sha256()
    for part in (str(IMAGE_FORMAT), *SUITES, *DOM0_PACKAGES, *python_pins()):
        h.update(part.encode() + b"\0")
    # The guest is built with kernel_builder's pieces; the zone initramfs (built per run, not
    # part of the image) is left out so that changing it costs no image rebuild.
    guest_build = [ROOT / "kernel_builder" / f"{m}.py" for m in ("__init__", "cpio", "elf", "kmod")]
    for path in sorted([HERE / "dom0_init.sh", *(HERE / "guest").glob("*"), *guest_build]):
        if path.is_file() and path.suffix != ".pyc":
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def check_host_tools() -> None:
    missing = [
        pkg
        for tool, pkg in HOST_TOOLS.items()
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None
    ]
    if missing:
        raise TestbedError(
            f"missing host packages: {' '.join(missing)} (scripts/setup.sh installs)"
        )


def _run(
    cmd: list[str], what: str, log: Path, *, tries: int = 1, fresh: Path | None = None
) -> None:
    """Run a build step, logging to ``log``. Steps that download get ``tries`` > 1, each
    attempt starting from an empty ``fresh`` directory (their output)."""
    for attempt in range(1, tries + 1):
        if fresh is not None:
            shutil.rmtree(fresh, ignore_errors=True)
        with log.open("ab") as out:
            out.write(f"$ {shlex.join(cmd)}  # attempt {attempt}\n".encode())
            out.flush()
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
        if proc.returncode == 0:
            return
    tail = _tail(log.read_text(errors="replace"), 20)
    raise TestbedError(f"{what} failed (exit {proc.returncode}); see {log}:\n{tail}")


@contextlib.contextmanager
def _build_lock(cache: Path) -> Iterator[None]:
    """One image build at a time per cache: concurrent builds of one key share a work dir."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_image(cache: Path = CACHE, *, log: bool = True) -> Image:
    """The cached image for the current inputs, built first if needed (~2-3 min cold)."""
    check_host_tools()
    image = Image(cache / image_key())
    if (image.dir / "ready").exists():
        return image
    with _build_lock(cache):
        if (image.dir / "ready").exists():
            return image  # built by whoever held the lock
        return _build_image(image, cache, log=log)


def _build_image(image: Image, cache: Path, *, log: bool) -> Image:
    started = time.monotonic()
    work = cache / f"building-{image.dir.name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    build_log = work / "build.log"
    rootfs = work / "rootfs"
    _run(
        [
            "mmdebstrap",
            "--variant=minbase",
            "--mode=unshare",
            "--format=directory",
            f"--include={','.join(DOM0_PACKAGES)}",
            "bookworm",
            str(rootfs),
            *SUITES,
        ],
        "building the Dom0 root (mmdebstrap)",
        build_log,
        tries=2,
        fresh=rootfs,
    )
    boot = rootfs / "boot"
    [vmlinuz] = boot.glob("vmlinuz-*")
    [initrd] = boot.glob("initrd.img-*")
    with gzip.open(boot / "xen-4.17-amd64.gz") as xen_gz:
        (work / "xen.elf").write_bytes(xen_gz.read())
    shutil.copyfile(vmlinuz, work / "vmlinuz")
    shutil.copyfile(initrd, work / "initrd.img")

    site = rootfs / "opt" / "vgpu" / "site"
    _run(
        # Bytecode is compiled here, on the host: Python under emulation is ~11x slower, and
        # importing pydantic/hypothesis/pytest from source cost ~1 min per boot.
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "--target", str(site), *python_pins()],
        "installing the Python dependencies into Dom0",
        build_log,
        tries=2,
        fresh=site,
    )  # fmt: skip
    testbed = rootfs / "opt" / "testbed"
    testbed.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "dom0_init.sh", testbed / "init")
    (testbed / "init").chmod(0o755)
    guest = build_guest(rootfs, testbed / "guest")
    with (rootfs / "etc" / "default" / "xen").open("a") as default:
        default.write('XENCONSOLED_ARGS="--log=guest --log-dir=/var/log/xen/console"\n')
    # The guest files stay in the image; the host keeps a copy for reference.
    shutil.copytree(guest.kernel.parent, work / "guest")

    used = sum(p.stat().st_size for p in rootfs.rglob("*") if p.is_file() and not p.is_symlink())
    size_mib = int(used * 1.4) // (1 << 20) + 256
    _run(
        ["mke2fs", "-q", "-t", "ext4", "-L", "dom0", "-d", str(rootfs),
         str(work / "dom0.ext4"), f"{size_mib}M"],
        "making the Dom0 ext4 image",
        build_log,
    )  # fmt: skip
    shutil.rmtree(rootfs)
    (work / "ready").write_text(f"built in {time.monotonic() - started:.0f} s\n")
    shutil.rmtree(image.dir, ignore_errors=True)
    work.rename(image.dir)
    # Images of older inputs are ~1 GB each and never used again.
    for old in cache.iterdir():
        if old != image.dir and (old / "ready").exists():
            shutil.rmtree(old, ignore_errors=True)
    if log:
        print(f"testbed: built {image.dir} in {time.monotonic() - started:.0f} s", flush=True)
    return image


# -- running --------------------------------------------------------------------------------


def payload_files() -> list[str]:
    """The checkout as CI has it (tracked and untracked-but-not-ignored files) plus the built
    C extensions, which are ignored by git but needed to run."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.decode()
    files = [f for f in listed.split("\0") if f and (ROOT / f).is_file()]
    built = [str(p.relative_to(ROOT)) for p in (ROOT / "idm").rglob("*.so")]
    if not built:
        raise TestbedError("no built C extensions: run `python -m idm.build` first")
    # libvgpu's build output goes to zones on their payload disk, if it has been built.
    libvgpu = [str(p.relative_to(ROOT)) for p in (ROOT / "libvgpu" / "build").glob("*.so*")]
    # C programs the dom0 suite runs (tests/xen/dom0_programs.py), if they have been built.
    dom0 = (ROOT / "build" / "dom0").rglob("*")
    programs = [str(p.relative_to(ROOT)) for p in dom0 if not p.is_dir()]
    return sorted({*files, *built, *libvgpu, *programs})


def qemu_command(image: Image, share: Path) -> list[str]:
    return [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-cpu", "max,-smap,-smep",
        "-m", "2048",
        "-smp", "2",
        "-nographic",
        "-no-reboot",
        "-kernel", str(image.xen),
        "-append", XEN_ARGS,
        "-initrd", f"{image.kernel} {DOM0_ARGS},{image.initrd}",
        "-drive", f"file={image.disk},format=raw,if=virtio,snapshot=on",
        # /dev/vdb: the zones' shared root disk, never mounted in Dom0, never writable.
        "-drive", f"file={image.disk},format=raw,if=virtio,readonly=on",
        "-virtfs", f"local,path={share},mount_tag=share,security_model=none,id=share",
    ]  # fmt: skip


def parse_stages(dom0_log: Path) -> dict[str, float]:
    stages: dict[str, float] = {}
    if dom0_log.exists():
        for line in dom0_log.read_text(errors="replace").splitlines():
            if line.startswith("TESTBED-STAGE "):
                _, name, uptime = line.split()
                stages[name] = float(uptime)
    return stages


def run(command: str, *, image: Image, out_dir: Path, timeout_s: float = 1200) -> RunResult:
    """Boot the testbed, run ``command`` (a shell command) in Dom0 in the checkout, collect."""
    shutil.rmtree(out_dir, ignore_errors=True)
    share = out_dir / "share"
    share.mkdir(parents=True)
    with tarfile.open(share / "payload.tar", "w") as tar:
        for name in payload_files():
            tar.add(ROOT / name, arcname=name)
    try:
        build_zone_image(image.disk, share / ZONE_SHARE_DIR, with_kernel=False)
    except BootImageError as e:
        raise TestbedError(f"building the zone initramfs failed: {e}") from e
    (share / "command.sh").write_text(command + "\n")
    started = time.monotonic()
    timed_out = False
    with (out_dir / "serial.log").open("wb") as serial:
        proc = subprocess.Popen(
            qemu_command(image, share), stdout=serial, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = started + timeout_s
        rc_file = share / "rc"
        while proc.poll() is None:
            if time.monotonic() > deadline:
                timed_out = True
                break
            if rc_file.exists():
                # Dom0 is rebooting; give QEMU a moment to exit on its own.
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    break
            time.sleep(0.5)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rc_text = rc_file.read_text().strip() if rc_file.exists() else ""
    return RunResult(
        rc=int(rc_text) if rc_text.lstrip("-").isdigit() else None,
        timed_out=timed_out,
        wall_s=time.monotonic() - started,
        out_dir=out_dir,
        stages=parse_stages(share / "dom0.log"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.xen.testbed",
        description="Nested Xen testbed: Xen 4.17 + PV Dom0 under QEMU/TCG.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("build", help="build (or reuse) the cached image")
    run_p = sub.add_parser("run", help="boot, run a command in Dom0, power off")
    run_p.add_argument("--timeout", type=float, default=1200, help="hard limit, seconds")
    run_p.add_argument("--out", type=Path, default=ROOT / "results" / "xen" / "run")
    run_p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    image = build_image()
    print(f"testbed: image {image.dir} ready after {time.monotonic() - t0:.1f} s")
    if args.action == "build":
        return 0
    command = shlex.join(args.command[1:] if args.command[:1] == ["--"] else args.command)
    result = run(command or "xl info", image=image, out_dir=args.out, timeout_s=args.timeout)
    print(result.diagnosis())
    print(f"testbed: wall {result.wall_s:.1f} s; results in {result.out_dir}")
    return 0 if result.rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
