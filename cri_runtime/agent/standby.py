"""Standby agents: the zone agent started before its zone exists, so that booting a zone never
waits for an interpreter to start and import the agent (0.4 s, most of a process-backend boot).

The process backend starts ``python -m cri_runtime.agent --standby=<token> --oci-runtime=…
--log-level=…`` in a zone's namespaces (all but the network: a pod zone's agent
unshares its own when it gets the zone) and in a working directory of its own. The standby does
what no zone decides (imports, the reaper, the OCI runtime choice), then reads its zone from
stdin: one line, the JSON list of the flags a cold agent would get on its command line. End of
file instead means the runtime let it go (it closed the backend, or died): the standby exits.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from pydantic import TypeAdapter

STANDBY_FLAG = "--standby"
_FLAGS = TypeAdapter(list[str])


@dataclass(frozen=True, slots=True)
class Standby:
    token: str
    oci_runtime: str
    log_level: str


def parse_standby(argv: Sequence[str]) -> Standby | None:
    """A standby's settings when ``argv`` starts with ``--standby=<token>``, else None."""
    if not argv or not argv[0].startswith(f"{STANDBY_FLAG}="):
        return None
    parser = argparse.ArgumentParser(
        prog=f"python -m cri_runtime.agent {STANDBY_FLAG}=TOKEN",
        description="A warm zone agent: prepares, then reads its zone's flags from stdin.",
    )
    parser.add_argument(STANDBY_FLAG, required=True, metavar="TOKEN")
    parser.add_argument("--oci-runtime", choices=("auto", "crun", "runc"), default="auto")
    parser.add_argument("--log-level", default="info")
    ns = parser.parse_args(argv)
    return Standby(token=ns.standby, oci_runtime=ns.oci_runtime, log_level=ns.log_level)


def read_zone_flags(stream: BinaryIO) -> list[str] | None:
    """The zone's flags, or None at end of file (the runtime let the standby go)."""
    line = stream.readline()
    return _FLAGS.validate_json(line) if line else None
