"""The Xen device ABI as idm.xen._xenioctl sees it, checked against the kernel headers twice:
through _IOC() arithmetic on the compiler's struct sizes, and through a C program compiled here
that prints what the headers say. Then the device wrappers' errors, which need no Xen to test."""

import errno
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from idm.xen import _xenioctl
from idm.xen._device import XenDeviceError
from idm.xen.evtchn import EventChannel
from idm.xen.gntalloc import GrantedPages
from idm.xen.gntdev import MappedGrants

ffi, lib = _xenioctl.ffi, _xenioctl.lib

# (ioctl, struct it carries, type letter, number), as documented in the UAPI headers.
IOCTLS = [
    ("IOCTL_GNTALLOC_ALLOC_GREF", "ioctl_gntalloc_alloc_gref", "G", 5),
    ("IOCTL_GNTALLOC_DEALLOC_GREF", "ioctl_gntalloc_dealloc_gref", "G", 6),
    ("IOCTL_GNTDEV_MAP_GRANT_REF", "ioctl_gntdev_map_grant_ref", "G", 0),
    ("IOCTL_GNTDEV_UNMAP_GRANT_REF", "ioctl_gntdev_unmap_grant_ref", "G", 1),
    ("IOCTL_EVTCHN_BIND_INTERDOMAIN", "ioctl_evtchn_bind_interdomain", "E", 1),
    ("IOCTL_EVTCHN_BIND_UNBOUND_PORT", "ioctl_evtchn_bind_unbound_port", "E", 2),
    ("IOCTL_EVTCHN_UNBIND", "ioctl_evtchn_unbind", "E", 3),
    ("IOCTL_EVTCHN_NOTIFY", "ioctl_evtchn_notify", "E", 4),
]

FIELDS = {
    "ioctl_gntalloc_alloc_gref": ["domid", "flags", "count", "index", "gref_ids"],
    "ioctl_gntalloc_dealloc_gref": ["index", "count"],
    "ioctl_gntdev_grant_ref": ["domid", "ref"],
    "ioctl_gntdev_map_grant_ref": ["count", "pad", "index", "refs"],
    "ioctl_gntdev_unmap_grant_ref": ["index", "count", "pad"],
    "ioctl_evtchn_bind_unbound_port": ["remote_domain"],
    "ioctl_evtchn_bind_interdomain": ["remote_domain", "remote_port"],
    "ioctl_evtchn_notify": ["port"],
    "ioctl_evtchn_unbind": ["port"],
}

# The values libxengnttab/libxenevtchn use on x86-64: the kernel ABI itself.
KNOWN_X86_64 = {
    "IOCTL_GNTALLOC_ALLOC_GREF": 0x184705,
    "IOCTL_GNTALLOC_DEALLOC_GREF": 0x104706,
    "IOCTL_GNTDEV_MAP_GRANT_REF": 0x184700,
    "IOCTL_GNTDEV_UNMAP_GRANT_REF": 0x104701,
    "IOCTL_EVTCHN_BIND_INTERDOMAIN": 0x84501,
    "IOCTL_EVTCHN_BIND_UNBOUND_PORT": 0x44502,
    "IOCTL_EVTCHN_UNBIND": 0x44503,
    "IOCTL_EVTCHN_NOTIFY": 0x44504,
}


def _ioc(direction: int, kind: str, nr: int, size: int) -> int:
    """Linux's generic _IOC(): dir in bits 30-31, size 16-29, type 8-15, number 0-7."""
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | nr


@pytest.fixture(scope="module")
def from_gcc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Every ioctl number, struct size and field offset, as gcc reads the headers."""
    lines = [f'printf("{name} %lu\\n", (unsigned long){name});' for name, *_ in IOCTLS]
    lines.append('printf("GNTALLOC_FLAG_WRITABLE %lu\\n", (unsigned long)GNTALLOC_FLAG_WRITABLE);')
    for struct, fields in FIELDS.items():
        lines.append(f'printf("sizeof {struct} %zu\\n", sizeof(struct {struct}));')
        lines += [
            f'printf("offsetof {struct}.{f} %zu\\n", offsetof(struct {struct}, {f}));'
            for f in fields
        ]
    source = "\n".join(
        [
            "#include <stddef.h>",
            "#include <stdint.h>",
            "#include <stdio.h>",
            "#include <sys/ioctl.h>",
            "typedef uint16_t domid_t;",
            "typedef uint32_t grant_ref_t;",
            "#include <xen/evtchn.h>",
            "#include <xen/gntalloc.h>",
            "#include <xen/gntdev.h>",
            "int main(void) {",
            *lines,
            "return 0; }",
        ]
    )
    work = tmp_path_factory.mktemp("abi")
    (work / "abi.c").write_text(source)
    subprocess.run(["gcc", "-Wall", "-Werror", "-o", work / "abi", work / "abi.c"], check=True)
    out = subprocess.run([work / "abi"], check=True, capture_output=True, text=True).stdout
    values = {}
    for line in out.splitlines():
        key, value = line.rsplit(" ", 1)
        values[key] = int(value)
    return values


@pytest.mark.parametrize(("name", "struct", "kind", "nr"), IOCTLS)
def test_ioctl_number_is_ioc_of_the_struct_size(name: str, struct: str, kind: str, nr: int) -> None:
    assert getattr(lib, name) == _ioc(0, kind, nr, ffi.sizeof(f"struct {struct}"))


@pytest.mark.parametrize(("name", "struct", "kind", "nr"), IOCTLS)
def test_ioctl_number_matches_gcc_and_the_known_abi(
    from_gcc: dict[str, int], name: str, struct: str, kind: str, nr: int
) -> None:
    assert getattr(lib, name) == from_gcc[name] == KNOWN_X86_64[name]


@pytest.mark.parametrize("struct", sorted(FIELDS))
def test_struct_layout_matches_gcc(from_gcc: dict[str, int], struct: str) -> None:
    assert ffi.sizeof(f"struct {struct}") == from_gcc[f"sizeof {struct}"]
    for f in FIELDS[struct]:
        assert ffi.offsetof(f"struct {struct}", f) == from_gcc[f"offsetof {struct}.{f}"], f


def test_writable_flag_matches_gcc(from_gcc: dict[str, int]) -> None:
    assert lib.GNTALLOC_FLAG_WRITABLE == from_gcc["GNTALLOC_FLAG_WRITABLE"] == 1


def test_helpers_return_minus_errno_from_the_kernel() -> None:
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        index = ffi.new("uint64_t *")
        grefs = ffi.new("uint32_t[]", 2)
        assert lib.idmx_gntalloc_alloc(fd, 0, 2, index, grefs) == -errno.ENOTTY
        assert lib.idmx_gntdev_map(fd, 0, 2, grefs, index) == -errno.ENOTTY
        assert lib.idmx_gntdev_unmap(fd, 0, 1) == -errno.ENOTTY
        assert lib.idmx_evtchn_bind_unbound_port(fd, 0) == -errno.ENOTTY
        assert lib.idmx_evtchn_bind_interdomain(fd, 0, 1) == -errno.ENOTTY
        assert lib.idmx_evtchn_notify(fd, 1) == -errno.ENOTTY
        assert lib.idmx_evtchn_unbind(fd, 1) == -errno.ENOTTY
    finally:
        os.close(fd)
    assert lib.idmx_evtchn_notify(fd, 1) == -errno.EBADF


@pytest.mark.parametrize("count", [0, 0xFFFFFFFF])
def test_helpers_refuse_counts_before_sizing_a_request(count: int) -> None:
    index = ffi.new("uint64_t *")
    assert lib.idmx_gntalloc_alloc(-1, 0, count, index, ffi.NULL) == -errno.EINVAL
    assert lib.idmx_gntdev_map(-1, 0, count, ffi.NULL, index) == -errno.EINVAL


# -- the wrappers' errors ----------------------------------------------------------------------


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    ("open_it", "device", "module"),
    [
        (lambda dev: GrantedPages.allocate(0, 1, device=dev), "gntalloc", "xen-gntalloc"),
        (lambda dev: MappedGrants.map(0, [8], device=dev), "gntdev", "xen-gntdev"),
        (lambda dev: EventChannel.bind_unbound_port(0, device=dev), "evtchn", "xen-evtchn"),
        (lambda dev: EventChannel.bind_interdomain(0, 5, device=dev), "evtchn", "xen-evtchn"),
    ],
)
def test_missing_device_says_which_module(
    tmp_path: Path, open_it: Callable[[str], object], device: str, module: str
) -> None:
    path = str(tmp_path / device)
    with pytest.raises(XenDeviceError) as info:
        open_it(path)
    assert info.value.errno == errno.ENOENT
    assert info.value.device == path
    assert str(info.value) == (
        f"{path} not present (ENOENT: No such file or directory): is the {module} module loaded?"
    )


@pytest.mark.parametrize(
    ("open_it", "what"),
    [
        (lambda: GrantedPages.allocate(3, 2, device="/dev/null"), "IOCTL_GNTALLOC_ALLOC_GREF"),
        (lambda: MappedGrants.map(3, [8, 9], device="/dev/null"), "IOCTL_GNTDEV_MAP_GRANT_REF"),
        (
            lambda: EventChannel.bind_unbound_port(3, device="/dev/null"),
            "IOCTL_EVTCHN_BIND_UNBOUND_PORT",
        ),
        (
            lambda: EventChannel.bind_interdomain(3, 7, device="/dev/null"),
            "IOCTL_EVTCHN_BIND_INTERDOMAIN",
        ),
    ],
)
def test_refused_ioctl_names_device_and_errno_and_leaks_no_fd(
    open_it: Callable[[], object], what: str
) -> None:
    before = _open_fds()
    with pytest.raises(XenDeviceError) as info:
        open_it()
    assert _open_fds() == before
    assert info.value.errno == errno.ENOTTY
    message = str(info.value)
    assert message.startswith(f"/dev/null: {what}(")
    assert message.endswith("failed (ENOTTY: Inappropriate ioctl for device)")
    assert "domid=3" in message


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: GrantedPages.allocate(0x7FF0, 1), "domid 32752 is not a domain id"),
        (lambda: GrantedPages.allocate(0, 0), "page count 0 is out of range"),
        (lambda: MappedGrants.map(0, []), "page count 0 is out of range"),
        (lambda: MappedGrants.map(0, [1 << 32]), "32-bit unsigned"),
        (lambda: EventChannel.bind_unbound_port(-1), "domid -1 is not a domain id"),
        (lambda: EventChannel.bind_interdomain(0, 0), "port 0 is not a port"),
    ],
)
def test_arguments_are_checked_before_any_device_is_opened(
    call: Callable[[], object], message: str
) -> None:
    before = _open_fds()
    with pytest.raises(ValueError, match=message):
        call()
    assert _open_fds() == before
