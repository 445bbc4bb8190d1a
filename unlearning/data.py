"""CIFAR-10 on the device: the standard pickles read and checked, normalisation, augmentation and batches
drawn from a device-side permutation (no DataLoader)."""
import contextlib
import functools
import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from .errors import UserError
from .settings import CIFAR_MEAN, CIFAR_STD, IMAGE_SIZE, NUM_CLASSES, SMOKE, gpu_shaped


@dataclass
class CIFAR10:
    """Both splits as uint8 [N, 3, 32, 32] tensors and int64 labels, on the training device."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    @property
    def resident_mb(self):
        """Memory the four tensors hold on their device, in MiB."""
        return sum(t.numel() * t.element_size() for t in vars(self).values()) / 2**20


def _read_batch(path):
    """(images uint8 [N, 3, 32, 32], labels int64 [N]) of one CIFAR-10 pickle, checked; a UserError names the file."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None
    except Exception as error:  # unpickling raises many types on truncated or foreign files
        raise UserError(f"{path} is not a CIFAR-10 batch: it does not unpickle ({type(error).__name__}); "
                        f"the file is truncated or corrupt, download it again") from None
    if not isinstance(batch, dict) or not {"data", "labels"} <= batch.keys():
        raise UserError(f"{path} is not a CIFAR-10 batch: expected a dict with 'data' and 'labels'")
    try:
        data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    except Exception:
        raise UserError(f"{path} is not a CIFAR-10 batch: 'data' and 'labels' are not arrays") from None
    pixels = 3 * IMAGE_SIZE * IMAGE_SIZE
    if data.ndim != 2 or data.shape[1] != pixels or data.dtype != np.uint8:
        raise UserError(f"{path} is not a CIFAR-10 batch: 'data' is {data.dtype} {list(data.shape)}, "
                        f"expected uint8 [N, {pixels}]")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path} is not a CIFAR-10 batch: {len(data)} images but 'labels' is {labels.dtype} "
                        f"{list(labels.shape)}, expected {len(data)} integers")
    if len(labels) and not 0 <= labels.min() <= labels.max() < NUM_CLASSES:
        raise UserError(f"{path}: labels must lie in 0..{NUM_CLASSES - 1}, found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE), labels.astype(np.int64)


def _read_batches(folder, names):
    images, labels = zip(*(_read_batch(folder / name) for name in names), strict=True)
    images, labels = np.concatenate(images), np.concatenate(labels)
    if not len(labels):
        raise UserError(f"{folder}: {', '.join(names)} hold no images")
    return torch.from_numpy(images), torch.from_numpy(labels)


def _first_per_class(labels, k):
    return torch.sort(torch.cat([torch.nonzero(labels == c).flatten()[:k] for c in range(NUM_CLASSES)])).values


_shared = None  # {data_key: CIFAR10} inside shared_data(), else None


@contextlib.contextmanager
def shared_data():
    """Inside the block load_cifar10 reads each (root, preset, device) once and hands every caller the same tensors,
    so that steps run one after another in one process (a sweep's unit) share one copy of the data on the device.
    Yields the {data_key: CIFAR10} cache, which the caller may fill with data it has already loaded. No caller
    changes the tensors in place: batches and metrics index and normalise them into new tensors."""
    global _shared
    previous, _shared = _shared, {}
    try:
        yield _shared
    finally:
        _shared = previous


def data_key(root, preset, device):
    """(folder, preset, device) naming one load of the data: the same folder however it is spelled, cuda as cuda:N."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return Path(root).resolve(), preset, device


def load_cifar10(root, device, preset="full"):
    """Read cifar-10-batches-py under root (downloading it with torchvision if absent) onto device; inside
    shared_data() a second call with the same arguments returns the first call's tensors.

    The smoke preset keeps the first few images of each class."""
    if _shared is None:
        return _read_cifar10(root, device, preset)
    key = data_key(root, preset, device)
    if key not in _shared:
        _shared[key] = _read_cifar10(root, device, preset)
    return _shared[key]


def _read_cifar10(root, device, preset):
    folder = Path(root) / "cifar-10-batches-py"
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    if not all((folder / name).is_file() for name in [*train_names, "test_batch"]):
        try:
            torchvision.datasets.CIFAR10(root, train=True, download=True)
        except Exception as error:
            raise UserError(f"CIFAR-10 not found under {folder} and the download failed ({type(error).__name__}); "
                            f"download it from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it into {root}/, "
                            f"or pass --data DIR") from None
    train_images, train_labels = _read_batches(folder, train_names)
    test_images, test_labels = _read_batches(folder, ["test_batch"])
    if preset == "smoke":
        keep_train = _first_per_class(train_labels, SMOKE["train_per_class"])
        keep_test = _first_per_class(test_labels, SMOKE["test_per_class"])
        train_images, train_labels = train_images[keep_train], train_labels[keep_train]
        test_images, test_labels = test_images[keep_test], test_labels[keep_test]
    device = torch.device(device)
    return CIFAR10(train_images.to(device), train_labels.to(device), test_images.to(device), test_labels.to(device))


OFFICIAL_FILES = dict(torchvision.datasets.CIFAR10.train_list + torchvision.datasets.CIFAR10.test_list)  # name: md5
PROVENANCE_FILE = "PROVENANCE"
DIFFERENT_DATA_LABEL = "CIFAR-10 (files differ from the official release)"


def data_label(root):
    """What the data under root is, for run records and tables: "CIFAR-10" when the five training batches and the
    test batch match the official release's md5 checksums (those torchvision checks), else the one-line text of a
    PROVENANCE file beside them (an offline copy naming itself), else DIFFERENT_DATA_LABEL."""
    folder = Path(root) / "cifar-10-batches-py"
    if all(_md5(folder / name) == md5 for name, md5 in OFFICIAL_FILES.items()):
        return "CIFAR-10"
    provenance = folder / PROVENANCE_FILE
    if provenance.is_file():
        lines = provenance.read_text(errors="replace").strip().splitlines()
        if len(lines) == 1 and lines[0].strip():
            return lines[0].strip()
    return DIFFERENT_DATA_LABEL


def _md5(path):
    """The md5 hex digest of a file, None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "md5").hexdigest()
    except OSError:
        return None


@functools.cache
def _normalization(device):
    """CIFAR-10's mean and std as [1, 3, 1, 1] tensors on device, made once: building them per batch would be two
    host-to-device copies per training step. Read only, never written."""
    return tuple(torch.tensor(values, device=device).view(1, 3, 1, 1) for values in (CIFAR_MEAN, CIFAR_STD))


def normalize(images):
    """uint8 [B, 3, H, W] on any device -> normalised float, channels-last on the GPU's path (settings.gpu_shaped)."""
    mean, std = _normalization(images.device)
    if gpu_shaped(images.device):  # reorder the uint8 bytes, not the floats; the arithmetic keeps the layout
        images = images.contiguous(memory_format=torch.channels_last)
    return (images.float() / 255 - mean) / std


def augment(x, generator, pad=4):
    """Random crop (reflect padding) and horizontal flip of a normalised batch, on its device, in its layout."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device, generator=generator)
    rows = (dy + torch.arange(h, device=x.device))[:, :, None]
    cols = (dx + torch.arange(w, device=x.device))[:, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None]
    # The crop is gathered pixel by pixel from the [N, H, W, C] view, so it comes out channels-last; a contiguous
    # batch is given back contiguous.
    cropped = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(n, device=x.device, generator=generator) < 0.5
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped).contiguous(memory_format=layout)


class Batches:
    """Shuffled mini-batches of images[idx] drawn from a device-side permutation; no DataLoader.

    Iterating yields (normalised images, labels); each pass draws a new permutation."""

    def __init__(self, images, labels, idx, batch_size, seed=0, shuffle=True, augment=False):
        self.images, self.labels, self.idx = images, labels, idx.to(images.device)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.generator = torch.Generator(device=images.device)
        self.generator.manual_seed(seed)

    def __len__(self):
        return -(-len(self.idx) // self.batch_size)

    def __iter__(self):
        order = self.idx
        if self.shuffle:
            order = order[torch.randperm(len(order), device=order.device, generator=self.generator)]
        for start in range(0, len(order), self.batch_size):
            batch_idx = order[start:start + self.batch_size]
            x = normalize(self.images[batch_idx])
            if self.augment:
                x = augment(x, self.generator)
            yield x, self.labels[batch_idx]
