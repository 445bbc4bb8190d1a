import dataclasses
import hashlib

import pytest
import torch
import torchvision
from conftest import TEST_PER_CLASS, TRAIN_PER_CLASS, write_synthetic_cifar

import common
from unlearning import data as data_module


@pytest.fixture(scope="module")
def data(cifar_dir):
    return common.load_data(cifar_dir, "cpu")


def test_load_reads_standard_layout(data):
    assert data.train_images.shape == (10 * TRAIN_PER_CLASS, 3, 32, 32)
    assert data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (10 * TEST_PER_CLASS, 3, 32, 32)
    assert torch.bincount(data.train_labels).tolist() == [TRAIN_PER_CLASS] * 10


def test_smoke_preset_keeps_first_images_of_each_class(tmp_path):
    write_synthetic_cifar(tmp_path, train_per_class=40, test_per_class=15)
    full = common.load_data(tmp_path, "cpu")
    smoke = common.load_data(tmp_path, "cpu", preset="smoke")
    assert torch.bincount(smoke.train_labels).tolist() == [common.SMOKE["train_per_class"]] * 10
    assert torch.bincount(smoke.test_labels).tolist() == [common.SMOKE["test_per_class"]] * 10
    first_cat = torch.nonzero(full.train_labels == 3).flatten()[0]
    assert torch.equal(smoke.train_images[torch.nonzero(smoke.train_labels == 3).flatten()[0]],
                       full.train_images[first_cat])


def test_missing_data_is_a_user_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(common.UserError, match="CIFAR-10 not found"):
        common.load_data(tmp_path, "cpu")


def assert_partition(splits, n_train):
    forget, retain = set(splits.forget_idx.tolist()), set(splits.retain_idx.tolist())
    assert not forget & retain
    assert forget | retain == set(range(n_train))


def test_class_split_is_exact(data):
    splits = common.make_splits(data.train_labels, data.test_labels, common.ForgetSpec((3,)))
    assert_partition(splits, len(data.train_labels))
    assert len(splits.forget_idx) == TRAIN_PER_CLASS
    assert (data.train_labels[splits.forget_idx] == 3).all()
    assert (data.train_labels[splits.retain_idx] != 3).all()
    assert len(splits.test_idx) == 9 * TEST_PER_CLASS
    assert (data.test_labels[splits.test_idx] != 3).all()


def test_several_classes(data):
    splits = common.make_splits(data.train_labels, data.test_labels, common.ForgetSpec((3, 5)))
    assert_partition(splits, len(data.train_labels))
    assert set(data.train_labels[splits.forget_idx].tolist()) == {3, 5}
    assert len(splits.forget_idx) == 2 * TRAIN_PER_CLASS
    assert len(splits.test_idx) == 8 * TEST_PER_CLASS


def test_random_split_is_seeded(data):
    spec = common.ForgetSpec((), 0.1, seed=0)
    first = common.make_splits(data.train_labels, data.test_labels, spec)
    again = common.make_splits(data.train_labels, data.test_labels, spec)
    other = common.make_splits(data.train_labels, data.test_labels, common.ForgetSpec((), 0.1, seed=1))
    assert_partition(first, len(data.train_labels))
    assert len(first.forget_idx) == round(0.1 * len(data.train_labels))
    assert torch.equal(first.forget_idx, again.forget_idx)
    assert not torch.equal(first.forget_idx, other.forget_idx)
    assert len(first.test_idx) == len(data.test_labels)
    assert spec.tag == "random10"
    assert common.ForgetSpec((), 0.025, seed=1).tag == "random2p5-seed1"


def test_spec_round_trips_through_dict():
    spec = common.ForgetSpec((3, 5), None, 2)
    assert common.ForgetSpec.from_dict(spec.to_dict()) == spec
    assert spec.tag == "class3-5"


def test_batches_cover_each_index_once_per_epoch(data):
    idx = torch.arange(0, len(data.train_labels), 3)
    batches = common.Batches(data.train_images, torch.arange(len(data.train_labels)), idx, batch_size=16, seed=0)
    for _ in range(2):
        seen = torch.cat([positions for _, positions in batches])
        assert sorted(seen.tolist()) == idx.tolist()
    assert len(batches) == -(-len(idx) // 16)


def test_normalize_uses_cifar_statistics():
    grey = torch.full((1, 3, 2, 2), 128, dtype=torch.uint8)
    cifar10 = common.DATASETS["cifar10"]
    expected = (128 / 255 - torch.tensor(cifar10.mean)) / torch.tensor(cifar10.std)
    assert torch.allclose(common.normalize(grey)[0, :, 0, 0], expected)


def test_augment_crops_and_flips_within_the_image():
    image = torch.arange(32.0).expand(4, 3, 32, 32).clone()
    out = common.augment(image, torch.Generator().manual_seed(0))
    assert out.shape == image.shape
    for row in out[:, 0, 0]:
        steps = row.diff().abs()
        assert set(steps.tolist()) <= {0.0, 1.0}  # a shifted ramp, reflected at the border


def test_data_label_names_the_official_release_a_provenance_file_or_different_files(tmp_path, monkeypatch):
    root = write_synthetic_cifar(tmp_path)
    folder = root / "cifar-10-batches-py"
    assert common.data_label(root) == common.DIFFERENT_DATA_LABEL
    (folder / "PROVENANCE").write_text("CIFAR-10 (JPEG copy)\n")
    assert common.data_label(root) == "CIFAR-10 (JPEG copy)"
    (folder / "PROVENANCE").write_text("two\nlines\n")  # not a one-line provenance: not trusted as a name
    assert common.data_label(root) == common.DIFFERENT_DATA_LABEL
    # the official release is recognised by its checksums, whatever a PROVENANCE file says
    cifar10 = common.DATASETS["cifar10"]
    checksums = {path: hashlib.md5((root / path).read_bytes()).hexdigest() for path in cifar10.checksums}
    monkeypatch.setitem(common.DATASETS, "cifar10", dataclasses.replace(cifar10, checksums=checksums))
    (folder / "PROVENANCE").write_text("something else\n")
    assert common.data_label(root) == "CIFAR-10"
    with open(folder / "data_batch_3", "ab") as batch:
        batch.write(b"\0")
    assert common.data_label(root) == "something else"


def test_the_official_checksums_are_torchvisions():
    checksums = common.DATASETS["cifar10"].checksums
    assert sorted(checksums) == sorted(f"cifar-10-batches-py/{name}"
                                       for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])
    assert checksums["cifar-10-batches-py/test_batch"] == dict(torchvision.datasets.CIFAR10.test_list)["test_batch"]
    assert common.DATASETS["cifar100"].checksums["cifar-100-python/meta"] == torchvision.datasets.CIFAR100.meta["md5"]
    assert common.DATASETS["svhn"].checksums["test_32x32.mat"] == torchvision.datasets.SVHN.split_list["test"][2]


def test_shared_data_reads_each_folder_preset_and_device_once(cifar_dir, monkeypatch):
    reads = []
    real_read = data_module._read_data
    monkeypatch.setattr(data_module, "_read_data", lambda *args: reads.append(args) or real_read(*args))
    with common.shared_data():
        first = common.load_data(cifar_dir, "cpu", "smoke")
        same_folder = f"{cifar_dir}/../{cifar_dir.name}/"
        assert common.load_data(same_folder, torch.device("cpu"), "smoke") is first
        assert common.load_data(cifar_dir, "cpu", "full") is not first
    assert len(reads) == 2
    assert common.load_data(cifar_dir, "cpu", "smoke") is not first  # outside the block: read again
    assert len(reads) == 3
