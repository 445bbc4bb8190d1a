"""What a training step and an evaluation cost, counted on any device: FLOPs, dispatched ops (those other than
views are the kernel launches), ops that would make the host wait on a GPU, bytes saved for backward, memory and
convolution layouts; and a GPU time estimate from those counts.

The counts are properties of the code and the shapes, not of the machine: the same model, batch and step give the
same numbers on a laptop CPU as on a GPU host. `count_training` runs common.train itself over a few tiny batches and
reads the steady-state step (neither the first one, which creates the optimizer state, nor the epoch-end check).
To count what a GPU runs on a CPU, set up and count under settings.gpu_shaped_mode (as bench.py --costs does): the
project's own GPU code paths (bf16 autocast, channels-last, fused or foreach optimizers) then run.
"""
import difflib
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .metrics import predict
from .training import train

aten = torch.ops.aten

# Ops after which a GPU host waits for the device, or which copy between host and device, by what they are.
# On a CPU no real sync can be observed, so these are the ops that WOULD sync or transfer on a GPU.
HOST_READ = "device-to-host read (.item(), bool(), int() of a tensor)"
HOST_DATA = "tensor built from host data (torch.tensor, as_tensor): a host-to-device copy on a GPU"
CROSS_DEVICE = "copy between devices (.to(), .cpu(), copy_)"
DATA_DEPENDENT = "output size depends on values (nonzero, masked_select, unique, boolean indexing)"
_DATA_DEPENDENT_OPS = {aten.nonzero, aten.masked_select, aten._unique2, aten.unique_dim, aten.unique_consecutive,
                       aten.repeat_interleave}

# The GPU this estimate is for and what it assumes; to be replaced by measured figures once a GPU run exists.
# Training runs under bf16 autocast; evaluation in fp32, where cuDNN convolutions use TF32 and matmuls plain fp32
# (torch's defaults). Peaks are dense tensor-core / fp32 figures of one H100 SXM (the H200 has the same).
GPU_ASSUMPTIONS = {"gpu": "H100 / H200 SXM", "bf16_tflops": 989.0, "tf32_tflops": 494.7, "fp32_tflops": 66.9,
                   "utilisation": 0.4, "launch_us": 5.0}


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                        **kwargs):
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's flop counter knows the GPU attention kernels; the CPU one computes the same attention.
_EXTRA_FLOP_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops,
                        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward_flops}


def sync_reason(func, args, kwargs, out):
    """Why op func would make a GPU host wait or copy between host and device; None if it would not."""
    packet = func.overloadpacket
    if packet is aten._local_scalar_dense:
        return HOST_READ
    if packet is aten.lift_fresh:
        return HOST_DATA
    if packet in _DATA_DEPENDENT_OPS and not (packet is aten.repeat_interleave and kwargs.get("output_size")):
        return DATA_DEPENDENT
    if packet in (aten.index, aten.index_put, aten.index_put_) and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in _flat(args[1:2])):
        return DATA_DEPENDENT
    if packet in (aten._to_copy, aten.copy_):
        tensors = [t for t in _flat((args, out)) if isinstance(t, torch.Tensor)]
        if len({t.device for t in tensors}) > 1:
            return CROSS_DEVICE
    return None


def _flat(tree):
    return tree_flatten(tree)[0]


class OpCounter(TorchDispatchMode):
    """Counts every dispatched op, the ops sync_reason names, and forward convolutions whose input and weight are
    both channels-last, and the view ops among them (no kernel on a GPU); tracks the bytes of the storages
    created inside it that are still alive (`live`, `peak`), and `trace`, (op, live bytes) after each op.

    `phase` labels where the ops fall (ops_by_phase); while `in_model` is true the ops are also counted as the
    model's own (model_ops, model_view_ops: its forward and backward, what --compile compiles)."""

    def __init__(self):
        super().__init__()
        self.ops, self.view_ops, self.syncs, self.convolutions, self.channels_last_convolutions = 0, 0, 0, 0, 0
        self.model_ops = self.model_view_ops = 0
        self.in_model = False
        self.sync_ops, self.ops_by_phase = Counter(), Counter()
        self.phase = "data"
        self.live = self.peak = 0
        self.trace = []
        self._tracked = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "profiler":  # record_function markers launch nothing
            return out
        self.ops += 1
        self.view_ops += func.is_view
        if self.in_model:
            self.model_ops += 1
            self.model_view_ops += func.is_view
        self.ops_by_phase[self.phase] += 1
        reason = sync_reason(func, args, kwargs, out)
        if reason is not None:
            self.syncs += 1
            self.sync_ops[f"{func.overloadpacket.__name__}: {reason}"] += 1
        if func.overloadpacket is aten.convolution:
            self.convolutions += 1
            layout = torch.channels_last
            self.channels_last_convolutions += args[0].is_contiguous(memory_format=layout) and \
                args[1].is_contiguous(memory_format=layout)
        self._track(args, kwargs, out)
        self.trace.append((func.name(), self.live))
        return out

    def _track(self, args, kwargs, out):
        """Count the storages an op creates (not the ones it views or writes into) until they are freed."""
        inputs = {id(t.untyped_storage()) for t in _flat((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in _flat(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._tracked:
                continue
            self._tracked.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, storage.nbytes())

    def _release(self, key, nbytes):
        self._tracked.discard(key)
        self.live -= nbytes


class SavedBytes:
    """torch.autograd.graph.saved_tensors_hooks that add up the bytes autograd keeps for backward, each storage
    once; storages of `resident` tensors (parameters, buffers) are counted apart, as they are kept anyway."""

    def __init__(self, resident=()):
        self.resident = {id(t.untyped_storage()) for t in resident}
        self.seen, self.bytes, self.resident_bytes = set(), 0, 0  # saved storages stay alive until backward

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        key = id(storage)
        if key not in self.seen:
            self.seen.add(key)
            if key in self.resident:
                self.resident_bytes += storage.nbytes()
            else:
                self.bytes += storage.nbytes()
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)


class _GlobalOnly:
    """Stands in for FlopCounterMode's per-module tracker: every FLOP goes to "Global" only."""
    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def total_flop_counter():
    """A FlopCounterMode that counts totals (per op, under "Global") without its per-module tracking, whose backward
    hooks keep the tensors of torch.utils.checkpoint's reruns alive into the next step: live memory that a plain
    run frees at once."""
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    counter.mod_tracker = _GlobalOnly()
    return counter


class Recorder:
    """FLOPs, ops, syncs and live memory together, cut into windows by mark(): each window's counts and peak."""

    def __init__(self):
        self.flops = total_flop_counter()
        self.counter = OpCounter()
        self.windows = []
        self._start, self._start_live = None, 0

    def __enter__(self):
        self.flops.__enter__()
        self.counter.__enter__()
        self._start = self._snapshot()
        return self

    def __exit__(self, *exc):
        self.counter.__exit__(*exc)
        self.flops.__exit__(*exc)

    def _snapshot(self):
        c = self.counter
        by_op = self.flops.get_flop_counts().get("Global", {})
        return {"flops": self.flops.get_total_flops(),
                "convolution_flops": sum(n for op, n in by_op.items() if "convolution" in str(op)),
                "ops": c.ops, "view_ops": c.view_ops, "model_ops": c.model_ops, "model_view_ops": c.model_view_ops,
                "syncs": c.syncs, "sync_ops": Counter(c.sync_ops),
                "ops_by_phase": Counter(c.ops_by_phase), "convolutions": c.convolutions,
                "channels_last_convolutions": c.channels_last_convolutions}

    def mark(self, **extra):
        """Close the current window (with extra fields) and start the next."""
        now = self._snapshot()
        window = {key: now[key] - self._start[key] for key in now}
        window["sync_ops"] = dict(window["sync_ops"])
        window["ops_by_phase"] = dict(window["ops_by_phase"])
        window.update(peak_live_bytes=self.counter.peak, start_live_bytes=self._start_live,
                      trace=self.counter.trace[self._start["ops"]:now["ops"]], **extra)
        self.windows.append(window)
        self._start = now
        self.counter.peak = self._start_live = self.counter.live


def tensor_bytes(tensors):
    """Bytes of the distinct storages behind tensors."""
    storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def module_bytes(module):
    return tensor_bytes([*module.parameters(), *module.buffers()])


def optimizer_state_bytes(optimizer):
    return tensor_bytes([v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)])


@dataclass
class TrainingStep:
    """What a method trains with, as its script sets it up: batches, loss_fn(model, inputs, labels), optimizer,
    before_step, whether BatchNorm is frozen, and further models kept on the device (SCRUB's teacher)."""
    batches: object
    loss_fn: object
    optimizer: torch.optim.Optimizer
    before_step: object = None
    freeze_batchnorm: bool = False
    resident: list = field(default_factory=list)


def _linear_in_batch(full, partial, full_batch, partial_batch):
    """(per image, fixed) of a quantity measured at two batch sizes."""
    per_image = (full - partial) / (full_batch - partial_batch)
    return per_image, full - per_image * full_batch


def _peak_at(full, partial, full_batch, partial_batch, batch_size):
    """Peak live bytes of a window at batch_size, from the same window run at two batch sizes: the live bytes after
    each op, each extrapolated linearly in the batch (every allocation either grows with it or does not), then the
    largest. The two op sequences are aligned first, as a batch of one can add a view op or two."""
    names = [[name for name, _ in window["trace"]] for window in (full, partial)]
    matcher = difflib.SequenceMatcher(None, *names, autojunk=False)
    pairs = [(full["trace"][block.a + k][1], partial["trace"][block.b + k][1])
             for block in matcher.get_matching_blocks() for k in range(block.size)]
    fits = (_linear_in_batch(a, b, full_batch, partial_batch) for a, b in pairs)
    return max(fixed + per_image * batch_size for per_image, fixed in fits)


def count_training(model, step, peak_batch_size):
    """Counts of one steady-state training step of model under step, by running common.train (one epoch) over
    step.batches, which must give at least three batches, the last one smaller (e.g. 8, 8, 4 images); the step's
    memory peak is estimated for batches of peak_batch_size.

    The step runs as common.train runs it on the model's device (bf16 autocast on the GPU's path); its ops are the
    data (indexing, normalising), forward, backward (with the loop's finite-loss bookkeeping and
    before_step) and optimizer ops between two optimizer steps. Quantities that grow with the batch (FLOPs, saved
    bytes, memory) are given per image and fixed, from the last two steps; op and sync counts are the full
    batch's step (they do not depend on the batch size)."""
    params = list(model.parameters())
    resident = [*params, *model.buffers(), *(t for m in step.resident for t in (*m.parameters(), *m.buffers()))]
    batch_sizes, saved, forward_flops = [], [], []
    recorder = Recorder()

    def counted_loss(model, inputs, labels):
        batch_sizes.append(len(labels))
        saved.append(SavedBytes(resident))
        recorder.counter.phase = "forward"
        before = recorder.flops.get_total_flops()
        with saved[-1].hooks():
            loss = step.loss_fn(model, inputs, labels)
        forward_flops.append(recorder.flops.get_total_flops() - before)
        recorder.counter.phase = "backward"
        return loss

    def before_optimizer(*_):
        recorder.counter.phase = "optimizer"
        recorder.counter.in_model = False

    def model_begins(*_):
        recorder.counter.in_model = True

    def model_ends(module, inputs, output):  # the loss follows; the model's backward begins at its output's gradient
        recorder.counter.in_model = False
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(model_begins)

    def counted_before_step():  # the model's backward has ended
        recorder.counter.in_model = False
        if step.before_step is not None:
            step.before_step()

    def after_optimizer(*_):
        recorder.mark(batch=batch_sizes[-1], forward_flops=forward_flops[-1], saved_bytes=saved[-1].bytes,
                      saved_resident_bytes=saved[-1].resident_bytes)
        recorder.counter.phase = "data"

    if len(step.batches) < 3:
        raise ValueError("count_training needs at least three batches")
    hooks = [step.optimizer.register_step_pre_hook(before_optimizer),
             step.optimizer.register_step_post_hook(after_optimizer),
             model.register_forward_pre_hook(model_begins), model.register_forward_hook(model_ends)]
    try:
        with recorder:
            train(model, step.batches, 1, loss_fn=counted_loss, optimizer=step.optimizer,
                  before_step=counted_before_step, freeze_batchnorm=step.freeze_batchnorm, desc="costs")
    finally:
        for hook in hooks:
            hook.remove()
    full, partial = recorder.windows[-2], recorder.windows[-1]
    if partial["batch"] >= full["batch"]:
        raise ValueError("count_training needs a last batch smaller than the others")
    fits = {key: _linear_in_batch(full[key], partial[key], full["batch"], partial["batch"])
            for key in ("flops", "forward_flops", "saved_bytes")}
    trainable = [p for p in params if p.requires_grad]
    return {
        "flops_per_image": fits["flops"][0], "flops_fixed": fits["flops"][1],
        "forward_flops_per_image": fits["forward_flops"][0],
        "ops_per_step": full["ops"], "view_ops_per_step": full["view_ops"], "ops_by_phase": full["ops_by_phase"],
        "model_ops_per_step": full["model_ops"], "model_view_ops_per_step": full["model_view_ops"],
        "ops_depend_on_batch": full["ops"] != partial["ops"],
        "syncs_per_step": full["syncs"], "sync_ops": full["sync_ops"],
        "convolutions": full["convolutions"], "channels_last_convolutions": full["channels_last_convolutions"],
        "saved_bytes_per_image": fits["saved_bytes"][0], "saved_bytes_fixed": fits["saved_bytes"][1],
        "saved_resident_bytes": full["saved_resident_bytes"],
        "resident_bytes": tensor_bytes(resident), "param_bytes": tensor_bytes(params),
        "trainable_params": sum(p.numel() for p in trainable), "params": sum(p.numel() for p in params),
        "grad_bytes": tensor_bytes(trainable), "optimizer_state_bytes": optimizer_state_bytes(step.optimizer),
        # the most a step holds beyond the resident tensors (optimizer state, gradients, activations, temporaries)
        "peak_batch_size": peak_batch_size,
        "step_peak_bytes": _peak_at(full, partial, full["batch"], partial["batch"], peak_batch_size),
        "counted_batches": [w["batch"] for w in recorder.windows],
    }


def count_evaluation(model, images, idx, batch_size, peak_batch_size):
    """Counts of predict() (fp32, no_grad) over images[idx] in batches of batch_size: FLOPs per image, ops and
    syncs per batch (the middle one of at least three, the last one smaller), and the peak memory of batches of
    peak_batch_size."""
    recorder = Recorder()
    hook = model.register_forward_pre_hook(lambda *_: recorder.mark(), prepend=True)
    try:
        with recorder:
            predict(model, images, idx, batch_size)
            recorder.mark()
    finally:
        hook.remove()
    # window k (k >= 1) holds batch k's forward and softmax and the next batch's normalisation
    windows = recorder.windows[1:]
    sizes = [len(idx[start:start + batch_size]) for start in range(0, len(idx), batch_size)]
    if len(windows) < 3 or sizes[-1] >= sizes[0]:
        raise ValueError("count_evaluation needs at least three batches, the last one smaller")
    full, partial = windows[-2], windows[-1]
    per_image_flops, _ = _linear_in_batch(full["flops"], partial["flops"], sizes[-2], sizes[-1])
    per_image_convolution, _ = _linear_in_batch(full["convolution_flops"], partial["convolution_flops"], sizes[-2],
                                                sizes[-1])
    return {"flops_per_image": per_image_flops, "convolution_flops_per_image": per_image_convolution,
            "ops_per_batch": windows[-3]["ops"], "view_ops_per_batch": windows[-3]["view_ops"],
            "syncs_per_batch": windows[-3]["syncs"], "sync_ops": windows[-3]["sync_ops"],
            "resident_bytes": module_bytes(model), "peak_batch_size": peak_batch_size,
            "batch_peak_bytes": _peak_at(full, partial, sizes[-2], sizes[-1], peak_batch_size)}


def count_ops(fn, *args, **kwargs):
    """(fn's result, its counts: ops, syncs, sync_ops, flops) for a one-off piece of work such as preparing a
    model."""
    recorder = Recorder()
    with recorder:
        result = fn(*args, **kwargs)
        recorder.mark()
    window = recorder.windows[0]
    return result, {key: window[key] for key in ("ops", "syncs", "sync_ops", "flops")}


def peak_bytes(counts):
    """Estimated peak memory of a counted step or evaluation batch: the resident tensors plus its peak above them."""
    return counts["resident_bytes"] + counts.get("step_peak_bytes", counts.get("batch_peak_bytes"))


def gpu_seconds(launches, assumptions=GPU_ASSUMPTIONS, **flops):
    """An estimate, not a measurement: FLOPs at the assumed share of the GPU's peak for their precision
    (bf16=..., tf32=..., fp32=...) plus launches at a fixed cost each, without overlap."""
    rate = 1e12 * assumptions["utilisation"]
    compute = sum(n / (assumptions[f"{precision}_tflops"] * rate) for precision, n in flops.items())
    return compute + launches * assumptions["launch_us"] * 1e-6
