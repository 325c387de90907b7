"""Running the host tools the Xen zone backend drives (xl, mke2fs, losetup, modprobe): each
with a timeout, each failure a ZoneError carrying the tool's own words (its stderr), so a CRI
error tells the operator what the tool said."""

from __future__ import annotations

import subprocess

from cri_runtime.zones.base import ZoneError

STDERR_LIMIT = 2000  # characters of a tool's stderr kept in an error (its last ones)


def run_tool(command: list[str], timeout_s: float, *, what: str = "") -> str:
    """``command``'s stdout; ZoneError, prefixed with ``what`` (the step it served), with its
    stderr (or the timeout) otherwise."""
    prefix = f"{what}: " if what else ""
    try:
        proc = subprocess.run(
            command,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise ZoneError(
            f"{prefix}{' '.join(command)} did not finish within {timeout_s:.0f} s"
            f"{_stderr_tail(exc.stderr)}"
        ) from None
    except OSError as exc:
        raise ZoneError(f"{prefix}cannot run {command[0]}: {exc}") from None
    if proc.returncode != 0:
        why = proc.stderr.strip() or proc.stdout.strip() or "no message"
        raise ZoneError(
            f"{prefix}{' '.join(command)} failed (exit {proc.returncode}): {why[-STDERR_LIMIT:]}"
        )
    return proc.stdout


def _stderr_tail(stderr: str | bytes | None) -> str:
    if not stderr:
        return ""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    return f": {text.strip()[-STDERR_LIMIT:]}"
