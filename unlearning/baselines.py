"""Pieces the baselines train with, shared by their scripts and bench.py's cost count: GA's loss, random other labels
(RL, SalUn), distillation and SCRUB's two losses, the L1 penalty (l1-sparse), SalUn's weight saliency and masked
gradient, and the defaults of their settings."""
import copy

import torch
import torch.nn.functional as F

from .datasets import DATASETS
from .training import cross_entropy, make_sgd

L1_ALPHA = 1e-4  # l1sparse.py's --l1-alpha
SALIENCY_SHARE = 0.5  # salun.py's --saliency-share
SCRUB_DISTILLATION = {"kd_temperature": 4.0, "kd_gamma": 0.99, "kd_alpha": 0.001}  # scrub.py's defaults


def negated_cross_entropy(model, inputs, labels):
    """GA's loss: gradient ascent on the cross-entropy."""
    return -cross_entropy(model, inputs, labels)


def random_other_labels(labels, generator=None, num_classes=10):
    """A uniformly random label of num_classes for each sample, never its true one."""
    shift = torch.randint(1, num_classes, labels.shape, device=labels.device, generator=generator)
    return (labels + shift) % num_classes


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
            yield inputs, random_other_labels(labels, self.generator, DATASETS[self.forget.dataset].num_classes)
        yield from self.retain


def distill_kl(student_logits, teacher_logits, temperature):
    """KL(teacher || student) of temperature-softened outputs, times T^2 (Hinton distillation, as in SCRUB)."""
    return F.kl_div(F.log_softmax(student_logits.float() / temperature, 1),
                    F.softmax(teacher_logits.float() / temperature, 1), reduction="batchmean") * temperature ** 2


def away_from_teacher(teacher, temperature):
    """SCRUB's max-step loss on the forget set: -KL(teacher || student)."""
    def loss_fn(model, inputs, labels):
        return -distill_kl(model(inputs), teacher(inputs), temperature)
    return loss_fn


def close_to_teacher(teacher, temperature, gamma, alpha):
    """SCRUB's min-step loss on the retain set: gamma * CE + alpha * KL(teacher || student)."""
    def loss_fn(model, inputs, labels):
        logits = model(inputs)
        return gamma * F.cross_entropy(logits, labels) + alpha * distill_kl(logits, teacher(inputs), temperature)
    return loss_fn


def l1_norm(model):
    """Sum of |w| over every trainable parameter, in a few multi-tensor (foreach) ops rather than a few per
    parameter."""
    return torch.stack(torch._foreach_norm([p for p in model.parameters() if p.requires_grad], 1)).sum()


def add_l1_gradient(params, weight):
    """Add weight * sign(w), the gradient of weight * l1_norm, to every parameter's gradient: two multi-tensor
    (foreach) ops in place of the few per parameter that differentiating the norm takes."""
    with torch.no_grad():
        with_grad = [p for p in params if p.grad is not None]
        if with_grad and weight:
            torch._foreach_add_([p.grad for p in with_grad], torch._foreach_sign(with_grad), alpha=weight)


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
        summed = [(saliency[name], p.grad) for name, p in params.items() if p.grad is not None]
        if summed:
            torch._foreach_add_(*map(list, zip(*summed, strict=True)))
        if optimizer is not None:
            optimizer.step()
    model.zero_grad(set_to_none=True)
    flat = torch.cat([s.abs().flatten() for s in saliency.values()])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, round(share * flat.numel()), sorted=False).indices] = True
    sizes = [p.numel() for p in params.values()]
    return {name: k.view_as(params[name]) for name, k in zip(params, keep.split(sizes), strict=True)}


def masked_gradient(params, mask, weight_decay):
    """SalUn's before_step: grad = (grad + weight_decay * w) * mask for every {name: bool mask} of mask, params
    {name: parameter}, in two multi-tensor (foreach) ops for all parameters."""
    masked = [(params[name], keep) for name, keep in mask.items()]

    def before_step():
        with torch.no_grad():
            with_grad = [(param.grad, param, keep) for param, keep in masked if param.grad is not None]
            if with_grad:
                grads, weights, keeps = map(list, zip(*with_grad, strict=True))
                torch._foreach_add_(grads, weights, alpha=weight_decay)
                torch._foreach_mul_(grads, keeps)
    return before_step
