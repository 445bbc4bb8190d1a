"""Checkpoints {"model": state_dict, "meta": {...}}: atomic saving, checked loading into a model (of weights from
anywhere, see weights.py) and default file names."""
import functools
import hashlib
import importlib.metadata
import re
from pathlib import Path

import torch
import torchvision

from .datasets import DATASETS, DEFAULT_DATASET
from .errors import UserError
from .files import write_bytes
from .forget import ForgetSpec
from .models import build_model, to_device
from .pruning import resize_to_state
from .settings import WEIGHTS_DIR
from .tracking import TRACKING_FLAGS
from .weights import DESCRIBED_FIELDS, read_weights, resolve_meta, weights_bytes


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
    """Write {"model": state_dict, "meta": meta} atomically (files.atomic_write); a path ending in .safetensors gets
    a safetensors file with meta in its metadata (weights.weights_bytes).

    The file is made in memory first: a write error torch.save met itself would surface as an unexplained
    RuntimeError, one of atomic_write's own is a one-line error naming the path and the cause (no space, read-only)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_bytes(path, weights_bytes(path, state, meta))


def load_checkpoint(path, device="cpu", **described):
    """(model, meta) from weights of any kind weights.read_weights reads: this project's checkpoints, plain or
    wrapped state dicts, .safetensors files. The model is on device in the layout training gives it (to_device:
    channels-last on the GPU's path), so evaluation runs it as the training scripts do.

    described ({field: value or None}, fields of weights.DESCRIBED_FIELDS such as arch="vit") says what a file
    without our meta does not; where the file's meta says it, a described value must agree. Every way the file can
    be wrong (unreadable, a pickled object, a malformed meta, weights that do not fit the arch) is a one-line
    UserError naming the file."""
    state, meta = read_weights(path)
    return model_from_weights(path, state, meta, device, **described)


def model_from_weights(path, state, meta, device="cpu", **described):
    """(model, meta) of a state dict and meta read from path (see load_checkpoint); meta comes back with every
    described field filled (weights.resolve_meta)."""
    unknown = set(described) - set(DESCRIBED_FIELDS)
    if unknown:
        raise TypeError(f"not a described field: {', '.join(sorted(unknown))}")
    try:
        if meta is not None and meta.get("forget"):
            ForgetSpec.from_dict(meta["forget"])
    except Exception as error:
        raise UserError(f"{path} has a malformed meta of this project ({type(error).__name__})") from None
    own_meta = meta is not None
    if own_meta and "dataset" not in meta:
        meta = {**meta, "dataset": DEFAULT_DATASET}  # our meta written before datasets were named: CIFAR-10's
    meta = resolve_meta(path, meta, described)
    physical = meta.get("prune_mode") == "physical"
    model = model_for(meta)
    try:
        if physical:
            resize_to_state(model, state)
        model.load_state_dict(state)
    except Exception:
        fields = ", ".join(f"{field} {meta[field]}" for field in DESCRIBED_FIELDS)
        flags = "/".join(spec.flag for spec in DESCRIBED_FIELDS.values())
        hint = "" if own_meta else f" (describe the file with {flags})"
        raise UserError(f"{path} does not fit {fields}{' (physically pruned)' if physical else ''}: "
                        f"{state_mismatch(model_for(meta), state)}{hint}") from None
    return to_device(model, device), meta


def checkpoint_dataset(meta):
    """The dataset a checkpoint's meta names (CIFAR-10 for meta written before datasets were named)."""
    return meta.get("dataset", DEFAULT_DATASET)


def model_for(meta):
    """A fresh model of the arch, preset and dataset (class count, image size) a checkpoint's meta names."""
    dataset = DATASETS[checkpoint_dataset(meta)]
    return build_model(meta["arch"], meta.get("preset", "full"), dataset.num_classes, dataset.image_size)


def state_mismatch(model, state):
    """How state differs from model's state dict: the count of missing, unexpected and mis-shaped tensors, with
    one example of each."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in ((missing, "missing"),
                                                                       (unexpected, "unexpected"))
             if keys]
    if shapes:
        shape = shapes[0]
        parts.append(f"{len(shapes)} of another shape (e.g. {shape}: {shape_text(state[shape])} in the file, "
                     f"{shape_text(expected[shape])} in the model)")
    return f"tensors {', '.join(parts)}" if parts else "tensors that do not load"


def shape_text(tensor):
    return "x".join(map(str, tensor.shape)) or "scalar"


def weights_path(arch, method, preset="full", spec=None, seed=None, settings=None, dataset=DEFAULT_DATASET):
    """model_weights/{arch}_{method}.pth, with the preset, a dataset other than CIFAR-10, a non-default forget
    setting, the non-default model-changing settings ({flag: text}, see name_settings) and a seed marked, e.g.
    model_weights/resnet50-smoke_cifar100_class3-5_loraprune_lora-rank=4_prune-mode=physical_s1.pth."""
    name = arch + ("-smoke" if preset == "smoke" else "") + ("" if dataset == DEFAULT_DATASET else f"_{dataset}")
    if spec is not None and spec != ForgetSpec():
        name += f"_{spec.tag}"
    name += f"_{method}"
    for flag, text in (settings or {}).items():
        name += f"_{flag}" if text is None else f"_{flag}={text}"
    if seed is not None:
        name += f"_s{seed}"
    return WEIGHTS_DIR / f"{name}.pth"


# Flags that are part of the name already (arch, preset, dataset, forget setting, seed) or do not change what is
# learnt.
NAMED_OR_NEUTRAL_FLAGS = {"help", "arch", "preset", "dataset", "seed", "forget_class", "forget_random", "forget_seed",
                          "data", "device", "deterministic", "out", "weights", "eval_every", "compile",
                          *TRACKING_FLAGS}


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
    original = weights_path(args.arch, "original", args.preset, dataset=getattr(args, "dataset", DEFAULT_DATASET))
    if weights and Path(weights).stem != original.stem:
        settings["from"] = setting_text(Path(weights).stem)
    return settings
