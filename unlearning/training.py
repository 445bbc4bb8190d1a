"""The one training loop (Adam + cross-entropy, bf16 autocast on GPU, no per-step host syncs), the optimizers,
and the from-scratch recipe with optional on-device mixup/cutmix."""
import contextlib
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import compiling
from .compiling import compile_errors
from .data import Batches
from .errors import TrainingDiverged, UserError
from .settings import BASELINE_SGD, DIVERGENCE_CHECK_STEPS, PAPER_RECIPE, PRETRAIN_OPTIONS, gpu_shaped
from .tracking import active


def autocast(device):
    """bf16 autocast on GPU (and on a CPU in the GPU-shaped mode, settings.gpu_shaped), plain fp32 elsewhere."""
    device = torch.device(device)
    if gpu_shaped(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cross_entropy(model, inputs, labels):
    return F.cross_entropy(model(inputs), labels)


def make_adam(params, lr):
    """Adam, fused (one kernel for every parameter, no per-parameter host read of the step) on the GPU's path."""
    params = list(params)
    return torch.optim.Adam(params, lr=lr, fused=gpu_shaped(params[0].device))


def make_sgd(params, lr, weight_decay=BASELINE_SGD["weight_decay"]):
    """SGD with the momentum of the baselines' official code (Unlearn-Sparse, SalUn, SCRUB); on the GPU's path the
    multi-tensor (foreach) update that torch picks by default on CUDA."""
    params = list(params)
    return torch.optim.SGD(params, lr=lr, momentum=BASELINE_SGD["momentum"], weight_decay=weight_decay,
                           foreach=gpu_shaped(params[0].device) or None)


def train(model, batches, epochs, lr=PAPER_RECIPE["lr"], loss_fn=cross_entropy, optimizer=None, scheduler=None,
          before_step=None, after_epoch=None, desc="train", freeze_batchnorm=False):
    """The one training loop: Adam + cross-entropy by default, bf16 autocast on GPU, no host syncs per step.

    loss_fn(model, inputs, labels) -> scalar; before_step() runs between backward and the optimizer step;
    after_epoch(epoch) after each epoch (1-based). freeze_batchnorm keeps BatchNorm layers in eval mode: they
    normalise with, and keep, their running statistics. A NaN or infinite loss raises TrainingDiverged naming the
    epoch and step. Inside a compiling() block (--compile) loss_fn gets the model's compiled wrapper (which shares
    its parameters and buffers)."""
    device = next(model.parameters()).device
    optimizer = optimizer or make_adam((p for p in model.parameters() if p.requires_grad), lr)
    training_mode(model, freeze_batchnorm)
    compiled = compiling.active()
    stepped = compiled.model(model) if compiled else model
    # Reading the loss on the host every step would stall the GPU queue. Instead the first non-finite step and
    # its loss are kept on the device and read every DIVERGENCE_CHECK_STEPS steps and at each epoch's end.
    bad_step = torch.full((), -1, dtype=torch.int64, device=device)
    bad_loss = torch.zeros((), device=device)
    tracker = active()  # --track: logs the losses kept on the device when the flag is read, never per step
    for epoch in range(1, epochs + 1):
        tracker.begin_epoch()
        for step, (inputs, labels) in enumerate(tqdm(batches, desc=f"{desc} epoch {epoch}/{epochs}", leave=False,
                                                     disable=None), start=1):
            if compiled:
                compiled.step_begins()
            with autocast(device):
                loss = loss_fn(stepped, inputs, labels)
            first_bad = (bad_step < 0) & ~torch.isfinite(loss.detach())
            bad_step = torch.where(first_bad, step, bad_step)
            bad_loss = torch.where(first_bad, loss.detach().float(), bad_loss)
            tracker.record_step(loss, optimizer, len(labels))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if before_step is not None:
                before_step()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if step % DIVERGENCE_CHECK_STEPS == 0:
                tracker.read_steps()  # first, so that a tracked run that diverged shows its last losses
                _check_finite(bad_step, bad_loss, desc, epoch, epochs, len(batches))
        tracker.read_steps()
        _check_finite(bad_step, bad_loss, desc, epoch, epochs, len(batches))
        tracker.end_epoch()
        if after_epoch is not None:
            after_epoch(epoch)
    return model


def training_mode(model, freeze_batchnorm=False):
    """The modes train() runs model in: train mode, BatchNorm layers in eval mode under freeze_batchnorm."""
    model.train()
    if freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _check_finite(bad_step, bad_loss, desc, epoch, epochs, steps):
    if bad_step.item() >= 0:
        raise TrainingDiverged(f"training diverged ({desc}): the loss became {bad_loss.item()} at epoch "
                               f"{epoch}/{epochs}, step {bad_step.item()}/{steps}; no checkpoint written "
                               f"(a lower --lr may help)")


def beta_sample(alpha, generator, device):
    """One Beta(alpha, alpha) draw on the device: the first coordinate of a Dirichlet(alpha, alpha), as
    torch.distributions.Beta draws it, but from a given generator (torch.distributions takes none)."""
    return torch._sample_dirichlet(torch.full((2,), float(alpha), device=device), generator=generator)[0]


def mix_batch(inputs, labels, generator, mixup_alpha=0.0, cutmix_alpha=0.0, mix_prob=1.0, switch_prob=0.5,
              num_classes=10):
    """(mixed inputs, soft targets [N, num_classes]): the batch mixed with its reverse, like timm's Mixup in batch
    mode. With probability mix_prob the batch is mixed, by cutmix with probability switch_prob when both alphas are
    on, else by the one that is on. Mixup blends whole images with weight lam ~ Beta(mixup_alpha, mixup_alpha);
    cutmix pastes a box of the partner image of area about (1 - lam) with lam ~ Beta(cutmix_alpha, cutmix_alpha),
    then sets lam to the share of the image outside the box. The targets put lam on an image's label and 1 - lam on
    its partner's. With both alphas 0 the inputs come back unchanged with one-hot targets and nothing is drawn.

    timm's Mixup is not used: it draws from numpy's global generator (repeatable only if nothing else uses it) and
    needs an even batch size, while the last batch of an epoch may be odd. Here every draw comes from `generator`
    (the batches' own, on the device), the same draws for every batch, so a seed repeats a run, and no step reads a
    value back to the host: the box is a mask, not Python slice bounds."""
    targets = torch.zeros(len(labels), num_classes, device=labels.device).scatter_(1, labels[:, None], 1.0)
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
    batches = Batches(data.train_images, data.train_labels, idx, recipe["batch_size"], seed=seed,
                      augment=options["augment"], dataset=data.dataset)
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(params, lr=recipe["lr"], momentum=0.9, nesterov=options["nesterov"],
                                    weight_decay=recipe["weight_decay"])
    else:
        optimizer = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    scheduler = lr_schedule(optimizer, options, len(batches))
    smoothing = recipe["label_smoothing"]
    mixing = {key: options[key] for key in ("mixup_alpha", "cutmix_alpha", "mix_prob", "switch_prob")}
    mixes = bool(mixing["mixup_alpha"] or mixing["cutmix_alpha"])

    def smoothed_cross_entropy(model, inputs, labels):
        if mixes:  # soft targets; cross_entropy smooths them as it does labels: (1 - s) * targets + s / classes
            inputs, labels = mix_batch(inputs, labels, batches.generator, **mixing, num_classes=data.num_classes)
        return F.cross_entropy(model(inputs), labels, label_smoothing=smoothing)

    trained = model
    if options["compile"]:
        # Compiled lazily at the first steps, so compile time is part of the training time (the RTE). Static shapes:
        # the last, smaller batch of an epoch gets a graph of its own instead of making every step's graph dynamic.
        trained = torch.compile(model, backend=compiling.COMPILE_BACKEND, dynamic=False)
    with compile_errors():
        train(trained, batches, recipe["epochs"], loss_fn=smoothed_cross_entropy, optimizer=optimizer,
              scheduler=scheduler, after_epoch=curve, desc=desc)
    return model


def lr_schedule(optimizer, recipe, steps_per_epoch):
    """The recipe's schedule, stepped once per batch: one-cycle (warm-up over warmup_fraction of the steps), or with
    lr_milestones the lr times 0.1 after each milestone's share of the epochs, rounded down to a whole epoch (0.5 and
    0.75 of 182 epochs: after epochs 91 and 136, as Unlearn-Sparse's MultiStepLR)."""
    if recipe["lr_milestones"]:
        milestones = [int(share * recipe["epochs"]) * steps_per_epoch for share in recipe["lr_milestones"]]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe["lr"],
                                               total_steps=recipe["epochs"] * steps_per_epoch,
                                               pct_start=recipe["warmup_fraction"])


def seed_everything(seed):
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_mode(enabled):
    """With enabled, only deterministic kernels inside the block (an op without one raises), cuDNN autotuning off;
    the previous settings, CUBLAS_WORKSPACE_CONFIG included, come back afterwards. CUBLAS_WORKSPACE_CONFIG must be
    set before cuBLAS starts, so this runs before the model or the data reach the GPU."""
    if not enabled:
        yield
        return
    workspace_config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
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
        if workspace_config is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
