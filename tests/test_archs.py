"""Every arch of the ARCHITECTURES table: its builder's classes and image size, the pruning and LoRA targets its row
states, mask pruning that stays in force, physical pruning that shrinks the model, LoRA that trains only adapters."""
import argparse
import copy

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

import common
from unlearning.representation import classifier

CNNS = ["resnet18", "resnet50", "vgg16_bn"]
NEW_CNNS = ["resnet18", "vgg16_bn"]
CIFAR10_CLASSES = common.DATASETS["cifar10"].num_classes  # build_model's default


def lora_settings(arch, model):
    args = argparse.Namespace(lora_rank=None, lora_alpha=None, lora_dropout=None, lora_targets=None,
                              lora_train_full=None)
    return common.lora_settings(arch, args, model)


def stage_convs(arch, model):
    """Names of the convolutions of the stages, read from the model: every conv but a ResNet's stem and shortcuts."""
    names = {name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}
    return {name for name in names if name != "conv1" and ".downsample." not in name}


def zero_rows(weight):
    return int((weight.flatten(1).abs().sum(1) == 0).sum())


def random_batches(count=4, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=generator),
             torch.randint(0, CIFAR10_CLASSES, (size,), generator=generator)) for _ in range(count)]


@pytest.mark.parametrize("arch", common.ARCHS)
def test_builders_take_the_class_count_and_image_size(arch):
    default = common.build_model(arch, "smoke")
    assert default(torch.zeros(2, 3, 32, 32)).shape == (2, CIFAR10_CLASSES)
    model = common.build_model(arch, "smoke", num_classes=200, image_size=64)
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 200)
    assert common.architecture(model) is common.ARCHITECTURES[arch] and model.arch == arch
    if arch == "vit":
        assert model.patch_embed.num_patches == default.patch_embed.num_patches == 64  # patch 8 at 64x64


def test_full_size_models_have_the_published_sizes():
    vgg = common.build_model("vgg16_bn")
    convs = [m for m in vgg.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and [c.out_channels for c in convs][-1] == 512 and vgg.get_classifier().in_features == 256
    resnet18 = common.build_model("resnet18")
    assert 11.1e6 < common.count_parameters(resnet18) < 11.2e6  # kuangliu's ResNet18: 11.17 M
    assert resnet18.conv1.kernel_size == (3, 3) and resnet18.conv1.stride == (1, 1)
    assert isinstance(resnet18.maxpool, nn.Identity)


def test_an_unknown_model_or_arch_is_a_one_line_error():
    with pytest.raises(common.UserError, match="unknown arch"):
        common.build_model("resnet34")
    with pytest.raises(common.UserError, match="build_model did not make"):
        common.prune_targets(nn.Sequential(nn.Conv2d(3, 4, 3)))


@pytest.mark.parametrize("arch", CNNS)
def test_cnns_prune_every_conv_and_adapt_every_stage_conv(arch):
    model = common.build_model(arch, "smoke")
    assert common.prune_targets(model) == [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    adapted = common.add_lora(model, lora_settings(arch, model), torch.zeros(2, 3, 32, 32))
    adapted_names = {name.removeprefix("base_model.model.") for name, m in adapted.named_modules()
                     if isinstance(m, LoraLayer)}
    assert adapted_names == stage_convs(arch, common.build_model(arch, "smoke"))


@pytest.mark.parametrize("arch", NEW_CNNS)
def test_mask_pruning_zeros_half_of_each_conv_and_its_batchnorm_and_they_stay_zero(arch):
    model = common.prune(common.build_model(arch, "smoke"), 0.5)
    convs = common.prune_targets(model)
    norms = common.batchnorm_after(model, convs)
    assert len(norms) == len(convs)  # every conv of these CNNs feeds a BatchNorm
    masks = {conv: common.output_mask(conv).clone() for conv in convs}
    common.train(model, random_batches(count=2), epochs=2, lr=1e-2)
    for conv, norm in norms.items():
        assert zero_rows(conv.weight) == round(0.5 * conv.out_channels)
        assert torch.equal(common.output_mask(conv), masks[conv])
        assert torch.all(norm.weight[masks[conv] == 0] == 0) and torch.all(norm.bias[masks[conv] == 0] == 0)
    assert zero_rows(classifier(model).weight) == 0
    final = common.finalize(model)
    assert not common.pruned_layers(final)
    for conv in common.prune_targets(final):
        assert zero_rows(conv.weight) == round(0.5 * conv.out_channels)


def test_physical_pruning_halves_every_vgg_conv_and_keeps_the_classifier_widths():
    model = common.build_model("vgg16_bn", "smoke")
    widths = [conv.out_channels for conv in common.prune_targets(model)]
    hidden = model.classifier[0].out_features
    common.prune(model, 0.5, "physical")
    assert [conv.out_channels for conv in common.prune_targets(model)] == [w // 2 for w in widths]
    assert model.classifier[0].in_features == widths[-1] // 2 * 4  # the 2x2 pooled map of the last conv
    assert model.classifier[0].out_features == model.classifier[2].out_features == hidden
    assert model.get_classifier().out_features == CIFAR10_CLASSES


def test_physical_pruning_halves_every_resnet18_conv_but_keeps_the_classes():
    model = common.build_model("resnet18", "smoke")
    widths = [conv.out_channels for conv in common.prune_targets(model)]
    fc_in = model.fc.in_features
    common.prune(model, 0.5, "physical")
    assert [conv.out_channels for conv in common.prune_targets(model)] == [w // 2 for w in widths]
    assert model.fc.in_features == fc_in // 2 and model.fc.out_features == CIFAR10_CLASSES


@pytest.mark.parametrize("arch", NEW_CNNS)
def test_physically_pruned_checkpoint_round_trips_and_adapts(arch, tmp_path):
    model = common.prune(common.build_model(arch, "smoke"), 0.5, "physical").eval()
    path = tmp_path / "pruned.pth"
    common.save_checkpoint(path, model, {"arch": arch, "preset": "smoke", "prune_mode": "physical"})
    loaded, _ = common.load_checkpoint(path)
    inputs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(inputs), model(inputs))
    adapted = common.add_lora(loaded, lora_settings(arch, loaded), inputs)
    common.train(adapted, random_batches(count=2), epochs=1, lr=1e-2)
    assert torch.isfinite(common.finalize(adapted).eval()(inputs)).all()


@pytest.mark.parametrize("arch", NEW_CNNS)
def test_lora_trains_only_the_adapters_and_the_classifier(arch):
    model = common.build_model(arch, "smoke")
    base = copy.deepcopy(model.state_dict())
    adapted = common.add_lora(model, lora_settings(arch, model), torch.zeros(2, 3, 32, 32))
    head = common.LORA_DEFAULTS[arch]["train_full"][0]
    trainable = [name for name, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or f".{head}." in name for name in trainable)
    lora_b = {name: p.detach().clone() for name, p in adapted.named_parameters() if "lora_B" in name}
    common.train(adapted, random_batches(), epochs=1, lr=1e-2)
    after = dict(adapted.named_parameters())
    assert all(not torch.equal(after[name], start) for name, start in lora_b.items())
    for name, tensor in adapted.get_base_model().state_dict().items():
        key = name.replace(".base_layer", "")
        if key in base and not key.startswith(f"{head}.") and "running" not in key and "num_batches" not in key:
            assert torch.equal(tensor, base[key]), name
