"""CRI conformance for GPU pods: the runtime registers the zone with gpu-proxy (quota from the
pod annotation), the container gets the zone's channel, and removal releases the zone."""

from __future__ import annotations

import grpc

from cri_runtime.client import CriClient, container_config, pod_config
from cri_runtime.cri.gen import api_pb2
from gpu_proxy.proto.gen import control_pb2, control_pb2_grpc


def proxy_zones(address: str) -> dict[str, int]:
    with grpc.insecure_channel(address) as channel:
        reply = control_pb2_grpc.ZoneControlStub(channel).List(control_pb2.ListZonesRequest())
    return {z.identity.zone: z.memory_limit_bytes for z in reply.zones}


def test_gpu_pod_gets_its_zone_channel(cri: CriClient, image: str, gpu_proxy: str) -> None:
    cfg = pod_config("gpu", annotations={"vgpu-isolated.io/gpu-memory": "64Mi"})
    pod = cri.run_pod(cfg, handler="vgpu-isolated")
    assert proxy_zones(gpu_proxy).get(pod) == 64 << 20
    cid = cri.create(pod, container_config("cuda", image, ["sleep", "60"]), cfg)
    cri.start(cid)
    reply = cri.runtime.ExecSync(
        api_pb2.ExecSyncRequest(
            container_id=cid,
            cmd=["sh", "-c", 'test -S "$VGPU_PROXY_SOCKET" && echo ok'],
            timeout=10,
        )
    )
    assert reply.exit_code == 0 and reply.stdout == b"ok\n", reply.stderr
    cri.stop_pod(pod)
    assert pod not in proxy_zones(gpu_proxy)
    cri.remove_pod(pod)


def test_plain_pod_has_no_gpu_channel(cri: CriClient, image: str, gpu_proxy: str) -> None:
    cfg = pod_config("plain")
    pod = cri.run_pod(cfg)
    assert pod not in proxy_zones(gpu_proxy)
    cid = cri.create(pod, container_config("c", image, ["sleep", "60"]), cfg)
    cri.start(cid)
    reply = cri.runtime.ExecSync(
        api_pb2.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", 'echo "[$VGPU_PROXY_SOCKET]"'])
    )
    assert reply.stdout == b"[]\n"
    cri.remove_pod(pod)


def test_bad_gpu_quota_is_refused(cri: CriClient) -> None:
    cfg = pod_config("badq", annotations={"vgpu-isolated.io/gpu-memory": "lots"})
    try:
        cri.run_pod(cfg, handler="vgpu-isolated")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "lots" in (exc.details() or "")
    else:
        raise AssertionError("a bad quota was accepted")
    listed = cri.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items
    assert "badq" not in [p.metadata.name for p in listed]
