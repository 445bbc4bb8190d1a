"""The GPU-shaped mode (UNLEARN_GPU_SHAPED=1): a CPU takes the GPU's branches, so these tests run the code a GPU runs:
bf16 autocast, channels-last, fused Adam, and a training loop without host syncs per step."""
import argparse
from types import SimpleNamespace

import pytest
import torch
from conftest import run_script
from torch import nn

import common
from unlearning import costs, tracking, training
from unlearning import data as data_module


@pytest.fixture
def gpu_shaped(monkeypatch):
    monkeypatch.setenv(common.GPU_SHAPED_ENV, "1")


def smoke_resnet():
    torch.manual_seed(0)
    return common.to_device(common.build_model("resnet50", "smoke"), "cpu")


def lora_settings(model, dropout=None):
    args = argparse.Namespace(lora_rank=None, lora_alpha=None, lora_dropout=dropout, lora_targets=None,
                              lora_train_full=None)
    return common.lora_settings("resnet50", args, model)


def example():
    return torch.zeros(2, 3, 32, 32)


def test_the_switch_turns_on_the_gpu_branches_on_a_cpu(monkeypatch):
    monkeypatch.delenv(common.GPU_SHAPED_ENV, raising=False)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    plain = (common.autocast("cpu"), common.normalize(images), smoke_resnet().conv1.weight,
             common.make_adam([nn.Parameter(torch.zeros(2))], 1e-3))
    monkeypatch.setenv(common.GPU_SHAPED_ENV, "1")
    shaped = (common.autocast("cpu"), common.normalize(images), smoke_resnet().conv1.weight,
              common.make_adam([nn.Parameter(torch.zeros(2))], 1e-3))
    with plain[0]:
        assert not torch.is_autocast_enabled("cpu")
    with shaped[0]:
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert plain[1].is_contiguous() and shaped[1].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain[1], shaped[1])  # the same values, in the other layout
    assert plain[2].is_contiguous() and shaped[2].is_contiguous(memory_format=torch.channels_last)
    assert not plain[3].defaults["fused"] and shaped[3].defaults["fused"]


def tiny_data(n=40):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return common.Data(images, torch.arange(n) % 10, images[:10], torch.arange(10))


def pruned_lora(model):
    return common.add_lora(common.prune(model), lora_settings(model), example())


def sgd(model):
    return common.make_sgd(model.parameters(), 0.01)


def l1_penalty(model):
    params = list(model.parameters())
    return lambda: common.add_l1_gradient(params, common.L1_ALPHA)


def salun_mask(model):
    mask = {name: torch.rand_like(p) < 0.5 for name, p in model.named_parameters()}
    return common.masked_gradient(dict(model.named_parameters()), mask, common.BASELINE_SGD["weight_decay"])


SETUPS = {  # name: (prepare the model, loss, optimizer factory or None for train's fused Adam, before_step factory)
    "finetune": (lambda model: model, common.cross_entropy, None, None),
    "pruneft": (common.prune, common.cross_entropy, None, None),
    "loraprune": (pruned_lora, common.cross_entropy, None, None),
    "l1sparse": (lambda model: model, common.cross_entropy, sgd, l1_penalty),
    "salun": (lambda model: model, common.cross_entropy, sgd, salun_mask),
}


def five_steps(setup, monkeypatch):
    """(model, batches, loss_fn, optimizer or None, before_step or None) of SETUPS[setup]: 5 steps of 8 images, the
    divergence flag read every 2 steps."""
    prepare, loss_fn, make_optimizer, make_before_step = SETUPS[setup]
    monkeypatch.setattr(training, "DIVERGENCE_CHECK_STEPS", 2)
    model = prepare(smoke_resnet())
    data = tiny_data()
    batches = common.Batches(data.train_images, data.train_labels, torch.arange(40), batch_size=8)
    return (model, batches, loss_fn, make_optimizer(model) if make_optimizer else None,
            make_before_step(model) if make_before_step else None)


@pytest.mark.parametrize("setup", SETUPS)
def test_train_reads_the_host_only_at_the_divergence_checks(setup, gpu_shaped, monkeypatch):
    model, batches, loss_fn, optimizer, before_step = five_steps(setup, monkeypatch)
    data_module._normalization.cache_clear()  # so the constants' one-time creation is seen here
    with costs.OpCounter() as counter:
        common.train(model, batches, epochs=1, loss_fn=loss_fn, optimizer=optimizer, before_step=before_step)
    # steps 2 and 4 and the epoch's end read the divergence flag, one host read each; the normalisation constants
    # are made once per device (two host copies), not per step; nothing else reaches the host
    assert counter.sync_ops == {f"_local_scalar_dense: {costs.HOST_READ}": 3, f"lift_fresh: {costs.HOST_DATA}": 2}


@pytest.mark.parametrize("setup", ["finetune", "l1sparse"])
def test_tracked_training_reads_the_host_at_the_same_checks_and_logs_every_step(setup, gpu_shaped, monkeypatch):
    """--track adds no host read per step: the losses wait on the device and come back in one transfer at each
    divergence check (host_values, which a CPU cannot count as a sync), every step's loss and lr logged."""
    model, batches, loss_fn, optimizer, before_step = five_steps(setup, monkeypatch)
    logged, reads, losses = [], [], []
    tracker = tracking.Tracker()
    tracker.sinks = [SimpleNamespace(name="list", log=lambda values, step: logged.append((step, values)))]
    monkeypatch.setattr(tracking, "host_values", lambda tensor: reads.append(len(tensor)) or tensor.tolist())

    def kept_loss(model, inputs, labels):
        loss = loss_fn(model, inputs, labels)
        losses.append(loss.detach())
        return loss
    data_module._normalization.cache_clear()
    with costs.OpCounter() as counter, tracking.activate(tracker):
        common.train(model, batches, epochs=1, loss_fn=kept_loss, optimizer=optimizer, before_step=before_step)
    assert counter.sync_ops == {f"_local_scalar_dense: {costs.HOST_READ}": 3, f"lift_fresh: {costs.HOST_DATA}": 2}
    assert reads == [2, 2, 1]  # at steps 2 and 4 and the epoch's end, beside the divergence flag's reads
    per_step = [(step, values) for step, values in logged if "train/loss" in values]
    assert [step for step, _ in per_step] == [1, 2, 3, 4, 5]
    assert [values["train/loss"] for _, values in per_step] == [loss.float().item() for loss in losses]
    lr = (optimizer or common.make_adam(model.parameters(), common.PAPER_RECIPE["lr"])).param_groups[0]["lr"]
    assert {values["train/lr"] for _, values in per_step} == {lr}
    assert logged[-1][0] == 5 and set(logged[-1][1]) == {"train/images_per_s"}


def conv_layouts(model, inputs):
    """(input is channels-last, weight is channels-last) of every convolution a forward pass runs."""
    seen = []

    def record(module, args):
        weight = module.weight
        seen.append((args[0].is_contiguous(memory_format=torch.channels_last),
                     weight.is_contiguous(memory_format=torch.channels_last)))
    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(inputs)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("prepare", ["prune mask", "prune physical", "lora", "loraprune mask", "loraprune physical"])
def test_channels_last_survives_prune_and_lora(prepare, gpu_shaped):
    model = smoke_resnet()
    if prepare.startswith(("prune", "loraprune")):
        common.prune(model, mode=prepare.split()[-1])
    if prepare.startswith(("lora", "loraprune")):
        model = common.add_lora(model, lora_settings(model), example())
    inputs = common.normalize(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    layouts = conv_layouts(model, inputs)
    assert len(layouts) >= 17 and all(x and w for x, w in layouts)  # 17: the smoke ResNet's own convolutions


def test_a_contiguous_model_stays_contiguous_through_physical_pruning_and_lora(gpu_shaped):
    model = common.build_model("resnet50", "smoke")  # not through to_device: the layout it was built in
    model = common.add_lora(common.prune(model, mode="physical"), lora_settings(model), example())
    assert all(p.is_contiguous() for p in model.parameters())


def test_augmentation_keeps_channels_last(gpu_shaped):
    data = tiny_data()
    batches = common.Batches(data.train_images, data.train_labels, torch.arange(40), batch_size=8, augment=True)
    for inputs, _ in batches:
        assert inputs.is_contiguous(memory_format=torch.channels_last)


METHOD_RUNS = [("finetune.py",), ("pruneft.py",), ("pruneft.py", "--prune-mode", "physical"), ("lora.py",),
               ("loraprune.py",), ("loraprune.py", "--prune-mode", "physical"), ("ga.py",), ("rl.py",),
               ("l1sparse.py",), ("salun.py",), ("scrub.py",)]


def test_every_method_runs_gpu_shaped(original_weights, cifar_dir, workdir, gpu_shaped, monkeypatch):
    weights = original_weights("resnet50")
    step_contexts = []
    real_autocast = training.autocast

    def recording_autocast(device):
        context = real_autocast(device)
        step_contexts.append(type(context))
        return context
    monkeypatch.setattr(training, "autocast", recording_autocast)
    flags = ["--preset", "smoke", "--data", cifar_dir, "--weights", weights, "--epochs", "1"]
    outs = []
    for script, *extra in METHOD_RUNS:
        out = workdir / f"{script.removesuffix('.py')}{'_' + extra[-1] if extra else ''}.pth"
        assert run_script(script, *flags, *extra, "--out", out) == 0, script
        outs.append(out)
    assert step_contexts and set(step_contexts) == {torch.autocast}  # every training step ran under autocast
    assert run_script("evaluate.py", *outs, "--data", cifar_dir, "--json", "eval.json") == 0
