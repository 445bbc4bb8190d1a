"""Bad input across the scripts, one row per case: the exit status, one line on stderr, no traceback, and every
existing file left exactly as it was (nothing written, nothing removed)."""
import argparse
import hashlib
import os
import pickle
import shutil
from pathlib import Path

import pytest
import scipy.io
import torch
from conftest import ROOT, SYNTHETIC_WRITERS, run_script
from PIL import Image

import common

SMOKE = ["--preset", "smoke", "--data", "data", "--device", "cpu"]
BATCHES = Path("data/cifar-10-batches-py")  # relative to the test's working folder


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def rewrite_batch(path, change):
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    with open(path, "wb") as f:
        pickle.dump(change(batch), f)


def save_with_meta(path, arch, preset, **meta):
    """A checkpoint of a smoke model of arch whose meta claims something else."""
    common.save_checkpoint(path, common.build_model(arch, "smoke"), {"arch": meta.pop("meta_arch", arch),
                                                                     "preset": preset, "method": "x", **meta})


def truncated_copy(source, target):
    shutil.copy(source, target)
    truncate(Path(target))


def save_plain(source, target):
    """The bare state dict of the checkpoint at source, as torch.save(model.state_dict(), target) writes it."""
    torch.save(torch.load(source, weights_only=True)["model"], target)


def save_safetensors(source, target):
    model, meta = common.load_checkpoint(source)
    common.save_checkpoint(target, model, meta)


def broken(dataset, change):
    """A setup: the dataset's tiny synthetic files written under data/, then change() applied to them."""
    def setup():
        SYNTHETIC_WRITERS[dataset](Path("data"), train_per_class=1, test_per_class=1)
        change()
    return setup


def small_svhn_images():
    mat = scipy.io.loadmat("data/test_32x32.mat")
    scipy.io.savemat("data/test_32x32.mat", {"X": mat["X"][:28, :28], "y": mat["y"]})


def tiny_image(size):
    Image.new("RGB", (size, size)).save(next(Path("data/tiny-imagenet-200/train").rglob("*.JPEG")))


TINY_VAL = Path("data/tiny-imagenet-200/val")


SETUPS = {
    "truncated batch": lambda: truncate(BATCHES / "data_batch_1"),
    "list pickle": lambda: rewrite_batch(BATCHES / "test_batch", lambda batch: [1, 2, 3]),
    "label 10": lambda: rewrite_batch(BATCHES / "data_batch_2", lambda b: dict(b, labels=[10] * len(b["labels"]))),
    "short rows": lambda: rewrite_batch(BATCHES / "data_batch_3", lambda b: dict(b, data=b["data"][:, :1000])),
    "label count": lambda: rewrite_batch(BATCHES / "data_batch_4", lambda b: dict(b, labels=b["labels"][:-1])),
    "float pixels": lambda: rewrite_batch(BATCHES / "data_batch_5", lambda b: dict(b, data=b["data"] / 255)),
    "garbage checkpoint": lambda: Path("garbage.pth").write_bytes(b"\x80\x02not a checkpoint"),
    "truncated checkpoint": lambda: truncated_copy("keep.pth", "half.pth"),
    "vit weights, resnet50 meta": lambda: save_with_meta("mislabelled.pth", "vit", "smoke", meta_arch="resnet50"),
    "smoke weights, full meta": lambda: save_with_meta("wrong-preset.pth", "resnet50", "full"),
    "unknown arch": lambda: save_with_meta("alien.pth", "vit", "smoke", meta_arch="alexnet"),
    "bad forget meta": lambda: save_with_meta("bad-forget.pth", "vit", "smoke", forget={"classes": 3}),
    "cifar10 weights, cifar100 meta": lambda: save_with_meta("relabelled.pth", "resnet50", "smoke", dataset="cifar100"),
    "truncated cifar-100": broken("cifar100", lambda: truncate(Path("data/cifar-100-python/train"))),
    "cifar-100 without meta": broken("cifar100", lambda: Path("data/cifar-100-python/meta").write_bytes(b"")),
    "truncated svhn": broken("svhn", lambda: truncate(Path("data/train_32x32.mat"))),
    "28x28 svhn": broken("svhn", small_svhn_images),
    "truncated tiny jpeg": broken("tinyimagenet", lambda: truncate(next(TINY_VAL.rglob("*.JPEG")))),
    "32x32 tiny jpeg": broken("tinyimagenet", lambda: tiny_image(32)),
    "tiny val of no class": broken("tinyimagenet", lambda: (TINY_VAL / "val_annotations.txt").write_text(
        "val_0.JPEG\tn99999999\t0\t0\t63\t63\n")),
    "vit state dict": lambda: save_plain(common.weights_path("vit", "original", "smoke"), "vit-plain.pth"),
    "plain state dict": lambda: save_plain("keep.pth", "plain.pth"),
    "pickled model": lambda: torch.save(common.build_model("resnet50", "smoke"), "whole.pth"),
    "truncated state dict": lambda: (save_plain("keep.pth", "plain.pth"), truncate(Path("plain.pth"))),
    "truncated safetensors": lambda: (save_safetensors("keep.pth", "keep.safetensors"),
                                      truncate(Path("keep.safetensors"))),
}


# (script, arguments, setup, exit status, text the one line must hold)
CASES = [
    ("finetune.py", [*SMOKE, "--epochs", "-1"], None, 2, "integer >= 1, got '-1'"),
    ("finetune.py", [*SMOKE, "--epochs", "0"], None, 2, "integer >= 1"),
    ("finetune.py", [*SMOKE, "--batch-size", "1.5"], None, 2, "integer >= 1"),
    ("pretrain.py", [*SMOKE, "--batch-size", "0"], None, 2, "--batch-size: expected an integer >= 1"),
    ("finetune.py", [*SMOKE, "--lr", "nan"], None, 2, "finite number > 0, got 'nan'"),
    ("retrain.py", [*SMOKE, "--lr", "inf"], None, 2, "finite number > 0"),
    ("ga.py", [*SMOKE, "--lr", "-0.1"], None, 2, "finite number > 0"),
    ("lora.py", [*SMOKE, "--lora-rank", "0"], None, 2, "--lora-rank: expected an integer >= 1"),
    ("loraprune.py", [*SMOKE, "--lora-alpha", "0"], None, 2, "--lora-alpha"),
    ("lora.py", [*SMOKE, "--lora-dropout", "1"], None, 2, "number >= 0 and < 1"),
    ("pruneft.py", [*SMOKE, "--prune-amount", "1"], None, 2, "--prune-amount"),
    ("loraprune.py", [*SMOKE, "--prune-amount", "-0.5"], None, 2, "--prune-amount"),
    ("finetune.py", [*SMOKE, "--prune-amount", "0.3"], None, 2, "unrecognized arguments: --prune-amount"),
    ("finetune.py", [*SMOKE, "--prune-mode", "physical"], None, 2, "unrecognized arguments: --prune-mode"),
    ("salun.py", [*SMOKE, "--lora-rank", "4"], None, 2, "unrecognized arguments: --lora-rank"),
    ("pruneft.py", [*SMOKE, "--lora-targets", "fc"], None, 2, "unrecognized arguments: --lora-targets"),
    ("lora.py", [*SMOKE, "--prune-mode", "physical"], None, 2, "unrecognized arguments: --prune-mode"),
    ("retrain.py", [*SMOKE, "--forget-random", "0"], None, 2, "number > 0 and < 1"),
    ("retrain.py", [*SMOKE, "--forget-random", "1.5"], None, 2, "number > 0 and < 1"),
    ("finetune.py", [*SMOKE, "--seed", "-1"], None, 2, "--seed: expected an integer >= 0"),
    ("finetune.py", [*SMOKE, "--forget-seed", "-3"], None, 2, "--forget-seed"),
    ("salun.py", [*SMOKE, "--saliency-share", "0"], None, 2, "number > 0 and <= 1"),
    ("scrub.py", [*SMOKE, "--kd-temperature", "0"], None, 2, "--kd-temperature"),
    ("scrub.py", [*SMOKE, "--forget-batch-size", "0"], None, 2, "--forget-batch-size"),
    ("scrub.py", [*SMOKE, "--lr-decay-epochs", "0"], None, 2, "--lr-decay-epochs"),
    ("l1sparse.py", [*SMOKE, "--l1-alpha", "-1"], None, 2, "--l1-alpha"),
    ("l1sparse.py", [*SMOKE, "--no-l1-epochs", "-1"], None, 2, "--no-l1-epochs"),
    ("evaluate.py", ["keep.pth", "--seed", "-1"], None, 2, "--seed"),
    ("continual.py", [*SMOKE, "--seed", "-1"], None, 2, "--seed"),
    ("bench.py", [*SMOKE, "--epochs", "0"], None, 2, "--epochs"),
    ("bench.py", [*SMOKE, "--limit", "2"], None, 2, "integer >= 5"),
    ("bench.py", [*SMOKE, "--costs", "--dataset", "svhn"], None, 2, "--costs counts the paper's setting, cifar10"),
    ("reproduce.py", [*SMOKE, "--seeds", "0", "-1"], None, 2, "--seeds"),
    ("finetune.py", [*SMOKE, "--out", "notes.txt/x.pth"], None, 1, "notes.txt is a file, not a folder"),
    ("retrain.py", [*SMOKE, "--out", "notes.txt/deeper/x.pth"], None, 1, "notes.txt is a file"),
    ("lora.py", [*SMOKE, "--out", "model_weights"], None, 1, "is a folder"),
    ("evaluate.py", ["keep.pth", "--data", "data", "--json", "notes.txt/e.json"], None, 1, "notes.txt is a file"),
    ("bench.py", [*SMOKE, "--out", "notes.txt"], None, 1, "notes.txt is a file"),
    ("pretrain.py", SMOKE, "truncated batch", 1, "data_batch_1 is not a CIFAR-10 batch: it does not unpickle"),
    ("finetune.py", SMOKE, "list pickle", 1, "test_batch is not a CIFAR-10 batch: expected a dict"),
    ("retrain.py", SMOKE, "label 10", 1, "data_batch_2: labels must lie in 0..9, found 10..10"),
    ("evaluate.py", ["keep.pth", "--data", "data"], "short rows", 1, "data_batch_3 is not a CIFAR-10 batch: 'data' is"),
    ("pretrain.py", SMOKE, "label count", 1, "data_batch_4 is not a CIFAR-10 batch"),
    ("pretrain.py", SMOKE, "float pixels", 1, "expected uint8"),
    ("finetune.py", [*SMOKE, "--weights", "garbage.pth"], "garbage checkpoint", 1,
     "garbage.pth is not a checkpoint torch can read (UnpicklingError)"),
    ("evaluate.py", ["half.pth", "--data", "data"], "truncated checkpoint", 1, "half.pth is not a checkpoint"),
    ("evaluate.py", ["mislabelled.pth", "--data", "data"], "vit weights, resnet50 meta", 1,
     "mislabelled.pth does not fit arch resnet50, preset smoke, dataset cifar10: tensors "),
    ("evaluate.py", ["wrong-preset.pth", "--data", "data"], "smoke weights, full meta", 1,
     "does not fit arch resnet50, preset full, dataset cifar10: tensors "),
    ("evaluate.py", ["alien.pth", "--data", "data"], "unknown arch", 1, "names an unknown arch 'alexnet'"),
    ("evaluate.py", ["bad-forget.pth", "--data", "data"], "bad forget meta", 1,
     "bad-forget.pth has a malformed meta of this project"),
    ("pruneft.py", [*SMOKE, "--weights", "missing.pth"], None, 1, "no original model at missing.pth"),
    ("finetune.py", [*SMOKE, "--weights", "vit-plain.pth"], "vit state dict", 1,
     "vit-plain.pth does not fit arch resnet50, preset smoke, dataset cifar10: tensors "),
    ("evaluate.py", ["vit-plain.pth", "--arch", "resnet50", "--preset", "smoke", "--data", "data"], "vit state dict",
     1, "does not fit arch resnet50, preset smoke, dataset cifar10: tensors "),
    ("evaluate.py", ["plain.pth", "--data", "data"], "plain state dict", 1,
     "plain.pth does not say its arch (it has no meta of this project): pass --arch"),
    ("evaluate.py", ["keep.pth", "--arch", "vit", "--data", "data"], None, 1,
     "keep.pth: its meta says arch resnet50, not vit as --arch says"),
    ("finetune.py", [*SMOKE, "--weights", "whole.pth"], "pickled model", 1,
     "whole.pth holds pickled Python objects (unlearning.models.SlimResNet"),
    ("evaluate.py", ["whole.pth", "--data", "data"], "pickled model", 1, "torch.save(model.state_dict(), PATH)"),
    ("finetune.py", [*SMOKE, "--weights", "plain.pth"], "truncated state dict", 1,
     "plain.pth is not a checkpoint torch can read"),
    ("evaluate.py", ["keep.safetensors", "--data", "data"], "truncated safetensors", 1,
     "keep.safetensors is not a safetensors file that can be read"),
    ("export.py", ["keep.pth", "vit-plain.pth", "--arch", "resnet50", "--preset", "smoke"], "vit state dict", 1,
     "vit-plain.pth does not fit arch resnet50"),
    ("export.py", ["keep.pth", "--out", "keep.pth"], None, 1, "an export is a .safetensors file"),
    ("finetune.py", [*SMOKE, "--forget-class", "10"], None, 1, "--forget-class 10 is out of range: cifar10 has "
                                                                "classes 0..9"),
    ("retrain.py", [*SMOKE, "--dataset", "svhn", "--forget-class", "-1"], None, 2,
     "--forget-class: expected an integer >= 0, got '-1'"),
    ("retrain.py", [*SMOKE, "--dataset", "svhn", "--forget-class", "10"], None, 1,
     "--forget-class 10 is out of range: svhn has classes 0..9"),
    ("evaluate.py", ["keep.pth", "--data", "data", "--forget-class", "3", "12"], None, 1,
     "--forget-class 12 is out of range: cifar10 has classes 0..9"),
    ("continual.py", [*SMOKE, "--steps", "3", "10"], None, 1, "--steps 10 is out of range: cifar10 has classes"),
    ("reproduce.py", [*SMOKE, "--dataset", "cifar100", "--forget-class", "100"], None, 1, "classes 0..99"),
    ("lora.py", [*SMOKE, "--dataset", "cifar100", "--weights", "keep.pth"], None, 1,
     "keep.pth: its meta says dataset cifar10, not cifar100 as --dataset says; pass --dataset cifar10"),
    ("loraprune.py", [*SMOKE, "--dataset", "svhn"], None, 1,
     "no original model at model_weights/resnet50-smoke_svhn_original.pth: run `python pretrain.py --arch resnet50 "
     "--preset smoke --dataset svhn` first"),
    ("evaluate.py", ["relabelled.pth", "--data", "data"], "cifar10 weights, cifar100 meta", 1,
     "relabelled.pth does not fit arch resnet50, preset smoke, dataset cifar100: tensors "),
    ("pretrain.py", [*SMOKE, "--dataset", "cifar100"], "truncated cifar-100", 1,
     "train is not a CIFAR-100 batch: it does not unpickle"),
    ("retrain.py", [*SMOKE, "--dataset", "cifar100"], "cifar-100 without meta", 1,
     "meta is not CIFAR-100's meta file: it does not unpickle"),
    ("pretrain.py", [*SMOKE, "--dataset", "svhn"], "truncated svhn", 1,
     "train_32x32.mat is not an SVHN split (.mat with X and y): it does not load"),
    ("retrain.py", [*SMOKE, "--dataset", "svhn"], "28x28 svhn", 1, "expected uint8 [N, 3, 32, 32]"),
    ("pretrain.py", [*SMOKE, "--dataset", "tinyimagenet"], "truncated tiny jpeg", 1, "is not a JPEG image"),
    ("pretrain.py", [*SMOKE, "--dataset", "tinyimagenet"], "32x32 tiny jpeg", 1, "is 32x32, expected 64x64"),
    ("pretrain.py", [*SMOKE, "--dataset", "tinyimagenet"], "tiny val of no class", 1,
     "val_annotations.txt: line 'val_0.JPEG"),
    ("ga.py", [*SMOKE, "--lr", "1e30", "--epochs", "3", "--out", "keep.pth"], None, 3,
     "training diverged (ga): the loss became"),
]


def folder_state(root):
    """{relative path: sha256} of every file under root."""
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture
def world(workdir, cifar_dir, original_weights):
    """A project folder with data, the original smoke models, a checkpoint to keep and a plain file."""
    shutil.copytree(cifar_dir, workdir / "data")
    for arch in ("resnet50", "vit"):
        target = common.weights_path(arch, "original", "smoke")
        target.parent.mkdir(exist_ok=True)
        shutil.copy(original_weights(arch), target)
    shutil.copy(common.weights_path("resnet50", "original", "smoke"), workdir / "keep.pth")
    (workdir / "notes.txt").write_text("a plain file\n")
    return workdir


@pytest.mark.parametrize(("script", "args", "setup", "status", "message"), CASES,
                         ids=[f"{c[0]} {c[2] or ' '.join(c[1][len(SMOKE):] if c[1][:1] == SMOKE[:1] else c[1])}"
                              for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(script, args, setup, status, message, world, capsys):
    if setup:
        SETUPS[setup]()
    before = folder_state(world)
    capsys.readouterr()
    assert run_script(script, *args) == status
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err and "Traceback" not in err
    assert folder_state(world) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_output_folder_is_refused_before_training(world, capsys):
    locked = world / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert run_script("finetune.py", *SMOKE, "--out", locked / "x.pth") == 1
        assert "is not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def parsers_of_every_script(monkeypatch):
    """{script: its parser}, captured as each script parses its command line (nothing runs)."""
    captured = {}

    def capture(parser, argv=None, namespace=None):
        captured[current] = parser
        raise SystemExit(0)
    monkeypatch.setattr(common.OneLineParser, "parse_args", capture)
    for current in sorted(p.name for p in ROOT.glob("*.py") if '__name__ == "__main__"' in p.read_text()):
        run_script(current)
    return captured


def test_every_number_flag_is_range_checked_and_says_its_range(monkeypatch):
    parsers = parsers_of_every_script(monkeypatch)
    assert {"finetune.py", "evaluate.py", "reproduce.py", "bench.py"} <= parsers.keys()
    for script, parser in parsers.items():
        for action in parser._actions:
            bare_number = action.type in (int, float) and action.choices is None
            assert not bare_number, f"{script} {action.option_strings} takes any {action.type.__name__}"
            valid = getattr(action.type, "valid", None)
            if valid:
                assert f"[{valid}]" in action.help, (script, action.option_strings)


def test_ranges_are_exact_at_their_bounds():
    assert common.positive_int("1") == 1 and common.nonnegative_int("0") == 0
    assert common.unit_interval_open_above("0") == 0 and common.unit_interval_open_below("1") == 1
    assert common.seed_int(str(2**32 - 1)) == 2**32 - 1
    for parse, text in [(common.open_unit_interval, "0"), (common.open_unit_interval, "1"),
                        (common.unit_interval_open_above, "1"), (common.seed_int, str(2**32)),
                        (common.positive_float, "-inf"), (common.nonnegative_float, "-1e-9")]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_checkpoint_key_dump_is_not_shown(world):
    save_with_meta("mislabelled.pth", "vit", "smoke", meta_arch="resnet50")
    with pytest.raises(common.UserError) as error:
        common.load_checkpoint("mislabelled.pth")
    assert len(str(error.value)) < 300
    assert torch.load("mislabelled.pth", weights_only=True)["meta"]["arch"] == "resnet50"
