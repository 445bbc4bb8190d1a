"""What to forget: whole classes or a seeded random fraction, and the forget/retain/test index sets."""
from dataclasses import dataclass
from decimal import Decimal

import torch

from .datasets import DATASETS
from .errors import UserError
from .settings import DEFAULT_FORGET_CLASS


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
    """ForgetSpec from --forget-class / --forget-random / --forget-seed (None when none was given); the classes
    must be --dataset's (a script without --dataset, evaluate.py, checks them against each checkpoint's)."""
    if args.forget_random is not None:
        if args.forget_class is not None:
            raise UserError("give either --forget-class or --forget-random, not both")
        if not 0 < args.forget_random < 1:
            raise UserError(f"--forget-random must lie strictly between 0 and 1, got {args.forget_random}")
        return ForgetSpec((), args.forget_random, args.forget_seed)
    if args.forget_class is None:
        return None
    spec = ForgetSpec(tuple(sorted(set(args.forget_class))))  # the forget seed only draws random subsets
    if getattr(args, "dataset", None) is not None:
        check_classes(spec, args.dataset)
    return spec


def check_classes(spec, dataset, flag="--forget-class"):
    """Refuse forget classes (given by flag) outside the dataset's range, or all of its classes."""
    info = DATASETS[dataset]
    outside = [c for c in spec.classes if not 0 <= c < info.num_classes]
    if outside:
        raise UserError(f"{flag} {outside[0]} is out of range: {dataset} has classes 0..{info.num_classes - 1}")
    if len(spec.classes) == info.num_classes:
        raise UserError("cannot forget every class: nothing would be left to retain")


def check_splits(splits, spec, data_root):
    """Refuse a forget or retain set without images (e.g. a class absent from a subset of the data)."""
    what = f"random {spec.random_fraction}" if spec.random_fraction is not None else \
        f"class {', '.join(map(str, spec.classes))}"
    if not len(splits.forget_idx):
        raise UserError(f"the forget set ({what}) holds no training image of the data under {data_root}")
    if not len(splits.retain_idx):
        raise UserError(f"the retain set is empty: the forget set ({what}) covers every training image")
