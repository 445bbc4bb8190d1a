"""The dataset table: each dataset read from tiny synthetic files in its standard layout (conftest's writers), its
labels, class names and data label. The scripts run end to end on every dataset in tests/test_grid.py."""
import dataclasses
import hashlib
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.io
import torch
from conftest import SYNTHETIC_WRITERS, run_script
from PIL import Image

import common
from unlearning import data as data_module
from unlearning import locks, units

OTHERS = ("cifar100", "svhn", "tinyimagenet")


def test_the_table_holds_one_entry_per_dataset_and_each_names_its_geometry():
    assert common.DATASET_NAMES == ("cifar10", "cifar100", "svhn", "tinyimagenet") == tuple(SYNTHETIC_WRITERS)
    assert {name: (d.num_classes, d.image_size) for name, d in common.DATASETS.items()} == {
        "cifar10": (10, 32), "cifar100": (100, 32), "svhn": (10, 32), "tinyimagenet": (200, 64)}
    for dataset in common.DATASETS.values():
        assert len(dataset.mean) == len(dataset.std) == 3 and all(0 < s < 1 for s in dataset.std)
        assert set(dataset.checksums) <= set(dataset.files) | {"cifar-100-python/meta"}


@pytest.mark.parametrize("name", common.DATASET_NAMES)
def test_each_dataset_is_read_from_its_standard_layout(name, dataset_dir):
    info, root = common.DATASETS[name], dataset_dir(name)
    data = common.load_data(root, "cpu", "full", name)
    size = info.image_size
    assert data.dataset == name and data.num_classes == info.num_classes
    for images, labels in ((data.train_images, data.train_labels), (data.test_images, data.test_labels)):
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, size, size) and len(images) == len(labels)
        assert images.is_contiguous()  # [N, C, H, W] in memory, as CIFAR-10's
        counts = torch.bincount(labels, minlength=info.num_classes)
        assert len(counts) == info.num_classes and (counts == counts[0]).all() and counts[0] > 0
    assert len(data.class_names) == info.num_classes and len(set(data.class_names)) == info.num_classes
    smoke = common.load_data(root, "cpu", "smoke", name)
    assert torch.bincount(smoke.train_labels).max() <= common.SMOKE["train_per_class"]
    assert torch.bincount(smoke.test_labels).max() <= common.SMOKE["test_per_class"]
    normalised = common.normalize(data.train_images[:4], name)
    expected = (data.train_images[:4].float() / 255 - torch.tensor(info.mean).view(1, 3, 1, 1)) / \
        torch.tensor(info.std).view(1, 3, 1, 1)
    assert torch.allclose(normalised, expected)


def test_cifar100_takes_the_fine_labels_and_the_meta_names(dataset_dir):
    root = dataset_dir("cifar100")
    with open(root / "cifar-100-python" / "train", "rb") as f:
        release = pickle.load(f)
    data = common.load_data(root, "cpu", "full", "cifar100")
    assert data.train_labels.tolist() == release["fine_labels"]
    assert torch.equal(data.train_images[5], torch.from_numpy(release["data"][5].reshape(3, 32, 32)))
    assert data.class_names[:2] == ("fine0", "fine1")


def test_svhn_maps_label_10_to_the_digit_0_and_keeps_the_pixels(dataset_dir):
    root = dataset_dir("svhn")
    mat = scipy.io.loadmat(root / "train_32x32.mat")
    data = common.load_data(root, "cpu", "full", "svhn")
    y = mat["y"][:, 0]
    assert set(y.tolist()) == set(range(1, 11)) and data.train_labels.tolist() == np.where(y == 10, 0, y).tolist()
    first_ten = int(np.flatnonzero(y == 10)[0])
    assert torch.equal(data.train_images[first_ten], torch.from_numpy(mat["X"][..., first_ten].transpose(2, 0, 1)))
    assert data.class_names == tuple("0123456789")


def test_tiny_imagenet_orders_classes_by_wnid_and_labels_val_by_its_annotations(dataset_dir):
    root = dataset_dir("tinyimagenet")
    folder = root / "tiny-imagenet-200"
    wnids = sorted(folder.joinpath("wnids.txt").read_text().split())
    data = common.load_data(root, "cpu", "full", "tinyimagenet")
    assert data.class_names[:3] == ("word0", "word1", "word2")  # the first word of each wnid's words.txt entry
    name, wnid = folder.joinpath("val", "val_annotations.txt").read_text().splitlines()[7].split("\t")[:2]
    assert data.test_labels[7] == wnids.index(wnid)
    decoded = np.asarray(Image.open(folder / "val" / "images" / name).convert("RGB")).transpose(2, 0, 1)
    assert torch.equal(data.test_images[7], torch.from_numpy(decoded.copy()))


def test_each_data_label_names_its_dataset(dataset_dir, monkeypatch, tmp_path):
    root = SYNTHETIC_WRITERS["svhn"](tmp_path, train_per_class=1, test_per_class=1)
    svhn = common.DATASETS["svhn"]
    assert common.data_label(root, "svhn") == "SVHN (files differ from the official release)"
    (root / svhn.provenance).write_text("SVHN (re-encoded copy)\n")
    assert common.data_label(root, "svhn") == "SVHN (re-encoded copy)"
    checksums = {path: hashlib.md5((root / path).read_bytes()).hexdigest() for path in svhn.checksums}
    monkeypatch.setitem(common.DATASETS, "svhn", dataclasses.replace(svhn, checksums=checksums))
    assert common.data_label(root, "svhn") == "SVHN"
    # Tiny ImageNet's release is one zip, checked when downloaded: unpacked files are not checkable one by one
    assert common.data_label(dataset_dir("tinyimagenet"), "tinyimagenet") == \
        "Tiny ImageNet (files not checked against the official release)"


@pytest.mark.parametrize("name", OTHERS)
def test_missing_files_offline_say_where_to_put_them(name, tmp_path, monkeypatch, capsys):
    def offline(root):
        raise OSError("no network")
    monkeypatch.setitem(common.DATASETS, name, dataclasses.replace(common.DATASETS[name], download=offline))
    assert run_script("pretrain.py", "--dataset", name, "--preset", "smoke", "--data", tmp_path / "none",
                      "--device", "cpu", "--out", tmp_path / "x.pth") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found under" in err and common.DATASETS[name].source in err
    assert not (tmp_path / "x.pth").exists()


def test_the_vit_keeps_64_patch_tokens_at_64x64():
    for size in (32, 64):
        model = common.build_model("vit", "smoke", num_classes=200, image_size=size)
        assert model.patch_embed.num_patches == 64 and common.input_size(model) == size
        assert model(torch.zeros(2, 3, size, size)).shape == (2, 200)


def test_the_sweep_names_other_datasets_and_leaves_cifar10_runs_as_they_were():
    args = SimpleNamespace(preset="smoke", data="data", device="cpu", dataset="cifar10")
    cifar10 = units.make_run("resnet50", "lora", 0, args, common.ForgetSpec())
    assert cifar10.checkpoint.name == "resnet50-smoke_lora_s0.pth" and "--dataset" not in cifar10.plan_flags
    args.dataset = "svhn"
    svhn = units.make_run("resnet50", "lora", 0, args, common.ForgetSpec())
    assert svhn.checkpoint.name == "resnet50-smoke_svhn_lora_s0.pth" and svhn.dataset == "svhn"
    assert svhn.plan_flags[svhn.plan_flags.index("--dataset") + 1] == "svhn"
    assert "resnet50-smoke_svhn_original_s0" in str(svhn.io_flags)
    assert units.results_stem("vit", "full", common.ForgetSpec((5,)), "svhn") == "vit_svhn_class5"
    assert units.results_stem("resnet18", "smoke", common.ForgetSpec(random_fraction=0.1), "cifar10", "salun") == \
        "resnet18-smoke_random10_bench=salun"
    # a sweep of another dataset locks its own units, so two sweeps of one arch and seed do not wait on each other
    unit = units.Unit("resnet50", 0, "methods", [cifar10])
    lock_name = "resnet50-smoke_svhn_s0-methods.lock"
    assert locks.unit_lock(unit, "smoke", common.ForgetSpec(), "svhn").path.name == lock_name
    assert locks.unit_lock(unit, "smoke", common.ForgetSpec()).path.name == lock_name.replace("_svhn", "")


def test_resnet18_and_vgg16_bn_train_on_svhn_without_augmentation_and_cifar10_recipes_stay(monkeypatch):
    """Unlearn-Sparse's SVHN loader does not augment; a recipe with augment off never crops or flips a batch."""
    for arch in common.ARCHS:
        assert common.pretrain_recipe(arch, "cifar10") == common.PRETRAIN_RECIPES[arch]
        assert common.pretrain_recipe(arch, "svhn").get("augment", True) is (arch not in ("resnet18", "vgg16_bn"))
    augmented = []
    real_augment = data_module.augment
    monkeypatch.setattr(data_module, "augment", lambda *args, **kwargs: augmented.append(len(args[0])) or
                        real_augment(*args, **kwargs))
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = common.Data(images, torch.arange(20) % 10, images[:10], torch.arange(10), dataset="svhn")
    recipe = dict(common.pretrain_recipe("resnet18", "svhn"), epochs=1, batch_size=8)
    for augment, expected in ((False, []), (True, [8, 8, 4])):
        augmented.clear()
        common.train_from_scratch(common.build_model("resnet18", "smoke"), data, torch.arange(20),
                                  dict(recipe, augment=augment), seed=0)
        assert augmented == expected
