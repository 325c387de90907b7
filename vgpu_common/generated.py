"""Checked-in generated code: the `--check` that CI runs and the regeneration command, shared by
the generators that produce gRPC stubs (gpu_proxy.proto.protogen, cri_runtime.cri.protogen)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

# generate(root, out): write the outputs, as generated from the sources under root, into out/gen
Generate = Callable[[Path, Path], None]


def stale_outputs(root: Path, gen: Path, outputs: Sequence[str], generate: Generate) -> list[str]:
    """The outputs under root/gen whose checked-in bytes differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(root, Path(tmp))
        stale = []
        for name in outputs:
            current, fresh = root / gen / name, Path(tmp) / gen / name
            if not current.exists() or current.read_bytes() != fresh.read_bytes():
                stale.append(str(gen / name))
        return stale


def generator_main(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    root: Path,
    gen: Path,
    outputs: Sequence[str],
    generate: Generate,
) -> int:
    """`prog [--check] [--root DIR]`: regenerate in place, or exit 1 listing stale outputs."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--check", action="store_true", help="only report stale outputs (exit 1)")
    ap.add_argument("--root", type=Path, default=root, help="repository root to work under")
    args = ap.parse_args(argv)
    if args.check:
        stale = stale_outputs(args.root, gen, outputs, generate)
        for rel in stale:
            print(f"stale: {rel}", file=sys.stderr)
        if stale:
            print(f"{prog}: generated files are out of date: run `{prog}`", file=sys.stderr)
            return 1
        return 0
    generate(args.root, args.root)
    for name in outputs:
        print(f"wrote {gen / name}")
    return 0
