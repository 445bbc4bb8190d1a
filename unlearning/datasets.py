"""The dataset table: one entry per dataset (its files in their standard layout under --data, its reader, class
names, class count, image size, normalisation, official checksums and downloader). data.py holds what an entry reads
on the device; nothing else needs to know which dataset it is.

    python pretrain.py --dataset cifar100 --data data
"""
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision

from .errors import UserError


@dataclass(frozen=True)
class Dataset:
    """One dataset. Paths are relative to the --data folder; read(root, per_class) returns
    (train_images, train_labels, test_images, test_labels) as uint8 [N, 3, S, S] and int64 [N] numpy arrays, checked,
    keeping only the first per_class images of each class when per_class is given (the smoke preset)."""
    name: str
    title: str  # the data label when the files are the official release
    files: tuple  # what must exist for a read; any missing triggers the download
    checksums: dict  # {path: md5} of the official release (empty: not checkable file by file)
    provenance: str  # path of the optional one-line PROVENANCE file naming an unofficial copy
    num_classes: int
    image_size: int
    mean: tuple
    std: tuple
    read: object
    class_names: object  # class_names(root) -> tuple of num_classes names
    download: object  # download(root): fetch the official files, raising on failure
    source: str  # where the files come from, for the offline message
    flip: bool = True  # whether training batches are flipped left-right (not digits)

    @property
    def pixels(self):
        return 3 * self.image_size ** 2


# ------------------------------------------------------------------------------------------ checks

def check_arrays(path, title, images, labels, dataset):
    """images uint8 [N, 3, S, S] and integer labels [N] in 0..num_classes-1, else a UserError naming path."""
    size = dataset.image_size
    if images.ndim != 4 or images.shape[1:] != (3, size, size) or images.dtype != np.uint8:
        raise UserError(f"{path} is not {title}: its images are {images.dtype} {list(images.shape)}, expected uint8 "
                        f"[N, 3, {size}, {size}]")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path} is not {title}: {len(images)} images but the labels are {labels.dtype} "
                        f"{list(labels.shape)}, expected {len(images)} integers")
    if len(labels) and not 0 <= labels.min() <= labels.max() < dataset.num_classes:
        raise UserError(f"{path}: labels must lie in 0..{dataset.num_classes - 1}, "
                        f"found {labels.min()}..{labels.max()}")
    return images, labels.astype(np.int64)


def first_per_class(labels, k, num_classes):
    """Indices (increasing) of the first k entries of each class in labels (an int64 tensor or array)."""
    labels = torch.as_tensor(labels)
    return torch.sort(torch.cat([torch.nonzero(labels == c).flatten()[:k] for c in range(num_classes)])).values


def _keep(images, labels, per_class, num_classes):
    if per_class is None:
        return images, labels
    keep = first_per_class(labels, per_class, num_classes).numpy()
    return images[keep], labels[keep]


# ------------------------------------------------------------------------------------------ CIFAR

def parse_file(path, parse, title, verb="load"):
    """parse(open binary file) of the file at path; a file that cannot be opened, or that parse fails on (a
    truncated or foreign file raises many types), is a one-line UserError naming it."""
    try:
        f = open(path, "rb")
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None
    with f:
        try:
            return parse(f)
        except Exception as error:
            raise UserError(f"{path} is not {title}: it does not {verb} ({type(error).__name__}); the file is "
                            f"truncated or corrupt, download it again") from None


def _unpickle(path, title):
    return parse_file(path, lambda f: pickle.load(f, encoding="latin1"), title, "unpickle")


def read_cifar_batch(path, dataset, label_key):
    """(images uint8 [N, 3, 32, 32], labels int64 [N]) of one CIFAR pickle, checked; a UserError names the file."""
    title = f"a {dataset.title} batch"
    batch = _unpickle(path, title)
    if not isinstance(batch, dict) or not {"data", label_key} <= batch.keys():
        raise UserError(f"{path} is not {title}: expected a dict with 'data' and '{label_key}'")
    try:
        data, labels = np.asarray(batch["data"]), np.asarray(batch[label_key])
    except Exception:
        raise UserError(f"{path} is not {title}: 'data' and '{label_key}' are not arrays") from None
    if data.ndim != 2 or data.shape[1] != dataset.pixels or data.dtype != np.uint8:
        raise UserError(f"{path} is not {title}: 'data' is {data.dtype} {list(data.shape)}, "
                        f"expected uint8 [N, {dataset.pixels}]")
    size = dataset.image_size
    return check_arrays(path, title, data.reshape(-1, 3, size, size), labels, dataset)


def _cifar_reader(name, folder, train_names, test_names, label_key):
    """read(root, per_class) of a CIFAR release: the training batches, then the test batches, under folder."""
    def read(root, per_class=None):
        dataset, splits = DATASETS[name], []
        for names in (train_names, test_names):
            images, labels = zip(*(read_cifar_batch(Path(root) / folder / batch, dataset, label_key)
                                   for batch in names), strict=True)
            splits += _keep(np.concatenate(images), np.concatenate(labels), per_class, dataset.num_classes)
        return tuple(splits)
    return read


def _cifar100_names(root):
    """The 100 fine label names, from the release's meta file."""
    path = Path(root) / "cifar-100-python" / "meta"
    meta = _unpickle(path, "CIFAR-100's meta file")
    names = meta.get("fine_label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != 100:
        raise UserError(f"{path} is not CIFAR-100's meta file: expected 100 'fine_label_names'")
    return tuple(names)


# ------------------------------------------------------------------------------------------ SVHN

def _read_svhn_split(path, dataset):
    """One SVHN .mat file: X [32, 32, 3, N], y [N, 1] with 1..10, where 10 is the digit 0 (as torchvision maps it)."""
    import scipy.io  # imported here: only SVHN needs it

    title = "an SVHN split (.mat with X and y)"
    mat = parse_file(path, scipy.io.loadmat, title)
    if "X" not in mat or "y" not in mat:
        raise UserError(f"{path} is not {title}: it has no 'X' and 'y'")
    images, labels = np.asarray(mat["X"]), np.asarray(mat["y"])
    if images.ndim != 4:
        raise UserError(f"{path} is not {title}: 'X' is {images.dtype} {list(images.shape)}, expected uint8 "
                        f"[32, 32, 3, N]")
    if labels.ndim == 2 and labels.shape[1] == 1:  # [N, 1], the digit 0 labelled 10
        labels = np.where(labels[:, 0] == 10, 0, labels[:, 0])
    return check_arrays(path, title, np.ascontiguousarray(images.transpose(3, 2, 0, 1)), labels, dataset)


def _read_svhn(root, per_class=None):
    dataset = DATASETS["svhn"]
    splits = []
    for name in ("train_32x32.mat", "test_32x32.mat"):
        splits += _keep(*_read_svhn_split(Path(root) / name, dataset), per_class, dataset.num_classes)
    return tuple(splits)


# ------------------------------------------------------------------------------------------ Tiny ImageNet

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"  # of the official zip


def _lines(path):
    try:
        return [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None


def _tiny_wnids(root):
    """The 200 WordNet ids, sorted (the class order of a folder-per-class reader such as ImageFolder)."""
    path = Path(root) / "tiny-imagenet-200" / "wnids.txt"
    wnids = sorted({line.strip() for line in _lines(path)})
    if len(wnids) != DATASETS["tinyimagenet"].num_classes:
        raise UserError(f"{path} lists {len(wnids)} classes, expected {DATASETS['tinyimagenet'].num_classes}")
    return wnids


def _tiny_names(root):
    """Each class's first word in words.txt ('n01443537\tgoldfish, Carassius auratus' -> 'goldfish')."""
    words = dict(line.split("\t", 1) for line in _lines(Path(root) / "tiny-imagenet-200" / "words.txt")
                 if "\t" in line)
    return tuple(words.get(wnid, wnid).split(",")[0].strip() for wnid in _tiny_wnids(root))


def _decode(path, size):
    """uint8 [3, size, size] of one JPEG (grey ones made RGB); a UserError names a file that is not one."""
    from PIL import Image

    image = parse_file(path, lambda f: np.asarray(Image.open(f).convert("RGB")), "a JPEG image", "decode")
    if image.shape != (size, size, 3):
        raise UserError(f"{path} is {image.shape[1]}x{image.shape[0]}, expected {size}x{size}")
    return image.transpose(2, 0, 1)


def _decode_all(paths, size):
    if not paths:
        return np.zeros((0, 3, size, size), np.uint8)
    with ThreadPoolExecutor(8) as pool:  # the decoder releases the GIL
        # Stacked [C, H, W] views of [H, W, C] arrays come out channels-last; held contiguous like every other
        # dataset (the GPU's path makes each batch channels-last itself, see data.normalize).
        return np.ascontiguousarray(np.stack(list(pool.map(lambda path: _decode(path, size), paths))))


def _read_tiny_imagenet(root, per_class=None):
    """train/<wnid>/images/*.JPEG (sorted) and val/images/*.JPEG labelled by val/val_annotations.txt (the test
    set); only the first per_class files of each class are decoded when per_class is given."""
    dataset, folder = DATASETS["tinyimagenet"], Path(root) / "tiny-imagenet-200"
    wnids = _tiny_wnids(root)
    index = {wnid: i for i, wnid in enumerate(wnids)}
    train = [(path, index[wnid]) for wnid in wnids
             for path in sorted((folder / "train" / wnid / "images").glob("*.JPEG"))[:per_class]]
    annotations = folder / "val" / "val_annotations.txt"
    test, seen = [], [0] * len(wnids)
    for line in _lines(annotations):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise UserError(f"{annotations}: line {line[:60]!r} names no class of wnids.txt")
        label = index[fields[1]]
        if per_class is None or seen[label] < per_class:
            seen[label] += 1
            test.append((folder / "val" / "images" / fields[0], label))
    splits = []
    for pairs, where in ((train, folder / "train"), (test, annotations)):
        images = _decode_all([path for path, _ in pairs], dataset.image_size)
        splits += check_arrays(where, "Tiny ImageNet", images, np.array([label for _, label in pairs], np.int64),
                               dataset)
    return tuple(splits)


def _download_tiny_imagenet(root):
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(TINY_IMAGENET_URL, str(root), md5=TINY_IMAGENET_MD5, remove_finished=True)
    (Path(root) / "tiny-imagenet-200" / "PROVENANCE").write_text(
        f"Tiny ImageNet ({TINY_IMAGENET_URL}, md5 {TINY_IMAGENET_MD5})\n")


# ------------------------------------------------------------------------------------------ the table

_cifar10 = torchvision.datasets.CIFAR10
_cifar100 = torchvision.datasets.CIFAR100
_svhn = torchvision.datasets.SVHN.split_list
DATASETS = {dataset.name: dataset for dataset in (
    Dataset("cifar10", "CIFAR-10",
            files=tuple(f"cifar-10-batches-py/{name}" for name, _ in _cifar10.train_list + _cifar10.test_list),
            checksums={f"cifar-10-batches-py/{name}": md5 for name, md5 in _cifar10.train_list + _cifar10.test_list},
            provenance="cifar-10-batches-py/PROVENANCE", num_classes=10, image_size=32,
            mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616),
            read=_cifar_reader("cifar10", "cifar-10-batches-py", [name for name, _ in _cifar10.train_list],
                               ["test_batch"], "labels"),
            class_names=lambda root: ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                      "ship", "truck"),
            download=lambda root: torchvision.datasets.CIFAR10(root, train=True, download=True),
            source="https://www.cs.toronto.edu/~kriz/cifar.html"),
    Dataset("cifar100", "CIFAR-100",
            files=("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"),
            checksums={f"cifar-100-python/{name}": md5 for name, md5 in
                       _cifar100.train_list + _cifar100.test_list + [["meta", _cifar100.meta["md5"]]]},
            provenance="cifar-100-python/PROVENANCE", num_classes=100, image_size=32,
            # per-channel mean and std of the 50,000 training images (as Unlearn-Sparse and SalUn normalise)
            mean=(0.5071, 0.4866, 0.4409), std=(0.2673, 0.2564, 0.2762),
            read=_cifar_reader("cifar100", "cifar-100-python", ["train"], ["test"], "fine_labels"),
            class_names=_cifar100_names,
            download=lambda root: torchvision.datasets.CIFAR100(root, train=True, download=True),
            source="https://www.cs.toronto.edu/~kriz/cifar.html"),
    Dataset("svhn", "SVHN",
            files=("train_32x32.mat", "test_32x32.mat"),
            checksums={_svhn[split][1]: _svhn[split][2] for split in ("train", "test")},
            provenance="PROVENANCE-svhn", num_classes=10, image_size=32,
            # the 73,257 training images' per-channel mean and std (as Unlearn-Sparse and SalUn normalise)
            mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970),
            read=_read_svhn,
            class_names=lambda root: tuple(str(digit) for digit in range(10)),
            download=lambda root: [torchvision.datasets.SVHN(root, split, download=True)
                                   for split in ("train", "test")],
            source="http://ufldl.stanford.edu/housenumbers/ (train_32x32.mat, test_32x32.mat)", flip=False),
    Dataset("tinyimagenet", "Tiny ImageNet",
            files=("tiny-imagenet-200/wnids.txt", "tiny-imagenet-200/words.txt",
                   "tiny-imagenet-200/val/val_annotations.txt"),
            checksums={},  # the release is one zip: checked when downloaded, which writes PROVENANCE
            provenance="tiny-imagenet-200/PROVENANCE", num_classes=200, image_size=64,
            # the training images' per-channel mean and std (as Unlearn-Sparse and SalUn normalise)
            mean=(0.4802, 0.4481, 0.3975), std=(0.2302, 0.2265, 0.2262),
            read=_read_tiny_imagenet,
            class_names=_tiny_names,
            download=_download_tiny_imagenet,
            source=f"{TINY_IMAGENET_URL} (unzipped)"),
)}
DATASET_NAMES = tuple(DATASETS)
DEFAULT_DATASET = "cifar10"
