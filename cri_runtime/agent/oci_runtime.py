"""The OCI runtime the agent drives (crun or runc), and how it is chosen.

crun is preferred: a small C binary that starts containers faster and with less memory than
runc, which matters in a zone with little RAM. But crun refuses hosts with hybrid cgroups
(v1 controllers plus a cgroup2 mount with controllers: "cgroups in hybrid mode not supported"),
which the process backend meets on some dev/CI machines, so ``auto`` probes once at start and
falls back to runc, logging why. Each invocation gets its own ``--log`` file in JSON, so a
failure's message is the runtime's own error and not whatever the container printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from cri_runtime.agent.cgroups import CgroupLayout, CgroupMode
from cri_runtime.agent.client import AgentError
from cri_runtime.agent.protocol import AgentStatus, ExecResult
from cri_runtime.agent.reaper import Child, Reaper

log = structlog.get_logger(__name__)

RUNTIMES = ("crun", "runc")
COMMAND_TIMEOUT_S = 60.0
EXEC_OUTPUT_LIMIT = 16 << 20  # per stream; more is drained and dropped
MESSAGE_LIMIT = 4096
PROBE_EXECUTABLE = "/vgpu-oci-probe"


@dataclass(frozen=True, slots=True)
class RuntimeChoice:
    name: str
    binary: str
    reason: str


def choose_runtime(
    requested: str,
    *,
    which: Callable[[str], str | None],
    layout: CgroupLayout,
    probe_crun: Callable[[str], str | None],
) -> RuntimeChoice:
    """``requested`` is auto, crun or runc; ``probe_crun(binary)`` returns None when crun can
    create a container here, else why not. ValueError when nothing usable is installed."""
    if requested != "auto":
        binary = which(requested)
        if binary is None:
            raise ValueError(f"{requested} is configured but not installed")
        return RuntimeChoice(requested, binary, "configured")
    crun, runc = which("crun"), which("runc")
    if crun is None:
        if runc is None:
            raise ValueError("neither crun nor runc is installed")
        return RuntimeChoice("runc", runc, "crun is not installed")
    if runc is not None and layout.mode == CgroupMode.HYBRID:
        return RuntimeChoice("runc", runc, "hybrid cgroups (v1 + v2): crun refuses them")
    why_not = probe_crun(crun)
    if why_not is None:
        return RuntimeChoice("crun", crun, "crun works here (preferred: faster, smaller)")
    if runc is None:
        return RuntimeChoice("crun", crun, f"crun failed its probe ({why_not}) but runc is absent")
    return RuntimeChoice("runc", runc, f"crun cannot create containers here: {why_not}")


def runtime_errors(log_text: str) -> str:
    """The error messages of a runtime's JSON log (runc and crun write the same shape)."""
    messages = []
    lines = log_text.splitlines()
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            messages.append(str(entry.get("msg", "")))
    text = "; ".join(messages) if messages else "\n".join(lines[-5:])
    return text[-MESSAGE_LIMIT:]


class OciRuntime:
    """Commands of one runtime binary over one state root (``<zone_dir>/oci``)."""

    def __init__(self, choice: RuntimeChoice, state_root: Path, scratch: Path, reaper: Reaper):
        self.name = choice.name
        self.binary = choice.binary
        self.state_root = state_root
        self._scratch = scratch
        self._reaper = reaper
        state_root.mkdir(parents=True, exist_ok=True)
        scratch.mkdir(parents=True, exist_ok=True)

    def create(
        self, container_id: str, bundle: Path, pid_file: Path, *, stdout: int, stderr: int
    ) -> int:
        """Create the container with our pipes as its stdout/stderr; returns its pid."""
        with self._log_file("create") as log_path:
            child = self._reaper.spawn(
                self._command(
                    log_path, "create", f"--bundle={bundle}", f"--pid-file={pid_file}", container_id
                ),
                stdout=stdout,
                stderr=stderr,
            )
            code = child.wait(COMMAND_TIMEOUT_S)
            if code is None:
                child.kill()
                child.wait()
                raise AgentError(AgentStatus.FAILED, f"{self.name} create timed out")
            if code != 0:
                raise AgentError(
                    AgentStatus.FAILED, self._failure("create", self._errors(log_path))
                )
        return int(pid_file.read_text())

    def start(self, container_id: str) -> None:
        self._run("start", container_id)

    def delete(self, container_id: str) -> None:
        """Remove the container's state and cgroup; one already gone is fine."""
        if (self.state_root / container_id).exists():
            self._run("delete", "--force", container_id)

    def update(self, container_id: str, resources: dict[str, Any]) -> None:
        path = self._scratch / f"resources-{uuid.uuid4().hex}.json"
        path.write_text(json.dumps(resources))
        try:
            self._run("update", f"--resources={path}", container_id)
        finally:
            path.unlink(missing_ok=True)

    def exec(
        self, container_id: str, cmd: Sequence[str], pid_file: Path, timeout_s: float
    ) -> ExecResult:
        """Run ``cmd`` in the container (the container's process settings, new args); on timeout
        the exec'd process is killed and the result says timed_out."""

        def kill_exec(child: Child) -> None:
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                child.kill()

        with self._log_file("exec") as log_path:
            done = self._reaper.run(
                self._command(log_path, "exec", f"--pid-file={pid_file}", "--", container_id, *cmd),
                timeout_s=timeout_s or None,
                output_limit=EXEC_OUTPUT_LIMIT,
                on_timeout=kill_exec,
            )
            started = pid_file.exists()
            pid_file.unlink(missing_ok=True)
            if not started and not done.timed_out:
                why = self._errors(log_path) or done.stderr.decode(errors="replace")
                raise AgentError(AgentStatus.FAILED, self._failure("exec", why))
        return ExecResult(
            stdout=done.stdout,
            stderr=done.stderr,
            exit_code=done.exit_code,
            timed_out=done.timed_out,
        )

    def _command(self, log_path: Path, *args: str) -> list[str]:
        return [
            self.binary,
            f"--root={self.state_root}",
            f"--log={log_path}",
            "--log-format=json",
            *args,
        ]

    def _run(self, verb: str, *args: str) -> None:
        with self._log_file(verb) as log_path:
            done = self._reaper.run(
                self._command(log_path, verb, *args), timeout_s=COMMAND_TIMEOUT_S
            )
            if done.exit_code != 0 or done.timed_out:
                why = self._errors(log_path) or done.stderr.decode(errors="replace")
                if done.timed_out:
                    why = f"timed out after {COMMAND_TIMEOUT_S:.0f} s"
                raise AgentError(AgentStatus.FAILED, self._failure(verb, why))

    @contextlib.contextmanager
    def _log_file(self, verb: str) -> Iterator[Path]:
        path = self._scratch / f"{verb}-{uuid.uuid4().hex}.log.json"
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def _failure(self, verb: str, why: str) -> str:
        """runc's own messages already start with "runc <verb> failed:"."""
        why = why.strip()
        return why if why.startswith(self.name) else f"{self.name} {verb} failed: {why}"

    @staticmethod
    def _errors(log_path: Path) -> str:
        try:
            return runtime_errors(log_path.read_text(errors="replace"))
        except OSError:
            return ""


def probe_crun(binary: str, workdir: Path, reaper: Reaper) -> str | None:
    """Create (and delete) a container from an empty bundle: crun sets up cgroups and
    namespaces, then fails only for the missing executable. Any other failure says why crun
    cannot work here."""
    bundle = workdir / "crun-probe"
    (bundle / "rootfs").mkdir(parents=True, exist_ok=True)
    config = {
        "ociVersion": "1.0.2",
        "process": {"args": [PROBE_EXECUTABLE], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"namespaces": [{"type": "mount"}, {"type": "pid"}]},
    }
    (bundle / "config.json").write_text(json.dumps(config))
    root, name = workdir / "crun-probe-state", f"probe-{os.getpid()}"
    log_path = workdir / "crun-probe.log.json"
    try:
        base = [binary, f"--root={root}", f"--log={log_path}", "--log-format=json"]
        done = reaper.run([*base, "create", f"--bundle={bundle}", name], timeout_s=30)
        reaper.run([*base, "delete", "--force", name], timeout_s=30)
        text = done.stderr.decode(errors="replace")
        with contextlib.suppress(OSError):
            text += "\n" + runtime_errors(log_path.read_text(errors="replace"))
        if done.exit_code == 0 or (PROBE_EXECUTABLE in text and "not found" in text):
            return None
        return text.strip().splitlines()[-1] if text.strip() else f"exit {done.exit_code}"
    finally:
        shutil.rmtree(bundle, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        log_path.unlink(missing_ok=True)
