"""Constants and recipes, named once: the paper's unlearning recipe, the from-scratch recipes' options, pruning
defaults, the smoke preset, and the switch to the GPU's code paths. Each dataset's shape, classes and normalisation
are its entry in datasets.py; each arch's own settings (builder, pruning and LoRA targets, from-scratch recipe) are
its row in models.ARCHITECTURES."""
import contextlib
import os
from pathlib import Path

import torch

PRESETS = ("full", "smoke")
DEFAULT_FORGET_CLASS = 3
REPOSITORY = Path(__file__).resolve().parent.parent  # the scripts and requirements.txt
WEIGHTS_DIR = Path("model_weights")
RESULTS_DIR = Path("results")
# The paper's unlearning recipe (Adam, cross-entropy, no augmentation).
PAPER_RECIPE = {"epochs": 5, "lr": 1e-3, "batch_size": 128}
# The baselines' optimizer in their official code (Unlearn-Sparse / SalUn arg_parser.py, SCRUB's notebooks).
BASELINE_SGD = {"momentum": 0.9, "weight_decay": 5e-4}
# Optional PRETRAIN_RECIPES keys and the values that leave them off: a recipe without them trains exactly as before.
# mixup_alpha / cutmix_alpha: Beta(alpha, alpha) of mixup / cutmix (0: off); mix_prob: share of batches mixed;
# switch_prob: share of mixed batches that use cutmix when both are on (see mix_batch); compile: torch.compile;
# nesterov: Nesterov momentum of the "sgd" optimizer; lr_milestones: instead of the one-cycle schedule, the lr times
# 0.1 after each of these shares of the epochs (a multi-step schedule; None: one-cycle); augment: random crop of the
# training batches, and flips where the dataset allows them (False: the batches as they are).
PRETRAIN_OPTIONS = {"mixup_alpha": 0.0, "cutmix_alpha": 0.0, "mix_prob": 1.0, "switch_prob": 0.5, "compile": False,
                    "nesterov": True, "lr_milestones": None, "augment": True}
# A tiny configuration that runs every script end to end on a CPU in seconds.
SMOKE = {"train_per_class": 30, "test_per_class": 10, "epochs": 1, "pretrain_epochs": 3, "batch_size": 64}
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



def preset_recipe(recipe, preset, from_scratch=False):
    """A copy of recipe with, under --preset smoke, the smoke preset's epochs (SMOKE's pretrain_epochs for training
    from scratch) and batch size."""
    if preset != "smoke":
        return dict(recipe)
    return dict(recipe, epochs=SMOKE["pretrain_epochs" if from_scratch else "epochs"], batch_size=SMOKE["batch_size"])
