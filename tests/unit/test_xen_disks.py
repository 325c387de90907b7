"""Read-only zone disks on the host (cri_runtime/zones/xen_disks.py): real mke2fs, debugfs and
loop devices. The loop tests need root and loop devices (they skip without); xl is a script
here that fails the way xl does, the real one runs in the nested Xen testbed (test_zone_boot).
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cri_runtime.zones import xen_disks
from cri_runtime.zones.base import ZoneError
from cri_runtime.zones.xen_disks import (
    Ext4Cache,
    attach_loop,
    block_attach,
    block_detach,
    build_ext4,
    disk_spec,
    loop_backing_file,
    loops_of,
    release_loop,
    release_loop_when_held,
    vbd_number,
)
from cri_runtime.zones.xl import Xl

DEBUGFS = shutil.which("debugfs") or shutil.which("debugfs", path="/usr/sbin:/sbin")
needs_e2fsprogs = pytest.mark.skipif(
    shutil.which("mke2fs") is None or DEBUGFS is None, reason="e2fsprogs not installed"
)


def debugfs(image: Path, request: str) -> str:
    assert DEBUGFS is not None
    done = subprocess.run([DEBUGFS, "-R", request, str(image)], capture_output=True, check=True)
    return done.stdout.decode(errors="replace")


def make_tree(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n")
    (root / "bin" / "tool").chmod(0o755)
    (root / "data").mkdir()
    (root / "data" / "big").write_bytes(os.urandom(300_000))
    os.link(root / "data" / "big", root / "data" / "big-link")
    (root / "data" / "empty").write_bytes(b"")
    (root / "lib").symlink_to("data")
    (root / "owned").write_text("by 1234\n")
    if os.geteuid() == 0:
        os.chown(root / "owned", 1234, 4321)
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "tree")


@needs_e2fsprogs
def test_build_ext4_holds_the_tree_as_it_is(tree: Path, tmp_path: Path) -> None:
    image = build_ext4(tree, tmp_path / "out" / "disk.ext4", label="payload")
    assert image == tmp_path / "out" / "disk.ext4"
    assert [p.name for p in image.parent.iterdir()] == ["disk.ext4"]  # no temporary left
    assert debugfs(image, "cat /bin/tool") == "#!/bin/sh\necho tool\n"
    assert len(debugfs(image, "cat /data/big").encode(errors="surrogateescape")) > 0
    listing = debugfs(image, "ls -p /data")
    inodes = {line.split("/")[5]: line.split("/")[1] for line in listing.splitlines() if line}
    assert inodes["big"] == inodes["big-link"]  # a hard link stays one file
    assert 'Fast link dest: "data"' in debugfs(image, "stat /lib")
    stat_tool = debugfs(image, "stat /bin/tool")
    assert "Mode:  0755" in stat_tool
    if os.geteuid() == 0:
        assert "User:  1234   Group:  4321" in debugfs(image, "stat /owned")
    header = subprocess.run(
        ["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True
    ).stdout
    assert "Filesystem volume name:   payload" in header
    assert "has_journal" not in header  # read-only use: no journal to replay


def test_build_ext4_refuses_what_is_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ZoneError, match="not a directory"):
        build_ext4(tmp_path / "missing", tmp_path / "disk.ext4")
    (tmp_path / "tree").mkdir()
    with pytest.raises(ZoneError, match="longer than 16 bytes"):
        build_ext4(tmp_path / "tree", tmp_path / "disk.ext4", label="x" * 17)


@needs_e2fsprogs
def test_build_ext4_failure_carries_mke2fs_words_and_leaves_nothing(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tree / "data" / "huge").write_bytes(os.urandom(40 << 20))
    monkeypatch.setattr(xen_disks, "estimate_ext4", lambda source: (8 << 20, 64))
    out = tmp_path / "out"
    with pytest.raises(ZoneError, match=r"making an ext4 image of .*mke2fs.*failed") as info:
        build_ext4(tree, out / "disk.ext4")
    assert "allocat" in str(info.value) or "space" in str(info.value)
    assert list(out.iterdir()) == []


@needs_e2fsprogs
def test_estimate_fits_many_small_files(tmp_path: Path) -> None:
    """Inode-heavy trees (container images) must fit in the first try."""
    root = tmp_path / "many"
    for d in range(20):
        (root / f"d{d}").mkdir(parents=True)
        for f in range(150):
            (root / f"d{d}" / f"file-with-a-longish-name-{f}").write_text("x" * (f % 7))
    size, inodes = xen_disks.estimate_ext4(root)
    assert inodes > 3000 and size >= 8 << 20
    image = build_ext4(root, tmp_path / "many.ext4")
    assert "file-with-a-longish-name-149" in debugfs(image, "ls /d19")


@needs_e2fsprogs
def test_cache_builds_once_per_key(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = Ext4Cache(tmp_path / "cache")
    first = cache.get("sha256-abc", tree)
    built = []
    monkeypatch.setattr(xen_disks, "build_ext4", lambda *a, **k: built.append(a))
    assert cache.get("sha256-abc", tree) == first == tmp_path / "cache" / "sha256-abc.ext4"
    assert built == []
    for bad in ("", "../x", "a/b", ".hidden", "x" * 200):
        with pytest.raises(ZoneError, match="invalid disk cache key"):
            cache.get(bad, tree)
    assert cache.discard("sha256-abc") is True
    assert not first.exists()


def test_disk_spec_and_its_refusals() -> None:
    assert disk_spec(Path("/dev/loop3"), "xvdb") == "phy:/dev/loop3,xvdb,r"
    assert disk_spec(Path("/dev/vdb"), "xvda") == "phy:/dev/vdb,xvda,r"
    assert (
        disk_spec(Path("/dev/loop3"), "xvdb", script=Path("/opt/block-ro"))
        == "vdev=xvdb,access=r,script=/opt/block-ro,target=/dev/loop3"
    )
    with pytest.raises(ZoneError, match="must be an absolute path"):
        disk_spec(Path("/dev/loop3"), "xvdb", script=Path("block-ro"))
    for device, vdev, error in [
        (Path("/dev/loop3"), "sda", "should match pattern"),
        (Path("/dev/loop3"), "xvdb,w", "should match pattern"),
        (Path("/tmp/disk"), "xvdb", "invalid block device"),
        (Path("/dev/loop3,xvdc"), "xvdb", "must not contain ','"),
    ]:
        with pytest.raises(ZoneError, match=error):
            disk_spec(device, vdev)


def fake_xl(tmp_path: Path, rc: int, stderr: str) -> Xl:
    script = tmp_path / "xl"
    script.write_text(
        f"#!/bin/sh\necho \"$@\" >>{tmp_path}/xl.args\necho '{stderr}' >&2\nexit {rc}\n"
    )
    script.chmod(0o755)
    return Xl(binary=str(script))


def test_block_attach_and_detach_run_xl_and_carry_its_stderr(tmp_path: Path) -> None:
    ok = fake_xl(tmp_path, 0, "")
    block_attach(ok, "vgpu-z1", Path("/dev/loop7"), "xvdc")
    block_detach(ok, "vgpu-z1", "xvdc")
    assert (tmp_path / "xl.args").read_text().splitlines() == [
        "block-attach vgpu-z1 phy:/dev/loop7,xvdc,r",
        "block-detach vgpu-z1 xvdc",
    ]
    failing = fake_xl(tmp_path, 1, "libxl: error: Domain vgpu-z1 does not exist")
    with pytest.raises(ZoneError, match=r"block-attach.*Domain vgpu-z1 does not exist"):
        block_attach(failing, "vgpu-z1", Path("/dev/loop7"), "xvdc")
    with pytest.raises(ZoneError, match="invalid virtual device"):
        block_detach(failing, "vgpu-z1", "../xvdc")


# -- loop devices (root) -------------------------------------------------------------------


@pytest.fixture
def image(tree: Path, tmp_path: Path) -> Path:
    if shutil.which("mke2fs") is None:
        pytest.skip("e2fsprogs not installed")
    built = build_ext4(tree, tmp_path / "disk.ext4")
    try:
        device = attach_loop(built)
    except ZoneError as exc:
        pytest.skip(f"no loop devices here: {exc}")
    release_loop(device)
    return built


def test_loop_attach_is_read_only_and_released(image: Path) -> None:
    device = attach_loop(image)
    try:
        assert loop_backing_file(device) == image.resolve()
        assert device in loops_of(image)
        assert (Path("/sys/block") / device.name / "ro").read_text().strip() == "1"
        fd = os.open(device, os.O_WRONLY)
        try:
            with pytest.raises(PermissionError):
                os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
        assert Ext4Cache(image.parent).discard("disk") is False  # in use: kept
    finally:
        assert release_loop(device) is True  # nothing held it: freed at once
    assert loop_backing_file(device) is None
    assert device not in loops_of(image)
    assert release_loop(device) is True  # releasing twice is fine


def test_a_held_loop_device_goes_when_its_last_holder_closes(image: Path) -> None:
    device = attach_loop(image)
    holder = os.open(device, os.O_RDONLY)  # what a domain's blkback does
    try:
        assert release_loop(device) is False
        assert loop_backing_file(device) == image.resolve()
        assert (Path("/sys/block") / device.name / "loop" / "autoclear").read_text().strip() == "1"
    finally:
        os.close(holder)
    assert loop_backing_file(device) is None


def test_attach_loop_refuses_a_missing_image(tmp_path: Path) -> None:
    with pytest.raises(ZoneError, match="no such image file"):
        attach_loop(tmp_path / "missing.ext4")
    with pytest.raises(ZoneError, match="not a loop device"):
        release_loop(Path("/dev/sda"))


# -- the block-ro hotplug script (the real xenstore run is in the testbed) ---------------------


def run_block_ro(tmp_path: Path, params: str, mode: str, action: str = "add") -> tuple[int, str]:
    """Run block-ro with xenstore-read/-write stand-ins that serve ``params``/``mode`` and
    record what it writes; returns its exit code and the writes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "xenstore-read").write_text(f"#!/bin/sh\nprintf '%s\\n' '{params}' '{mode}'\n")
    (bin_dir / "xenstore-write").write_text(f'#!/bin/sh\necho "$@" >>{tmp_path}/writes\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    done = subprocess.run(
        [str(xen_disks.BLOCK_RO_SCRIPT), action],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "XENBUS_PATH": "/be/vbd/5/51712"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    writes = tmp_path / "writes"
    return done.returncode, writes.read_text() if writes.exists() else ""


def a_block_device() -> Path:
    for entry in sorted(Path("/sys/class/block").iterdir()):
        device = Path("/dev") / entry.name
        if device.is_block_device():
            return device
    pytest.skip("no block device here")


def test_block_ro_publishes_the_device_numbers(tmp_path: Path) -> None:
    device = a_block_device()
    major, minor = (Path("/sys/class/block") / device.name / "dev").read_text().split(":")
    rc, writes = run_block_ro(tmp_path, str(device), "r")
    assert rc == 0
    assert writes.split() == [
        "/be/vbd/5/51712/physical-device", f"{int(major):x}:{int(minor):x}",
        "/be/vbd/5/51712/physical-device-path", str(device),
        "/be/vbd/5/51712/hotplug-status", "connected",
    ]  # fmt: skip
    assert run_block_ro(tmp_path, str(device), "r", "remove")[0] == 0


def test_block_ro_refuses_writable_and_non_block_disks(tmp_path: Path) -> None:
    device = a_block_device()
    rc, writes = run_block_ro(tmp_path, str(device), "w")
    assert rc == 1 and "not read-only" in writes and "hotplug-status error" in writes
    (tmp_path / "writes").unlink()
    rc, writes = run_block_ro(tmp_path, str(tmp_path), "r")
    assert rc == 1 and "is not a block device" in writes


def test_vbd_numbers_follow_xens_scheme() -> None:
    assert [vbd_number(v) for v in ("xvda", "xvdb", "xvdp")] == [51712, 51728, 51952]
    assert vbd_number("xvdq") == (1 << 28) | (16 << 8)  # extended format from xvdq on
    assert vbd_number("xvdaa") == (1 << 28) | (26 << 8)
    with pytest.raises(ZoneError, match="invalid virtual device"):
        vbd_number("hda")


def test_a_loop_device_no_domain_holds_is_not_released(image: Path) -> None:
    device = attach_loop(image)
    try:
        with pytest.raises(ZoneError, match="did not open"):
            release_loop_when_held(device, 32000, "xvdb", timeout_s=0.2)
        assert loop_backing_file(device) == image.resolve()
    finally:
        release_loop(device)
