import argparse

import torch
from conftest import run_script
from peft.tuners.lora import LoraLayer

import common
from unlearning import measure


def lora_resnet():
    """A smoke ResNet with LoRA adapters: BatchNorm statistics and dropout, the state a warm-up could disturb."""
    torch.manual_seed(0)
    model = common.build_model("resnet50", "smoke")
    args = argparse.Namespace(lora_rank=None, lora_alpha=None, lora_dropout=None, lora_targets=None,
                              lora_train_full=None)
    return common.add_lora(model, common.lora_settings("resnet50", args, model), torch.zeros(2, 3, 32, 32))


def has_adapters(model):
    return any(isinstance(module, LoraLayer) for module in model.modules())


def test_warm_up_leaves_model_and_random_state_bit_identical(cifar_dir):
    data = common.load_data(cifar_dir, "cpu")
    model = lora_resnet().eval()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    forward_calls = []
    model.register_forward_hook(lambda *_: forward_calls.append(1))
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    common.warm_up_on(model, data, torch.arange(len(data.train_labels)), batch_size=32)
    assert forward_calls  # it did run
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_warm_up_does_not_change_a_run(original_weights, cifar_dir, workdir, monkeypatch):
    flags = ["--preset", "smoke", "--data", cifar_dir, "--device", "cpu", "--weights", original_weights("resnet50")]
    assert run_script("lora.py", *flags, "--out", workdir / "warm.pth") == 0
    warm_ups = []
    monkeypatch.setattr(measure, "warm_up", lambda model, *args: warm_ups.append(has_adapters(model)))
    assert run_script("lora.py", *flags, "--out", workdir / "cold.pth") == 0
    # the device's start-up on the original, then the prepared model with its LoRA adapters
    assert warm_ups == [False, True]
    warm, cold = (torch.load(workdir / f"{name}.pth", weights_only=True)["model"] for name in ("warm", "cold"))
    assert warm.keys() == cold.keys()
    assert all(torch.equal(warm[name], cold[name]) for name in warm)
