"""Shared machinery for every script: data, forget splits, models, pruning, LoRA, training, metrics, checkpoints.

Method scripts import this module and hold only what their method does to the model; nothing imports a
method script. Run any script with --help, e.g.

    python finetune.py --help
"""
import argparse
import contextlib
import copy
import datetime
import hashlib
import json
import os
import pickle
import re
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np
import peft
import timm
import torch
import torch.nn.functional as F
import torchvision
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from sklearn.svm import SVC
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn.utils import prune as torch_prune
from torchvision.models.resnet import Bottleneck, ResNet, resnet50
from tqdm import tqdm

NUM_CLASSES = 10
IMAGE_SIZE = 32
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ARCHS = ("resnet50", "vit")
PRESETS = ("full", "smoke")
DEFAULT_FORGET_CLASS = 3
WEIGHTS_DIR = Path("model_weights")
RESULTS_DIR = Path("results")

# The paper's unlearning recipe (Adam, cross-entropy, no augmentation).
PAPER_RECIPE = {"epochs": 5, "lr": 1e-3, "batch_size": 128}
# The baselines' optimizer in their official code (Unlearn-Sparse / SalUn arg_parser.py, SCRUB's notebooks).
BASELINE_SGD = {"momentum": 0.9, "weight_decay": 5e-4}
# Training from scratch (pretrain.py, retrain.py): random crop + flip, label smoothing, one-cycle schedule.
PRETRAIN_RECIPES = {
    "resnet50": {"epochs": 60, "lr": 0.2, "batch_size": 512, "optimizer": "sgd", "weight_decay": 5e-4,
                 "label_smoothing": 0.1, "warmup_fraction": 0.15},
    "vit": {"epochs": 200, "lr": 1e-3, "batch_size": 512, "optimizer": "adamw", "weight_decay": 0.05,
            "label_smoothing": 0.1, "warmup_fraction": 0.05},
}
# Optional PRETRAIN_RECIPES keys and the values that leave them off: a recipe without them trains exactly as before.
# mixup_alpha / cutmix_alpha: Beta(alpha, alpha) of mixup / cutmix (0: off); mix_prob: share of batches mixed;
# switch_prob: share of mixed batches that use cutmix when both are on (see mix_batch); compile: torch.compile.
PRETRAIN_OPTIONS = {"mixup_alpha": 0.0, "cutmix_alpha": 0.0, "mix_prob": 1.0, "switch_prob": 0.5, "compile": False}
COMPILE_BACKEND = "inductor"  # torch.compile's backend under compile (inductor needs a C++ compiler on CPU)
# A tiny configuration that runs every script end to end on a CPU in seconds.
SMOKE = {"train_per_class": 30, "test_per_class": 10, "epochs": 1, "pretrain_epochs": 3, "batch_size": 64}
# LoRA defaults per arch: rank, alpha, dropout, target-module regex, modules trained in full.
LORA_DEFAULTS = {
    "resnet50": {"rank": 8, "alpha": 16, "dropout": 0.1, "targets": r"layer\d\.\d+\.conv[123]", "train_full": ["fc"]},
    "vit": {"rank": 16, "alpha": 32, "dropout": 0.1, "targets": r"blocks\.{last}\.attn\.proj|head", "train_full": []},
}
PRUNE_AMOUNT = 0.5
PRUNE_MODES = ("mask", "physical")
BATCHNORM_MODES = ("train", "frozen")
EVAL_BATCH_SIZE = 1024
DIVERGENCE_CHECK_STEPS = 50  # steps between host reads of the non-finite-loss flag (one sync each)
MIA_MAX_SAMPLES = 5000


class UserError(Exception):
    """A problem with the user's input (a file, a combination of flags): reported as one line, exit status 1."""
    exit_status = 1


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: training stops and nothing is written; exit status 3."""
    exit_status = 3


class Terminated(KeyboardInterrupt):
    """SIGTERM (e.g. a cluster's preemption), raised as a KeyboardInterrupt so that the same clean-up runs."""


_written = []  # files this command has written so far, for the message after an interruption
_cli_depth = 0


def raise_terminated(signum, frame):
    """SIGTERM handler: raise Terminated."""
    raise Terminated


def cli(main, argv=None):
    """Run main(argv): a UserError becomes a one-line message and its exit status; Ctrl-C (130) and SIGTERM (143)
    stop it with one line saying which files, if any, it had written. A nested call (continual.py running a method
    script in-process) lets interruptions through to the outermost one."""
    global _cli_depth
    outermost = _cli_depth == 0
    previous_handler = None
    if outermost:
        _written.clear()
        with contextlib.suppress(ValueError):  # only the main thread may install signal handlers
            previous_handler = signal.signal(signal.SIGTERM, raise_terminated)
    _cli_depth += 1
    try:
        return main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_status)
    except KeyboardInterrupt as interruption:
        if not outermost:
            raise
        kept = f"wrote {', '.join(map(str, _written))} before stopping" if _written else "nothing written"
        print(f"interrupted: {kept}; other existing files unchanged", file=sys.stderr)
        sys.exit(143 if isinstance(interruption, Terminated) else 130)
    finally:
        _cli_depth -= 1
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad arguments in one line (exit status 2) and shows each number flag's valid range."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def add_argument(self, *args, **kwargs):
        valid = getattr(kwargs.get("type"), "valid", None)
        if valid and kwargs.get("help"):
            kwargs["help"] += f" [{valid}]"
        return super().add_argument(*args, **kwargs)


def number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: a finite int or float in [low, high] (open where asked); its range text is .valid."""
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high}")
    noun = "integer" if kind is int else "number" if high is not None else "finite number"
    valid = f"{noun} {' and '.join(bounds)}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = float("nan")
        above_low = low is None or value > low or (value == low and not low_open)
        below_high = high is None or value < high or (value == high and not high_open)
        finite = value == value and abs(value) != float("inf")  # NaN is the one value unequal to itself
        if not (finite and above_low and below_high):
            raise argparse.ArgumentTypeError(f"expected {'an' if kind is int else 'a'} {valid}, got {text!r}")
        return value
    parse.valid = valid
    parse.__name__ = valid.replace(" ", "_")
    return parse


positive_int = number(int, 1)
nonnegative_int = number(int, 0)
seed_int = number(int, 0, 2**32 - 1)  # numpy's seed range
positive_float = number(float, 0, low_open=True)
nonnegative_float = number(float, 0)
open_unit_interval = number(float, 0, 1, low_open=True, high_open=True)
unit_interval_open_above = number(float, 0, 1, high_open=True)
unit_interval_open_below = number(float, 0, 1, low_open=True)


def make_parser(doc):
    """A parser whose description is the script's docstring."""
    return OneLineParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


# ----------------------------------------------------------------------------------------------- data

@dataclass
class CIFAR10:
    """Both splits as uint8 [N, 3, 32, 32] tensors and int64 labels, on the training device."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def _read_batch(path):
    """(images uint8 [N, 3, 32, 32], labels int64 [N]) of one CIFAR-10 pickle, checked; a UserError names the file."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None
    except Exception as error:  # unpickling raises many types on truncated or foreign files
        raise UserError(f"{path} is not a CIFAR-10 batch: it does not unpickle ({type(error).__name__}); "
                        f"the file is truncated or corrupt, download it again") from None
    if not isinstance(batch, dict) or not {"data", "labels"} <= batch.keys():
        raise UserError(f"{path} is not a CIFAR-10 batch: expected a dict with 'data' and 'labels'")
    try:
        data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    except Exception:
        raise UserError(f"{path} is not a CIFAR-10 batch: 'data' and 'labels' are not arrays") from None
    pixels = 3 * IMAGE_SIZE * IMAGE_SIZE
    if data.ndim != 2 or data.shape[1] != pixels or data.dtype != np.uint8:
        raise UserError(f"{path} is not a CIFAR-10 batch: 'data' is {data.dtype} {list(data.shape)}, "
                        f"expected uint8 [N, {pixels}]")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path} is not a CIFAR-10 batch: {len(data)} images but 'labels' is {labels.dtype} "
                        f"{list(labels.shape)}, expected {len(data)} integers")
    if len(labels) and not 0 <= labels.min() <= labels.max() < NUM_CLASSES:
        raise UserError(f"{path}: labels must lie in 0..{NUM_CLASSES - 1}, found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE), labels.astype(np.int64)


def _read_batches(folder, names):
    images, labels = zip(*(_read_batch(folder / name) for name in names), strict=True)
    images, labels = np.concatenate(images), np.concatenate(labels)
    if not len(labels):
        raise UserError(f"{folder}: {', '.join(names)} hold no images")
    return torch.from_numpy(images), torch.from_numpy(labels)


def _first_per_class(labels, k):
    return torch.sort(torch.cat([torch.nonzero(labels == c).flatten()[:k] for c in range(NUM_CLASSES)])).values


def load_cifar10(root, device, preset="full"):
    """Read cifar-10-batches-py under root (downloading it with torchvision if absent) onto device.

    The smoke preset keeps the first few images of each class."""
    folder = Path(root) / "cifar-10-batches-py"
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    if not all((folder / name).is_file() for name in [*train_names, "test_batch"]):
        try:
            torchvision.datasets.CIFAR10(root, train=True, download=True)
        except Exception as error:
            raise UserError(f"CIFAR-10 not found under {folder} and the download failed ({type(error).__name__}); "
                            f"download it from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it into {root}/, "
                            f"or pass --data DIR") from None
    train_images, train_labels = _read_batches(folder, train_names)
    test_images, test_labels = _read_batches(folder, ["test_batch"])
    if preset == "smoke":
        keep_train = _first_per_class(train_labels, SMOKE["train_per_class"])
        keep_test = _first_per_class(test_labels, SMOKE["test_per_class"])
        train_images, train_labels = train_images[keep_train], train_labels[keep_train]
        test_images, test_labels = test_images[keep_test], test_labels[keep_test]
    device = torch.device(device)
    return CIFAR10(train_images.to(device), train_labels.to(device), test_images.to(device), test_labels.to(device))


def normalize(images):
    """uint8 [B, 3, H, W] on any device -> normalised float, channels-last on GPU."""
    mean = torch.tensor(CIFAR_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=images.device).view(1, 3, 1, 1)
    x = (images.float() / 255 - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


def augment(x, generator, pad=4):
    """Random crop (reflect padding) and horizontal flip of a normalised batch, on its device."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device, generator=generator)
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    cropped = padded[batch, channel, rows, cols]
    flip = torch.rand(n, device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


class Batches:
    """Shuffled mini-batches of images[idx] drawn from a device-side permutation; no DataLoader.

    Iterating yields (normalised images, labels); each pass draws a new permutation."""

    def __init__(self, images, labels, idx, batch_size, seed=0, shuffle=True, augment=False):
        self.images, self.labels, self.idx = images, labels, idx.to(images.device)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.generator = torch.Generator(device=images.device)
        self.generator.manual_seed(seed)

    def __len__(self):
        return -(-len(self.idx) // self.batch_size)

    def __iter__(self):
        order = self.idx
        if self.shuffle:
            order = order[torch.randperm(len(order), device=order.device, generator=self.generator)]
        for start in range(0, len(order), self.batch_size):
            batch_idx = order[start:start + self.batch_size]
            x = normalize(self.images[batch_idx])
            if self.augment:
                x = augment(x, self.generator)
            yield x, self.labels[batch_idx]


# ------------------------------------------------------------------------------------- forget splits

@dataclass(frozen=True)
class ForgetSpec:
    """What to forget: whole classes, or a seeded random fraction of the training images."""
    classes: tuple = (DEFAULT_FORGET_CLASS,)
    random_fraction: float | None = None
    seed: int = 0

    @property
    def tag(self):
        """Short, exact name for file names: class3, class3-5, random10 (random10-seed1 for another forget seed).

        The percentage is written out exactly, with p for the decimal point (0.1000001 -> random10p00001), so
        two different fractions never share a tag and the tag holds no dot that could pass for a file suffix."""
        if self.random_fraction is not None:
            percent = format(Decimal(repr(self.random_fraction)) * 100, "f")
            percent = percent.rstrip("0").rstrip(".") if "." in percent else percent
            return f"random{percent.replace('.', 'p')}" + (f"-seed{self.seed}" if self.seed else "")
        return "class" + "-".join(str(c) for c in self.classes)

    def to_dict(self):
        return {"classes": list(self.classes), "random_fraction": self.random_fraction, "seed": self.seed}

    @classmethod
    def from_dict(cls, spec):
        return cls(tuple(spec["classes"]), spec["random_fraction"], spec["seed"])


@dataclass
class Splits:
    """Index sets: forget and retain partition the training split; test_idx is the test split for TA."""
    forget_idx: torch.Tensor
    retain_idx: torch.Tensor
    test_idx: torch.Tensor


def make_splits(train_labels, test_labels, spec):
    """Forget/retain indices of the training split and the test indices without forgotten classes."""
    n_train = len(train_labels)
    if spec.random_fraction is not None:
        generator = torch.Generator().manual_seed(spec.seed)
        order = torch.randperm(n_train, generator=generator).to(train_labels.device)
        forget_mask = torch.zeros(n_train, dtype=torch.bool, device=train_labels.device)
        forget_mask[order[:round(spec.random_fraction * n_train)]] = True
        test_idx = torch.arange(len(test_labels), device=test_labels.device)
    else:
        classes = torch.tensor(spec.classes, device=train_labels.device)
        forget_mask = torch.isin(train_labels, classes)
        test_idx = torch.nonzero(~torch.isin(test_labels, classes.to(test_labels.device))).flatten()
    return Splits(torch.nonzero(forget_mask).flatten(), torch.nonzero(~forget_mask).flatten(), test_idx)


def forget_spec_from_args(args):
    """ForgetSpec from --forget-class / --forget-random / --forget-seed (None when none was given)."""
    if args.forget_random is not None:
        if args.forget_class is not None:
            raise UserError("give either --forget-class or --forget-random, not both")
        if not 0 < args.forget_random < 1:
            raise UserError(f"--forget-random must lie strictly between 0 and 1, got {args.forget_random}")
        return ForgetSpec((), args.forget_random, args.forget_seed)
    if args.forget_class is None:
        return None
    if len(set(args.forget_class)) == NUM_CLASSES:
        raise UserError("cannot forget every class: nothing would be left to retain")
    return ForgetSpec(tuple(sorted(set(args.forget_class))))  # the forget seed only draws random subsets


def add_forget_arguments(parser):
    parser.add_argument("--forget-class", type=int, nargs="+", choices=range(NUM_CLASSES), metavar="C",
                        help=f"forget every training image of these classes, 0-9 (default: {DEFAULT_FORGET_CLASS})")
    parser.add_argument("--forget-random", type=open_unit_interval, metavar="FRACTION",
                        help="forget a seeded random FRACTION of the training images instead")
    parser.add_argument("--forget-seed", type=seed_int, default=0, help="seed of the random forget subset (default: 0)")


# --------------------------------------------------------------------------------------------- models

def _cifar_stem(model):
    """Replace ImageNet's 7x7 stride-2 conv and max-pool with a 3x3 stride-1 conv for 32x32 inputs."""
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


class SlimResNet(ResNet):
    """torchvision's ResNet with every stage 8x narrower: the smoke preset's stand-in for ResNet-50."""

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        return super()._make_layer(block, planes // 8, blocks, stride, dilate)


def build_model(arch, preset="full"):
    """A fresh model by name. The smoke preset gives a slim variant with the same module names."""
    if arch == "resnet50":
        if preset == "smoke":
            model = SlimResNet(Bottleneck, [1, 1, 1, 1], num_classes=NUM_CLASSES)
            model.fc = nn.Linear(model.inplanes, NUM_CLASSES)
        else:
            model = resnet50(num_classes=NUM_CLASSES)
        return _cifar_stem(model)
    if arch == "vit":
        size = {"embed_dim": 48, "depth": 2, "num_heads": 2} if preset == "smoke" else \
            {"embed_dim": 384, "depth": 12, "num_heads": 6}
        return VisionTransformer(img_size=IMAGE_SIZE, patch_size=4, num_classes=NUM_CLASSES, global_pool="avg",
                                 class_token=False, **size)
    raise UserError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")


def to_device(model, device):
    """model on device, with channels-last weights on GPU to match normalize()'s channels-last batches."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if torch.device(device).type == "cuda" else model


def count_parameters(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# -------------------------------------------------------------------------------------------- pruning

def prune_targets(model):
    """Layers whose output channels/features are pruned. ResNet: every conv. ViT: every MLP hidden layer."""
    if hasattr(model, "blocks"):
        return [block.mlp.fc1 for block in model.blocks]
    return [module for module in model.modules() if isinstance(module, nn.Conv2d)]


def prune(model, amount=PRUNE_AMOUNT, mode="mask"):
    """Zero the `amount` share of output channels/features with the smallest L2 norm, per layer.

    The mask stays attached (torch.nn.utils.prune), so pruned weights stay exactly zero while training.
    A layer's bias entries of pruned outputs are masked too, and so are the weight and bias of the BatchNorm
    that normalises its output (every ResNet conv has one), so a pruned unit outputs exactly zero after its
    normalisation, in train and eval mode. mode="physical" removes the channels instead (prune_physically)."""
    if mode == "physical":
        return prune_physically(model, amount) if amount else model
    layers = prune_targets(model)
    norms = batchnorm_after(model, layers)
    for layer in layers:
        torch_prune.ln_structured(layer, "weight", amount=amount, n=2, dim=0)
        mask = output_mask(layer)
        if layer.bias is not None:
            torch_prune.custom_from_mask(layer, "bias", mask)
        if layer in norms:
            for name in ("weight", "bias"):
                torch_prune.custom_from_mask(norms[layer], name, mask)
    return model


def batchnorm_after(model, layers):
    """{layer: the BatchNorm that directly normalises its output}, found by tracing one forward pass."""
    outputs, found = {}, {}

    def remember_output(layer, inputs, output):
        outputs[layer] = output

    def match_input(norm, inputs):
        for layer, output in outputs.items():
            if inputs[0] is output:
                found[layer] = norm

    hooks = [layer.register_forward_hook(remember_output) for layer in layers]
    hooks += [m.register_forward_pre_hook(match_input) for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    example = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, device=next(model.parameters()).device)
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)  # eval mode: the BatchNorm statistics stay as they are
    finally:
        for hook in hooks:
            hook.remove()
        model.train(training)
    return found


def prune_physically(model, amount=PRUNE_AMOUNT):
    """Remove the `amount` share of channels/features with torch-pruning, so the network is really smaller.

    Channels coupled through residual connections are pruned together (torch-pruning's dependency graph),
    ranked by group L2 norm. The scope is the mask mode's: ResNet every conv, ViT only the MLP hidden units;
    the classifier's class rows are never pruned."""
    if hasattr(model, "blocks"):
        hidden = {block.mlp.fc1 for block in model.blocks}
        ignored = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m not in hidden]
        unwrapped = [(model.pos_embed, 2)]
    else:
        ignored, unwrapped = [model.fc], None
    tp = import_torch_pruning()
    device = next(model.parameters()).device
    example = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    training = model.training
    model.eval()  # tracing runs a forward pass: keep BatchNorm statistics as they are
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=amount, ignored_layers=ignored, unwrapped_parameters=unwrapped)
    pruner.step()
    return model.train(training)


def resize_to_state(model, state):
    """Give a fresh model's Conv2d/BatchNorm2d/Linear/LayerNorm modules the shapes of a physically pruned state."""
    for name, module in model.named_modules():
        tensors = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
        for key, tensor in tensors.items():
            shape = state.get(f"{name}.{key}" if name else key, tensor).shape
            if shape != tensor.shape:
                resized = torch.empty(shape, dtype=tensor.dtype)
                setattr(module, key, nn.Parameter(resized) if isinstance(tensor, nn.Parameter) else resized)
        if isinstance(module, nn.Conv2d):
            module.out_channels, module.in_channels = module.weight.shape[0], module.weight.shape[1] * module.groups
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.BatchNorm2d):
            module.num_features = module.running_mean.shape[0]
        elif isinstance(module, nn.LayerNorm) and module.weight is not None:
            module.normalized_shape = tuple(module.weight.shape)
    return model


def import_torch_pruning():
    """torch_pruning, imported only where physical pruning or MAC counting needs it; a one-line error when missing."""
    try:
        import torch_pruning
    except ImportError:
        raise UserError("--prune-mode physical needs torch-pruning: pip install 'torch-pruning>=1.5'") from None
    return torch_pruning


def model_cost(model):
    """Parameter count and multiply-accumulates of model on one 32x32 image (torch-pruning's counter).

    Without torch-pruning installed the parameters are counted with torch and macs is None."""
    try:
        tp = import_torch_pruning()
    except UserError:
        return {"params": count_parameters(model), "macs": None}
    example = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, device=next(model.parameters()).device)
    macs, params = tp.utils.count_ops_and_params(model, example)
    return {"params": int(params), "macs": int(macs)}


def output_mask(layer):
    """1 for each output channel/feature of a pruned layer that survives, 0 for each pruned one."""
    return layer.weight_mask.reshape(len(layer.weight_mask), -1).amax(1)


def pruned_layers(model):
    return [module for module in model.modules() if hasattr(module, "weight_mask")]


# ----------------------------------------------------------------------------------------------- LoRA

@dataclass
class LoraSettings:
    rank: int
    alpha: int
    dropout: float
    targets: str
    train_full: list


def lora_settings(arch, args, model):
    """LoRA settings from the arch's defaults, overridden by the --lora-* flags that were given (0 included)."""
    defaults = LORA_DEFAULTS[arch]
    last_block = len(model.blocks) - 1 if hasattr(model, "blocks") else 0

    def flag_or_default(flag, key):
        value = getattr(args, flag)
        return defaults[key] if value is None else value
    return LoraSettings(flag_or_default("lora_rank", "rank"), flag_or_default("lora_alpha", "alpha"),
                        flag_or_default("lora_dropout", "dropout"),
                        flag_or_default("lora_targets", "targets").replace("{last}", str(last_block)),
                        flag_or_default("lora_train_full", "train_full"))


def add_lora(model, settings, example_input):
    """Freeze the model and attach peft LoRA adapters; checks that every adapter is called in forward.

    Adapters on a pruned layer have their output rows masked like the layer, so merging keeps pruned
    channels at zero and the merged model computes exactly what the adapted one did."""
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.targets, modules_to_save=settings.train_full or None)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as error:
        raise UserError(f"LoRA targets {settings.targets!r}: {error}".splitlines()[0]) from None
    adapters = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    for adapter in adapters:
        base = adapter.get_base_layer()
        if hasattr(base, "weight_mask"):
            for lora_b in adapter.lora_B.values():
                row_mask = output_mask(base).view(-1, *[1] * (lora_b.weight.dim() - 1)).expand_as(lora_b.weight)
                torch_prune.custom_from_mask(lora_b, "weight", row_mask.clone())
    _assert_called(peft_model, adapters, example_input)
    return peft_model


def _assert_called(model, modules, example_input):
    called = set()
    hooks = [m.register_forward_hook(lambda mod, *_: called.add(id(mod))) for m in modules]
    with torch.no_grad():
        model.eval()
        model(example_input)
    for hook in hooks:
        hook.remove()
    missing = [m for m in modules if id(m) not in called]
    if missing:
        raise UserError(f"{len(missing)} LoRA adapter(s) are never called in forward: choose other --lora-targets")


def finalize(model):
    """A plain model of its arch: LoRA adapters merged, prune masks applied and made permanent."""
    masks = {}
    for layer in pruned_layers(model):
        masks[layer] = {name: getattr(layer, f"{name}_mask").clone() for name in ("weight", "bias")
                        if hasattr(layer, f"{name}_mask")}
        for name in masks[layer]:
            torch_prune.remove(layer, name)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    with torch.no_grad():
        for module in model.modules():
            for name, mask in masks.get(module, {}).items():
                getattr(module, name).mul_(mask)
    return model


# ------------------------------------------------------------------------------------------- training

def autocast(device):
    """bf16 autocast on GPU, plain fp32 elsewhere."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cross_entropy(model, inputs, labels):
    return F.cross_entropy(model(inputs), labels)


def make_adam(params, lr):
    params = list(params)
    return torch.optim.Adam(params, lr=lr, fused=params[0].is_cuda)


def make_sgd(params, lr, weight_decay=BASELINE_SGD["weight_decay"]):
    """SGD with the momentum of the baselines' official code (Unlearn-Sparse, SalUn, SCRUB)."""
    return torch.optim.SGD(list(params), lr=lr, momentum=BASELINE_SGD["momentum"], weight_decay=weight_decay)


def random_other_labels(labels, generator=None):
    """A uniformly random label for each sample, never its true one."""
    shift = torch.randint(1, NUM_CLASSES, labels.shape, device=labels.device, generator=generator)
    return (labels + shift) % NUM_CLASSES


class RandomLabelBatches:
    """One pass: the forget batches relabelled by random_other_labels, then the retain batches (SalUn's RL)."""

    def __init__(self, forget, retain, seed=0):
        self.forget, self.retain = forget, retain
        self.generator = torch.Generator(device=forget.images.device)
        self.generator.manual_seed(seed)

    def __len__(self):
        return len(self.forget) + len(self.retain)

    def __iter__(self):
        for inputs, labels in self.forget:
            yield inputs, random_other_labels(labels, self.generator)
        yield from self.retain


def distill_kl(student_logits, teacher_logits, temperature):
    """KL(teacher || student) of temperature-softened outputs, times T^2 (Hinton distillation, as in SCRUB)."""
    return F.kl_div(F.log_softmax(student_logits.float() / temperature, 1),
                    F.softmax(teacher_logits.float() / temperature, 1), reduction="batchmean") * temperature ** 2


def l1_norm(model):
    """Sum of |w| over every trainable parameter."""
    return sum(p.abs().sum() for p in model.parameters() if p.requires_grad)


def saliency_mask(model, batches, share, step_lr=None):
    """SalUn's weight saliency: {parameter name: bool mask shaped like it}, True for the `share` of all trainable
    weights (one ranking across the model) with the largest |gradient of the forget loss -CE summed over batches|,
    in eval mode. By default every gradient is taken at the model's weights (the SalUn paper's equation). With
    step_lr, a copy of the model takes an SGD step (momentum, weight decay: make_sgd) on -CE after every batch,
    as a version of SalUn's generate_mask.py does, so the gradients are summed along that path; the model itself
    is left unchanged either way."""
    if step_lr is not None:
        model = copy.deepcopy(model)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = make_sgd(params.values(), step_lr) if step_lr is not None else None
    saliency = {name: torch.zeros_like(p) for name, p in params.items()}
    model.eval()
    for inputs, labels in batches:
        model.zero_grad(set_to_none=True)
        (-cross_entropy(model, inputs, labels)).backward()
        for name, p in params.items():
            if p.grad is not None:
                saliency[name] += p.grad
        if optimizer is not None:
            optimizer.step()
    model.zero_grad(set_to_none=True)
    flat = torch.cat([s.abs().flatten() for s in saliency.values()])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, round(share * flat.numel()), sorted=False).indices] = True
    sizes = [p.numel() for p in params.values()]
    return {name: k.view_as(params[name]) for name, k in zip(params, keep.split(sizes), strict=True)}


def train(model, batches, epochs, lr=PAPER_RECIPE["lr"], loss_fn=cross_entropy, optimizer=None, scheduler=None,
          before_step=None, after_epoch=None, desc="train", freeze_batchnorm=False):
    """The one training loop: Adam + cross-entropy by default, bf16 autocast on GPU, no host syncs per step.

    loss_fn(model, inputs, labels) -> scalar; before_step() runs between backward and the optimizer step;
    after_epoch(epoch) after each epoch (1-based). freeze_batchnorm keeps BatchNorm layers in eval mode: they
    normalise with, and keep, their running statistics. A NaN or infinite loss raises TrainingDiverged naming the
    epoch and step."""
    device = next(model.parameters()).device
    optimizer = optimizer or make_adam((p for p in model.parameters() if p.requires_grad), lr)
    model.train()
    if freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    # Reading the loss on the host every step would stall the GPU queue. Instead the first non-finite step and
    # its loss are kept on the device and read every DIVERGENCE_CHECK_STEPS steps and at each epoch's end.
    bad_step = torch.full((), -1, dtype=torch.int64, device=device)
    bad_loss = torch.zeros((), device=device)
    for epoch in range(1, epochs + 1):
        for step, (inputs, labels) in enumerate(tqdm(batches, desc=f"{desc} epoch {epoch}/{epochs}", leave=False,
                                                     disable=None), start=1):
            with autocast(device):
                loss = loss_fn(model, inputs, labels)
            first_bad = (bad_step < 0) & ~torch.isfinite(loss.detach())
            bad_step = torch.where(first_bad, step, bad_step)
            bad_loss = torch.where(first_bad, loss.detach().float(), bad_loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if before_step is not None:
                before_step()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if step % DIVERGENCE_CHECK_STEPS == 0:
                _check_finite(bad_step, bad_loss, desc, epoch, epochs, len(batches))
        _check_finite(bad_step, bad_loss, desc, epoch, epochs, len(batches))
        if after_epoch is not None:
            after_epoch(epoch)
    return model


def _check_finite(bad_step, bad_loss, desc, epoch, epochs, steps):
    if bad_step.item() >= 0:
        raise TrainingDiverged(f"training diverged ({desc}): the loss became {bad_loss.item()} at epoch "
                               f"{epoch}/{epochs}, step {bad_step.item()}/{steps}; no checkpoint written "
                               f"(a lower --lr may help)")


def beta_sample(alpha, generator, device):
    """One Beta(alpha, alpha) draw on the device: the first coordinate of a Dirichlet(alpha, alpha), as
    torch.distributions.Beta draws it, but from a given generator (torch.distributions takes none)."""
    return torch._sample_dirichlet(torch.full((2,), float(alpha), device=device), generator=generator)[0]


def mix_batch(inputs, labels, generator, mixup_alpha=0.0, cutmix_alpha=0.0, mix_prob=1.0, switch_prob=0.5):
    """(mixed inputs, soft targets [N, NUM_CLASSES]): the batch mixed with its reverse, like timm's Mixup in batch
    mode. With probability mix_prob the batch is mixed, by cutmix with probability switch_prob when both alphas are
    on, else by the one that is on. Mixup blends whole images with weight lam ~ Beta(mixup_alpha, mixup_alpha);
    cutmix pastes a box of the partner image of area about (1 - lam) with lam ~ Beta(cutmix_alpha, cutmix_alpha),
    then sets lam to the share of the image outside the box. The targets put lam on an image's label and 1 - lam on
    its partner's. With both alphas 0 the inputs come back unchanged with one-hot targets and nothing is drawn.

    timm's Mixup is not used: it draws from numpy's global generator (repeatable only if nothing else uses it) and
    needs an even batch size, while the last batch of an epoch may be odd. Here every draw comes from `generator`
    (the batches' own, on the device), the same draws for every batch, so a seed repeats a run, and no step reads a
    value back to the host: the box is a mask, not Python slice bounds."""
    targets = torch.zeros(len(labels), NUM_CLASSES, device=labels.device).scatter_(1, labels[:, None], 1.0)
    if not (mixup_alpha or cutmix_alpha):
        return inputs, targets
    device = inputs.device
    apply_draw, switch_draw, row_draw, column_draw = torch.rand(4, device=device, generator=generator)
    partner = inputs.flip(0)
    if mixup_alpha:
        mixup_lam = beta_sample(mixup_alpha, generator, device)
        mixup_inputs = inputs * mixup_lam + partner * (1 - mixup_lam)
    if cutmix_alpha:
        height, width = inputs.shape[-2:]
        side_ratio = (1 - beta_sample(cutmix_alpha, generator, device)).sqrt()

        def span(size, centre_draw):  # [centre - cut // 2, centre + cut // 2) clipped to the image, as timm's box
            centre, half_cut = (centre_draw * size).floor(), (side_ratio * size).floor().div(2, rounding_mode="floor")
            positions = torch.arange(size, device=device)
            return (positions >= centre - half_cut) & (positions < centre + half_cut)
        box = span(height, row_draw)[:, None] & span(width, column_draw)[None, :]
        cutmix_lam = 1 - box.float().mean()
        cutmix_inputs = torch.where(box, partner, inputs)
    if mixup_alpha and cutmix_alpha:
        use_cutmix = switch_draw < switch_prob
        lam = torch.where(use_cutmix, cutmix_lam, mixup_lam)
        mixed = torch.where(use_cutmix, cutmix_inputs, mixup_inputs)
    else:
        lam, mixed = (mixup_lam, mixup_inputs) if mixup_alpha else (cutmix_lam, cutmix_inputs)
    apply = apply_draw < mix_prob
    lam = torch.where(apply, lam, 1.0)
    return torch.where(apply, mixed, inputs), lam * targets + (1 - lam) * targets.flip(0)


def train_from_scratch(model, data, idx, recipe, seed, desc="pretrain", curve=None):
    """Train a fresh model on images[idx] with a PRETRAIN_RECIPES entry: augmentation, one-cycle schedule, and the
    PRETRAIN_OPTIONS the recipe turns on (mixup/cutmix on the device, torch.compile). Returns the model itself,
    never the compiled wrapper, so its state dict has the plain parameter names.

    curve: an AccuracyCurve, called after each epoch."""
    options = {**PRETRAIN_OPTIONS, **recipe}
    batches = Batches(data.train_images, data.train_labels, idx, recipe["batch_size"], seed=seed, augment=True)
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(params, lr=recipe["lr"], momentum=0.9, nesterov=True,
                                    weight_decay=recipe["weight_decay"])
    else:
        optimizer = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe["lr"],
                                                    total_steps=recipe["epochs"] * len(batches),
                                                    pct_start=recipe["warmup_fraction"])
    smoothing = recipe["label_smoothing"]
    mixing = {key: options[key] for key in ("mixup_alpha", "cutmix_alpha", "mix_prob", "switch_prob")}
    mixes = bool(mixing["mixup_alpha"] or mixing["cutmix_alpha"])

    def smoothed_cross_entropy(model, inputs, labels):
        if mixes:  # soft targets; cross_entropy smooths them as it does labels: (1 - s) * targets + s / classes
            inputs, labels = mix_batch(inputs, labels, batches.generator, **mixing)
        return F.cross_entropy(model(inputs), labels, label_smoothing=smoothing)

    trained = model
    if options["compile"]:
        # Compiled lazily at the first steps, so compile time is part of the training time (the RTE). Static shapes:
        # the last, smaller batch of an epoch gets a graph of its own instead of making every step's graph dynamic.
        trained = torch.compile(model, backend=COMPILE_BACKEND, dynamic=False)
    try:
        train(trained, batches, recipe["epochs"], loss_fn=smoothed_cross_entropy, optimizer=optimizer,
              scheduler=scheduler, after_epoch=curve, desc=desc)
    except torch._dynamo.exc.BackendCompilerFailed as error:
        raise UserError(f"--compile failed ({COMPILE_BACKEND}): {str(error).strip().splitlines()[0]}; "
                        f"run without --compile") from None
    return model


def default_eval_every(epochs):
    """About ten evaluation points over a run (every epoch for short runs), the last epoch always included."""
    return max(1, epochs // 10)


class AccuracyCurve:
    """Time to accuracy: test accuracy after every `every`-th epoch and the last, with the training seconds so far
    and the throughput since the previous point, one printed line each. Evaluation (no_grad, the test images idx)
    is not training time: `eval_seconds` says how much of the run it took. Called as after_epoch(epoch)."""

    def __init__(self, model, images, labels, idx, every, epochs, images_per_epoch, desc="train"):
        self.model, self.images, self.labels, self.idx = model, images, labels, idx
        self.every, self.epochs, self.images_per_epoch, self.desc = every, epochs, images_per_epoch, desc
        self.device = next(model.parameters()).device
        self.points, self.eval_seconds = [], 0.0
        self.start = self.last_seconds = None
        self.last_epoch = 0

    def begin(self):
        """Start the clock (call right before training)."""
        self._sync()
        self.start, self.last_seconds = time.perf_counter(), 0.0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, epoch):
        if not self.every or (epoch % self.every and epoch != self.epochs):
            return
        self._sync()
        paused = time.perf_counter()
        seconds = paused - self.start - self.eval_seconds
        modes = {module: module.training for module in self.model.modules()}
        test_accuracy = accuracy(predict(self.model, self.images, self.idx), self.labels[self.idx])
        for module, training in modes.items():  # back to each module's own mode (frozen BatchNorm stays frozen)
            module.train(training)
        images_per_s = (epoch - self.last_epoch) * self.images_per_epoch / max(seconds - self.last_seconds, 1e-9)
        self.points.append({"epoch": epoch, "seconds": round(seconds, 3), "test_accuracy": round(test_accuracy, 3),
                            "images_per_s": round(images_per_s, 1)})
        self.last_epoch, self.last_seconds = epoch, seconds
        tqdm.write(f"{self.desc} epoch {epoch}/{self.epochs}: test accuracy {test_accuracy:.2f} % after "
                   f"{seconds:.1f} s of training, {images_per_s:,.0f} images/s")
        self.eval_seconds += time.perf_counter() - paused


def seed_everything(seed):
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_mode(enabled):
    """With enabled, only deterministic kernels inside the block (an op without one raises), cuDNN autotuning off;
    the previous settings come back afterwards. CUBLAS_WORKSPACE_CONFIG must be set before cuBLAS starts, so
    this runs before the model or the data reach the GPU."""
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    except RuntimeError as error:
        if "deterministic" not in str(error):
            raise
        raise UserError(f"--deterministic: {str(error).splitlines()[0]}") from None
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]


def warm_up(model, inputs, labels):
    """One untimed forward and backward pass (bf16 autocast on GPU, train mode), so that CUDA, cuBLAS and cuDNN
    start-up falls outside the RTE. The model is left exactly as it was: its buffers (BatchNorm statistics) and
    the RNG states (dropout) are restored, the gradients cleared, and no optimizer steps."""
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(inputs.device) if inputs.is_cuda else None
    training = model.training
    model.train()
    with autocast(inputs.device):
        loss = cross_entropy(model, inputs, labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, inputs.device)
        torch.cuda.synchronize(inputs.device)
    model.train(training)


def warm_up_on(model, data, idx, batch_size):
    """warm_up on the first batch_size images of images[idx] (no shuffling, so no batch generator moves)."""
    first = idx[:batch_size]
    warm_up(model, normalize(data.train_images[first]), data.train_labels[first])


class Measure:
    """Times a block (device synchronised) and records its peak GPU memory; `with Measure(device) as m:`."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.seconds, self.peak_gpu_mem_mb = None, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_gpu_mem_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.seconds = time.perf_counter() - self.start


# ------------------------------------------------------------------------------------------- metrics

@torch.no_grad()
def predict(model, images, idx, batch_size=EVAL_BATCH_SIZE):
    """Softmax probabilities of model on images[idx], float32 [len(idx), classes].

    Runs in fp32, without the training loop's bf16 autocast, as the methods' official evaluations do: every
    metric (arg-max, the MIA's confidences) comes from fp32 logits."""
    model.eval()
    device = next(model.parameters()).device
    probs = []
    for start in range(0, len(idx), batch_size):
        logits = model(normalize(images[idx[start:start + batch_size]]))
        probs.append(logits.float().softmax(1))
    return torch.cat(probs) if probs else torch.zeros(0, NUM_CLASSES, device=device)


def accuracy(probs, labels):
    """Percent of rows whose arg-max is the label (NaN for no rows)."""
    return (probs.argmax(1) == labels).float().mean().item() * 100 if len(labels) else float("nan")


def mia_efficacy(retain_conf, test_conf, forget_conf, seed=0, max_samples=MIA_MAX_SAMPLES):
    """Unlearn-Sparse's SVC MIA on true-label confidence: percent of forget samples called non-members.

    An RBF SVC (C=3, gamma='auto', as in Unlearn-Sparse) is fitted on equally many retain samples
    (members) and test samples (non-members), at most max_samples of each, drawn with the seed."""
    rng = np.random.default_rng(seed)
    n = min(len(retain_conf), len(test_conf), max_samples)
    members = rng.choice(retain_conf, n, replace=False)
    non_members = rng.choice(test_conf, n, replace=False)
    features = np.concatenate([members, non_members])[:, None]
    is_member = np.concatenate([np.ones(n), np.zeros(n)])
    classifier = SVC(C=3, gamma="auto", kernel="rbf").fit(features, is_member)
    return float((classifier.predict(np.asarray(forget_conf)[:, None]) == 0).mean() * 100)


def evaluate_model(model, data, splits, seed=0):
    """UA, RA, TA and MIA-efficacy (percent) of model on the splits."""
    all_train = torch.arange(len(data.train_labels), device=data.train_labels.device)
    train_probs = predict(model, data.train_images, all_train)
    test_probs = predict(model, data.test_images, splits.test_idx)
    train_conf = train_probs.gather(1, data.train_labels[:, None]).flatten()
    test_conf = test_probs.gather(1, data.test_labels[splits.test_idx][:, None]).flatten()
    forget, retain = splits.forget_idx, splits.retain_idx
    return {
        "UA": 100 - accuracy(train_probs[forget], data.train_labels[forget]),
        "RA": accuracy(train_probs[retain], data.train_labels[retain]),
        "TA": accuracy(test_probs, data.test_labels[splits.test_idx]),
        "MIA_efficacy": mia_efficacy(train_conf[retain].cpu().numpy(), test_conf.cpu().numpy(),
                                     train_conf[forget].cpu().numpy(), seed),
    }


# ---------------------------------------------------------------------------------------- checkpoints

def library_versions():
    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__), "timm": str(timm.__version__),
            "peft": str(peft.__version__)}


def device_name(device):
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def save_checkpoint(path, model, meta):
    """Write {"model": state_dict, "meta": meta} atomically: a temporary file, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"model": state, "meta": meta}, f)
        os.replace(tmp, path)
        _written.append(path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, device="cpu", arch=None):
    """(model, meta) from a checkpoint written by save_checkpoint; arch, if given, must match.

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
    return model.to(device), meta


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


def write_json(path, obj):
    """Write JSON atomically: a temporary file, then a rename (an interruption leaves the old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
        _written.append(path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------- script plumbing

def torch_device(name):
    """argparse type: a torch device that exists on this machine."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{name} asked for, but this machine has no CUDA GPU")
    return str(device)


def add_device_argument(parser):
    parser.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")


def add_common_arguments(parser):
    """Flags shared by every training script."""
    parser.add_argument("--arch", default="resnet50", choices=ARCHS, help="model (default: resnet50)")
    parser.add_argument("--data", default="data", help="folder holding cifar-10-batches-py (default: data)")
    add_forget_arguments(parser)
    parser.add_argument("--epochs", type=positive_int, help="training epochs (default: the recipe's)")
    parser.add_argument("--batch-size", type=positive_int, help="batch size (default: the recipe's)")
    parser.add_argument("--lr", type=positive_float, help="learning rate (default: the recipe's)")
    add_seed_argument(parser, "seed of init, shuffling and dropout")
    add_device_argument(parser)
    parser.add_argument("--deterministic", action="store_true",
                        help="use only deterministic GPU kernels (slower; an op without one is an error)")
    parser.add_argument("--out", help="checkpoint to write (default: model_weights/{arch}_{method}.pth, "
                                      "with every non-default setting in the name)")
    parser.add_argument("--preset", default="full", choices=PRESETS,
                        help="full: the paper's settings; smoke: a tiny CPU configuration for checks (default: full)")


def add_seed_argument(parser, what):
    parser.add_argument("--seed", type=seed_int, default=0, help=f"{what} (default: 0)")


def add_weights_argument(parser):
    parser.add_argument("--weights", help="original model to unlearn from (default: model_weights/{arch}_original.pth)")


def add_prune_arguments(parser):
    parser.add_argument("--prune-amount", type=unit_interval_open_above, default=PRUNE_AMOUNT,
                        help="share of output channels/features pruned per layer (default: 0.5)")
    parser.add_argument("--prune-mode", default="mask", choices=PRUNE_MODES,
                        help="mask: zero pruned channels in place, as in the paper; physical: remove them with "
                             "torch-pruning, so training and inference run on a smaller network (default: mask)")


def add_lora_arguments(parser):
    parser.add_argument("--lora-rank", type=positive_int, help="LoRA rank (default: 8 for resnet50, 16 for vit)")
    parser.add_argument("--lora-alpha", type=positive_int, help="LoRA alpha (default: 16 for resnet50, 32 for vit)")
    parser.add_argument("--lora-dropout", type=unit_interval_open_above, help="LoRA dropout (default: 0.1)")
    parser.add_argument("--lora-targets", help="regex of module names given adapters (default: per arch, see README)")
    parser.add_argument("--lora-train-full", nargs="*",
                        help="modules trained in full beside the adapters (default: fc for resnet50, none for vit)")


def add_method_arguments(parser, prune=True, lora=True):
    """Flags of the unlearning scripts: source weights and, for the methods that use them, pruning and LoRA."""
    add_weights_argument(parser)
    if prune:
        add_prune_arguments(parser)
    if lora:
        add_lora_arguments(parser)


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


def check_out_path(args, default):
    """The output path (--out or the default), checked writable before any work is done."""
    return check_writable(Path(args.out) if args.out else default)


def preset_recipe(recipe, preset, from_scratch=False):
    """A copy of recipe with, under --preset smoke, the smoke preset's epochs (SMOKE's pretrain_epochs for training
    from scratch) and batch size."""
    if preset != "smoke":
        return dict(recipe)
    return dict(recipe, epochs=SMOKE["pretrain_epochs" if from_scratch else "epochs"], batch_size=SMOKE["batch_size"])


def with_overrides(recipe, args, from_scratch=False):
    """A copy of recipe with the smoke preset's values (under --preset smoke) and --epochs/--lr/--batch-size."""
    recipe = preset_recipe(recipe, args.preset, from_scratch)
    recipe.update({k: getattr(args, k) for k in ("epochs", "lr", "batch_size") if getattr(args, k) is not None})
    return recipe


@dataclass
class Context:
    """Everything a method's unlearn() may need beside the model."""
    args: argparse.Namespace
    data: CIFAR10
    splits: Splits
    spec: ForgetSpec
    device: torch.device
    epochs: int
    lr: float
    batch_size: int
    original: nn.Module | None = None
    prune_amount: float | None = None
    prune_mode: str | None = None
    lora: LoraSettings | None = None
    hyperparameters: dict | None = None  # a method's own settings, saved in the checkpoint's meta

    def retain_batches(self):
        return Batches(self.data.train_images, self.data.train_labels, self.splits.retain_idx, self.batch_size,
                       seed=self.args.seed)

    def forget_batches(self, batch_size=None):
        return Batches(self.data.train_images, self.data.train_labels, self.splits.forget_idx,
                       batch_size or self.batch_size, seed=self.args.seed)

    def example_input(self):
        return normalize(self.data.train_images[:2])

    def prune(self, model):
        """Prune model by --prune-amount and --prune-mode, recording both in the checkpoint's meta."""
        self.prune_amount = self.args.prune_amount
        self.prune_mode = self.args.prune_mode
        return prune(model, self.prune_amount, self.prune_mode)

    def add_lora(self, model):
        """Attach LoRA adapters configured by the arch's defaults and the --lora-* flags."""
        self.lora = lora_settings(self.args.arch, self.args, model)
        return add_lora(model, self.lora, self.example_input())


def add_batchnorm_argument(parser):
    """--bn of the LoRA scripts: whether BatchNorm statistics may move while the adapters train."""
    parser.add_argument("--bn", default="train", choices=BATCHNORM_MODES,
                        help="train: BatchNorm layers run in train mode, so their running statistics move to the "
                             "retain set's (the paper's behaviour); frozen: they stay in eval mode and keep the "
                             "original model's statistics (default: train; the ViT has no BatchNorm)")


def train_on_retain(model, ctx):
    """The paper's training step: cross-entropy on the retain set (BatchNorm in eval mode under --bn frozen)."""
    batchnorm = getattr(ctx.args, "bn", None)  # only the LoRA scripts have --bn
    if batchnorm is not None:
        ctx.hyperparameters = {**(ctx.hyperparameters or {}), "bn": batchnorm}
    return train(model, ctx.retain_batches(), ctx.epochs, ctx.lr, desc=ctx.args.method,
                 freeze_batchnorm=batchnorm == "frozen")


def run_method(method, unlearn, doc, argv=None, add_arguments=None, fit=train_on_retain, prunes=False,
               uses_lora=False):
    """Command-line entry of an unlearning script: load the original, unlearn(model, ctx), fit, save.

    unlearn prepares the model (prune, attach LoRA, ...) and returns it; fit(model, ctx) trains it
    (cross-entropy on the retain set unless the method brings its own). Both are timed as the RTE.
    prunes / uses_lora give the script the --prune-* / --lora-* flags; a script without them rejects them."""
    def main(argv):
        parser = make_parser(doc)
        add_common_arguments(parser)
        add_method_arguments(parser, prune=prunes, lora=uses_lora)
        if add_arguments is not None:
            add_arguments(parser)
        args = parser.parse_args(argv)
        args.method = method
        recipe = preset_recipe(getattr(args, "recipe", PAPER_RECIPE), args.preset)
        with deterministic_mode(args.deterministic):
            return unlearn_and_save(args, unlearn, fit, name_settings(parser, args, recipe))
    return cli(main, argv)


def unlearn_and_save(args, unlearn, fit=train_on_retain, settings=None):
    """Load the original model and data, unlearn and fit, then save; every input is checked before training.

    settings: the non-default model-changing flags (name_settings), named in the default output path."""
    spec = forget_spec_from_args(args) or ForgetSpec()
    out = check_out_path(args, weights_path(args.arch, args.method, args.preset, spec, settings=settings))
    source = Path(args.weights) if args.weights else weights_path(args.arch, "original", args.preset)
    if not source.is_file():
        smoke = " --preset smoke" if args.preset == "smoke" else ""
        raise UserError(f"no original model at {source}: run `python pretrain.py --arch {args.arch}{smoke}` first, "
                        f"or pass --weights PATH")
    device = torch.device(args.device)
    model, source_meta = load_checkpoint(source, device, arch=args.arch)
    model = to_device(model, device)
    if source_meta.get("preset", "full") != args.preset:
        raise UserError(f"{source} was trained with --preset {source_meta.get('preset')}, not {args.preset}")
    data = load_cifar10(args.data, device, args.preset)
    splits = make_splits(data.train_labels, data.test_labels, spec)
    check_splits(splits, spec, args.data)
    recipe = with_overrides(getattr(args, "recipe", PAPER_RECIPE), args)
    ctx = Context(args, data, splits, spec, device, recipe["epochs"], recipe["lr"], recipe["batch_size"])
    if getattr(args, "needs_original", False):
        ctx.original = copy.deepcopy(model)
    seed_everything(args.seed)
    print(f"{args.method}: {len(splits.retain_idx)} retain and {len(splits.forget_idx)} forget images, "
          f"{ctx.epochs} epoch(s) on {device_name(device)}", flush=True)
    warm_up_on(model, data, splits.retain_idx, ctx.batch_size)
    with Measure(device) as measure:
        model = fit(unlearn(model, ctx), ctx)
    model = finalize(model)
    meta = run_meta(args, spec, ctx.epochs, ctx.lr, ctx.batch_size, len(splits.retain_idx), measure)
    meta.update(source_weights=str(source), prune_amount=ctx.prune_amount,
                prune_mode=ctx.prune_mode if ctx.prune_amount else None,
                lora=asdict(ctx.lora) if ctx.lora else None, settings=settings or {}, **model_cost(model))
    if ctx.hyperparameters:
        meta["hyperparameters"] = ctx.hyperparameters
    save_checkpoint(out, model, meta)
    report_saved(out, meta)
    return out


def check_splits(splits, spec, data_root):
    """Refuse a forget or retain set without images (e.g. a class absent from a subset of the data)."""
    what = f"random {spec.random_fraction}" if spec.random_fraction is not None else \
        f"class {', '.join(map(str, spec.classes))}"
    if not len(splits.forget_idx):
        raise UserError(f"the forget set ({what}) holds no training image of the data under {data_root}")
    if not len(splits.retain_idx):
        raise UserError(f"the retain set is empty: the forget set ({what}) covers every training image")


def run_meta(args, spec, epochs, lr, batch_size, train_images, measure):
    """Checkpoint meta shared by every training script."""
    return {"arch": args.arch, "preset": args.preset, "method": args.method,
            "forget": spec.to_dict() if spec else None, "seed": args.seed, "epochs": epochs, "lr": lr,
            "batch_size": batch_size, "train_images": train_images, "prune_amount": None, "prune_mode": None,
            "lora": None, "rte_s": measure.seconds, "peak_gpu_mem_mb": measure.peak_gpu_mem_mb,
            "device": device_name(args.device), "deterministic": getattr(args, "deterministic", False),
            "versions": library_versions(),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def report_saved(out, meta):
    memory = f", peak GPU memory {meta['peak_gpu_mem_mb']:.0f} MB" if meta["peak_gpu_mem_mb"] is not None else ""
    print(f"{meta['method']}: {meta['rte_s']:.1f} s on {meta['device']}{memory} -> {out}")


def add_pretrain_option_arguments(parser):
    """--mixup, --cutmix and --compile of pretrain.py and retrain.py: override the recipe's PRETRAIN_OPTIONS."""
    parser.add_argument("--mixup", dest="mixup_alpha", type=nonnegative_float, metavar="ALPHA",
                        help="mixup on the device: each batch blended with its reverse by a Beta(ALPHA, ALPHA) weight, "
                             "soft targets; 0: off (default: the recipe's, off unless it sets mixup_alpha)")
    parser.add_argument("--cutmix", dest="cutmix_alpha", type=nonnegative_float, metavar="ALPHA",
                        help="cutmix on the device: a box of the reversed batch pasted in, its area from "
                             "Beta(ALPHA, ALPHA); with --mixup, switch_prob of the mixed batches use cutmix; 0: off "
                             "(default: the recipe's, off unless it sets cutmix_alpha)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="torch.compile the model for training; compile time counts in the RTE (default: the "
                             "recipe's, off unless it sets compile)")


def run_from_scratch(method, doc, argv=None):
    """Command-line entry of pretrain.py (all training images) and retrain.py (the retain set only)."""
    def main(argv):
        parser = make_parser(doc)
        add_common_arguments(parser)
        parser.add_argument("--eval-every", type=nonnegative_int, metavar="N",
                            help="print test accuracy and images/s after every N-th epoch and the last, saved as "
                                 "meta['curve'] (retrain: the test images of the retained classes); 0: never "
                                 "(default: about ten points per run, epochs // 10)")
        add_pretrain_option_arguments(parser)
        args = parser.parse_args(argv)
        args.method = method
        spec = (forget_spec_from_args(args) or ForgetSpec()) if method == "retrain" else None
        if method != "retrain" and forget_spec_from_args(args) is not None:
            raise UserError("pretrain.py trains on every training image; forget flags belong to retrain.py")
        settings = name_settings(parser, args, {**PRETRAIN_OPTIONS, **preset_recipe(PRETRAIN_RECIPES[args.arch],
                                                                                    args.preset, from_scratch=True)})
        out = check_out_path(args, weights_path(args.arch, method, args.preset, spec, settings=settings))
        with deterministic_mode(args.deterministic):
            device = torch.device(args.device)
            data = load_cifar10(args.data, device, args.preset)
            all_test = torch.arange(len(data.test_labels), device=device)
            if spec:
                splits = make_splits(data.train_labels, data.test_labels, spec)
                check_splits(splits, spec, args.data)
                idx, test_idx = splits.retain_idx, splits.test_idx
            else:
                idx, test_idx = torch.arange(len(data.train_labels), device=device), all_test
            recipe = {**PRETRAIN_OPTIONS, **with_overrides(PRETRAIN_RECIPES[args.arch], args, from_scratch=True)}
            recipe.update({key: getattr(args, key) for key in ("mixup_alpha", "cutmix_alpha", "compile")
                           if getattr(args, key) is not None})
            seed_everything(args.seed)
            model = to_device(build_model(args.arch, args.preset), device)
            print(f"{method}: {len(idx)} training images, {recipe['epochs']} epoch(s) on {device_name(device)}",
                  flush=True)
            warm_up_on(model, data, idx, recipe["batch_size"])
            every = default_eval_every(recipe["epochs"]) if args.eval_every is None else args.eval_every
            curve = AccuracyCurve(model, data.test_images, data.test_labels, test_idx, every, recipe["epochs"],
                                  len(idx), desc=method)
            with Measure(device) as measure:
                curve.begin()
                train_from_scratch(model, data, idx, recipe, args.seed, desc=method, curve=curve)
            measure.seconds -= curve.eval_seconds  # evaluation points are not training time
            meta = run_meta(args, spec, recipe["epochs"], recipe["lr"], recipe["batch_size"], len(idx), measure)
            meta.update(recipe=recipe, settings=settings, eval_every=every, curve=curve.points)
            save_checkpoint(out, model, meta)
            test_accuracy = accuracy(predict(model, data.test_images, all_test), data.test_labels)
        report_saved(out, meta)
        print(f"test accuracy (all classes): {test_accuracy:.2f} %")
        return out
    return cli(main, argv)


# ---------------------------------------------------------------------------------------- evaluation

METRIC_KEYS = ("UA", "RA", "TA", "MIA_efficacy")


def evaluate_checkpoint(path, data_root, device, spec=None, seed=None, data_cache=None, extra_metrics=None):
    """Metrics of one checkpoint as a dict with keys path, arch, method, UA, RA, TA, MIA_efficacy, RTE_s,
    peak_gpu_mem_mb (and forget, seed, preset). The forget setting is the checkpoint's unless spec is given;
    a checkpoint without one (the original model) is scored on the default (class 3). The MIA draws its
    samples with the seed recorded in the checkpoint unless seed is given.
    extra_metrics(model, meta, data, splits, spec, seed) -> dict adds further metrics (representation.py's)."""
    model, meta = load_checkpoint(path, device)
    if seed is None:
        seed = meta.get("seed") or 0
    spec = spec or (ForgetSpec.from_dict(meta["forget"]) if meta.get("forget") else ForgetSpec())
    preset = meta.get("preset", "full")
    cache = {} if data_cache is None else data_cache
    if (data_root, preset) not in cache:
        cache[(data_root, preset)] = load_cifar10(data_root, device, preset)
    data = cache[(data_root, preset)]
    splits = make_splits(data.train_labels, data.test_labels, spec)
    metrics = evaluate_model(model, data, splits, seed)
    if extra_metrics is not None:
        metrics.update(extra_metrics(model, meta, data, splits, spec, seed))
    return {"path": str(path), "arch": meta["arch"], "method": meta.get("method"), **metrics,
            "RTE_s": meta.get("rte_s"), "peak_gpu_mem_mb": meta.get("peak_gpu_mem_mb"),
            "forget": spec.tag, "seed": meta.get("seed"), "preset": preset}


def format_cell(value, digits=2):
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows, columns):
    """A markdown table of dict rows; columns maps key -> header."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(row.get(key)) for key in columns) + " |" for row in rows]
    return "\n".join(lines)


EVALUATE_COLUMNS = {"method": "method", "arch": "arch", "forget": "forget", "UA": "UA %", "RA": "RA %", "TA": "TA %",
                    "MIA_efficacy": "MIA-efficacy %", "RTE_s": "RTE s", "peak_gpu_mem_mb": "peak GPU MB",
                    "path": "checkpoint"}
