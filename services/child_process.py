"""What every process `baton serve` starts shares: it dies with its parent."""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child before exec (Popen's preexec_fn): SIGTERM it (a graceful drain) when the
    process that started it dies, even by SIGKILL, so no worker or Redis outlives its supervisor
    (Linux's PR_SET_PDEATHSIG; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
