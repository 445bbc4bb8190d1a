"""--compile: the training step's forward and backward through torch.compile (inductor), compiled in the untimed
warm-up, once per batch shape, so that the RTE holds compiled steps only; on a GPU each compiled graph is replayed
as a CUDA graph. The compile seconds and counts go into the checkpoint's meta.

    with compiling(True, device) as compiled:
        warm_up(model, ...)          # compiles the step for every batch size the run meets (compiled.compile_s)
        with Measure(device):
            train(model, ...)        # runs the compiled step; a compilation here counts as late
    meta.update(compiled.meta())

What is compiled: the model as train() calls it (forward and, through AOTAutograd, its backward; LoRA's recomputed
adapter branch included), in the training mode train() sets. The loss, the finite-loss bookkeeping and the optimizer
step run eager. Static shapes (dynamic=False): the full batch, the smaller last batch and the forget set's batches
each get a graph of their own, all compiled in the warm-up and counted. Hitting Dynamo's recompile limit is an
error, never a silent fall-back to eager. Random ops draw from torch's own generator (inductor's fallback_random), so
a seed gives the compiled step the same dropout masks as the eager one.
"""
import contextlib
import time

import torch

from .errors import UserError

COMPILE_BACKEND = "inductor"  # torch.compile's backend under compile (inductor needs a C++ compiler on CPU)
# On CUDA the compiled graphs are replayed as CUDA graphs; cudagraph trees record a graph on its second call.
CUDA_GRAPH_MODE = "reduce-overhead"
CUDA_GRAPH_WARM_UP_CALLS = 3  # a run, a recording, a replay: every graph is replayed before the timed block
COMPILE_META_KEYS = ("compile_s", "compiles", "recompiles", "late_compiles")

_active = None  # the CompiledSteps of the enclosing compiling() block


def compile_mode(device):
    """torch.compile's mode on device: reduce-overhead (CUDA graphs) on CUDA, the default elsewhere."""
    return CUDA_GRAPH_MODE if torch.device(device).type == "cuda" else "default"


def compile_counts():
    """(graph compilations, recompilations: compilations of a frame compiled before) since Dynamo's last reset."""
    per_frame = torch._dynamo.convert_frame.FRAME_COMPILE_COUNTER
    return sum(per_frame.values()), sum(count - 1 for count in per_frame.values())


class CompiledSteps:
    """The compiled step of one run: each model's compiled wrapper (made once, shared by the warm-up and train()),
    the warm-up's seconds and the compilation counts."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.mode = compile_mode(self.device)
        self.cuda_graphs = self.mode == CUDA_GRAPH_MODE
        self.compiled = {}
        self.compile_s = 0.0
        self.warm_counts = (0, 0)

    def model(self, model):
        """model's compiled wrapper (it shares model's parameters and buffers)."""
        if model not in self.compiled:
            self.compiled[model] = torch.compile(model, backend=COMPILE_BACKEND, mode=self.mode, dynamic=False)
        return self.compiled[model]

    def step_begins(self):
        """Called before each step: CUDA-graph replays of the previous step may be overwritten from here on."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def warm_up_calls(self):
        return CUDA_GRAPH_WARM_UP_CALLS if self.cuda_graphs else 1

    @contextlib.contextmanager
    def warming_up(self):
        """The block compiles (and on a GPU records) the step: its seconds add to compile_s."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.compile_s += time.perf_counter() - start
            self.warm_counts = compile_counts()

    def meta(self):
        """What a checkpoint's meta records of the compiled run: the warm-up's compile seconds, compilations and
        recompilations (one per batch shape beyond the first), and the compilations after the warm-up (inside the
        timed block: 0 unless a step met a shape or mode the warm-up did not)."""
        compiles, recompiles = compile_counts()
        return {"compile_s": self.compile_s, "compiles": compiles, "recompiles": recompiles,
                "late_compiles": compiles - self.warm_counts[0]}


def active():
    """The CompiledSteps of the enclosing compiling() block, None outside one (train() then runs eager)."""
    return _active


@contextlib.contextmanager
def compile_errors():
    """A compiler that fails (no C++ compiler on a CPU, an unsupported op) or a recompile limit hit inside the block
    becomes a one-line UserError."""
    try:
        yield
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        raise UserError(f"--compile: the step recompiled past torch._dynamo.config.recompile_limit "
                        f"({torch._dynamo.config.recompile_limit}) and would have run eager") from None
    except torch._dynamo.exc.BackendCompilerFailed as error:
        raise UserError(f"--compile failed ({COMPILE_BACKEND}): {str(error).strip().splitlines()[0]}; "
                        f"run without --compile") from None


@contextlib.contextmanager
def compiling(enabled, device):
    """Inside the block train() runs its model compiled (see the module's docstring); yields the CompiledSteps, or
    None when not enabled (nothing changes then). Dynamo starts fresh, so the run pays, and counts, its own
    compilations; its caches are dropped again at the end."""
    global _active
    if not enabled:
        yield None
        return
    if _active is not None:
        raise RuntimeError("compiling() blocks do not nest")
    import torch._inductor.config  # noqa: F401  (imported where used: a run without --compile does not pay for it)

    torch._dynamo.reset()
    _active = CompiledSteps(device)
    try:
        with compile_errors(), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), \
                torch._inductor.config.patch(fallback_random=True):
            yield _active
    finally:
        _active = None
        torch._dynamo.reset()
