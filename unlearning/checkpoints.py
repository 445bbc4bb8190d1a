"""Checkpoints {"model": state_dict, "meta": {...}}: atomic saving, checked loading and default file names."""
import functools
import hashlib
import importlib.metadata
import io
import re
from pathlib import Path

import torch
import torchvision

from .errors import UserError
from .files import write_bytes
from .forget import ForgetSpec
from .models import build_model, to_device
from .pruning import resize_to_state
from .settings import ARCHS, PRESETS, WEIGHTS_DIR


def library_versions():
    """torch, torchvision, timm and peft versions; timm's and peft's read from their installed metadata, so that
    recording them imports neither (torch's and torchvision's own strings carry their build, e.g. +cu130)."""
    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            **{name: installed_version(name) for name in ("timm", "peft")}}


@functools.cache
def installed_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device):
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def save_checkpoint(path, model, meta):
    """Write {"model": state_dict, "meta": meta} atomically (files.atomic_write).

    torch.save writes to memory first: a write error it met itself would surface as an unexplained RuntimeError,
    one of atomic_write's own is a one-line error naming the path and the cause (no space, read-only)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"model": state, "meta": meta}, buffer)
    write_bytes(path, buffer.getbuffer())


def load_checkpoint(path, device="cpu", arch=None):
    """(model, meta) from a checkpoint written by save_checkpoint; arch, if given, must match. The model is on
    device in the layout training gives it (to_device: channels-last on the GPU's path), so evaluation runs it as
    the training scripts do.

    Every way the file can be wrong (unreadable, not a checkpoint, malformed meta, weights that do not fit the
    arch its meta names) is a one-line UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state, meta = checkpoint["model"], checkpoint["meta"]
        meta_arch, preset = meta["arch"], meta.get("preset", "full")
        if meta.get("forget"):
            ForgetSpec.from_dict(meta["forget"])
    except Exception as error:
        raise UserError(f"{path} is not a checkpoint of this project ({type(error).__name__})") from None
    if meta_arch not in ARCHS or preset not in PRESETS:
        raise UserError(f"{path} names an unknown arch or preset ({meta_arch!r}, {preset!r})")
    if arch is not None and meta_arch != arch:
        raise UserError(f"{path} holds a {meta_arch} model, not {arch}: pass --arch {meta_arch} or other weights")
    model = build_model(meta_arch, preset)
    try:
        if meta.get("prune_mode") == "physical":
            resize_to_state(model, state)
        model.load_state_dict(state)
    except Exception:
        raise UserError(f"{path} is not a checkpoint of arch {meta_arch} ({preset} preset"
                        f"{', physically pruned' if meta.get('prune_mode') == 'physical' else ''}): "
                        f"{state_mismatch(build_model(meta_arch, preset), state)}") from None
    return to_device(model, device), meta


def state_mismatch(model, state):
    """A short description of how state differs from model's state dict: counts and one example."""
    if not isinstance(state, dict):
        return f"its weights are a {type(state).__name__}, not a state dict"
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and getattr(state[k], "shape", None) != expected[k].shape]
    parts = [f"{len(keys)} {what}" for keys, what in ((missing, "missing"), (unexpected, "unexpected"),
                                                       (shapes, "mis-shaped")) if keys]
    example = (missing or unexpected or shapes or ["?"])[0]
    return f"{', '.join(parts) or 'incompatible'} tensors (e.g. {example})"


def weights_path(arch, method, preset="full", spec=None, seed=None, settings=None):
    """model_weights/{arch}_{method}.pth, with the preset, a non-default forget setting, the non-default
    model-changing settings ({flag: text}, see name_settings) and a seed marked, e.g.
    model_weights/resnet50-smoke_class3-5_loraprune_lora-rank=4_prune-mode=physical_s1.pth."""
    name = arch + ("-smoke" if preset == "smoke" else "")
    if spec is not None and spec != ForgetSpec():
        name += f"_{spec.tag}"
    name += f"_{method}"
    for flag, text in (settings or {}).items():
        name += f"_{flag}" if text is None else f"_{flag}={text}"
    if seed is not None:
        name += f"_s{seed}"
    return WEIGHTS_DIR / f"{name}.pth"


# Flags that are part of the name already (arch, preset, forget setting, seed) or do not change what is learnt.
NAMED_OR_NEUTRAL_FLAGS = {"help", "arch", "preset", "seed", "forget_class", "forget_random", "forget_seed", "data",
                          "device", "deterministic", "out", "weights", "eval_every", "compile"}


def setting_text(value):
    """An exact, file-name-safe text of a flag's value: repr of numbers, lists joined by '-', a hash otherwise."""
    if isinstance(value, (list, tuple)):
        return "-".join(setting_text(v) for v in value) if value else "none"
    text = repr(value) if isinstance(value, float) else str(value)
    if re.fullmatch(r"[\w.+-]+", text):
        return text
    return "h" + hashlib.sha256(text.encode()).hexdigest()[:10]


def name_settings(parser, args, recipe):
    """{flag: text} of every parsed flag that changes the model and differs from its default, in parser order.

    Generic, so that a flag a script adds (e.g. --prune-mode, --lora-rank, --l1-alpha) changes the default
    checkpoint name without being listed here. --epochs, --lr and --batch-size are compared with the recipe's
    values; --weights adds from={its file stem} unless that stem is the original model's, e.g. resnet50_original."""
    settings = {}
    for action in parser._actions:
        if action.dest in NAMED_OR_NEUTRAL_FLAGS or not action.option_strings:
            continue
        value = getattr(args, action.dest, None)
        default = recipe.get(action.dest, action.default)
        if value is None or value == default:
            continue
        flag = action.option_strings[-1].lstrip("-")
        settings[flag] = None if value is True else setting_text(value)
    weights = getattr(args, "weights", None)
    if weights and Path(weights).stem != weights_path(args.arch, "original", args.preset).stem:
        settings["from"] = setting_text(Path(weights).stem)
    return settings
