"""Tie a child process's life to its parent's (Linux), so a killed launcher leaves nothing."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies, even by SIGKILL.

    Call it in the child (a Popen preexec_fn, or first thing in a worker). If the parent died
    before this call (`parent_pid` given and no longer our parent), exit at once. Elsewhere
    than Linux it does nothing; the parent's own cleanup still stops its children.
    """
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    if parent_pid is not None and os.getppid() != parent_pid:
        raise SystemExit(1)
