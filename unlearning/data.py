"""The data on the device: one dataset of the table (datasets.py) read once, its data label, normalisation,
augmentation and batches drawn from a device-side permutation (no DataLoader)."""
import contextlib
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .datasets import DATASETS, DEFAULT_DATASET, first_per_class
from .errors import UserError
from .settings import SMOKE, gpu_shaped


@dataclass
class Data:
    """Both splits of one dataset as uint8 [N, 3, S, S] tensors and int64 labels, on the training device, with the
    dataset's name (a key of datasets.DATASETS) and class names."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    dataset: str = DEFAULT_DATASET
    class_names: tuple = ()

    @property
    def num_classes(self):
        return DATASETS[self.dataset].num_classes

    @property
    def resident_mb(self):
        """Memory the four tensors hold on their device, in MiB."""
        tensors = (self.train_images, self.train_labels, self.test_images, self.test_labels)
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20


_shared = None  # {data_key: Data} inside shared_data(), else None


@contextlib.contextmanager
def shared_data():
    """Inside the block load_data reads each (root, preset, device, dataset) once and hands every caller the same
    tensors, so that steps run one after another in one process (a sweep's unit) share one copy of the data on the
    device. Yields the {data_key: Data} cache, which the caller may fill with data it has already loaded. No caller
    changes the tensors in place: batches and metrics index and normalise them into new tensors."""
    global _shared
    previous, _shared = _shared, {}
    try:
        yield _shared
    finally:
        _shared = previous


def data_key(root, preset, device, dataset=DEFAULT_DATASET):
    """(folder, preset, device, dataset) naming one load of the data: the same folder however it is spelled, cuda
    as cuda:N."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return Path(root).resolve(), preset, device, dataset


def load_data(root, device, preset="full", dataset=DEFAULT_DATASET):
    """Read the dataset's files under root (downloading them if absent) onto device; inside shared_data() a second
    call with the same arguments returns the first call's tensors.

    The smoke preset keeps the first few images of each class."""
    if _shared is None:
        return _read_data(root, device, preset, dataset)
    key = data_key(root, preset, device, dataset)
    if key not in _shared:
        _shared[key] = _read_data(root, device, preset, dataset)
    return _shared[key]


def _read_data(root, device, preset, dataset):
    info = DATASETS[dataset]
    if not all((Path(root) / path).is_file() for path in info.files):
        try:
            info.download(root)
        except Exception as error:
            raise UserError(f"{info.title} not found under {root} and the download failed ({type(error).__name__}); "
                            f"download it from {info.source} into {root}/, or pass --data DIR") from None
    per_class = None
    if preset == "smoke":
        per_class = max(SMOKE["train_per_class"], SMOKE["test_per_class"])
    train_images, train_labels, test_images, test_labels = map(torch.from_numpy, info.read(root, per_class))
    if not (len(train_labels) and len(test_labels)):
        raise UserError(f"the {info.title} files under {root} hold no {'training' if test_labels.numel() else 'test'} "
                        f"images")
    if preset == "smoke":
        keep_train = first_per_class(train_labels, SMOKE["train_per_class"], info.num_classes)
        keep_test = first_per_class(test_labels, SMOKE["test_per_class"], info.num_classes)
        train_images, train_labels = train_images[keep_train], train_labels[keep_train]
        test_images, test_labels = test_images[keep_test], test_labels[keep_test]
    names = tuple(info.class_names(root))
    device = torch.device(device)
    return Data(train_images.to(device), train_labels.to(device), test_images.to(device), test_labels.to(device),
                dataset, names)


PROVENANCE_FILE = "PROVENANCE"


def different_data_label(dataset=DEFAULT_DATASET):
    """The data label of files that neither match the official checksums nor name themselves."""
    info = DATASETS[dataset]
    return f"{info.title} (files {'differ from' if info.checksums else 'not checked against'} the official release)"


DIFFERENT_DATA_LABEL = different_data_label()


def data_label(root, dataset=DEFAULT_DATASET):
    """What the data under root is, for run records and tables: the dataset's title (e.g. "CIFAR-10") when its
    files match the official release's md5 checksums (those torchvision checks), else the one-line text of its
    PROVENANCE file (an offline copy naming itself), else different_data_label(dataset)."""
    info = DATASETS[dataset]
    if info.checksums and all(_md5(Path(root) / path) == md5 for path, md5 in info.checksums.items()):
        return info.title
    provenance = Path(root) / info.provenance
    if provenance.is_file():
        lines = provenance.read_text(errors="replace").strip().splitlines()
        if len(lines) == 1 and lines[0].strip():
            return lines[0].strip()
    return different_data_label(dataset)


def _md5(path):
    """The md5 hex digest of a file, None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "md5").hexdigest()
    except OSError:
        return None


@functools.cache
def _normalization(device, dataset):
    """The dataset's mean and std as [1, 3, 1, 1] tensors on device, made once: building them per batch would be
    two host-to-device copies per training step. Read only, never written."""
    info = DATASETS[dataset]
    return tuple(torch.tensor(values, device=device).view(1, 3, 1, 1) for values in (info.mean, info.std))


def normalize(images, dataset=DEFAULT_DATASET):
    """uint8 [B, 3, H, W] on any device -> float normalised by the dataset's constants, channels-last on the GPU's
    path (settings.gpu_shaped)."""
    mean, std = _normalization(images.device, dataset)
    if gpu_shaped(images.device):  # reorder the uint8 bytes, not the floats; the arithmetic keeps the layout
        images = images.contiguous(memory_format=torch.channels_last)
    return (images.float() / 255 - mean) / std


def augment(x, generator, pad=4, flip=True):
    """Random crop (reflect padding) and, with flip, horizontal flip of a normalised batch, on its device, in its
    layout. The flip draws are made either way, so both take the same random numbers."""
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
    flips = torch.rand(n, device=x.device, generator=generator) < 0.5
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    if not flip:
        return cropped.contiguous(memory_format=layout)
    return torch.where(flips[:, None, None, None], cropped.flip(3), cropped).contiguous(memory_format=layout)


class Batches:
    """Shuffled mini-batches of images[idx] drawn from a device-side permutation; no DataLoader.

    Iterating yields (normalised images, labels); each pass draws a new permutation."""

    def __init__(self, images, labels, idx, batch_size, seed=0, shuffle=True, augment=False,
                 dataset=DEFAULT_DATASET):
        self.images, self.labels, self.idx, self.dataset = images, labels, idx.to(images.device), dataset
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
            x = normalize(self.images[batch_idx], self.dataset)
            if self.augment:
                x = augment(x, self.generator, flip=DATASETS[self.dataset].flip)
            yield x, self.labels[batch_idx]
