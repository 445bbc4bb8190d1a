"""--compile: the training step compiled in the untimed warm-up (unlearning/compiling.py), its counts in the meta, the
records and tables, and training equal to eager.

The default tests compile with Dynamo's "eager" backend (the graphs, guards and recompilations of inductor, no code)
or with "aot_eager" (also AOTAutograd's forward and backward graphs, as inductor gets them, run by torch's own
kernels), so they take seconds. The tests marked `inductor` compile with inductor itself and take minutes on a CPU:
`python -m pytest --inductor` runs them.
"""
import argparse

import pytest
import torch
from conftest import run_script
from torch import nn

import bench
import common
import reproduce
from unlearning import compiling, costs, kernels, records, units

SMOKE = ["--preset", "smoke", "--device", "cpu"]
# Synthetic smoke data: 180 retain and 20 forget images. At batch size 20 every batch, retain or forget, has 20
# images: one batch shape, one compilation.
ONE_SHAPE = ["--batch-size", "20"]
# Inductor against eager (fp32, one epoch of 9 Adam steps at lr 1e-3 on the smoke ResNet-50): inductor computes the
# same ops in other summation orders and fusions, so values differ in the last bits. Adam's normalised update turns
# such a difference in a gradient near zero into a step of up to about lr in either direction, so after 9 steps a
# trained weight may stand up to about 2 * 9 * lr apart. BatchNorm's running statistics average the batches'
# statistics of those weights: they are compared tensor by tensor, relative to their size. The metrics are read off
# 20 forget, 180 retain and 90 test images: a few flipped predictions move them by up to 10 points. (Measured on the
# smoke preset's CIFAR-10 images, 14 steps: weights 0.003 apart for finetune and 0.016 for LoRA, running statistics
# 0.6 % and 1 %, UA, RA and TA equal but for one retain image.)
WEIGHT_TOLERANCE = 2 * 9 * 1e-3
RUNNING_STATISTICS_TOLERANCE = 0.02  # |compiled - eager|_1 / |eager|_1 of each running mean and variance
METRIC_TOLERANCE = 10.0


@pytest.fixture
def eager_backend(monkeypatch):
    """Compile with Dynamo's eager backend: the graphs are captured and guarded, no code is generated."""
    monkeypatch.setattr(compiling, "COMPILE_BACKEND", "eager")


@pytest.fixture
def aot_eager_backend(monkeypatch):
    """Compile with aot_eager: AOTAutograd's forward and backward graphs (LoRA's recomputed branch partitioned as
    inductor gets it), run by torch's kernels."""
    monkeypatch.setattr(compiling, "COMPILE_BACKEND", "aot_eager")


def test_each_block_starts_a_fresh_dynamo_counts_its_compilations_and_fails_at_the_recompile_limit(eager_backend):
    model = nn.Linear(2, 1)

    def run(warm_shapes, late_shapes):
        with common.compiling(True, "cpu") as compiled:
            stepped = compiled.model(model)
            assert compiled.model(model) is stepped  # one wrapper per model, shared by warm-up and training
            with compiled.warming_up():
                for size in warm_shapes:
                    stepped(torch.ones(size, 2))
            for size in late_shapes:
                stepped(torch.ones(size, 2))
            return compiled.meta()

    with torch._dynamo.config.patch(recompile_limit=2):  # torch's own context restores the setting
        metas = [run([3, 4], [3, 4]) for _ in range(3)]  # without a fresh Dynamo, the third block would hit the limit
        assert [{key: meta[key] for key in ("compiles", "recompiles", "late_compiles")} for meta in metas] == \
            [{"compiles": 2, "recompiles": 1, "late_compiles": 0}] * 3
        assert all(meta["compile_s"] > 0 for meta in metas)
        assert run([3], [4])["late_compiles"] == 1  # a shape the warm-up did not meet compiles in the timed block
        with pytest.raises(common.UserError, match="recompile_limit"):
            run([3, 4, 5], [])  # a third shape is one compilation too many: an error, not eager
    assert compiling.active() is None


def test_outside_a_block_nothing_is_compiled(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: pytest.fail("compiled outside a block"))
    with common.compiling(False, "cpu") as compiled:
        assert compiled is None and compiling.active() is None
        model = nn.Linear(2, 2)
        common.train(model, [(torch.ones(4, 2), torch.zeros(4, dtype=torch.long))], 1)


def test_the_compiled_warm_up_compiles_every_batch_size_and_leaves_the_model_bit_identical(eager_backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(4 * 30 * 30, 10)).eval()  # BatchNorm statistics and dropout: what it could disturb
    inputs, labels = torch.randn(32, 3, 32, 32), torch.arange(32) % 10
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    rng = torch.get_rng_state()
    with common.compiling(True, "cpu") as compiled:
        common.warm_up(model, inputs, labels, sizes={32, 18})
        meta = compiled.meta()
    assert (meta["compiles"], meta["recompiles"], meta["late_compiles"]) == (2, 1, 0)
    assert torch.equal(torch.get_rng_state(), rng) and not model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def compiled_and_eager(method, arch, original_weights, cifar_dir, workdir):
    """(compiled checkpoint, eager checkpoint) of method trained from the smoke arch on one batch shape."""
    paths = {}
    for label, flags in (("compiled", ["--compile"]), ("eager", [])):
        paths[label] = workdir / f"{method}-{label}.pth"
        assert run_script(f"{method}.py", "--arch", arch, *SMOKE, *ONE_SHAPE, *flags, "--data", cifar_dir,
                          "--weights", original_weights(arch), "--out", paths[label]) == 0
    return [torch.load(paths[label], weights_only=True) for label in ("compiled", "eager")]


def test_a_compiled_run_trains_as_eager_with_its_compile_time_apart(original_weights, cifar_dir, workdir,
                                                                    aot_eager_backend):
    # LoRA at dropout 0.1 on the ViT: the recomputed adapter branch must draw the same dropout masks in the
    # compiled backward as in eager's.
    compiled, eager = compiled_and_eager("lora", "vit", original_weights, cifar_dir, workdir)
    meta = compiled["meta"]
    assert meta["compile"] is True and eager["meta"]["compile"] is False
    assert (meta["compiles"], meta["recompiles"], meta["late_compiles"]) == (1, 0, 0)
    assert meta["compile_s"] > 0 and "compile_s" not in eager["meta"]
    assert compiled["model"].keys() == eager["model"].keys()  # plain names: no wrapper's prefix
    assert all(torch.equal(compiled["model"][k], eager["model"][k]) for k in eager["model"])


@pytest.mark.inductor
@pytest.mark.parametrize("method", ["finetune", "lora"])
def test_inductor_trains_as_eager_within_the_tolerance(method, original_weights, cifar_dir, workdir):
    compiled, eager = compiled_and_eager(method, "resnet50", original_weights, cifar_dir, workdir)
    assert compiled["meta"]["late_compiles"] == 0
    for name, tensor in eager["model"].items():
        apart = (compiled["model"][name].float() - tensor.float()).abs()
        if "running_" in name:
            assert apart.sum() <= RUNNING_STATISTICS_TOLERANCE * tensor.abs().sum(), name
        else:
            assert apart.max() <= WEIGHT_TOLERANCE, name
    metrics = [common.evaluate_checkpoint(workdir / f"{method}-{label}.pth", cifar_dir, "cpu")
               for label in ("compiled", "eager")]
    for key in ("UA", "RA", "TA"):
        assert abs(metrics[0][key] - metrics[1][key]) <= METRIC_TOLERANCE, key


def test_compile_without_a_compiler_is_one_line(original_weights, cifar_dir, workdir, capsys):
    inductor_config = pytest.importorskip("torch._inductor.config")
    with inductor_config.patch({"cpp.cxx": ("no-such-compiler++",)}):
        assert run_script("finetune.py", "--arch", "vit", *SMOKE, "--compile", "--data", cifar_dir, "--weights",
                          original_weights("vit"), "--out", "x.pth") == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("error: --compile failed") and "run without --compile" in error
    assert not (workdir / "x.pth").exists()


def test_evaluate_shows_the_compile_columns_only_for_compiled_runs():
    columns = {"method": "method", "RTE_s": "RTE s", "path": "checkpoint"}
    assert common.with_compile_columns(columns, [{"RTE_s": 1.0}]) is columns
    assert list(common.with_compile_columns(columns, [{"RTE_s": 1.0}, {"compile_s": 9.0}])) == \
        ["method", "RTE_s", "compile_s", "compiles", "late_compiles", "path"]


def test_reproduce_compile_is_in_every_runs_fingerprint_and_the_record_schema():
    args = argparse.Namespace(preset="smoke", dataset="cifar10", data="data", device="cpu", compile=False)
    eager = units.make_run("resnet50", "lora", 0, args, common.ForgetSpec())
    compiled = units.make_run("resnet50", "lora", 0, argparse.Namespace(**{**vars(args), "compile": True}),
                              common.ForgetSpec())
    assert "--compile" in compiled.plan_flags and "--compile" not in eager.plan_flags
    record = {"fingerprint": records.fingerprint(eager, "smoke", "0" * 64, "synthetic", "cpu")}
    expected = records.fingerprint(compiled, "smoke", "0" * 64, "synthetic", "cpu")
    assert records.differences(record, expected) == ["flags"]  # an eager record is stale for a compiled sweep
    whole = {"arch": "resnet50", "method": "lora", "seed": 0, "preset": "smoke", "forget": "class3", "UA": 1.0,
             "RA": 1.0, "TA": 1.0, "MIA_efficacy": 1.0, "RTE_s": 1.0, "seconds": 2.0, **record}
    assert records.record_problem({**whole, "compile_s": 3.5, "compiles": 2, "recompiles": 1,
                                   "late_compiles": 0}) is None
    assert "late_compiles" in records.record_problem({**whole, "late_compiles": -1})


WRAPPER_CODE = '''
cpp_fused_relu_0 = async_compile.cpp_pybinding(["float*"], "...")
cpp_fused_sum_1 = async_compile.cpp_pybinding(["float*"], "...")


class Runner:
    def call(self, args):
        primals_1, primals_2 = args
        args.clear()
        assert_size_stride(primals_1, (4, 4), (4, 1), "input")
        buf0 = empty_strided_cpu((4, 4), (4, 1), torch.float32)
        cpp_fused_relu_0(primals_1, buf0)
        buf1 = extern_kernels.mm(buf0, reinterpret_tensor(primals_2, (4, 4), (1, 4), 0))
        buf2 = torch.ops.aten.convolution_backward.default(buf1, buf0, primals_2, None, [1, 1])
        buf3 = torch.ops.aten.view.dtype(buf1, torch.int32)
        cpp_fused_sum_1(buf1)
        cpp_fused_sum_1(buf2[0])
        return (buf1, )
'''


def test_a_graphs_launches_are_its_generated_kernels_and_library_calls_not_views_allocations_or_checks():
    launches = kernels.graph_launches(WRAPPER_CODE)
    assert launches["generated"] == 3  # each call of a generated kernel, as often as it is called
    assert launches["library_ops"] == {"extern_kernels.mm": 1, "torch.ops.aten.convolution_backward": 1}
    assert launches["library"] == 2


def test_the_models_own_ops_do_not_depend_on_the_loss():
    def count(loss_fn):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 10))
        images = torch.randint(0, 256, (10, 3, 2, 2), dtype=torch.uint8)
        batches = common.Batches(images, torch.arange(10), torch.arange(10), 4)
        step = costs.TrainingStep(batches, loss_fn, common.make_adam(model.parameters(), 1e-3))
        return costs.count_training(model, step, 4)

    plain, squared = count(common.cross_entropy), count(lambda model, x, y: model(x).pow(2).mean())
    assert plain["ops_per_step"] != squared["ops_per_step"]
    assert 0 < plain["model_ops_per_step"] == squared["model_ops_per_step"] < plain["ops_per_step"]


def test_the_compiled_launches_replace_the_models_own_and_cuda_graphs_replay_each_graph():
    counts = {"model_ops_per_step": 70, "model_view_ops_per_step": 10,
              "compiled": {"graphs": 2, "generated": 12, "library": 8, "library_ops": {}}}
    columns = bench.compiled_columns(counts, launches=90, steps=10, flops=0, assumptions=costs.GPU_ASSUMPTIONS)
    assert columns["model_launches"] == 60  # 30 launches outside the model: data, loss, optimizer
    assert columns["compiled_launches_per_step"] == 30 + 12 + 8
    assert columns["cuda_graph_launches_per_step"] == 30 + 2 * bench.CUDA_GRAPH_LAUNCHES_PER_GRAPH
    assert columns["compiled_ok"] == "FAIL" and columns["compiled_over_eager"] == 50 / 90
    assert columns["gpu_s_compiled"] == pytest.approx(10 * 50 * costs.GPU_ASSUMPTIONS["launch_us"] * 1e-6)
    assert bench.compiled_columns({}, 90, 10, 0, costs.GPU_ASSUMPTIONS) == {}


@pytest.mark.inductor
def test_inductor_compiles_an_mlps_step_into_two_graphs_with_its_matmuls_left_to_the_library():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 10))
    before = {name: p.clone() for name, p in model.named_parameters()}
    counted = kernels.count_compiled_step(model, common.cross_entropy, torch.randn(4, 3, 2, 2), torch.arange(4))
    assert counted["graphs"] == 2 and counted["generated"] > 0  # forward and backward
    # forward: two linear layers; backward: both weight gradients and the second layer's input gradient
    assert sum(counted["library_ops"].values()) == counted["library"] == 5
    assert all(p.grad is None and torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_reproduce_tables_show_compile_seconds_after_the_rte_only_when_runs_compiled(workdir):
    def run(method, seed, compile_s=None):
        record = {"method": method, "seed": seed, "UA": 90.0, "MIA_efficacy": 50.0, "RA": 90.0, "TA": 80.0,
                  "RTE_s": 1.0, "peak_gpu_mem_mb": None}
        return record if compile_s is None else {**record, "compile_s": compile_s}

    def header(runs):
        reproduce.write_markdown(workdir / "table.md", "title", [], reproduce.summarize(runs))
        return next(line for line in (workdir / "table.md").read_text().splitlines() if line.startswith("| method"))

    assert "compile s" not in header([run("retrain", 0), run("lora", 0)])
    runs = [run("retrain", 0), run("lora", 0, 30.0), run("lora", 1, 50.0)]
    assert "| RTE s | compile s | peak GPU MB |" in header(runs)
    assert reproduce.summarize(runs)[1]["compile_s"] == pytest.approx({"mean": 40.0, "std": 200 ** 0.5})
