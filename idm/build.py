"""Compile the project's C extensions in place: ``python -m idm.build``.

Run by scripts/setup.sh after ``pip install -e .``; also importable by tests that need a fresh
build. Each builder is a cffi ``FFI`` whose module name says where its ``.so`` belongs.
"""

import importlib
import sys
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
BUILDERS = ["idm._build", "idm.xen._build"]


def build_all(tmpdir: Path = ROOT / "build" / "cffi") -> list[Path]:
    """Build every extension; returns the paths of the shared objects written."""
    built = []
    for name in BUILDERS:
        ffibuilder: FFI = importlib.import_module(name).ffibuilder
        so = Path(ffibuilder.compile(tmpdir=str(tmpdir), verbose=False))
        # cffi writes <tmpdir>/<package path>/<module>.so; the package path is the target.
        target = ROOT / so.relative_to(tmpdir.resolve())
        so.replace(target)
        built.append(target)
    return built


def main() -> int:
    for path in build_all():
        print(f"built {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
