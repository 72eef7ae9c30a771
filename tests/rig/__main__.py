"""``python -m tests.rig [--rebuild] [--prepare-only] -- CMD...``

Prepares the nested rig (cached under $PYVMM_RIG_CACHE or ~/.cache/pyvmm-rig)
and runs CMD inside it, in the current directory, with the host's
environment and Python. Exits with CMD's status, or 125 with a one-line
message naming the step when the rig itself failed.
"""

from __future__ import annotations

import argparse
import sys

from . import RIG_FAILED, RigError
from .boot import run_in_rig
from .build import prepare


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    ap = argparse.ArgumentParser(
        prog="python -m tests.rig",
        description="Run a command inside pyvmm's nested KVM+VFIO test rig.",
        epilog="example: python -m tests.rig -- python -m pytest -m rig tests",
    )
    ap.add_argument(
        "--rebuild",
        action="store_true",
        help="rebuild the cached kernel modules and initramfs first",
    )
    ap.add_argument(
        "--prepare-only", action="store_true", help="only prepare (download, build, cache) the rig"
    )
    ap.add_argument(
        "--timeout", type=float, default=None, help="kill the rig after this many seconds"
    )
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd and not args.prepare_only:
        ap.error("no command given (usage: python -m tests.rig -- CMD...)")
    try:
        rig = prepare(rebuild=args.rebuild)
        if args.prepare_only:
            return 0
        return run_in_rig(rig, cmd, timeout=args.timeout)
    except RigError as e:
        print(e, file=sys.stderr)
        return RIG_FAILED
    except KeyboardInterrupt:
        print("rig: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
