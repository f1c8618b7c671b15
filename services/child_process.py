"""What every process `baton serve` starts shares: it dies with its parent.

Linux's PR_SET_PDEATHSIG sends a process a signal when the one that started it dies, even by
SIGKILL, and it survives exec. It is set by a tiny Python launcher that then execs the real
command, rather than by Popen's preexec_fn: code run between fork and exec in a process with
threads (a test runner, a gateway) can deadlock or crash in the child.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"  # 1: PR_SET_PDEATHSIG
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(0)\n"  # the parent died before the signal was armed
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def dying_with_parent(cmd: Sequence[str]) -> list[str]:
    """cmd, started so that it gets SIGTERM (a graceful drain) when this process dies."""
    return [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *cmd]
