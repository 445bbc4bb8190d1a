"""Measuring a run: the untimed warm-up, the timed block (RTE, peak GPU memory) and time-to-accuracy curves."""
import gc
import time

import torch
from tqdm import tqdm

from .data import normalize
from .metrics import accuracy, predict
from .settings import EVAL_BATCH_SIZE
from .training import autocast, cross_entropy


def default_eval_every(epochs):
    """About ten evaluation points over a run (every epoch for short runs), the last epoch always included."""
    return max(1, epochs // 10)


def accuracy_in_place(model, images, labels, idx, batch_size=EVAL_BATCH_SIZE):
    """Accuracy of model on images[idx] (predict, in eval mode) during training: each module goes back to its own
    mode afterwards (frozen BatchNorm stays frozen)."""
    modes = {module: module.training for module in model.modules()}
    try:
        return accuracy(predict(model, images, idx, batch_size), labels[idx])
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
    return {name: accuracy_in_place(model, *images_labels_idx, batch_size)
            for name, images_labels_idx in sets.items()}


class AccuracyCurve:
    """Time to accuracy: test accuracy after every `every`-th epoch and the last, with the training seconds so far
    and the throughput since the previous point, one printed line each. Evaluation (no_grad, the test images idx)
    is not training time: `eval_seconds` says how much of the run it took. Called as after_epoch(epoch)."""

    def __init__(self, model, images, labels, idx, every, epochs, images_per_epoch, desc="train"):
        self.model, self.images, self.labels, self.idx = model, images, labels, idx
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
        test_accuracy = accuracy_in_place(self.model, self.images, self.labels, self.idx)
        images_per_s = (epoch - self.last_epoch) * self.images_per_epoch / max(seconds - self.last_seconds, 1e-9)
        self.points.append({"epoch": epoch, "seconds": round(seconds, 3), "test_accuracy": round(test_accuracy, 3),
                            "images_per_s": round(images_per_s, 1)})
        self.last_epoch, self.last_seconds = epoch, seconds
        tqdm.write(f"{self.desc} epoch {epoch}/{self.epochs}: test accuracy {test_accuracy:.2f} % after "
                   f"{seconds:.1f} s of training, {images_per_s:,.0f} images/s")
        self.eval_seconds += time.perf_counter() - paused


def warm_up(model, inputs, labels):
    """One untimed forward and backward pass (bf16 autocast on GPU, train mode), so that CUDA, cuBLAS and cuDNN
    start-up falls outside the RTE. The model is left exactly as it was: its buffers (BatchNorm statistics) and
    the RNG states (dropout) are restored, the gradients cleared, and no optimizer steps."""
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(inputs.device) if inputs.is_cuda else None
    training = model.training
    model.train()
    with autocast(inputs.device):
        loss = cross_entropy(model, inputs, labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, inputs.device)
        torch.cuda.synchronize(inputs.device)
    model.train(training)


def warm_up_on(model, data, idx, batch_size):
    """warm_up on the first batch_size images of images[idx] (no shuffling, so no batch generator moves)."""
    first = idx[:batch_size]
    warm_up(model, normalize(data.train_images[first]), data.train_labels[first])


class Measure:
    """Times a block (device synchronised) and records its peak GPU memory above what was allocated when it began,
    after a garbage collection (leftovers of earlier in-process runs, such as torch-pruning's reference cycles, are
    freed first). `with Measure(device) as m:`. Entered again, the seconds add up and what the earlier blocks left
    allocated counts towards the later blocks' peaks, so the peak stays relative to the first block's start.
    baseline_gpu_mem_mb is what was resident then (model, data, a teacher copy).
    Measure.latest is the block entered last, so that a caller running a script in-process (the sweep) can tell its
    set-up (before `began`, the first block's start) from its training."""
    latest = None

    def __init__(self, device):
        self.device = torch.device(device)
        self.seconds, self.peak_gpu_mem_mb, self.baseline_gpu_mem_mb = None, None, None
        self._left_allocated = 0  # bytes the earlier blocks allocated and did not free
        self.began = None

    def __enter__(self):
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_bytes = torch.cuda.memory_allocated(self.device)
            if self.baseline_gpu_mem_mb is None:
                self.baseline_gpu_mem_mb = self._start_bytes / 2**20
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
