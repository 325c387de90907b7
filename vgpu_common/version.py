"""The project's version, for Version RPCs and logs: from the installed package's metadata, or
from pyproject.toml when the code runs from a checkout on PYTHONPATH (the nested Xen testbed's
Dom0 runs it that way), never an exception in a request handler."""

import functools
import tomllib
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "vgpu-isolated"
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@functools.cache
def project_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    try:
        version: str = tomllib.loads(PYPROJECT.read_text())["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "0+unknown"
    return f"{version}+checkout"
