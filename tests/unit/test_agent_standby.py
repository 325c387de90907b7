"""Standby agents: their command line and the zone they are given."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydantic import ValidationError

from cri_runtime.agent.config import parse_args
from cri_runtime.agent.standby import Standby, parse_standby, read_zone_flags


def test_a_standby_is_told_by_its_first_argument() -> None:
    assert parse_standby(["--zone-id=z", "--control-socket=/s", "--zone-dir=/d"]) is None
    assert parse_standby([]) is None
    standby = parse_standby(["--standby=ab12", "--oci-runtime=runc", "--log-level=debug"])
    assert standby == Standby(token="ab12", oci_runtime="runc", log_level="debug")


def test_the_zone_arrives_as_one_json_line_and_end_of_file_releases() -> None:
    line = b'["--zone-id=z", "--zone-dir=/d", "--control-socket=/d/s", "--new-netns"]\n{"x"'
    flags = read_zone_flags(io.BytesIO(line))
    assert flags is not None
    config = parse_args(flags)  # a cold agent's command line
    assert (config.zone_id, config.zone_dir, config.new_netns) == ("z", Path("/d"), True)
    assert read_zone_flags(io.BytesIO(b"")) is None
    with pytest.raises(ValidationError):
        read_zone_flags(io.BytesIO(b'{"zone": 1}\n'))
