"""LoRA adapters through peft: settings per arch, attaching them (checked to be called), merging them away."""
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .errors import UserError
from .models import is_channels_last, keep_layout
from .pruning import make_masks_permanent, output_mask, pruned_layers
from .settings import LORA_DEFAULTS


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


def add_lora(model, settings, example_input):
    """Freeze the model and attach peft LoRA adapters; checks that every adapter is called in forward.

    Adapters on a pruned layer have their output rows masked like the layer, so merging keeps pruned
    channels at zero and the merged model computes exactly what the adapted one did. The frozen base layers' masks
    are then made permanent, so no step recomputes a masked weight that never changes.

    peft casts an adapter's input to the adapter weights' dtype (fp32). Without adapter dropout (--lora-dropout 0,
    where peft puts nn.Identity) that cast is switched off: under bf16 autocast the adapter's convolution or linear
    layer casts the input back to bf16, so the cast changes no value but makes a copy of every adapted layer's input
    that the backward pass keeps. With dropout the cast stays, since dropout on bf16 draws other masks."""
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
