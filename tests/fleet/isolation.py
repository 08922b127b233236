"""Run a process where some paths do not exist for it: a private mount namespace with an empty tmpfs over each.

DESIGN.md §8 "Isolation on one machine": ``unshare -m`` gives the process tree its own mount table, and
``mount -t tmpfs`` over a directory there hides its contents from that tree only. The deployment tests start each
SuperNode this way, with the server's run directory, the dataset directory and the other devices' state and data
directories hidden, so a device that reads anything but its own state and Flower messages fails.

Needs root (CI runs as root) and util-linux's ``unshare`` / ``nsenter``. ``available()`` says whether this machine
can do it; ``listing(pid, path)`` shows what a running process sees at ``path`` (the tests' proof).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path


def available() -> bool:
    """True when this process may create mount namespaces (root, with unshare and nsenter installed)."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"):
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


def hidden(command: Sequence[str], hide: Sequence[Path]) -> list[str]:
    """``command`` run in a new mount namespace where every directory in ``hide`` is an empty, read-only tmpfs
    and every file in it reads as empty (``/dev/null`` bound over it).

    Paths that do not exist are skipped (nothing to hide). Mount propagation is private, so nothing leaks back
    to the host's mount table; the mounts vanish with the last process of the namespace.
    """
    mounts = []
    for p in dict.fromkeys(Path(p).resolve() for p in hide):
        if p.is_dir():
            mounts.append(f"mount -t tmpfs -o size=16k,mode=0555,ro none {shlex.quote(str(p))}")
        elif p.is_file():
            mounts.append(f"mount --bind /dev/null {shlex.quote(str(p))}")
    script = " && ".join([*mounts, "exec " + shlex.join(command)])
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script]


def listing(pid: int, path: Path) -> list[str] | None:
    """The names process ``pid`` sees in directory ``path`` (None: it cannot list it there)."""
    out = subprocess.run(["nsenter", "-t", str(pid), "-m", "--", "ls", "-A", str(path)], capture_output=True,
                         text=True)
    return out.stdout.split() if out.returncode == 0 else None


def readable_bytes(pid: int, path: Path) -> int | None:
    """How many bytes process ``pid`` can read from file ``path`` (None: it cannot open it)."""
    out = subprocess.run(["nsenter", "-t", str(pid), "-m", "--", "sh", "-c", f"cat {shlex.quote(str(path))} | wc -c"],
                         capture_output=True, text=True)
    return int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None


def wait_exec(pid: int, program: str, timeout: float = 30.0) -> None:
    """Wait until process ``pid`` (started with ``hidden``) runs ``program``: its mounts are all in place then
    (the shell execs the command only after the last mount)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError as err:
            raise RuntimeError(f"process {pid} exited before running {program}") from err
        if any(Path(a.decode(errors="replace")).name == program for a in argv[:2]):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {pid} did not start {program} within {timeout} s: {argv!r}")
        time.sleep(0.05)
