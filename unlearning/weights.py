"""Weights from anywhere: a state dict and, where the file has one, this project's meta, read from our checkpoints,
plain state dicts, the usual wrappers ({"state_dict": ...}, {"model": ...}, {"net": ...}), DataParallel/DDP and
torch.compile prefixes, and .safetensors files; what a file without our meta does not say, flags say.

    python evaluate.py plain_state_dict.pth --arch resnet50
    python finetune.py --weights ddp_checkpoint.pth

Nothing in a file ever runs: .pth files load with torch.load(weights_only=True), a pickled object (a whole model)
is a one-line error saying how to re-save it. Writing: torch's format, or .safetensors with the meta as the file's
metadata (by the file's suffix).
"""
import io
import json
import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from .datasets import DATASETS, DEFAULT_DATASET
from .errors import UserError
from .models import ARCHS
from .settings import PRESETS

SAFETENSORS_SUFFIX = ".safetensors"
META_KEY = "meta"  # this project's meta as JSON under this key of a .safetensors file's metadata
# Keys other code puts a state dict under, tried in this order (timm, Lightning, many repos; PyTorch's tutorial).
WRAPPER_KEYS = ("state_dict", "model", "net", "model_state_dict")
# Prefixes a wrapper adds to every key: DataParallel and DDP (module.), torch.compile (_orig_mod.).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class DescribedField:
    """A meta field that a file without this project's meta leaves unsaid, and the flag that says it."""
    flag: str
    choices: tuple
    default: str | None  # None: the flag must be given for such a file
    help: str


# The meta fields that say which model a file holds. A file's own meta wins; a flag that contradicts it is an
# error; for a file without it (a plain state dict) the flag, else the default, describes it. A new field is one
# more row here: evaluate.py and export.py get its flag from this table.
DESCRIBED_FIELDS = {
    "arch": DescribedField("--arch", ARCHS, None, "the model of weights without this project's meta"),
    "preset": DescribedField("--preset", PRESETS, "full",
                             "the size of weights without this project's meta: full, or the smoke preset's"),
    "dataset": DescribedField("--dataset", tuple(DATASETS), DEFAULT_DATASET,
                              "the dataset weights without this project's meta were trained on (their class count "
                              "and image size)"),
}


def described_by(args):
    """{field: value} of the DESCRIBED_FIELDS flags args holds a value for (scripts: all; evaluate.py: those given)."""
    return {field: getattr(args, field) for field in DESCRIBED_FIELDS if getattr(args, field, None) is not None}


def resolve_meta(path, meta, described):
    """meta (None for a file without ours) with every DESCRIBED_FIELDS field filled: the file's value, else the
    flag's (described), else the field's default. A flag that contradicts the file, a field nothing says and a
    value outside the field's choices are one-line UserErrors."""
    resolved = dict(meta or {})
    for field, spec in DESCRIBED_FIELDS.items():
        given, own = described.get(field), resolved.get(field)
        if own is not None and given is not None and own != given:
            raise UserError(f"{path}: its meta says {field} {own}, not {given} as {spec.flag} says; pass "
                            f"{spec.flag} {own}, or other weights")
        value = next((v for v in (own, given, spec.default) if v is not None), None)
        if value is None:
            raise UserError(f"{path} does not say its {field} (it has no meta of this project): pass {spec.flag} "
                            f"{{{','.join(spec.choices)}}}")
        if value not in spec.choices:
            raise UserError(f"{path} names an unknown {field} {value!r}; choose from {', '.join(spec.choices)}")
        resolved[field] = value
    return resolved


# ------------------------------------------------------------------------------------------------ reading

def read_weights(path):
    """(state dict, meta or None) from a .pth or .safetensors file: meta is this project's, None where the file
    has none. Wrappers and prefixes are taken off. Every way the file can be unreadable is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    with open(path, "rb") as file:
        head = file.read(9)
    # A .safetensors file opens with its header's length (8 bytes) and the header, a JSON object.
    if path.suffix == SAFETENSORS_SUFFIX or head[8:9] == b"{":
        state, meta = read_safetensors(path)
    else:
        state, meta = unwrap(path, load_pickled(path))
    return strip_prefixes(state), meta


def load_pickled(path):
    """torch.load(path, weights_only=True): a pickled object is refused with how to re-save it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        objects = unsafe_globals(path)
        if objects:
            raise UserError(f"{path} holds pickled Python objects ({objects[0]}{', ...' if len(objects) > 1 else ''})"
                            f", not only weights, and loading them would run code from the file; where it was made, "
                            f"re-save the weights: torch.save(model.state_dict(), PATH)") from None
        raise UserError(f"{path} is not a checkpoint torch can read ({type(error).__name__}): is it truncated, or "
                        f"not a .pth or .safetensors file?") from None


def unsafe_globals(path):
    """The classes and functions a torch.save file would need to run, read without running them ([] if none), in
    the order the pickle names them: a whole model's own class comes first."""
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        with zipfile.ZipFile(path) as archive:
            pickled = archive.read(next(name for name in archive.namelist() if name.endswith("/data.pkl")))
        named = [arg.replace(" ", ".") for opcode, arg, _ in pickletools.genops(pickled) if opcode.name == "GLOBAL"]
    except Exception:
        return []
    return [*dict.fromkeys(name for name in named if name in unsafe), *sorted(unsafe - set(named))]


def is_state_dict(value):
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def is_our_checkpoint(value):
    return (isinstance(value, dict) and isinstance(value.get("meta"), dict) and "arch" in value["meta"]
            and "model" in value)


def unwrap(path, loaded):
    """(state dict, meta or None) of what torch.load gave: our checkpoint, a plain state dict or a wrapper."""
    if is_our_checkpoint(loaded):
        if not is_state_dict(loaded["model"]):
            raise UserError(f"{path} is a checkpoint of this project without weights under 'model'")
        return loaded["model"], loaded["meta"]
    while not is_state_dict(loaded):
        inner = next((loaded[key] for key in WRAPPER_KEYS if isinstance(loaded, dict) and key in loaded), None)
        if inner is None:
            what = (f"a dict with keys {', '.join(map(repr, list(loaded)[:4]))}{', ...' if len(loaded) > 4 else ''}"
                    if isinstance(loaded, dict) else f"a {type(loaded).__name__}")
            raise UserError(f"{path} holds {what}, not a state dict: expected tensors by name, or a state dict under "
                            f"{', '.join(map(repr, WRAPPER_KEYS))}")
        loaded = inner
    return loaded, None


def strip_prefixes(state):
    """state with a prefix that every key shares (WRAPPER_PREFIXES, in any order and number) taken off."""
    while True:
        prefix = next((p for p in WRAPPER_PREFIXES if all(key.startswith(p) for key in state)), None)
        if prefix is None:
            return state
        state = {key[len(prefix):]: value for key, value in state.items()}


def read_safetensors(path):
    """(state dict, meta or None) of a .safetensors file; our meta is the JSON under META_KEY of its metadata."""
    try:
        with safetensors.safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            state = {key: file.get_tensor(key) for key in file.keys()}
        meta = json.loads(metadata[META_KEY]) if META_KEY in metadata else None
    except Exception as error:
        raise UserError(f"{path} is not a safetensors file that can be read ({type(error).__name__}): is it "
                        f"truncated?") from None
    if not state:
        raise UserError(f"{path} holds no tensors")
    return state, meta


# ------------------------------------------------------------------------------------------------ writing

def weights_bytes(path, state, meta):
    """The bytes of a file at path holding state and meta: .safetensors (meta as JSON in the file's metadata,
    tensors unshared, as safetensors requires) by the suffix, else torch's {"model": state, "meta": meta}."""
    if Path(path).suffix == SAFETENSORS_SUFFIX:
        tensors = {key: value.detach().cpu().contiguous().clone() for key, value in state.items()}
        return safetensors.torch.save(tensors, metadata={"format": "pt", META_KEY: json.dumps(meta)})
    buffer = io.BytesIO()
    torch.save({"model": state, "meta": meta}, buffer)
    return buffer.getbuffer()
