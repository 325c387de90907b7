"""ContainerSpec → OCI config.json: users, capabilities, mounts, namespaces, resources."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cri_runtime.agent import oci
from cri_runtime.agent.protocol import ContainerSpec, Mount, Resources, Security, User
from devkit.busybox import GROUP, PASSWD

ALL_CAPS = (1 << len(oci.CAPABILITIES)) - 1
ROOT = oci.ResolvedUser(0, 0, (0,))


def spec(**fields: Any) -> ContainerSpec:
    values: dict[str, Any] = {
        "container_id": "a" * 64,
        "name": "web",
        "rootfs_layers": (Path("/layers/1"),),
        "args": ("/bin/app", "--flag"),
    }
    return ContainerSpec.model_validate(values | fields)


def build(container: ContainerSpec, **overrides: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "user": ROOT,
        "zone_hostname": "zone",
        "cgroups_path": "/vgpu-zones/z/c",
        "bounding_caps": ALL_CAPS,
        "gpu": None,
    }
    return oci.runtime_spec(container, **(options | overrides))


def destinations(config: dict[str, Any]) -> list[str]:
    return [m["destination"] for m in config["mounts"]]


# -- users ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        (User(), oci.ResolvedUser(0, 0, (0,))),
        (User(username="app"), oci.ResolvedUser(1000, 1000, (1000, 44))),
        (User(username="app", gid=7), oci.ResolvedUser(1000, 7, (7, 44))),
        (User(uid=1000), oci.ResolvedUser(1000, 1000, (1000, 44))),
        (User(uid=4242), oci.ResolvedUser(4242, 0, (0,))),  # need not exist
        (User(uid=65534, gid=65534), oci.ResolvedUser(65534, 65534, (65534,))),
        (User(username="1000"), oci.ResolvedUser(1000, 1000, (1000, 44))),  # numeric name
        (
            User(uid=1000, supplemental_groups=(44, 3000)),
            oci.ResolvedUser(1000, 1000, (1000, 44, 3000)),
        ),
    ],
)
def test_users_resolve_like_containerd(user: User, expected: oci.ResolvedUser) -> None:
    assert oci.resolve_user(user, PASSWD, GROUP) == expected


def test_unknown_username_is_an_error_and_bad_lines_are_skipped() -> None:
    with pytest.raises(ValueError, match="'ghost' not found"):
        oci.resolve_user(User(username="ghost"), PASSWD, GROUP)
    passwd = "garbage\nx:x:notanumber:0::/:/bin/sh\nok:x:5:6::/:/bin/sh\n"
    assert oci.resolve_user(User(username="ok"), passwd, "") == oci.ResolvedUser(5, 6, (6,))
    assert oci.resolve_user(User(username="ok"), passwd, "g:x:9:other,ok\n").additional_gids == (
        6,
        9,
    )


def test_user_goes_into_the_process() -> None:
    config = build(spec(), user=oci.ResolvedUser(1000, 1000, (1000, 44)))
    assert config["process"]["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [1000, 44]}


# -- capabilities -----------------------------------------------------------------------------


def caps(
    *, privileged: bool = False, add: tuple[str, ...] = (), drop: tuple[str, ...] = ()
) -> list[str]:
    return oci.capabilities(privileged=privileged, add=add, drop=drop, bounding=ALL_CAPS)


def test_default_capabilities_are_containerds() -> None:
    assert set(caps()) == set(oci.DEFAULT_CAPABILITIES) and len(caps()) == 14


def test_capability_add_and_drop_follow_cri_rules() -> None:
    assert "CAP_NET_ADMIN" in caps(add=("NET_ADMIN",))
    assert "CAP_NET_ADMIN" in caps(add=("cap_net_admin",))
    assert "CAP_CHOWN" not in caps(drop=("CHOWN",))
    assert caps(drop=("ALL",)) == []
    assert caps(drop=("ALL",), add=("KILL",)) == ["CAP_KILL"]
    assert caps(add=("ALL",), drop=("SYS_ADMIN",)) == [
        c for c in oci.CAPABILITIES if c != "CAP_SYS_ADMIN"
    ]
    assert caps(privileged=True, drop=("ALL",)) == list(oci.CAPABILITIES)


def test_capabilities_are_bounded_by_the_zones_own() -> None:
    without_mknod = ALL_CAPS & ~(1 << oci.CAPABILITIES.index("CAP_MKNOD"))
    assert "CAP_MKNOD" not in oci.capabilities(
        privileged=False, add=(), drop=(), bounding=without_mknod
    )
    assert "CAP_MKNOD" not in oci.capabilities(
        privileged=True, add=(), drop=(), bounding=without_mknod
    )
    with pytest.raises(ValueError, match="not available in this zone: CAP_MKNOD"):
        oci.capabilities(privileged=False, add=("MKNOD",), drop=(), bounding=without_mknod)


def test_unknown_capabilities_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown capability 'FLY'"):
        caps(add=("FLY",))
    with pytest.raises(ValueError, match="unknown capability"):
        build(spec(security=Security(capabilities_drop=("CAP_NOPE",))))


def test_capability_sets_in_the_process() -> None:
    process = build(spec(security=Security(capabilities_add=("SYS_TIME",))))["process"]
    sets = process["capabilities"]
    assert sets["bounding"] == sets["effective"] == sets["permitted"]
    assert "CAP_SYS_TIME" in sets["bounding"] and "inheritable" not in sets


# -- process, hostname, namespaces ------------------------------------------------------------


def test_process_fields() -> None:
    config = build(
        spec(
            env=("A=1", "PATH=/opt/bin"),
            working_dir="/srv",
            security=Security(no_new_privileges=True),
            resources=Resources(oom_score_adj=-100),
        )
    )
    process = config["process"]
    assert process["args"] == ["/bin/app", "--flag"] and process["cwd"] == "/srv"
    assert process["env"] == ["A=1", "PATH=/opt/bin", "HOSTNAME=zone"]
    assert process["noNewPrivileges"] is True and process["oomScoreAdj"] == -100
    assert process["terminal"] is False
    assert config["ociVersion"] == oci.OCI_VERSION and config["root"] == {
        "path": "rootfs",
        "readonly": False,
    }


def test_default_path_and_hostname() -> None:
    config = build(spec(hostname="web-0"))
    assert config["process"]["env"] == [oci.DEFAULT_PATH, "HOSTNAME=web-0"]
    assert config["hostname"] == "web-0"
    assert build(spec())["hostname"] == "zone"


def test_new_namespaces_except_the_network() -> None:
    linux = build(spec())["linux"]
    assert sorted(n["type"] for n in linux["namespaces"]) == ["ipc", "mount", "pid", "uts"]
    assert linux["cgroupsPath"] == "/vgpu-zones/z/c"


def test_annotations_and_readonly_rootfs() -> None:
    config = build(spec(annotations={"k": "v"}, security=Security(readonly_rootfs=True)))
    assert config["annotations"] == {"k": "v"} and config["root"]["readonly"] is True


# -- mounts -----------------------------------------------------------------------------------


def test_default_mounts_are_runcs() -> None:
    config = build(spec())
    assert destinations(config) == [
        "/proc",
        "/dev",
        "/dev/pts",
        "/dev/shm",
        "/dev/mqueue",
        "/sys",
        "/sys/fs/cgroup",
    ]
    sys_mount = config["mounts"][5]
    assert "ro" in sys_mount["options"] and "nosuid" in sys_mount["options"]


def test_bind_mounts_replace_defaults_and_keep_parents_first() -> None:
    mounts = (
        Mount(host_path=Path("/data/deep"), container_path="/data/a/b", readonly=True),
        Mount(host_path=Path("/data"), container_path="/data", propagation="rslave"),
        Mount(host_path=Path("/host/shm"), container_path="/dev/shm/"),
    )
    config = build(spec(mounts=mounts))
    assert destinations(config) == [
        "/proc",
        "/dev",
        "/dev/pts",
        "/dev/mqueue",
        "/sys",
        "/sys/fs/cgroup",
        "/data",
        "/dev/shm",
        "/data/a/b",
    ]
    binds = {m["destination"]: m for m in config["mounts"] if m["type"] == "bind"}
    assert binds["/data/a/b"] == {
        "destination": "/data/a/b",
        "type": "bind",
        "source": "/data/deep",
        "options": ["rbind", "rprivate", "ro"],
    }
    assert binds["/data"]["options"] == ["rbind", "rslave", "rw"]
    assert config["linux"]["rootfsPropagation"] == "rslave"


def test_rshared_mounts_make_the_rootfs_shared() -> None:
    mount = Mount(host_path=Path("/x"), container_path="/x", propagation="rshared")
    assert build(spec(mounts=(mount,)))["linux"]["rootfsPropagation"] == "rshared"
    assert "rootfsPropagation" not in build(spec())["linux"]


@pytest.mark.parametrize(
    ("mount", "message"),
    [
        (Mount(host_path=Path("/x"), container_path="relative"), "not absolute"),
        (Mount(host_path=Path("/x"), container_path="/x", propagation="shared"), "propagation"),
    ],
)
def test_bad_mounts_are_refused(mount: Mount, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(spec(mounts=(mount,)))


# -- security paths, privileged ---------------------------------------------------------------


def test_masked_and_readonly_paths() -> None:
    linux = build(spec())["linux"]
    assert linux["maskedPaths"] == list(oci.DEFAULT_MASKED_PATHS)
    assert linux["readonlyPaths"] == list(oci.DEFAULT_READONLY_PATHS)
    given = build(spec(security=Security(masked_paths=("/proc/x",), readonly_paths=())))["linux"]
    assert given["maskedPaths"] == ["/proc/x"] and given["readonlyPaths"] == []


def test_privileged_gets_everything() -> None:
    config = build(spec(security=Security(privileged=True)))
    linux = config["linux"]
    assert linux["maskedPaths"] == [] and linux["readonlyPaths"] == []
    assert linux["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    assert config["process"]["capabilities"]["bounding"] == list(oci.CAPABILITIES)
    assert "rw" in next(m for m in config["mounts"] if m["destination"] == "/sys")["options"]
    assert build(spec())["linux"]["resources"]["devices"] == [{"allow": False, "access": "rwm"}]


# -- resources --------------------------------------------------------------------------------


def test_resources_include_only_what_is_set() -> None:
    assert oci.resources_json(Resources()) == {}
    full = Resources(
        cpu_period=100_000,
        cpu_quota=50_000,
        cpu_shares=512,
        memory_limit_bytes=1 << 30,
        cpuset_cpus="0-1",
        cpuset_mems="0",
    )
    assert oci.resources_json(full) == {
        "cpu": {"shares": 512, "quota": 50_000, "period": 100_000, "cpus": "0-1", "mems": "0"},
        "memory": {"limit": 1 << 30},
    }
    resources = build(spec(resources=full))["linux"]["resources"]
    assert resources["memory"] == {"limit": 1 << 30} and resources["cpu"]["shares"] == 512


# -- GPU --------------------------------------------------------------------------------------


def test_gpu_containers_get_the_proxy_socket_and_libvgpu() -> None:
    gpu = oci.GpuMounts(Path("/run/zone/proxy.sock"), Path("/opt/libvgpu.so"))
    config = build(spec(gpu=True, env=("VGPU_PROXY_SOCKET=/elsewhere",)), gpu=gpu)
    binds = {m["destination"]: m for m in config["mounts"] if m["type"] == "bind"}
    assert binds[oci.GPU_PROXY_SOCKET]["source"] == "/run/zone/proxy.sock"
    for path in oci.LIBCUDA_PATHS:
        assert binds[path]["source"] == "/opt/libvgpu.so" and "ro" in binds[path]["options"]
    assert [e for e in config["process"]["env"] if e.startswith("VGPU")] == [
        f"VGPU_PROXY_SOCKET={oci.GPU_PROXY_SOCKET}"
    ]


def test_gpu_containers_of_a_xen_zone_are_told_the_socket_is_the_grant_broker() -> None:
    gpu = oci.GpuMounts(Path("/run/vgpu/broker.sock"), Path("/opt/libvgpu.so"), "grant")
    config = build(spec(gpu=True, env=("VGPU_LINK=local", "A=1")), gpu=gpu)
    assert [e for e in config["process"]["env"] if e.startswith(("VGPU", "A="))] == [
        "A=1",
        f"VGPU_PROXY_SOCKET={oci.GPU_PROXY_SOCKET}",
        "VGPU_LINK=grant",
    ]
    local = build(spec(gpu=True, env=("VGPU_LINK=grant",)), gpu=oci.GpuMounts(Path("/p"), None))
    assert not [e for e in local["process"]["env"] if e.startswith("VGPU_LINK")]


def test_gpu_without_libvgpu_gets_the_socket_only() -> None:
    config = build(spec(gpu=True), gpu=oci.GpuMounts(Path("/p.sock"), None))
    assert [m["destination"] for m in config["mounts"] if m["type"] == "bind"] == [
        oci.GPU_PROXY_SOCKET
    ]


def test_non_gpu_containers_see_nothing_of_the_gpu() -> None:
    config = build(spec(), gpu=oci.GpuMounts(Path("/p.sock"), Path("/l.so")))
    assert not [m for m in config["mounts"] if m["type"] == "bind"]
    assert not [e for e in config["process"]["env"] if e.startswith("VGPU")]


def test_gpu_ask_in_a_zone_without_gpu_is_refused() -> None:
    with pytest.raises(ValueError, match="no gpu-proxy"):
        build(spec(gpu=True))
