"""Per-unit lock files, so that two workers never run the same unit; stale locks are taken over."""
import json
import os
import socket
import sys
import time
from pathlib import Path

from .datasets import DEFAULT_DATASET
from .files import create_new, write_error
from .settings import RESULTS_DIR
from .units import results_stem

LOCKS_DIR = RESULTS_DIR / "locks"


class UnitLock:
    """A lock file holding pid, host and SLURM job id; `acquire()` returns None on success, else a description of
    the holder.

    The lock is created whole or not at all (files.create_new: written aside, then hard-linked into place), so a
    lock file is never empty or half-written, and a creation that fails (a full disk) leaves nothing. A lock that
    names a dead process on this host or an earlier attempt of this same SLURM job (requeued, perhaps on another
    node), or that is empty or unreadable (damaged: no process of this project leaves one so), is taken over, with
    a line saying so."""

    def __init__(self, path):
        self.path = Path(path)
        self.held = False

    def _read(self):
        """(the lock's bytes or None when unreadable, its holder or None when damaged); None when there is none."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            return None, None
        try:
            holder = json.loads(raw)
        except ValueError:
            return raw, None
        if isinstance(holder, dict) and isinstance(holder.get("pid"), int) and isinstance(holder.get("host"), str):
            return raw, holder
        return raw, None

    def _why_stale(self, raw, holder):
        """Why the lock may be taken over; None when its holder may be alive."""
        if holder is None:
            return "it is unreadable" if raw is None else "it is empty" if not raw.strip() else "it is damaged"
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job") == job:
            return f"it names an earlier attempt of this SLURM job ({job})"
        if holder["host"] != socket.gethostname():
            return None
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return f"it names pid {holder['pid']} on this host, which is no longer running"
        except (PermissionError, OverflowError):
            return None
        return None

    def acquire(self):
        content = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "slurm_job": os.environ.get("SLURM_JOB_ID"),
                              "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        for _ in range(3):
            if create_new(self.path, content):
                self.held = True
                return None
            found = self._read()
            if found is None:
                continue  # released in the meantime
            raw, holder = found
            why = self._why_stale(raw, holder)
            if why is None:
                return f"{self.path} by pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
            if self._take_over(raw):
                print(f"taking over the lock {self.path}: {why}", flush=True)
        return f"{self.path} (contended)"

    def _take_over(self, raw):
        """Remove the stale lock whose bytes were raw, unless another process replaced it in the meantime."""
        moved = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return False
        except OSError as error:
            raise write_error(self.path, error) from None
        try:
            if raw is not None and moved.read_bytes() != raw:
                os.replace(moved, self.path)  # a live lock: put it back
                return False
        except OSError:
            pass
        moved.unlink(missing_ok=True)
        return True

    def release(self):
        if self.held:
            try:
                self.path.unlink(missing_ok=True)
            except OSError as error:  # e.g. the folder became read-only: the lock is taken over once we are gone
                print(f"warning: cannot remove the lock {self.path}: {error.strerror}", file=sys.stderr)
            self.held = False


def unit_lock(unit, preset, spec, dataset=DEFAULT_DATASET):
    stem = results_stem(unit.arch, preset, spec, dataset, unit.benchmark)
    return UnitLock(LOCKS_DIR / f"{stem}_s{unit.seed}-{unit.kind}.lock")


