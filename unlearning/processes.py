"""Child processes that die with their parent: the sweep's steps and the local launcher's units.

start_child takes subprocess.Popen's arguments. On Linux the child asks the kernel, before it runs its command,
for SIGTERM as soon as the thread that started it dies (prctl PR_SET_PDEATHSIG), however the parent dies,
SIGKILL and the OOM killer included; a step takes SIGTERM as an interruption and leaves no file half-written.
The child also learns its parent's pid (PARENT_PID_ENV), and atomic_write calls check_parent_alive right before
it renames a finished file into place: a child that outlives its parent anyway (SIGTERM ignored, a platform
without PR_SET_PDEATHSIG) writes nothing once the parent, and with it the lock that parent held, is gone.
"""
import os
import subprocess
import sys

from .errors import ParentGone

PARENT_PID_ENV = "PRUNELORA_PARENT_PID"
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


# What the child runs first, in a bare Python: ask for SIGTERM when the parent dies (or exit at once if it died
# already), then become the command (exec keeps the pid, and the request survives it). A first program rather than
# subprocess's preexec_fn keeps the fast spawn (preexec_fn forces a full fork of a parent that holds torch) and is
# safe in a parent with threads (the launcher's workers).
DIE_WITH_PARENT = f"""import ctypes, os, signal, sys
parent, argv = int(sys.argv[1]), sys.argv[2:]
ctypes.CDLL(None, use_errno=True).prctl({PR_SET_PDEATHSIG}, int(signal.SIGTERM), 0, 0, 0)
if os.getppid() != parent:
    sys.exit(128 + signal.SIGTERM)
os.execvp(argv[0], argv)
"""


def start_child(argv, env=None, **popen_options):
    """subprocess.Popen(argv, ...) of a child that stops when this process dies (see the module's docstring).

    env: the child's whole environment (default: this process's)."""
    parent = os.getpid()
    env = {**(os.environ if env is None else env), PARENT_PID_ENV: str(parent)}
    if sys.platform.startswith("linux"):
        argv = [sys.executable, "-I", "-S", "-c", DIE_WITH_PARENT, str(parent), *map(str, argv)]
    return subprocess.Popen(argv, env=env, **popen_options)


def check_parent_alive():
    """Raise ParentGone in a child of start_child whose parent has died (its parent is then another process)."""
    expected = os.environ.get(PARENT_PID_ENV)
    if expected and str(os.getppid()) != expected:
        raise ParentGone
