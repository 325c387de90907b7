"""The CRI log format: timestamps, full/partial lines, rotation."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from cri_runtime.agent.crilog import MAX_LINE, CriLog, format_entry, pump, rfc3339nano, split_lines


def test_timestamps_are_rfc3339nano_utc() -> None:
    assert rfc3339nano(1_475_713_029_669_794_202) == "2016-10-06T00:17:09.669794202Z"
    assert rfc3339nano(1_000_000_000) == "1970-01-01T00:00:01.000000000Z"


def test_entry_format() -> None:
    ns = 1_475_713_029_669_794_202
    assert format_entry(ns, "stdout", False, b"hello") == (
        b"2016-10-06T00:17:09.669794202Z stdout F hello\n"
    )
    assert format_entry(ns, "stderr", True, b"") == b"2016-10-06T00:17:09.669794202Z stderr P \n"


def test_split_lines() -> None:
    assert split_lines(b"a\nb\nrest", eof=False) == ([(False, b"a"), (False, b"b")], b"rest")
    assert split_lines(b"rest", eof=True) == ([(False, b"rest")], b"")
    assert split_lines(b"\n\n", eof=False) == ([(False, b""), (False, b"")], b"")
    assert split_lines(b"", eof=True) == ([], b"")


def test_long_lines_become_partial_chunks() -> None:
    exact = b"x" * MAX_LINE
    assert split_lines(exact + b"\n", eof=False) == ([(False, exact)], b"")
    entries, rest = split_lines(b"y" * (2 * MAX_LINE + 5) + b"\nz", eof=False)
    assert [(partial, len(c)) for partial, c in entries] == [
        (True, MAX_LINE),
        (True, MAX_LINE),
        (False, 5),
    ]
    assert rest == b"z"


def test_pump_writes_both_streams_and_survives_rotation(tmp_path: Path) -> None:
    log_path = tmp_path / "c.log"
    sink = CriLog(log_path)
    read_fd, write_fd = os.pipe()
    thread = threading.Thread(target=pump, args=(read_fd, "stdout", sink))
    thread.start()
    os.write(write_fd, b"one\ntw")
    os.write(write_fd, b"o\n")
    deadline = 0
    while log_path.read_bytes().count(b"\n") < 2 and deadline < 500:
        threading.Event().wait(0.01)
        deadline += 1
    log_path.rename(tmp_path / "c.log.1")
    sink.reopen()
    os.write(write_fd, b"three")  # no newline: written when the pipe closes
    os.close(write_fd)
    thread.join(5)
    sink.close()
    line = re.compile(rb"^\S+Z stdout F (.*)$", re.M)
    assert line.findall((tmp_path / "c.log.1").read_bytes()) == [b"one", b"two"]
    assert line.findall(log_path.read_bytes()) == [b"three"]


def test_no_log_path_discards_output() -> None:
    sink = CriLog(None)
    sink.write("stdout", [(False, b"gone")], 0)
    sink.reopen()
    sink.close()
