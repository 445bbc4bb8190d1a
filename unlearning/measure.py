"""Measuring a run: the untimed warm-up, the timed block (RTE, peak GPU memory) and time-to-accuracy curves."""
import contextlib
import gc
import sys
import time

import torch
from tqdm import tqdm

from . import compiling
from .data import normalize
from .datasets import DEFAULT_DATASET
from .metrics import accuracy, predict
from .settings import EVAL_BATCH_SIZE
from .training import autocast, cross_entropy, make_adam, make_sgd, training_mode


def default_eval_every(epochs):
    """About ten evaluation points over a run (every epoch for short runs), the last epoch always included."""
    return max(1, epochs // 10)


def accuracy_in_place(model, images, labels, idx, batch_size=EVAL_BATCH_SIZE, dataset=DEFAULT_DATASET):
    """Accuracy of model on images[idx] of dataset (predict, in eval mode) during training: each module goes back
    to its own mode afterwards (frozen BatchNorm stays frozen)."""
    modes = {module: module.training for module in model.modules()}
    try:
        return accuracy(predict(model, images, idx, batch_size, dataset=dataset), labels[idx])
    finally:
        for module, training in modes.items():
            module.train(training)


def split_accuracies(model, data, splits, batch_size):
    """The accuracy curve a tracked run logs (tracking.Tracker.watching): accuracy on the forget and retain
    training images and the retained classes' test images, at the training batch size: a forward pass without
    gradients at that size should need less GPU memory than the training step, so that the measured peak stays
    the training's (not yet measured on a GPU)."""
    sets = {"forget_acc": (data.train_images, data.train_labels, splits.forget_idx),
            "retain_acc": (data.train_images, data.train_labels, splits.retain_idx),
            "test_acc": (data.test_images, data.test_labels, splits.test_idx)}
    return {name: accuracy_in_place(model, *images_labels_idx, batch_size, dataset=data.dataset)
            for name, images_labels_idx in sets.items()}


class AccuracyCurve:
    """Time to accuracy: test accuracy after every `every`-th epoch and the last, with the training seconds so far
    and the throughput since the previous point, one printed line each. Evaluation (no_grad, the test images idx)
    is not training time: `eval_seconds` says how much of the run it took. Called as after_epoch(epoch)."""

    def __init__(self, model, images, labels, idx, every, epochs, images_per_epoch, desc="train",
                 dataset=DEFAULT_DATASET):
        self.model, self.images, self.labels, self.idx, self.dataset = model, images, labels, idx, dataset
        self.every, self.epochs, self.images_per_epoch, self.desc = every, epochs, images_per_epoch, desc
        self.device = next(model.parameters()).device
        self.points, self.eval_seconds = [], 0.0
        self.start = self.last_seconds = None
        self.last_epoch = 0

    def begin(self):
        """Start the clock (call right before training)."""
        self._sync()
        self.start, self.last_seconds = time.perf_counter(), 0.0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, epoch):
        if not self.every or (epoch % self.every and epoch != self.epochs):
            return
        self._sync()
        paused = time.perf_counter()
        seconds = paused - self.start - self.eval_seconds
        test_accuracy = accuracy_in_place(self.model, self.images, self.labels, self.idx, dataset=self.dataset)
        images_per_s = (epoch - self.last_epoch) * self.images_per_epoch / max(seconds - self.last_seconds, 1e-9)
        self.points.append({"epoch": epoch, "seconds": round(seconds, 3), "test_accuracy": round(test_accuracy, 3),
                            "images_per_s": round(images_per_s, 1)})
        self.last_epoch, self.last_seconds = epoch, seconds
        tqdm.write(f"{self.desc} epoch {epoch}/{self.epochs}: test accuracy {test_accuracy:.2f} % after "
                   f"{seconds:.1f} s of training, {images_per_s:,.0f} images/s")
        self.eval_seconds += time.perf_counter() - paused


def warm_up(model, inputs, labels, sizes=None, teacher=None, eval_sizes=(), freeze_batchnorm=False):
    """Untimed forward and backward passes (bf16 autocast on GPU), so that CUDA, cuBLAS and cuDNN start-up and the
    first use of every batch shape fall outside the RTE: for each batch size in sizes (default: len(inputs)) a
    forward and backward pass in train mode and in eval mode (frozen BatchNorm, SalUn's saliency) and a no-grad
    forward in eval mode (SCRUB's teacher, also run on teacher when given); for each size in eval_sizes only the
    no-grad forward in eval mode (a method's look at the model: pruning's trace, the adapters' check); then one
    step of each optimizer the methods use (Adam, SGD) on copies of the trainable parameters, which pays the
    optimizer's first step, and makes tqdm's lock, which the first progress bar would make.
    Inside a compiling() block (--compile) it also compiles the training step for each size in sizes, in the modes
    train() sets (BatchNorm in eval mode under freeze_batchnorm), and on a GPU records and replays its CUDA graphs:
    the compile seconds go to the block's compile_s, none into the RTE.
    The model is left exactly as it was: its buffers (BatchNorm statistics) and the RNG states (dropout) are
    restored, the gradients cleared, and no optimizer steps its parameters."""
    tqdm.get_lock()  # made by the first progress bar, importing multiprocessing's locks: paid here, not in an epoch
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(inputs.device) if inputs.is_cuda else None
    modes = {module: module.training for module in model.modules()}
    sizes = set(sizes or [len(inputs)]) - {0}
    for size in sorted(sizes | set(eval_sizes), reverse=True):
        batch, batch_labels = inputs[:size], labels[:size]
        for train_mode in (True, False) if size in sizes else ():
            model.train(train_mode)
            with autocast(inputs.device):
                loss = cross_entropy(model, batch, batch_labels)
            loss.backward()
        with torch.no_grad(), autocast(inputs.device):
            for frozen in (model, teacher) if teacher is not None else (model,):
                frozen_training = frozen.training
                frozen.eval()(batch)
                frozen.train(frozen_training)
    compiled = compiling.active()
    if compiled:
        compile_step(compiled, model, inputs, labels, sizes, freeze_batchnorm)
    trainable = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    if trainable:
        for make_optimizer in (make_adam, make_sgd):
            copies = [p.detach().clone().requires_grad_() for p in trainable]
            for clone, p in zip(copies, trainable, strict=True):
                clone.grad = p.grad.clone()
            make_optimizer(copies, 1e-3).step()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, inputs.device)
        torch.cuda.synchronize(inputs.device)
    for module, training in modes.items():  # each module's own mode (frozen BatchNorm stays frozen)
        module.train(training)


def compile_step(compiled, model, inputs, labels, sizes, freeze_batchnorm):
    """Compile model's training step (forward, loss, backward as train() runs them) for every batch size in sizes;
    gradients accumulate on model's parameters (warm_up clears them)."""
    stepped = compiled.model(model)
    training_mode(model, freeze_batchnorm)
    with compiled.warming_up():
        for size in sorted(sizes, reverse=True):
            for _ in range(compiled.warm_up_calls()):
                compiled.step_begins()
                with autocast(inputs.device):
                    loss = cross_entropy(stepped, inputs[:size], labels[:size])
                loss.backward()


def batch_sizes(count, batch_size):
    """The batch sizes an epoch over count images in batches of batch_size meets: the full one and the last."""
    return {min(count, batch_size), count % batch_size} - {0}


def warm_up_on(model, data, idx, batch_size, sizes=None, teacher=None, eval_sizes=(), freeze_batchnorm=False):
    """warm_up on the first images of images[idx] (no shuffling, so no batch generator moves; repeated if idx holds
    fewer), for every batch size in sizes (default: those of an epoch over idx, batch_sizes)."""
    sizes = set(sizes or batch_sizes(len(idx), batch_size))
    first = idx[torch.arange(max(sizes | set(eval_sizes)), device=idx.device) % len(idx)]
    warm_up(model, normalize(data.train_images[first], data.dataset), data.train_labels[first], sizes, teacher,
            eval_sizes, freeze_batchnorm)


class Measure:
    """Times a block (device synchronised) and records its peak GPU memory above what was allocated when it began,
    after a garbage collection (leftovers of earlier in-process runs, such as torch-pruning's reference cycles, are
    freed first). `with Measure(device) as m:`. Entered again, the seconds add up and what the earlier blocks left
    allocated counts towards the later blocks' peaks, so the peak stays relative to the first block's start.
    baseline_gpu_mem_mb is what was resident then (model, data, a teacher copy).
    Measure.latest is the block entered last, so that a caller running a script in-process (the sweep) can tell its
    set-up (before `began`, the first block's start) from its training. `imported` lists the modules first
    imported inside the blocks (their import time is not the method's: a script imports what it needs before
    timing). Before the clock starts, every callback of `before_timing` runs (the sweep's: finish the fits it
    runs in the background), so nothing else of this process runs while a block is timed."""
    latest = None
    before_timing = []

    def __init__(self, device):
        self.device = torch.device(device)
        self.seconds, self.peak_gpu_mem_mb, self.baseline_gpu_mem_mb = None, None, None
        self._left_allocated = 0  # bytes the earlier blocks allocated and did not free
        self.began = None
        self.imported = []

    def __enter__(self):
        for callback in Measure.before_timing:
            callback()
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_bytes = torch.cuda.memory_allocated(self.device)
            if self.baseline_gpu_mem_mb is None:
                self.baseline_gpu_mem_mb = self._start_bytes / 2**20
        self._modules = set(sys.modules)
        self.start = time.perf_counter()
        if self.began is None:
            self.began = self.start  # the first block's start: what came before it is set-up
        Measure.latest = self
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self._start_bytes + self._left_allocated
            self.peak_gpu_mem_mb = max(self.peak_gpu_mem_mb or 0.0, peak / 2**20)
            self._left_allocated += torch.cuda.memory_allocated(self.device) - self._start_bytes
        self.seconds = (self.seconds or 0.0) + time.perf_counter() - self.start
        self.imported += sorted(set(sys.modules) - self._modules)


def reset_compiler_caches():
    """Forget what torch.compile compiled earlier in this process (Dynamo's caches and recompile counts), so that a
    step run in-process pays its own compile time, as in a process of its own: called between steps. Nothing to
    do (and nothing imported) when nothing in the process has used torch.compile."""
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


@contextlib.contextmanager
def before_timing(callback):
    """Inside the block, callback() runs before every timed block (Measure) starts its clock."""
    Measure.before_timing.append(callback)
    try:
        yield
    finally:
        Measure.before_timing.remove(callback)
