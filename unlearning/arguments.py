"""Argument helpers shared by the scripts: a parser with one-line errors, range-checked number types and the
flag groups (device, forget setting, pruning, LoRA, ...)."""
import argparse
from pathlib import Path

import torch

from .datasets import DATASET_NAMES, DEFAULT_DATASET
from .files import check_writable
from .models import ARCHS, LORA_DEFAULTS
from .settings import (
    BATCHNORM_MODES,
    DEFAULT_FORGET_CLASS,
    PRESETS,
    PRUNE_AMOUNT,
    PRUNE_MODES,
    preset_recipe,
)
from .weights import DESCRIBED_FIELDS


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


def add_forget_arguments(parser):
    parser.add_argument("--forget-class", type=nonnegative_int, nargs="+", metavar="C",
                        help=f"forget every training image of these classes, below the dataset's class count "
                             f"(default: {DEFAULT_FORGET_CLASS})")
    parser.add_argument("--forget-random", type=open_unit_interval, metavar="FRACTION",
                        help="forget a seeded random FRACTION of the training images instead")
    parser.add_argument("--forget-seed", type=seed_int, default=0, help="seed of the random forget subset (default: 0)")


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
    add_dataset_arguments(parser)
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


def add_dataset_arguments(parser, dataset=True):
    """--data (the folder) and, unless the dataset comes from elsewhere (a checkpoint's meta), --dataset."""
    parser.add_argument("--data", default="data", help="folder holding each dataset in its standard layout, e.g. "
                                                       "cifar-10-batches-py (default: data; see docs/data.md)")
    if dataset:
        parser.add_argument("--dataset", default=DEFAULT_DATASET, choices=DATASET_NAMES,
                            help=f"dataset to train and evaluate on (default: {DEFAULT_DATASET})")


def add_seed_argument(parser, what):
    parser.add_argument("--seed", type=seed_int, default=0, help=f"{what} (default: 0)")


def add_weights_argument(parser):
    parser.add_argument("--weights", help="original model to unlearn from: a checkpoint of this project, a plain or "
                                          "wrapped state dict (.pth) or a .safetensors file; --arch, --preset and "
                                          "--dataset describe one without this project's meta (default: "
                                          "model_weights/{arch}_original.pth)")


def add_described_arguments(parser):
    """One flag per weights.DESCRIBED_FIELDS field (--arch, --preset, ...), for weights without this project's meta
    (evaluate.py, export.py); left out, a flag says nothing."""
    for field, spec in DESCRIBED_FIELDS.items():
        default = f"default: {spec.default}" if spec.default else "needed for weights that do not say it"
        parser.add_argument(spec.flag, dest=field, choices=spec.choices,
                            help=f"{spec.help}; a file's own meta wins, and a flag that contradicts it is an "
                                 f"error ({default})")


def add_prune_arguments(parser):
    parser.add_argument("--prune-amount", type=unit_interval_open_above, default=PRUNE_AMOUNT,
                        help="share of output channels/features pruned per layer (default: 0.5)")
    parser.add_argument("--prune-mode", default="mask", choices=PRUNE_MODES,
                        help="mask: zero pruned channels in place, as in the paper; physical: remove them with "
                             "torch-pruning, so training and inference run on a smaller network (default: mask)")


def per_arch(key, text=str):
    """'resnet18: 8, ..., vit: 16': an LORA_DEFAULTS entry of every arch, for --help."""
    return ", ".join(f"{arch}: {text(defaults[key])}" for arch, defaults in LORA_DEFAULTS.items())


def add_lora_arguments(parser):
    parser.add_argument("--lora-rank", type=positive_int, help=f"LoRA rank (default: {per_arch('rank')})")
    parser.add_argument("--lora-alpha", type=positive_int, help=f"LoRA alpha (default: {per_arch('alpha')})")
    parser.add_argument("--lora-dropout", type=unit_interval_open_above, help="LoRA dropout (default: 0.1)")
    parser.add_argument("--lora-targets",
                        help="regex of module names given adapters (default: per arch, see docs/methods.md)")
    parser.add_argument("--lora-train-full", nargs="*",
                        help="modules trained in full beside the adapters (default: "
                             f"{per_arch('train_full', lambda names: ' '.join(names) or 'none')})")


def add_compile_argument(parser):
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the training step (inductor; on a GPU replayed as CUDA graphs), compiled "
                             "in the untimed warm-up: compile seconds are recorded apart from the RTE (see "
                             "docs/methods.md)")


def add_method_arguments(parser, prune=True, lora=True):
    """Flags of the unlearning scripts: source weights, --compile and, for the methods that use them, pruning and
    LoRA."""
    add_weights_argument(parser)
    add_compile_argument(parser)
    if prune:
        add_prune_arguments(parser)
    if lora:
        add_lora_arguments(parser)


def check_out_path(args, default):
    """The output path (--out or the default), checked writable before any work is done."""
    return check_writable(Path(args.out) if args.out else default)


def with_overrides(recipe, args, from_scratch=False):
    """A copy of recipe with the smoke preset's values (under --preset smoke) and --epochs/--lr/--batch-size."""
    recipe = preset_recipe(recipe, args.preset, from_scratch)
    recipe.update({k: getattr(args, k) for k in ("epochs", "lr", "batch_size") if getattr(args, k) is not None})
    return recipe


def add_batchnorm_argument(parser):
    """--bn of the LoRA scripts: whether BatchNorm statistics may move while the adapters train."""
    parser.add_argument("--bn", default="train", choices=BATCHNORM_MODES,
                        help="train: BatchNorm layers run in train mode, so their running statistics move to the "
                             "retain set's (the paper's behaviour); frozen: they stay in eval mode and keep the "
                             "original model's statistics (default: train; the ViT has no BatchNorm)")


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
