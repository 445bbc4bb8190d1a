"""The timed block (RTE) holds the method's work and nothing else, whatever ran before it in the process: no module
is imported inside it, every batch shape and mode it meets was warmed up before it, no background callback is
pending when its clock starts, and a step leaves the process environment as it found it."""
import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_script

import common
from unlearning import measure

SMOKE = ["--preset", "smoke", "--device", "cpu"]
METHOD_SCRIPTS = ("finetune", "pruneft", "lora", "loraprune", "ga", "rl", "l1sparse", "salun", "scrub")


def process_environment():
    """What a step could leave changed in the process: environment variables, torch's global settings, argv, path."""
    return {"environ": dict(os.environ), "deterministic": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn": (torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark,
                      torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32),
            "matmul": (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()),
            "threads": torch.get_num_threads(), "dtype": torch.get_default_dtype(),
            "grad": torch.is_grad_enabled(), "cwd": os.getcwd(), "argv": list(sys.argv), "path": list(sys.path),
            "sigterm": signal.getsignal(signal.SIGTERM), "before_timing": list(measure.Measure.before_timing)}


class TimedBlocks:
    """Watches every Measure block of a run: the modules imported inside, and the (batch size, train mode) of every
    image batch that a module met inside a block and that no module met before that block."""

    def __init__(self):
        self.timing, self.blocks = False, 0
        self.met, self.unwarmed, self.imported = set(), set(), []

    def see_batch(self, module, inputs):
        if inputs and torch.is_tensor(inputs[0]) and inputs[0].dim() == 4 and inputs[0].shape[1] == 3:
            key = (len(inputs[0]), module.training)
            if self.timing and key not in self.met:
                self.unwarmed.add(key)
            self.met.add(key)

    @contextlib.contextmanager
    def watching(self, monkeypatch):
        enter, leave = measure.Measure.__enter__, measure.Measure.__exit__

        def entered(block):
            result = enter(block)
            self.timing, self.blocks = True, self.blocks + 1
            return result

        def left(block, *exc):
            self.timing = False
            before = len(block.imported)
            leave(block, *exc)
            self.imported += block.imported[before:]
        monkeypatch.setattr(measure.Measure, "__enter__", entered)
        monkeypatch.setattr(measure.Measure, "__exit__", left)
        hook = torch.nn.modules.module.register_module_forward_pre_hook(self.see_batch)
        try:
            yield self
        finally:
            hook.remove()


@pytest.fixture(scope="module")
def warmed_process(original_weights):
    """The original model's path, with the libraries the scripts use imported already, as in the sweep's process
    after its first step: their first import changes the process once (torch's inductor sets
    TORCHINDUCTOR_CACHE_DIR, scikit-learn KMP_* variables), which is the process's start-up, not a step's change.
    That the scripts import them before timing is checked in a fresh process below."""
    common.import_peft()
    common.import_torch_pruning()
    importlib.import_module("timm.models.vision_transformer")
    importlib.import_module("sklearn.svm")
    return original_weights("resnet50")


@pytest.mark.parametrize("script", METHOD_SCRIPTS)
def test_a_timed_block_imports_nothing_meets_only_warmed_shapes_and_the_step_leaves_the_environment(
        script, warmed_process, cifar_dir, workdir, monkeypatch):
    flags = [*SMOKE, "--data", cifar_dir, "--weights", warmed_process, "--deterministic"]
    if script in ("pruneft", "loraprune"):
        flags += ["--prune-mode", "physical"]
    if script in ("ga", "rl", "salun", "scrub"):  # a forget set whose last batch is partial
        flags += ["--batch-size", "16"]
    before = process_environment()
    with TimedBlocks().watching(monkeypatch) as blocks:
        assert run_script(f"{script}.py", *flags, "--out", workdir / "out.pth") == 0
    assert blocks.blocks == 2  # unlearn() and fit()
    assert blocks.imported == []
    assert blocks.unwarmed == set()
    assert process_environment() == before


def test_continual_steps_import_nothing_while_timed(warmed_process, original_weights, cifar_dir, workdir,
                                                   monkeypatch):
    weights = original_weights("vit")
    before = process_environment()
    with TimedBlocks().watching(monkeypatch) as blocks:
        assert run_script("continual.py", *SMOKE, "--data", cifar_dir, "--weights", weights,
                          "--methods", "lora", "loraprune", "--steps", "3", "5", "--no-retrain",
                          "--arch", "vit") == 0
    assert blocks.blocks == 2 * 2 * 2
    assert blocks.imported == []
    assert blocks.unwarmed == set()
    assert process_environment() == before


def test_every_callback_runs_before_the_clock_starts_and_only_while_registered():
    block, clock_started = common.Measure("cpu"), []
    with common.before_timing(lambda: clock_started.append(hasattr(block, "start"))):
        with block:
            pass
        assert clock_started == [False]
    with block:
        pass
    assert clock_started == [False]


def test_an_import_inside_a_timed_block_is_reported():
    sys.modules.pop("colorsys", None)
    with common.Measure("cpu") as block:
        import colorsys  # noqa: F401
    assert block.imported == ["colorsys"]


def test_compiler_caches_are_reset_between_steps():
    compiled = torch.compile(lambda x: x + 1, backend="eager")
    compiled(torch.zeros(3))
    counter = torch._dynamo.convert_frame.FRAME_COMPILE_COUNTER
    assert sum(counter.values()) >= 1
    common.reset_compiler_caches()
    assert sum(counter.values()) == 0


def test_deterministic_mode_restores_the_cublas_workspace_setting(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with common.deterministic_mode(True):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"]
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with common.deterministic_mode(True):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_a_fresh_process_imports_the_libraries_of_lora_and_pruning_before_timing(original_weights, cifar_dir,
                                                                                   workdir):
    """In this test process peft and torch-pruning are imported already; a fresh one shows that the script itself
    imports them before its timed block (the first LoRA step of a process paid peft's start-up in its RTE)."""
    flags = [*SMOKE, "--data", str(cifar_dir), "--weights", str(original_weights("resnet50")), "--prune-mode",
             "physical", "--out", str(workdir / "out.pth")]
    check = ("import json, runpy, sys; from unlearning import measure; "
             f"sys.argv = ['loraprune.py', *{flags!r}]; runpy.run_path('loraprune.py', run_name='__main__'); "
             "print(json.dumps([measure.Measure.latest.imported, 'peft' in sys.modules, "
             "'torch_pruning' in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.splitlines()[-1]) == [[], True, True]
