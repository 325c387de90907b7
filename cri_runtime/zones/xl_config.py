"""A zone's xl domain configuration as a pydantic model, rendered to xl's config syntax.

xl reads a small language (``key = "string"``, ``key = 123``, ``key = [ "a", "b" ]``). Rather
than escaping, every string that reaches the file is checked to need none: no quote, backslash,
newline or other control character can appear (xl's parser would end the string or the line
there, and a hostile value could add keys of its own). Numbers are integers; disks are parsed
into their parts and rendered back, so only the forms validated here reach xl.

PVH guests get ``cpuid = "host,rdtscp=0"``: QEMU's emulated SVM mishandles RDTSCP exits and a
nested PVH guest dies on its first RDTSCP (../shared/XEN-TESTBED.md); real hardware is not
hurt by hiding RDTSCP from a guest that then reads the TSC with RDTSC.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

DOMAIN_PREFIX = "vgpu-"
PVH_CPUID = "host,rdtscp=0"
# A zone id (cri_runtime.zones.base.ZoneSpec) behind the prefix: never all digits, which xl
# would read as a domid.
_DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_VDEV = re.compile(r"^xvd[a-z]{1,2}$")
# Characters that could end an xl string or line, or confuse a disk spec's own syntax.
_UNSAFE = re.compile(r"[\"'\\\x00-\x1f\x7f]")

Action = Literal[
    "destroy", "restart", "rename-restart", "preserve", "coredump-destroy",
    "coredump-restart", "soft-reset",
]  # fmt: skip


def safe_text(value: str) -> str:
    """A value that can go between xl's double quotes as it is."""
    if _UNSAFE.search(value):
        raise ValueError(
            f"{value!r} contains a quote, backslash or control character (xl config strings "
            "cannot carry them safely)"
        )
    return value


def _absolute(path: PurePosixPath) -> PurePosixPath:
    if not path.is_absolute():
        raise ValueError(f"{path} must be an absolute path")
    safe_text(str(path))
    return path


SafeText = Annotated[str, AfterValidator(safe_text)]
AbsolutePath = Annotated[PurePosixPath, AfterValidator(_absolute)]


class XlDisk(BaseModel):
    """One disk (xl-disk-configuration): ``phy:<target>,<vdev>,<access>``, or with a hotplug
    ``script`` the keyword form ``vdev=..,access=..,script=..,target=..`` (the positional form
    cannot name one; zones' read-only disks use xen_disks.BLOCK_RO_SCRIPT)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    target: AbsolutePath
    vdev: str = Field(pattern=_VDEV.pattern)
    readonly: bool = True
    script: AbsolutePath | None = None

    @field_validator("target", "script")
    @classmethod
    def _no_separators(cls, path: PurePosixPath | None) -> PurePosixPath | None:
        if path is not None and ("," in str(path) or any(c.isspace() for c in str(path))):
            raise ValueError(f"disk path {str(path)!r} must not contain ',' or whitespace")
        return path

    @classmethod
    def parse(cls, spec: str) -> XlDisk:
        """``phy:/dev/loop3,xvdb,r`` (access ``r``/``ro`` or ``w``/``rw``); anything else is
        refused with the reason."""
        safe_text(spec)
        prefix, colon, rest = spec.partition(":")
        if not colon or prefix != "phy":
            raise ValueError(f"disk {spec!r}: expected phy:<target>,<vdev>,<r|rw>")
        parts = rest.split(",")
        if len(parts) != 3:
            raise ValueError(f"disk {spec!r}: expected phy:<target>,<vdev>,<r|rw>")
        target, vdev, access = parts
        if access not in ("r", "ro", "w", "rw"):
            raise ValueError(f"disk {spec!r}: access {access!r} is not r, ro, w or rw")
        return cls(target=PurePosixPath(target), vdev=vdev, readonly=access in ("r", "ro"))

    def render(self) -> str:
        access = "r" if self.readonly else "rw"
        if self.script is None:
            return f"phy:{self.target},{self.vdev},{access}"
        return f"vdev={self.vdev},access={access},script={self.script},target={self.target}"


class XlConfig(BaseModel):
    """What ``xl create`` gets for one zone. Memory in MiB, as xl counts it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    type: Literal["pv", "pvh"] = "pv"
    kernel: AbsolutePath
    ramdisk: AbsolutePath | None = None
    extra: SafeText = ""  # the guest kernel's command line
    memory: int = Field(ge=32, le=1 << 22)
    maxmem: int | None = Field(default=None, ge=32, le=1 << 22)
    vcpus: int = Field(default=1, ge=1, le=128)
    disks: tuple[XlDisk, ...] = ()
    on_poweroff: Action = "destroy"
    on_reboot: Action = "destroy"  # a zone that reboots has lost its agent's state: it ends
    on_crash: Action = "destroy"
    cpuid: SafeText = PVH_CPUID  # used for PVH only (see the module docstring)

    @field_validator("name")
    @classmethod
    def _domain_name(cls, name: str) -> str:
        zone = name.removeprefix(DOMAIN_PREFIX)
        if zone == name or not _DOMAIN_NAME.fullmatch(zone):
            raise ValueError(
                f"domain name {name!r} must be {DOMAIN_PREFIX}<zone id> "
                "(zone ids: [A-Za-z0-9][A-Za-z0-9_.-]{0,63})"
            )
        return name

    @field_validator("disks", mode="before")
    @classmethod
    def _parse_disks(cls, value: object) -> object:
        if isinstance(value, (list, tuple)):
            return tuple(XlDisk.parse(d) if isinstance(d, str) else d for d in value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> XlConfig:
        if self.maxmem is not None and self.maxmem < self.memory:
            raise ValueError(f"maxmem {self.maxmem} MiB is below memory {self.memory} MiB")
        vdevs = [d.vdev for d in self.disks]
        if len(set(vdevs)) != len(vdevs):
            raise ValueError(f"disks use a virtual device twice: {vdevs}")
        return self

    def render(self) -> str:
        """The config file's text (every value was validated to need no escaping)."""
        lines = [
            f'name = "{self.name}"',
            f'type = "{self.type}"',
            f'kernel = "{self.kernel}"',
        ]
        if self.ramdisk is not None:
            lines.append(f'ramdisk = "{self.ramdisk}"')
        if self.extra:
            lines.append(f'extra = "{self.extra}"')
        lines += [f"memory = {self.memory}", f"maxmem = {self.maxmem or self.memory}"]
        lines.append(f"vcpus = {self.vcpus}")
        if self.disks:
            lines.append("disk = [ " + ", ".join(f'"{d.render()}"' for d in self.disks) + " ]")
        lines += [
            f'on_poweroff = "{self.on_poweroff}"',
            f'on_reboot = "{self.on_reboot}"',
            f'on_crash = "{self.on_crash}"',
        ]
        if self.type == "pvh":
            lines.append(f'cpuid = "{self.cpuid}"')
        return "\n".join(lines) + "\n"
