"""Structured L2 pruning: masks that stay in force (the paper's), or channels really removed (torch-pruning)."""
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .errors import UserError
from .models import architecture, count_parameters, input_size, is_channels_last, keep_layout
from .settings import PRUNE_AMOUNT

TRACE_BATCH_SIZE = 1  # images in the example batch torch-pruning traces the model with


def prune_targets(model):
    """Layers whose output channels/features are pruned, as the model's ARCHITECTURES row states them: the CNNs
    every conv, the ViT every MLP hidden layer."""
    return architecture(model).prune_targets(model)


def prune(model, amount=PRUNE_AMOUNT, mode="mask"):
    """Zero the `amount` share of output channels/features with the smallest L2 norm, per layer.

    The mask stays attached (torch.nn.utils.prune), so pruned weights stay exactly zero while training; it has the
    weight's dtype and layout, so weight_orig * mask needs no cast and keeps channels-last (make_masks_permanent
    removes the masks of weights that do not train).
    A layer's bias entries of pruned outputs are masked too, and so are the weight and bias of the BatchNorm
    that normalises its output (every ResNet conv has one), so a pruned unit outputs exactly zero after its
    normalisation, in train and eval mode. mode="physical" removes the channels instead (prune_physically)."""
    if mode == "physical":
        return prune_physically(model, amount) if amount else model
    layers = prune_targets(model)
    norms = batchnorm_after(model, layers)
    for layer in layers:
        torch_prune.ln_structured(layer, "weight", amount=amount, n=2, dim=0)
        layer.weight_mask = torch.empty_like(layer.weight_orig).copy_(layer.weight_mask)
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
    example = torch.zeros(1, 3, input_size(model), input_size(model), device=next(model.parameters()).device)
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
    ranked by group L2 norm. The scope is the mask mode's (prune_targets): every other conv or linear layer keeps
    its outputs, so the classifier's class rows are never pruned; a layer after a pruned one loses the matching
    inputs."""
    row = architecture(model)
    targets = set(row.prune_targets(model))
    ignored = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m not in targets]
    unwrapped = row.unwrapped_parameters(model) if row.unwrapped_parameters else None
    tp = import_torch_pruning()
    channels_last = is_channels_last(model)
    device = next(model.parameters()).device
    example = torch.zeros(TRACE_BATCH_SIZE, 3, input_size(model), input_size(model), device=device)
    training = model.training
    model.eval()  # tracing runs a forward pass: keep BatchNorm statistics as they are
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=amount, ignored_layers=ignored, unwrapped_parameters=unwrapped)
    pruner.step()
    return keep_layout(model.train(training), channels_last)  # the pruned weights are new, contiguous tensors


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
    """Parameter count and multiply-accumulates of model on one image of its input size (torch-pruning's counter).

    Without torch-pruning installed the parameters are counted with torch and macs is None."""
    try:
        tp = import_torch_pruning()
    except UserError:
        return {"params": count_parameters(model), "macs": None}
    example = torch.zeros(1, 3, input_size(model), input_size(model), device=next(model.parameters()).device)
    macs, params = tp.utils.count_ops_and_params(model, example)
    return {"params": int(params), "macs": int(macs)}


def output_mask(layer):
    """1 for each output channel/feature of a pruned layer that survives, 0 for each pruned one."""
    return layer.weight_mask.reshape(len(layer.weight_mask), -1).amax(1)


def pruned_layers(model):
    """Modules with a prune mask attached (on their weight, bias or both)."""
    return [module for module in model.modules() if hasattr(module, "weight_mask") or hasattr(module, "bias_mask")]


def make_masks_permanent(model, frozen_only=True):
    """Apply the prune masks once and drop them (torch.nn.utils.prune.remove), so the forward uses a plain weight
    instead of recomputing weight_orig * mask at every step. frozen_only: only for parameters that do not train
    (a LoRA model's base weights); a trained parameter keeps its mask, which keeps its pruned entries at zero."""
    for module in pruned_layers(model):
        for name in ("weight", "bias"):
            original = getattr(module, f"{name}_orig", None)
            if original is not None and not (frozen_only and original.requires_grad):
                torch_prune.remove(module, name)
    return model
