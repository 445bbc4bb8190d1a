"""Output files: atomic writes, the list of files this command has written, and checks made before any work."""
import json
import os
from pathlib import Path

from .errors import UserError

written = []  # files this command has written so far, for the message after an interruption


def write_json(path, obj):
    """Write JSON atomically: a temporary file, then a rename (an interruption leaves the old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
        written.append(path)
    finally:
        tmp.unlink(missing_ok=True)


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
