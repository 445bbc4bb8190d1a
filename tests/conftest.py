"""Shared fixtures: tiny synthetic CIFAR-10 in the standard pickle layout, and in-process script runs."""
import pickle
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """A folder holding a synthetic cifar-10-batches-py (200 training, 100 test images)."""
    return write_synthetic_cifar(tmp_path_factory.mktemp("cifar"))


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


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in an empty folder, so default paths (model_weights/, results/) land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
