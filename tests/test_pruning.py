import copy

import pytest
import torch
from conftest import run_script
from torch import nn
from torch.nn.utils import prune as torch_prune

import common


def zero_rows(weight):
    return int((weight.flatten(1).abs().sum(1) == 0).sum())


@pytest.mark.parametrize("arch", ["resnet50", "vit"])
def test_prune_zeros_exactly_the_requested_share(arch):
    model = common.build_model(arch, "smoke")
    for layer in common.prune_targets(model):
        if layer.bias is not None:
            nn.init.ones_(layer.bias)  # timm starts biases at zero
    common.prune(model, 0.5)
    layers = common.prune_targets(model)
    assert layers and all(hasattr(layer, "weight_mask") for layer in layers)
    for layer in layers:
        assert zero_rows(layer.weight) == round(0.5 * layer.weight.shape[0])
        if layer.bias is not None:
            assert torch.equal(layer.bias == 0, common.output_mask(layer) == 0)


def test_resnet_prunes_every_conv_and_its_batchnorm_but_never_the_classifier():
    model = common.prune(common.build_model("resnet50", "smoke"), 0.5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert set(common.pruned_layers(model)) == {*convs, *norms}
    assert zero_rows(model.fc.weight) == 0
    for conv, norm in common.batchnorm_after(model, convs).items():
        for name in ("weight", "bias"):
            assert torch.equal(getattr(norm, f"{name}_mask"), common.output_mask(conv))


def live_batchnorms(model):
    """Give every BatchNorm non-trivial affine parameters and statistics, as a trained model has."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, nn.BatchNorm2d):
                norm.weight.copy_(1 + torch.rand(norm.num_features, generator=generator))
                norm.bias.copy_(torch.randn(norm.num_features, generator=generator))
                norm.running_mean.copy_(torch.randn(norm.num_features, generator=generator))
                norm.running_var.copy_(0.5 + torch.rand(norm.num_features, generator=generator))
    return model


def pruned_channel_outputs(model, inputs):
    """Largest |output| of each conv's BatchNorm over the channels its conv pruned (train and eval mode)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = common.batchnorm_after(model, convs)
    assert len(norms) == len(convs)
    pruned = {norm: zero_rows_mask(conv.weight) for conv, norm in norms.items()}
    largest = []

    def record(norm, inputs, output):  # read at once: the residual addition and ReLU work in place
        largest.append(output[:, pruned[norm]].abs().max().item())

    hooks = [norm.register_forward_hook(record) for norm in pruned]
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            model(inputs)
    for hook in hooks:
        hook.remove()
    return largest


def zero_rows_mask(weight):
    return weight.flatten(1).abs().sum(1) == 0


def test_pruned_resnet_channels_are_exactly_zero_after_batchnorm(cifar_dir):
    data = common.load_data(cifar_dir, "cpu")
    inputs = common.normalize(data.test_images[:8])
    unpruned = live_batchnorms(common.build_model("resnet50", "smoke"))
    masks_only = copy.deepcopy(unpruned)
    for conv in [m for m in masks_only.modules() if isinstance(m, nn.Conv2d)]:
        torch_prune.ln_structured(conv, "weight", amount=0.5, n=2, dim=0)
    assert max(pruned_channel_outputs(masks_only, inputs)) > 0  # BatchNorm alone would revive them
    model = common.prune(unpruned, 0.5)
    assert max(pruned_channel_outputs(model, inputs)) == 0
    batches = common.Batches(data.train_images, data.train_labels, torch.arange(64), batch_size=16)
    common.train(model, batches, epochs=2, lr=1e-2)
    assert max(pruned_channel_outputs(model, inputs)) == 0
    final = common.finalize(model)
    assert not common.pruned_layers(final)
    assert max(pruned_channel_outputs(final, inputs)) == 0


def test_pruned_weights_stay_zero_while_training(cifar_dir):
    data = common.load_data(cifar_dir, "cpu")
    model = common.prune(common.build_model("vit", "smoke"), 0.5)
    masks = [layer.weight_mask.clone() for layer in common.prune_targets(model)]
    batches = common.Batches(data.train_images, data.train_labels, torch.arange(64), batch_size=16)
    before = [layer.weight_orig.detach().clone() for layer in common.prune_targets(model)]
    common.train(model, batches, epochs=2, lr=1e-2)
    for layer, mask, start in zip(common.prune_targets(model), masks, before, strict=True):
        assert torch.equal(layer.weight_mask, mask)
        assert torch.all(layer.weight[mask == 0] == 0)
        assert not torch.equal(layer.weight_orig, start)  # the rest did train
    final = common.finalize(model)
    for layer, mask in zip(common.prune_targets(final), masks, strict=True):
        assert not hasattr(layer, "weight_mask")
        assert torch.all(layer.weight[mask == 0] == 0)


@pytest.mark.parametrize("method", ["pruneft", "loraprune"])
def test_saved_pruned_model_keeps_zero_channels(method, original_weights, cifar_dir, workdir):
    out = workdir / f"{method}.pth"
    assert run_script(f"{method}.py", "--preset", "smoke", "--data", cifar_dir, "--weights",
                      original_weights("resnet50"), "--out", out) == 0
    state = torch.load(out, weights_only=True)["model"]
    convs = {k: v for k, v in state.items() if v.dim() == 4}
    assert convs and all(zero_rows(w) == round(0.5 * w.shape[0]) for w in convs.values())
    assert zero_rows(state["fc.weight"]) == 0
    model, _ = common.load_checkpoint(out)
    for conv, norm in common.batchnorm_after(model, [m for m in model.modules() if isinstance(m, nn.Conv2d)]).items():
        pruned = zero_rows_mask(conv.weight)
        assert torch.all(norm.weight[pruned] == 0) and torch.all(norm.bias[pruned] == 0)
    data = common.load_data(cifar_dir, "cpu", "smoke")
    assert max(pruned_channel_outputs(model, common.normalize(data.test_images[:8]))) == 0
