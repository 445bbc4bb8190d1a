"""Constants and recipes, named once: the paper's unlearning recipe, the from-scratch recipes, LoRA and pruning
defaults, the smoke preset, and the switch to the GPU's code paths (each dataset's shape, classes and normalisation
are its entry in datasets.py)."""
import contextlib
import os
from pathlib import Path

import torch

ARCHS = ("resnet50", "vit")
PRESETS = ("full", "smoke")
DEFAULT_FORGET_CLASS = 3
REPOSITORY = Path(__file__).resolve().parent.parent  # the scripts and requirements.txt
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
# Changes to PRETRAIN_RECIPES for one (arch, dataset); a pair not listed trains with the arch's recipe, which
# CIFAR-100 and Tiny ImageNet share with CIFAR-10 (Unlearn-Sparse's and SalUn's main_train.py also train every
# dataset with one set of flags). SVHN: half the epochs, as its 73,257 training images are 1.5 times CIFAR's and
# digits are learnt faster (this project's choice); its batches are not flipped (datasets.py, as Unlearn-Sparse's
# dataset.py). None of these is sized on a GPU yet: the epochs are first guesses, to be checked against the
# accuracy curve pretrain.py records.
PRETRAIN_DATASET_CHANGES = {
    ("resnet50", "svhn"): {"epochs": 30},
    ("vit", "svhn"): {"epochs": 100},
}
# Optional PRETRAIN_RECIPES keys and the values that leave them off: a recipe without them trains exactly as before.
# mixup_alpha / cutmix_alpha: Beta(alpha, alpha) of mixup / cutmix (0: off); mix_prob: share of batches mixed;
# switch_prob: share of mixed batches that use cutmix when both are on (see mix_batch); compile: torch.compile.
PRETRAIN_OPTIONS = {"mixup_alpha": 0.0, "cutmix_alpha": 0.0, "mix_prob": 1.0, "switch_prob": 0.5, "compile": False}
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
# Set to 1, a CPU takes every branch a GPU takes that a CPU can run (bf16 autocast, channels-last, fused Adam),
# so CPU tests execute the code a GPU runs.
GPU_SHAPED_ENV = "UNLEARN_GPU_SHAPED"


def gpu_shaped(device):
    """Whether work on device takes the GPU's code paths: always on CUDA, on a CPU under UNLEARN_GPU_SHAPED=1."""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get(GPU_SHAPED_ENV) == "1")


@contextlib.contextmanager
def gpu_shaped_mode():
    """Inside the block a CPU takes the GPU's code paths (UNLEARN_GPU_SHAPED=1); the variable is as it was after."""
    before = os.environ.get(GPU_SHAPED_ENV)
    os.environ[GPU_SHAPED_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(GPU_SHAPED_ENV, None)
        else:
            os.environ[GPU_SHAPED_ENV] = before


def pretrain_recipe(arch, dataset):
    """The from-scratch recipe of arch on dataset: PRETRAIN_RECIPES[arch] with PRETRAIN_DATASET_CHANGES applied."""
    return {**PRETRAIN_RECIPES[arch], **PRETRAIN_DATASET_CHANGES.get((arch, dataset), {})}


def preset_recipe(recipe, preset, from_scratch=False):
    """A copy of recipe with, under --preset smoke, the smoke preset's epochs (SMOKE's pretrain_epochs for training
    from scratch) and batch size."""
    if preset != "smoke":
        return dict(recipe)
    return dict(recipe, epochs=SMOKE["pretrain_epochs" if from_scratch else "epochs"], batch_size=SMOKE["batch_size"])
