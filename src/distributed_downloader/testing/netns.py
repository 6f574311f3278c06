"""Benchmarks' guard for the network rule: run the script where only loopback exists."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys


def in_loopback_namespace() -> None:
    """Re-run this script in a network namespace with only `lo` (root only), so that nothing it
    starts (img2dataset included) can reach beyond this machine."""
    if os.environ.get("BENCH_NETNS") or os.geteuid() != 0 or not shutil.which("unshare"):
        return
    command = shlex.join([sys.executable, *sys.argv])
    env = {**os.environ, "BENCH_NETNS": "1"}
    sys.exit(subprocess.call(["unshare", "-n", "sh", "-c", f"ip link set lo up && {command}"],
                             env=env))
