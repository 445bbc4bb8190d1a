"""Output files: atomic writes, the list of files this command has written, and checks made before any work.

Every file the project writes goes through atomic_write: the content goes to a temporary file of a name unique to
its writer in the target's folder, then one rename puts it in place. Concurrent writers of the same file each
rename a whole file of their own (the last one wins), a reader sees the old file or a new one, never a part, and a
write that fails (a full disk, a read-only folder, an interruption) leaves the old file and no temporary one."""
import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path

from .errors import UserError
from .processes import check_parent_alive

written = []  # files this command has written so far, for the message after an interruption
UMASK = os.umask(0o022)
os.umask(UMASK)  # read once: mkstemp makes its files private, a written file gets the usual permissions

# What to do about a write that failed for want of space or permission; the same command resumes afterwards.
WRITE_ERROR_HINTS = {
    errno.ENOSPC: "free space and rerun the same command",
    errno.EDQUOT: "free space within your quota and rerun the same command",
    errno.EROFS: "write to a writable location, or remount it writable, and rerun the same command",
    errno.EACCES: "make it writable and rerun the same command",
    errno.EPERM: "make it writable and rerun the same command",
}


def write_error(path, error):
    """A one-line UserError for an OSError met writing path: the path, the system's words for the cause, a hint."""
    cause = error.strerror or str(error)
    hint = WRITE_ERROR_HINTS.get(error.errno, "fix the cause and rerun the same command")
    return UserError(f"cannot write {path}: {cause} ({hint})")


@contextlib.contextmanager
def written_aside(path, mode, put_in_place):
    """Open a new temporary file beside path (mode "w" or "wb"); once the block is done, put_in_place(temporary,
    path) makes it path. An OSError (no space, read-only, no permission) becomes a one-line UserError naming path,
    except FileExistsError; on any failure the temporary file is removed and path is left as it was."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())  # the data is on disk before the name points at it
        check_parent_alive()
        put_in_place(tmp, path)
    except FileExistsError:
        raise
    except OSError as error:
        raise write_error(path, error) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


@contextlib.contextmanager
def atomic_write(path, mode="w"):
    """Open a temporary file for writing (mode "w" or "wb") that replaces path in one rename once the block is
    done (written_aside). A step started by a sweep or launcher writes nothing once that parent is gone
    (processes.check_parent_alive)."""
    with written_aside(path, mode, os.replace) as file:
        yield file
    written.append(Path(path))


def create_new(path, data):
    """Create path holding data, whole or not at all (a hard link from a temporary file: atomic, and never over an
    existing file); False when path exists already."""
    try:
        with written_aside(path, "wb", os.link) as file:
            file.write(data)
    except FileExistsError:
        return False
    return True


def write_bytes(path, data):
    with atomic_write(path, "wb") as file:
        file.write(data)


def write_text(path, text):
    with atomic_write(path) as file:
        file.write(text)


def write_json(path, obj):
    """Write obj as indented JSON, atomically (atomic_write)."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_figure(path, figure, **options):
    """figure.savefig to path, atomically (atomic_write); the format follows path's suffix."""
    with atomic_write(path, "wb") as file:
        figure.savefig(file, format=Path(path).suffix.lstrip(".") or "png", **options)


def check_writable(path, flag="--out"):
    """Refuse, before any work is done, an output path that is a folder or lies where no file can be written."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file path")
    if path.exists() and not path.is_file():
        raise UserError(f"{flag} {path} exists and is not a regular file")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot write {flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"cannot write {flag} {path}: {parent if not path.exists() else path} is not writable")
    return path
