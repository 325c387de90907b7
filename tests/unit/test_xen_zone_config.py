"""The Xen backend's host-side pieces that need no Xen: the xl config model and its rendering,
`xl list` parsing, xl failures becoming ZoneErrors, and how a ZoneSpec becomes a domain."""

from __future__ import annotations

import stat
from pathlib import Path, PurePosixPath

import pytest
from pydantic import ValidationError

from cri_runtime.agent import xen
from cri_runtime.agent.xen import ZoneAgentSettings
from cri_runtime.config import XenSettings
from cri_runtime.zones import xen_disks
from cri_runtime.zones.base import GpuAccess, ZoneError, ZoneSpec
from cri_runtime.zones.xen import agent_settings, domain_name, xl_config, zone_of
from cri_runtime.zones.xl import Xl, parse_list
from cri_runtime.zones.xl_config import XlConfig, XlDisk

# `xl list` in the testbed's Dom0 (Xen 4.17): a paused zone being booted and one shutting down.
XL_LIST = (
    "Name                                        ID   Mem VCPUs\tState\tTime(s)\n"
    "Domain-0                                     0  1024     2     r-----      41.2\n"
    "vgpu-3f2a                                    1   256     1     --p---       0.0\n"
    "vgpu-zone.b_1                                2   512     2     -b-s--       3.9\n"
)


def config(**overrides: object) -> XlConfig:
    fields: dict[str, object] = {
        "name": "vgpu-abc",
        "kernel": "/boot/vmlinux",
        "ramdisk": "/boot/zone.cpio.gz",
        "extra": "console=hvc0 quiet",
        "memory": 256,
        "disks": ["phy:/dev/vdb,xvda,r"],
    }
    fields.update(overrides)
    return XlConfig.model_validate(fields)


def test_renders_every_key_xl_needs() -> None:
    text = config(vcpus=2, disks=["phy:/dev/vdb,xvda,r", "phy:/dev/loop3,xvdb,rw"]).render()
    assert text.splitlines() == [
        'name = "vgpu-abc"',
        'type = "pv"',
        'kernel = "/boot/vmlinux"',
        'ramdisk = "/boot/zone.cpio.gz"',
        'extra = "console=hvc0 quiet"',
        "memory = 256",
        "maxmem = 256",
        "vcpus = 2",
        'disk = [ "phy:/dev/vdb,xvda,r", "phy:/dev/loop3,xvdb,rw" ]',
        'on_poweroff = "destroy"',
        'on_reboot = "destroy"',
        'on_crash = "destroy"',
    ]


def test_pvh_gets_the_rdtscp_quirk_and_pv_does_not() -> None:
    assert 'cpuid = "host,rdtscp=0"' in config(type="pvh").render().splitlines()
    assert "cpuid" not in config(type="pv").render()


def test_optional_keys_are_left_out() -> None:
    text = config(ramdisk=None, extra="", disks=[], maxmem=512, on_crash="preserve").render()
    assert "ramdisk" not in text and "extra" not in text and "disk" not in text
    assert "maxmem = 512" in text and 'on_crash = "preserve"' in text


@pytest.mark.parametrize(
    "hostile",
    [
        {"extra": 'quiet"\nmemory = 99999'},
        {"extra": "a\nb"},
        {"extra": "back\\slash"},
        {"extra": "single'quote"},
        {"extra": "tab\there"},
        {"kernel": '/boot/x"y'},
        {"ramdisk": "/boot/x\ny"},
        {"kernel": "relative/vmlinux"},
        {"name": 'vgpu-a"b'},
        {"name": "vgpu-a b"},
        {"name": "other-zone"},
        {"name": "vgpu-"},
        {"name": "vgpu-" + "a" * 65},
        {"memory": 8},
        {"memory": 256, "maxmem": 128},
        {"vcpus": 0},
        {"on_crash": "explode"},
        {"type": "hvm"},
        {"disks": ['phy:/dev/vdb,xvda,r"']},
        {"disks": ["phy:/dev/vdb,xvda,r", "phy:/dev/vdc,xvda,r"]},
        {"bootloader": "pygrub"},
    ],
)
def test_hostile_or_wrong_values_are_refused(hostile: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        config(**hostile)


@pytest.mark.parametrize(
    "spec",
    [
        "/dev/vdb,xvda,r",  # no backend prefix
        "file:/img,xvda,r",
        "phy:/dev/vdb,xvda",
        "phy:/dev/vdb,xvda,r,extra",
        "phy:/dev/vdb,hda,r",
        "phy:/dev/vdb,xvda,rx",
        "phy:dev/vdb,xvda,r",
        "phy:/dev/my disk,xvda,r",
        "phy:/dev/vdb,xvda,r\n",
    ],
)
def test_bad_disk_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        XlDisk.parse(spec)


def test_disk_specs_round_trip() -> None:
    disk = XlDisk.parse("phy:/dev/loop7,xvdc,ro")
    assert (disk.target, disk.vdev, disk.readonly) == (PurePosixPath("/dev/loop7"), "xvdc", True)
    assert disk.render() == "phy:/dev/loop7,xvdc,r"
    assert XlDisk.parse("phy:/dev/loop7,xvdc,w").render() == "phy:/dev/loop7,xvdc,rw"


def test_xl_list_is_parsed() -> None:
    domains = parse_list(XL_LIST)
    assert [(d.name, d.domid, d.memory_mib, d.vcpus) for d in domains] == [
        ("Domain-0", 0, 1024, 2),
        ("vgpu-3f2a", 1, 256, 1),
        ("vgpu-zone.b_1", 2, 512, 2),
    ]
    assert [(d.paused, d.ended) for d in domains] == [(False, False), (True, False), (False, True)]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Name ID\n",
        XL_LIST + "vgpu-x 3 256\n",
        XL_LIST + "vgpu-x three 256 1 -b---- 0.1\n",
        XL_LIST + "vgpu-x 3 256 1 running 0.1\n",
    ],
)
def test_unexpected_xl_list_output_is_an_error(text: str) -> None:
    with pytest.raises(ValueError, match="xl list"):
        parse_list(text)


def fake_xl(directory: Path, script: str) -> Xl:
    """A stand-in executable for xl's failure modes (exit status, stderr, hanging)."""
    path = directory / "xl"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return Xl(str(path), timeout_s=5)


def test_xl_failures_carry_its_stderr(tmp_path: Path) -> None:
    xl = fake_xl(
        tmp_path,
        'echo "libxl: error: domain_create: Domain 7:cannot allocate memory" >&2\nexit 3\n',
    )
    with pytest.raises(ZoneError) as caught:
        xl.create_paused(tmp_path / "zone.cfg")
    message = str(caught.value)
    assert "create -p" in message and "exit 3" in message
    assert "Domain 7:cannot allocate memory" in message


def test_xl_that_hangs_times_out(tmp_path: Path) -> None:
    xl = fake_xl(tmp_path, "echo stuck >&2\nexec sleep 30\n")
    with pytest.raises(ZoneError, match=r"unpause vgpu-a did not finish within 1 s: stuck"):
        xl.run("unpause", "vgpu-a", timeout_s=1)


def test_missing_xl_is_a_zone_error(tmp_path: Path) -> None:
    with pytest.raises(ZoneError, match="cannot run"):
        Xl(str(tmp_path / "no-xl")).list()


def test_garbled_xl_list_is_a_zone_error(tmp_path: Path) -> None:
    with pytest.raises(ZoneError, match="unexpected header"):
        fake_xl(tmp_path, "echo garbage\n").list()


def settings(**overrides: object) -> XenSettings:
    fields: dict[str, object] = {
        "kernel": "/zone/vmlinux",
        "ramdisk": "/zone/initrd",
        "root_disk": "/dev/vdb",
        "system_disk": "/dev/loop0",
        "min_memory_mib": 256,
    }
    fields.update(overrides)
    return XenSettings.model_validate(fields)


def test_a_zone_spec_becomes_its_domain() -> None:
    spec = ZoneSpec(zone_id="a" * 64, vcpus=3, memory_mib=1024)
    rendered = xl_config(spec, settings()).render()
    assert f'name = "vgpu-{"a" * 64}"' in rendered
    assert "vcpus = 3" in rendered and "memory = 1024" in rendered
    script = xen_disks.BLOCK_RO_SCRIPT  # both disks are read-only: the short hotplug script
    assert (
        f'disk = [ "vdev=xvda,access=r,script={script},target=/dev/vdb", '
        f'"vdev=xvdb,access=r,script={script},target=/dev/loop0" ]'
    ) in rendered


def test_small_pods_get_the_zone_memory_floor() -> None:
    spec = ZoneSpec(zone_id="z", memory_mib=64)
    assert xl_config(spec, settings(min_memory_mib=320)).memory == 320


def test_hostile_extra_cmdline_in_the_settings_is_refused() -> None:
    with pytest.raises(ValidationError):
        xl_config(ZoneSpec(zone_id="z"), settings(extra='quiet" kernel = "/evil'))


def test_domain_names_and_zone_ids() -> None:
    assert domain_name("abc") == "vgpu-abc"
    assert zone_of("vgpu-abc") == "abc"
    assert zone_of("Domain-0") is None
    assert zone_of("vgpu-") is None
    assert zone_of("vgpu-../x") is None


def test_agent_settings_follow_the_spec() -> None:
    gpu = ZoneSpec(zone_id="z", hostname="web-1", gpu=GpuAccess(memory_limit=1 << 30))
    lib = Path("/opt/vgpu-zone/libvgpu.so")
    made = agent_settings(gpu, settings(libvgpu=lib), "runc", "debug")
    assert made == ZoneAgentSettings(
        hostname="web-1", oci_runtime="runc", log_level="debug", gpu=True, libvgpu=lib
    )
    plain = agent_settings(ZoneSpec(zone_id="z"), settings(libvgpu=lib), "auto", "info")
    assert not plain.gpu and plain.libvgpu is None
    # what the agent reads back from xenstore is the same model; it refuses unknown keys
    assert ZoneAgentSettings.model_validate_json(made.model_dump_json()) == made
    with pytest.raises(ValidationError):
        ZoneAgentSettings.model_validate_json('{"hostname": "x", "privileged": true}')


@pytest.mark.parametrize("vdev", ["xvdb,w", "sda", "xvdb\n", "axvdb", "xvdabc"])
def test_a_disk_vdev_is_the_whole_name_or_refused(vdev: str) -> None:
    """Pydantic's pattern searches: an unanchored one let "xvdb,w" smuggle an access mode in."""
    with pytest.raises(ValidationError):
        XlDisk(target=PurePosixPath("/dev/loop0"), vdev=vdev)


def test_the_agent_lets_the_zone_grant_as_many_pages_as_it_has(tmp_path: Path) -> None:
    """gntalloc's limit rises to the zone's memory in pages (pinned buffers are granted pages),
    never falls, and a zone without gntalloc keeps going."""
    limit, meminfo = tmp_path / "limit", tmp_path / "meminfo"
    meminfo.write_text("MemTotal:         524288 kB\nMemFree:          100 kB\n")
    limit.write_text("1024\n")
    assert xen.allow_granting_memory(limit, meminfo) == 131072
    assert limit.read_text() == "131072"
    limit.write_text("1000000\n")
    assert xen.allow_granting_memory(limit, meminfo) == 1000000
    assert limit.read_text() == "1000000\n"
    assert xen.allow_granting_memory(tmp_path / "absent", meminfo) is None
