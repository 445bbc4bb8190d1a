import contextlib
import json
import os

import pytest
import torch
from conftest import run_script
from torch import nn

import bench
import common
from unlearning import costs

IN_FEATURES, HIDDEN, CLASSES = 3 * 4 * 4, 16, 10


def tiny_batches(n=10, batch_size=4):
    """Batches of 4, 4 and 2 random uint8 images of 3 x 4 x 4."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    return common.Batches(images, labels, torch.arange(n), batch_size)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(IN_FEATURES, HIDDEN, bias=False), nn.ReLU(),
                         nn.Linear(HIDDEN, CLASSES, bias=False))


def squared_output(model, inputs, labels):
    return model(inputs).pow(2).mean()


def count_mlp(model, loss_fn=common.cross_entropy, gpu_shaped=True, peak_batch_size=64):
    """Counts of the MLP's training step, by default in the GPU-shaped mode (bf16 autocast, fused Adam)."""
    with common.gpu_shaped_mode() if gpu_shaped else contextlib.nullcontext():
        step = costs.TrainingStep(tiny_batches(), loss_fn, common.make_adam(
            [p for p in model.parameters() if p.requires_grad], 1e-3))
        return costs.count_training(model, step, peak_batch_size)


def test_linear_flops_are_two_m_n_k_forward_and_frozen_weights_drop_their_gradient_flops():
    full = count_mlp(mlp())
    first, second = 2 * IN_FEATURES * HIDDEN, 2 * HIDDEN * CLASSES  # per image
    assert full["forward_flops_per_image"] == first + second
    # backward: both weight gradients, and the input gradient of the second layer only (the input needs none)
    assert full["flops_per_image"] == 2 * (first + second) + second and full["flops_fixed"] == 0
    model = mlp()
    model[3].requires_grad_(False)
    frozen_last = count_mlp(model)
    assert full["flops_per_image"] - frozen_last["flops_per_image"] == second  # only its weight gradient goes
    assert frozen_last["trainable_params"] == HIDDEN * IN_FEATURES and frozen_last["grad_bytes"] == 4 * first // 2
    model = mlp()
    model[1].requires_grad_(False)
    frozen_first = count_mlp(model)  # nothing before the second layer needs a gradient: no input gradient either
    assert frozen_first["flops_per_image"] == first + second + second


def test_saved_bytes_count_each_activation_storage_once_and_weights_apart():
    counts = count_mlp(mlp(), loss_fn=squared_output, gpu_shaped=False)
    # fp32: the flattened input (a view of the batch), ReLU's output (also the second layer's input), the output
    assert counts["saved_bytes_per_image"] == 4 * (IN_FEATURES + HIDDEN + CLASSES)
    assert counts["saved_bytes_fixed"] == 0
    # autograd keeps a weight only for an input gradient: the second layer's, as the batch needs none
    assert counts["saved_resident_bytes"] == 4 * HIDDEN * CLASSES


def test_bf16_autocast_saves_half_precision_copies_of_the_weights():
    counts = count_mlp(mlp(), loss_fn=squared_output)
    assert counts["saved_bytes_fixed"] == 2 * HIDDEN * CLASSES  # the second layer's bf16 weight
    assert counts["saved_resident_bytes"] == 0


def test_adam_state_and_step_peak_are_counted():
    counts = count_mlp(mlp())
    params = 4 * (IN_FEATURES * HIDDEN + HIDDEN * CLASSES)
    assert counts["param_bytes"] == counts["grad_bytes"] == params
    assert counts["optimizer_state_bytes"] >= 2 * params  # exp_avg and exp_avg_sq (and the step counters)
    small = count_mlp(mlp(), peak_batch_size=4)
    assert counts["step_peak_bytes"] - small["step_peak_bytes"] >= 60 * counts["saved_bytes_per_image"]


def test_item_counts_one_host_read_and_host_data_and_boolean_indexing_count_too():
    x = torch.arange(6.0)
    _, counts = costs.count_ops(lambda: x.sum().item())
    assert counts["syncs"] == 1 and list(counts["sync_ops"]) == [f"_local_scalar_dense: {costs.HOST_READ}"]
    _, counts = costs.count_ops(lambda: torch.tensor([1.0, 2.0]) * 2)
    assert counts["syncs"] == 1 and list(counts["sync_ops"]) == [f"lift_fresh: {costs.HOST_DATA}"]
    _, counts = costs.count_ops(lambda: x[x > 2])
    assert counts["syncs"] == 1 and costs.DATA_DEPENDENT in next(iter(counts["sync_ops"]))
    _, counts = costs.count_ops(lambda: torch.where(x > 2, x, 0.0).sum() * 3)
    assert counts["syncs"] == 0 and counts["ops"] > 0


def test_channels_last_convolutions_are_counted_per_input_and_weight():
    conv = nn.Conv2d(3, 8, 3)
    x = torch.zeros(2, 3, 8, 8)
    channels_last = torch.channels_last
    cases = {(False, False): 0, (True, False): 0, (False, True): 0, (True, True): 1}
    for (weight_last, input_last), expected in cases.items():
        conv.to(memory_format=channels_last if weight_last else torch.contiguous_format)
        with costs.OpCounter() as counter:
            conv(x.contiguous(memory_format=channels_last if input_last else torch.contiguous_format))
        assert (counter.convolutions, counter.channels_last_convolutions) == (1, expected)


def test_the_gpu_shaped_optimizers_are_fused_adam_and_foreach_sgd(monkeypatch):
    monkeypatch.delenv(common.GPU_SHAPED_ENV, raising=False)
    params = [nn.Parameter(torch.zeros(3)) for _ in range(5)]
    with common.gpu_shaped_mode():
        adam, sgd = common.make_adam(params, 1e-3), common.make_sgd(params, 1e-3)
    assert common.GPU_SHAPED_ENV not in os.environ  # restored
    assert adam.param_groups[0]["fused"] and sgd.param_groups[0]["foreach"]
    for p in params:
        p.grad = torch.ones(3)
    adam.step(), sgd.step()  # the first steps create the state
    _, fused = costs.count_ops(adam.step)
    _, foreach = costs.count_ops(sgd.step)
    assert fused["ops"] <= 2 and foreach["ops"] <= 4  # not one op per parameter


def test_gpu_estimate_adds_compute_at_the_assumed_rate_and_launches():
    assumptions = costs.GPU_ASSUMPTIONS
    one_second = assumptions["bf16_tflops"] * 1e12 * assumptions["utilisation"]
    assert costs.gpu_seconds(1000, bf16=one_second) == pytest.approx(1 + 1000 * assumptions["launch_us"] * 1e-6)
    assert costs.gpu_seconds(0, bf16=one_second, fp32=0.0) == pytest.approx(1.0)


def test_counting_needs_a_smaller_last_batch():
    step = costs.TrainingStep(tiny_batches(n=12), common.cross_entropy, common.make_adam(mlp().parameters(), 1e-3))
    with pytest.raises(ValueError, match="smaller"):
        costs.count_training(mlp(), step, peak_batch_size=8)


def test_bench_costs_writes_counts_floors_and_estimates(workdir):
    assert run_script("bench.py", "--costs", "--preset", "smoke", "--device", "cpu", "--arch", "resnet50",
                      "--methods", "finetune", "pruneft") == 0
    results = json.loads((workdir / "bench" / "costs" / "costs.json").read_text())
    rows = {(r["method"], r["prune_mode"]): r for r in results["rows"]}
    assert list(rows) == [("finetune", None), ("pruneft", "mask"), ("pruneft", "physical")]
    finetune, physical = rows[("finetune", None)], rows[("pruneft", "physical")]
    assert physical["gflops_per_image"] < finetune["gflops_per_image"] / 2
    assert physical["params_mb"] < finetune["params_mb"] and physical["peak_mb"] < finetune["peak_mb"]
    assert finetune["batch_size"] == common.PAPER_RECIPE["batch_size"] and finetune["gpu_s"] > 0
    # mask pruning computes what finetune does, plus the masked weights at every forward
    assert rows[("pruneft", "mask")]["gflops_per_image"] == finetune["gflops_per_image"]
    assert rows[("pruneft", "mask")]["ops_per_step"] > finetune["ops_per_step"]
    assert [r["flops_ratio"] for r in results["floors"]][0] == 1
    assert [r["model"] for r in results["evaluation"]] == ["full", "pruned (physical)"]
    assert "estimates, not measurements" in (workdir / "bench" / "costs" / "costs.md").read_text()


@pytest.mark.parametrize(("method", "mode", "dropout"), [("loraprune", "physical", 0.1), ("salun", None, None)])
def test_two_counts_of_a_method_agree(method, mode, dropout):
    args = bench.parse_args(["--costs", "--preset", "smoke", "--device", "cpu"])
    data, splits = bench.cost_data(args.cost_batch, torch.device("cpu"))
    first, second = (bench.count_method(args, "resnet50", method, mode, dropout, data, splits)[1:] for _ in range(2))
    assert first == second and first[1]["flops_per_image"] > 0 and first[1]["step_peak_bytes"] > 0


class Recomputed(nn.Module):
    """A linear layer and dropout, recomputed in backward by torch.utils.checkpoint."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(lambda x: nn.functional.dropout(self.linear(x), 0.5), x,
                                                 use_reentrant=False)


def test_recomputed_layers_leave_nothing_live_between_counted_steps():
    """torch.utils.checkpoint's reruns are freed with their step: each counted step starts from the same live
    bytes (torch's per-module FLOP tracking would keep them alive into the next step)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.ReLU(), Recomputed(), nn.Linear(HIDDEN, CLASSES))
    inputs, labels = torch.randn(4, IN_FEATURES), torch.arange(4)
    with costs.Recorder() as recorder:
        for _ in range(3):
            nn.functional.cross_entropy(model(inputs), labels).backward()
            recorder.mark()
    starts = [window["start_live_bytes"] for window in recorder.windows]
    assert starts[1] == starts[2] > 0  # from the second step on: the gradients, and nothing else
