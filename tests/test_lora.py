import argparse
import contextlib
import copy

import pytest
import torch
from conftest import run_script
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import common


def settings_for(arch, model, **flags):
    args = argparse.Namespace(lora_rank=None, lora_alpha=None, lora_dropout=None, lora_targets=None,
                              lora_train_full=None)
    vars(args).update(flags)
    return common.lora_settings(arch, args, model)


def tiny_batches(cifar_dir, n=64):
    data = common.load_data(cifar_dir, "cpu")
    return common.Batches(data.train_images, data.train_labels, torch.arange(n), batch_size=16), data


def test_resnet_defaults_target_every_bottleneck_conv():
    model = common.build_model("resnet50", "smoke")
    settings = settings_for("resnet50", model)
    assert (settings.rank, settings.alpha, settings.dropout, settings.train_full) == (8, 16, 0.1, ["fc"])
    adapted = common.add_lora(model, settings, torch.zeros(2, 3, 32, 32))
    names = {name.removeprefix("base_model.model.") for name, m in adapted.named_modules()
             if isinstance(m, LoraLayer)}
    expected = {f"layer{i}.0.conv{j}" for i in range(1, 5) for j in range(1, 4)}
    assert names == expected


def test_vit_defaults_target_last_attention_projection_and_head():
    model = common.build_model("vit", "smoke")
    settings = settings_for("vit", model)
    assert (settings.rank, settings.alpha) == (16, 32)
    adapted = common.add_lora(model, settings, torch.zeros(2, 3, 32, 32))
    names = {name.removeprefix("base_model.model.") for name, m in adapted.named_modules()
             if isinstance(m, LoraLayer)}
    assert names == {f"blocks.{len(model.blocks) - 1}.attn.proj", "head"}


def test_lora_trains_only_adapters_and_the_classifier(cifar_dir):
    model = common.build_model("resnet50", "smoke")
    base = copy.deepcopy(model.state_dict())
    adapted = common.add_lora(model, settings_for("resnet50", model), torch.zeros(2, 3, 32, 32))
    trainable = [name for name, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or ".fc." in name for name in trainable)
    lora_b = {name: p.detach().clone() for name, p in adapted.named_parameters() if "lora_B" in name}
    batches, _ = tiny_batches(cifar_dir)
    common.train(adapted, batches, epochs=1, lr=1e-2)
    after = dict(adapted.named_parameters())
    assert all(not torch.equal(after[name], start) for name, start in lora_b.items())
    frozen = adapted.get_base_model()
    for name, tensor in frozen.state_dict().items():
        key = name.replace(".base_layer", "")
        if key in base and not key.startswith("fc.") and "running" not in key and "num_batches" not in key:
            assert torch.equal(tensor, base[key]), name


@pytest.mark.parametrize("arch, pruned", [("resnet50", False), ("resnet50", True), ("vit", False), ("vit", True)])
def test_merged_model_reproduces_adapted_outputs(arch, pruned, cifar_dir):
    torch.manual_seed(0)
    model = common.build_model(arch, "smoke")
    if pruned:
        common.prune(model, 0.5)
    adapted = common.add_lora(model, settings_for(arch, model), torch.zeros(2, 3, 32, 32))
    batches, data = tiny_batches(cifar_dir)
    common.train(adapted, batches, epochs=1, lr=1e-2)
    inputs = common.normalize(data.test_images[:16])
    adapted.eval()
    with torch.no_grad():
        expected = adapted(inputs)
    merged = common.finalize(adapted)
    assert type(merged) is type(common.build_model(arch, "smoke"))
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    merged.eval()
    with torch.no_grad():
        assert torch.allclose(merged(inputs), expected, atol=1e-4)
    fresh = common.build_model(arch, "smoke")
    fresh.load_state_dict(merged.state_dict())
    if pruned:
        for layer in common.prune_targets(merged):
            assert (layer.weight.flatten(1).abs().sum(1) == 0).sum() == round(0.5 * layer.weight.shape[0])
        assert not common.pruned_layers(merged)
        for conv, norm in common.batchnorm_after(merged, common.prune_targets(merged)).items():
            zero = conv.weight.flatten(1).abs().sum(1) == 0  # the BatchNorm masks survive the merge
            assert torch.all(norm.weight[zero] == 0) and torch.all(norm.bias[zero] == 0)


def test_adapter_that_is_never_called_is_refused():
    class WithUnusedLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 2)
            self.unused = nn.Linear(4, 2)

        def forward(self, x):
            return self.used(x)

    model = WithUnusedLayer()
    settings = common.LoraSettings(rank=2, alpha=4, dropout=0.0, targets="used|unused", train_full=[])
    with pytest.raises(common.UserError, match="never called"):
        common.add_lora(model, settings, torch.zeros(1, 4))


def test_targets_that_match_nothing_are_refused():
    model = common.build_model("vit", "smoke")
    with pytest.raises(common.UserError, match="LoRA targets"):
        common.add_lora(model, settings_for("vit", model, lora_targets="no_such_layer"), torch.zeros(1, 3, 32, 32))


def batchnorm_buffers(state):
    return {key: value for key, value in state.items() if "running_" in key or "num_batches_tracked" in key}


@pytest.mark.parametrize("script, bn", [("lora.py", "train"), ("lora.py", "frozen"), ("loraprune.py", "frozen")])
def test_bn_flag_decides_whether_batchnorm_statistics_move(script, bn, original_weights, cifar_dir, workdir):
    source = original_weights("resnet50")
    out = workdir / "adapted.pth"
    assert run_script(script, "--preset", "smoke", "--data", cifar_dir, "--device", "cpu", "--weights", source,
                      "--out", out, "--bn", bn) == 0
    saved = torch.load(out, weights_only=True)
    assert saved["meta"]["hyperparameters"]["bn"] == bn
    before = batchnorm_buffers(torch.load(source, weights_only=True)["model"])
    after = batchnorm_buffers(saved["model"])
    assert before and before.keys() == after.keys()
    unchanged = [key for key in before if torch.equal(before[key], after[key])]
    if bn == "frozen":
        assert unchanged == list(before)
    else:
        assert not unchanged


def saved_for_backward_bytes(model, inputs, labels):
    """Bytes of the tensors one bf16-autocast training step keeps for its backward pass, beside the model's own."""
    resident = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def keep(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = common.cross_entropy(model, inputs, labels)
    loss.backward()
    return sum(size for pointer, size in saved.items() if pointer not in resident)


def adapted_step(arch, dropout, cast):
    """(logits, adapter gradients, bytes saved for backward) of one bf16-autocast step, with peft's input cast on
    or off; the adapter weights are random so that every gradient is nonzero."""
    torch.manual_seed(0)
    model = common.build_model(arch, "smoke")
    adapted = common.add_lora(model, settings_for(arch, model, lora_dropout=dropout), torch.zeros(2, 3, 32, 32))
    for param in adapted.parameters():
        if param.requires_grad:
            nn.init.normal_(param, std=0.05)
    for module in adapted.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = cast
    adapted.train()
    inputs, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = adapted(inputs)
        loss = nn.functional.cross_entropy(logits, labels)
    loss.backward()
    grads = [p.grad.clone() for p in adapted.parameters() if p.requires_grad]
    adapted.zero_grad(set_to_none=True)
    return logits.detach(), grads, saved_for_backward_bytes(adapted, inputs, labels)


@pytest.mark.parametrize("arch", ["resnet50", "vit"])
def test_without_dropout_the_input_cast_is_off_and_changes_no_value(arch):
    model = common.build_model(arch, "smoke")
    adapted = common.add_lora(model, settings_for(arch, model, lora_dropout=0.0), torch.zeros(2, 3, 32, 32))
    adapters = [m for m in adapted.modules() if isinstance(m, LoraLayer)]
    assert all(isinstance(d, nn.Identity) for a in adapters for d in a.lora_dropout.values())
    assert not any(a.cast_input_dtype_enabled for a in adapters)
    cast_logits, cast_grads, cast_saved = adapted_step(arch, 0.0, cast=True)
    logits, grads, saved = adapted_step(arch, 0.0, cast=False)
    assert torch.equal(logits, cast_logits)
    assert all(torch.equal(g, c) for g, c in zip(grads, cast_grads, strict=True))
    # A convolution's backward keeps its input, so a ResNet adapter can share the base layer's; a frozen linear
    # layer's backward needs none, so a ViT adapter keeps one copy, the cast's or the input itself.
    assert saved < cast_saved if arch == "resnet50" else saved == cast_saved


def test_with_dropout_peft_keeps_its_input_cast():
    model = common.build_model("resnet50", "smoke")
    adapted = common.add_lora(model, settings_for("resnet50", model), torch.zeros(2, 3, 32, 32))
    adapters = [m for m in adapted.modules() if isinstance(m, LoraLayer)]
    assert all(isinstance(d, nn.Dropout) and d.p == 0.1 for a in adapters for d in a.lora_dropout.values())
    assert all(a.cast_input_dtype_enabled for a in adapters)


def test_lora_on_a_masked_model_bakes_the_frozen_masks_and_keeps_the_trained_ones(cifar_dir):
    torch.manual_seed(0)
    model = common.prune(common.build_model("resnet50", "smoke"), 0.5)
    masks = {name: module.weight_mask.clone() for name, module in model.named_modules()
             if isinstance(module, nn.Conv2d)}
    inputs = common.normalize(common.load_data(cifar_dir, "cpu").test_images[:8])
    with torch.no_grad():
        expected = model.eval()(inputs)
    adapted = common.add_lora(model, settings_for("resnet50", model), torch.zeros(2, 3, 32, 32))
    base = {name.replace("base_model.model.", "").replace(".base_layer", ""): module
            for name, module in adapted.named_modules() if isinstance(module, (nn.Conv2d, nn.BatchNorm2d))
            and "lora_" not in name}
    assert not any(hasattr(module, "weight_orig") or hasattr(module, "weight_mask") for module in base.values())
    lora_b = [m for name, m in adapted.named_modules() if name.endswith("lora_B.default")]
    assert lora_b and all(hasattr(m, "weight_mask") for m in lora_b)  # trained: masked while training
    for name, mask in masks.items():
        assert torch.all(base[name].weight[mask == 0] == 0)
    with torch.no_grad():  # LoRA B starts at zero: the adapted model computes what the masked one did
        assert torch.equal(adapted.eval()(inputs), expected)
    batches, _ = tiny_batches(cifar_dir)
    common.train(adapted, batches, epochs=1, lr=1e-2)
    merged = common.finalize(adapted)
    convs = dict(merged.named_modules())
    for name, mask in masks.items():
        assert torch.all(convs[name].weight[mask == 0] == 0)


def trained_adapters(arch, pruned, recompute_branch, gpu_shaped, cifar_dir):
    """(losses, trained parameters) of three steps of common.train with LoRA at dropout 0.1, recomputing the
    adapter branch in backward or not, in fp32 or the GPU-shaped mode (bf16 autocast, channels-last, fused Adam)."""
    with common.gpu_shaped_mode() if gpu_shaped else contextlib.nullcontext():
        torch.manual_seed(0)
        model = common.to_device(common.build_model(arch, "smoke"), "cpu")
        if pruned:
            common.prune(model, 0.5)
        adapted = common.add_lora(model, settings_for(arch, model, lora_dropout=0.1), torch.zeros(2, 3, 32, 32),
                                  recompute_branch=recompute_branch)
        for param in adapted.parameters():
            if param.requires_grad:
                nn.init.normal_(param, std=0.05)  # lora_B starts at zero: random, so every gradient is nonzero
        batches, _ = tiny_batches(cifar_dir, n=40)
        losses = []

        def recorded_loss(model, inputs, labels):
            losses.append(common.cross_entropy(model, inputs, labels))
            return losses[-1]
        common.train(adapted, batches, epochs=1, lr=1e-2, loss_fn=recorded_loss)
    return torch.stack(losses).detach(), {name: p.detach() for name, p in adapted.named_parameters()
                                          if p.requires_grad}


@pytest.mark.parametrize("arch, pruned, gpu_shaped", [("resnet50", False, False), ("resnet50", True, True),
                                                      ("vit", False, True), ("vit", True, False)])
def test_recomputed_branch_trains_bit_for_bit_like_peft(arch, pruned, gpu_shaped, cifar_dir):
    losses, params = trained_adapters(arch, pruned, True, gpu_shaped, cifar_dir)
    peft_losses, peft_params = trained_adapters(arch, pruned, False, gpu_shaped, cifar_dir)
    assert len(losses) == 3 and torch.equal(losses, peft_losses)
    assert params.keys() == peft_params.keys()
    assert all(torch.equal(params[name], peft_params[name]) for name in params), "same dropout masks, same steps"


def training_step_flops(model, inputs, labels):
    """FLOPs of one bf16-autocast training step, forward and backward."""
    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = common.cross_entropy(model, inputs, labels)
        loss.backward()
    return counter.get_total_flops()


def test_recomputed_branch_keeps_no_copy_of_the_input_and_reruns_no_adapter():
    torch.manual_seed(0)
    inputs, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    saved, flops = {}, {}
    for dropout, recompute in [(0.1, True), (0.1, False), (0.0, False)]:
        model = common.build_model("resnet50", "smoke")
        adapted = common.add_lora(model, settings_for("resnet50", model, lora_dropout=dropout),
                                  torch.zeros(2, 3, 32, 32), recompute_branch=recompute)
        adapters = [m for m in adapted.modules() if isinstance(m, LoraLayer)]
        assert all(("forward" in vars(a)) == (recompute and dropout > 0) for a in adapters)
        saved[dropout, recompute] = saved_for_backward_bytes(adapted.train(), inputs, labels)
        flops[dropout, recompute] = training_step_flops(adapted, inputs, labels)
    # peft at dropout 0 keeps the layer inputs (shared with the base convolutions, but for an adapter's own bf16
    # copy of an fp32 input) and the rank-r hidden tensors; recomputed, dropout 0.1 keeps at most that, far less
    # than peft's dropped copies
    assert saved[0.1, True] <= saved[0.0, False] < saved[0.1, False]
    # only the dropout and the casts are redone in backward: no convolution of lora_A or lora_B runs again
    assert flops[0.1, True] == flops[0.1, False] == flops[0.0, False] > 0
