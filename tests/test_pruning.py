import pytest
import torch
from conftest import run_script
from torch import nn

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


def test_resnet_prunes_every_conv_but_never_the_classifier():
    model = common.prune(common.build_model("resnet50", "smoke"), 0.5)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert common.pruned_layers(model) == convs
    assert zero_rows(model.fc.weight) == 0


def test_pruned_weights_stay_zero_while_training(cifar_dir):
    data = common.load_cifar10(cifar_dir, "cpu")
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
