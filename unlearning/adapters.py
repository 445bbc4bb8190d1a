"""LoRA adapters through peft: settings per arch, attaching them (checked to be called) with their dropped input
recomputed in backward, merging them away."""
import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune
from torch.utils.checkpoint import checkpoint

from .errors import UserError
from .models import LORA_DEFAULTS, is_channels_last, keep_layout
from .pruning import make_masks_permanent, output_mask, pruned_layers


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


def import_peft():
    """peft (it pulls in transformers: seconds of start-up), imported where LoRA is used: run_method imports it
    before its timed block, so that no RTE holds it."""
    import peft
    import peft.tuners.lora
    return peft


def add_lora(model, settings, example_input, recompute_branch=True):
    """Freeze the model and attach peft LoRA adapters; checks that every adapter is called in forward.

    Adapters on a pruned layer have their output rows masked like the layer, so merging keeps pruned
    channels at zero and the merged model computes exactly what the adapted one did. The frozen base layers' masks
    are then made permanent, so no step recomputes a masked weight that never changes.

    peft casts an adapter's input to the adapter weights' dtype (fp32). Without adapter dropout (--lora-dropout 0,
    where peft puts nn.Identity) that cast is switched off: under bf16 autocast the adapter's convolution or linear
    layer casts the input back to bf16, so the cast changes no value but makes a copy of every adapted layer's input
    that the backward pass keeps. With dropout the cast stays, since dropout on bf16 draws other masks.

    With recompute_branch (the default) the dropped input of every adapter with dropout (input cast -> dropout,
    the input of lora_A) is recomputed in the backward pass (recompute_adapter_branches): training computes what
    plain peft computes with the same FLOPs, and keeps for backward what peft keeps without dropout: the layer's
    input and the rank-r hidden tensor. Without dropout the branch is left to peft, which with its cast off keeps
    just that."""
    peft = import_peft()
    LoraLayer = peft.tuners.lora.LoraLayer  # noqa: N806 (a class)
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.targets, modules_to_save=settings.train_full or None)
    channels_last = is_channels_last(model)
    try:
        peft_model = peft.get_peft_model(model, config)
    except ValueError as error:
        raise UserError(f"LoRA targets {settings.targets!r}: {error}".splitlines()[0]) from None
    adapters = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    for adapter in adapters:
        adapter.cast_input_dtype_enabled = any(isinstance(d, nn.Dropout) for d in adapter.lora_dropout.values())
        base = adapter.get_base_layer()
        if hasattr(base, "weight_mask"):
            for lora_b in adapter.lora_B.values():
                row_mask = output_mask(base).view(-1, *[1] * (lora_b.weight.dim() - 1)).expand_as(lora_b.weight)
                torch_prune.custom_from_mask(lora_b, "weight", row_mask.clone())
    make_masks_permanent(peft_model)
    peft_model = keep_layout(peft_model, channels_last)  # peft makes the adapter weights contiguous
    if recompute_branch:
        recompute_adapter_branches([a for a in adapters if a.cast_input_dtype_enabled])
    _assert_called(peft_model, adapters, example_input)
    return peft_model


def recompute_adapter_branches(adapters):
    """Make each peft LoRA layer (linear or convolution) recompute its adapter input in the backward pass.

    peft computes base(x) + lora_B(lora_A(dropout(cast(x)))) * scaling. With adapter dropout the branch keeps, for
    backward, the dropout mask and a second copy of every adapted layer's input (the dropped one, cast to the
    adapter weights' dtype, and under bf16 autocast cast back): at the paper's dropout 0.1 more than all of full
    fine-tuning's activations on ResNet-50. Here cast -> dropout -> lora_A runs inside torch.utils.checkpoint
    (non-reentrant, RNG state preserved, early stop): its forward keeps only its input x, which the layer's input
    already is, and backward redraws the same dropout mask and recasts under the same autocast state, then stops
    as soon as lora_A's saved inputs are rebuilt, before lora_A's own forward would run again (autograd saves an
    op's inputs before it runs the op). lora_B and the scaling stay outside, so lora_B keeps the rank-r hidden
    tensor as it does without dropout, and neither adapter weight's forward is recomputed. Values and gradients are
    those of plain peft. Outside training with gradients (evaluation, no_grad) and in peft's other modes (merged,
    disabled, variants, mixed adapter batches) the layer runs peft's own forward."""
    for adapter in adapters:
        adapter.forward = functools.partial(_forward_recomputing_branch, adapter)


def _forward_recomputing_branch(layer, x, *args, **kwargs):
    """peft's vanilla LoRA forward (lora.Linear, lora.Conv2d), with lora_A's dropped input recomputed in backward."""
    if not torch.is_grad_enabled() or layer.disable_adapters or layer.merged or layer.lora_variant or kwargs:
        return type(layer).forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x, *args)
    result_dtype = result.dtype
    for name in layer.active_adapters:
        if name in layer.lora_A:
            hidden = checkpoint(_dropped_lora_a, layer, name, x, use_reentrant=False, preserve_rng_state=True,
                                early_stop=True)
            result = result + layer.lora_B[name](hidden) * layer.scaling[name]
    return result.to(result_dtype)


def _dropped_lora_a(layer, name, x):
    x = layer._cast_input_dtype(x, layer.lora_A[name].weight.dtype)
    return layer.lora_A[name](layer.lora_dropout[name](x))


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
