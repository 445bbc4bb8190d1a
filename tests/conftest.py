"""Shared fixtures: tiny synthetic datasets in their standard layouts (CIFAR-10, CIFAR-100, SVHN, Tiny ImageNet),
and in-process script runs. Tests marked `inductor` compile with inductor (minutes on a CPU): they run only with
`python -m pytest --inductor`."""
import contextlib
import pickle
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pytest_addoption(parser):
    parser.addoption("--inductor", action="store_true",
                     help="also run the tests that compile with inductor (minutes on a CPU)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--inductor"):
        return
    skip = pytest.mark.skip(reason="compiles with inductor (minutes on a CPU): run with --inductor")
    for item in items:
        if "inductor" in item.keywords:
            item.add_marker(skip)


TRAIN_PER_CLASS = 20
TEST_PER_CLASS = 10


def write_synthetic_cifar(root, train_per_class=TRAIN_PER_CLASS, test_per_class=TEST_PER_CLASS, seed=0):
    """cifar-10-batches-py under root with class-coloured noise images (learnable, but not trivially)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    palette = rng.integers(40, 216, size=(10, 3))

    def split(per_class):
        labels = np.tile(np.arange(10), per_class)
        noise = rng.normal(0, 40, size=(len(labels), 3, 32, 32))
        images = np.clip(palette[labels][:, :, None, None] + noise, 0, 255).astype(np.uint8)
        return images.reshape(len(labels), 3072), labels.tolist()

    train, train_labels = split(train_per_class)
    for i, part in enumerate(np.array_split(np.arange(len(train_labels)), 5), start=1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": train[part], "labels": [train_labels[j] for j in part]}, f)
    test, test_labels = split(test_per_class)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": test, "labels": test_labels}, f)
    return Path(root)


def _coloured_noise(rng, classes, per_class, size):
    """(uint8 images [N, 3, size, size], labels [N]): per_class images of each class, coloured by class plus noise."""
    palette = rng.integers(40, 216, size=(classes, 3))
    labels = np.tile(np.arange(classes), per_class)
    noise = rng.normal(0, 40, size=(len(labels), 3, size, size))
    return np.clip(palette[labels][:, :, None, None] + noise, 0, 255).astype(np.uint8), labels


def write_synthetic_cifar100(root, train_per_class=2, test_per_class=1, seed=0):
    """cifar-100-python/ (train, test, meta) under root, as the release pickles them: 100 fine classes."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = _coloured_noise(rng, 100, per_class, 32)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": images.reshape(len(labels), -1), "fine_labels": labels.tolist(),
                         "coarse_labels": (labels // 5).tolist()}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"fine{c}" for c in range(100)],
                     "coarse_label_names": [f"coarse{c}" for c in range(20)]}, f)
    return Path(root)


def write_synthetic_svhn(root, train_per_class=20, test_per_class=10, seed=0):
    """train_32x32.mat and test_32x32.mat under root, as the release stores them: X [32, 32, 3, N], y [N, 1] with
    the digit 0 labelled 10."""
    import scipy.io

    rng = np.random.default_rng(seed)
    Path(root).mkdir(parents=True, exist_ok=True)
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = _coloured_noise(rng, 10, per_class, 32)
        y = np.where(labels == 0, 10, labels).astype(np.uint8)[:, None]
        scipy.io.savemat(Path(root) / f"{name}_32x32.mat", {"X": images.transpose(2, 3, 1, 0), "y": y})
    return Path(root)


def write_synthetic_tiny_imagenet(root, train_per_class=1, test_per_class=1, seed=0):
    """tiny-imagenet-200/ under root, as the official zip unpacks: wnids.txt, words.txt, train/<wnid>/images/*.JPEG
    and val/images/*.JPEG with val/val_annotations.txt; 200 classes of 64x64 JPEGs (a few grey, as in the release)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = Path(root) / "tiny-imagenet-200"
    wnids = [f"n{1000 + 7 * c:08d}" for c in range(200)]
    (folder / "val" / "images").mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("".join(f"{wnid}\n" for wnid in reversed(wnids)))  # the release is unsorted
    (folder / "words.txt").write_text("".join(f"{wnid}\tword{c}, synonym\n" for c, wnid in enumerate(wnids)))

    def save(image, path):
        picture = Image.fromarray(image.transpose(1, 2, 0))
        (picture.convert("L") if rng.random() < 0.05 else picture).save(path, quality=95)

    images, labels = _coloured_noise(rng, 200, train_per_class, 64)
    for k, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = folder / "train" / wnids[label] / "images" / f"{wnids[label]}_{k}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        save(image, path)
    images, labels = _coloured_noise(rng, 200, test_per_class, 64)
    annotations = []
    for k, (image, label) in enumerate(zip(images, labels, strict=True)):
        save(image, folder / "val" / "images" / f"val_{k}.JPEG")
        annotations.append(f"val_{k}.JPEG\t{wnids[label]}\t0\t0\t63\t63\n")
    (folder / "val" / "val_annotations.txt").write_text("".join(annotations))
    return Path(root)


SYNTHETIC_WRITERS = {"cifar10": write_synthetic_cifar, "cifar100": write_synthetic_cifar100,
                     "svhn": write_synthetic_svhn, "tinyimagenet": write_synthetic_tiny_imagenet}


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory):
    """dataset_dir(name[, per_class]) -> a folder holding that dataset's synthetic files in its standard layout, with
    the writer's default images per class or per_class = (train, test), written once per (name, per_class)."""
    made = {}

    def get(name, per_class=()):
        if (name, per_class) not in made:
            folder = tmp_path_factory.mktemp("-".join(map(str, (name, *per_class))))
            made[name, per_class] = SYNTHETIC_WRITERS[name](folder, *per_class)
        return made[name, per_class]
    return get


def run_script(name, *args):
    """Run ROOT/name as __main__ in this process with the given arguments; returns its exit status."""
    argv = sys.argv
    sys.argv = [name, *map(str, args)]
    try:
        runpy.run_path(str(ROOT / name), run_name="__main__")
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.argv = argv
    return 0


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The suite's models are tiny: a second thread only waits on the first, and spins where the CPU is shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cifar_dir(dataset_dir):
    """A folder holding a synthetic cifar-10-batches-py (200 training, 100 test images)."""
    return dataset_dir("cifar10")


@pytest.fixture(scope="session")
def original_weights(tmp_path_factory, cifar_dir):
    """original_weights(arch) -> path of a smoke-preset original model trained once per session."""
    made = {}

    def get(arch):
        if arch not in made:
            out = tmp_path_factory.mktemp("weights") / f"{arch}-smoke_original.pth"
            assert run_script("pretrain.py", "--arch", arch, "--preset", "smoke", "--data", cifar_dir,
                              "--device", "cpu", "--out", out) == 0
            made[arch] = out
        return made[arch]
    return get


# Images per class (training, test) of the grid's data: a few, so that an epoch of each dataset of 10 classes is one
# batch of the smoke preset; one of each class for the datasets of 100 and 200 classes.
GRID_IMAGES_PER_CLASS = {"cifar10": (6, 2), "cifar100": (1, 1), "svhn": (6, 2), "tinyimagenet": (1, 1)}
# The grid checks that every pair runs and what its scripts write, not what the models learn: one epoch from scratch.
# Tiny ImageNet's smoke batches are 16 images: at 64 images of 64x64 the slim ResNets' full-width stem makes
# activations larger than the C allocator keeps for reuse (32 MB), so that every step maps fresh pages, and a third of
# the pair's time went to the kernel.
GRID_PRETRAIN_EPOCHS = 1
GRID_SMOKE_BATCH_SIZE = {"tinyimagenet": 16}


@contextlib.contextmanager
def grid_run_in(folder, dataset):
    """Inside the block scripts run in folder with the grid's smoke preset for dataset (GRID_PRETRAIN_EPOCHS and
    GRID_SMOKE_BATCH_SIZE); the working folder and the preset are as they were after."""
    import common  # the scripts' module, importable once ROOT is on the path

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setitem(common.SMOKE, "pretrain_epochs", GRID_PRETRAIN_EPOCHS)
        patch.setitem(common.SMOKE, "batch_size", GRID_SMOKE_BATCH_SIZE.get(dataset, common.SMOKE["batch_size"]))
        yield


@pytest.fixture(scope="session")
def grid_dataset_dir(dataset_dir):
    """grid_dataset_dir(name) -> a folder holding that dataset's synthetic files with GRID_IMAGES_PER_CLASS."""
    return lambda name: dataset_dir(name, GRID_IMAGES_PER_CLASS[name])


def smoke_flags(arch, dataset, root):
    """The command-line flags of a smoke run of arch on dataset's files under root, on the CPU."""
    return ["--arch", arch, "--dataset", dataset, "--preset", "smoke", "--data", root, "--device", "cpu"]


@pytest.fixture(scope="session")
def smoke_original(tmp_path_factory, grid_dataset_dir):
    """smoke_original(arch, dataset) -> path of the pair's smoke-preset original model on the grid's data and preset
    (grid_run_in), trained once per session by pretrain.py in a folder of its own, at its default path there
    (model_weights/...)."""
    import common  # the scripts' module, importable once ROOT is on the path

    made = {}

    def get(arch, dataset):
        if (arch, dataset) not in made:
            folder = tmp_path_factory.mktemp(f"{arch}-{dataset}")
            with grid_run_in(folder, dataset):
                assert run_script("pretrain.py", *smoke_flags(arch, dataset, grid_dataset_dir(dataset))) == 0
            made[arch, dataset] = folder / common.weights_path(arch, "original", "smoke", dataset=dataset)
            assert made[arch, dataset].is_file()
        return made[arch, dataset]
    return get


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in an empty folder, so default paths (model_weights/, results/) land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
