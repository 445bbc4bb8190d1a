import subprocess
import sys

import pytest
import torch
import torchvision
from conftest import ROOT, run_script

import common

# Every script end to end on every dataset and arch: tests/test_grid.py.


def test_forget_settings_reach_the_checkpoint(original_weights, cifar_dir, workdir):
    common_args = ["--preset", "smoke", "--data", cifar_dir, "--weights", original_weights("vit"), "--arch", "vit"]
    assert run_script("finetune.py", *common_args, "--forget-class", "3", "5") == 0
    assert run_script("finetune.py", *common_args, "--forget-random", "0.1") == 0
    several = workdir / "model_weights/vit-smoke_class3-5_finetune.pth"
    random = workdir / "model_weights/vit-smoke_random10_finetune.pth"
    rows = [common.evaluate_checkpoint(p, cifar_dir, "cpu") for p in (several, random)]
    assert [row["forget"] for row in rows] == ["class3-5", "random10"]


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err and len(err.splitlines()) == 1, err
    return err


def test_missing_weights_name_the_pretrain_command(cifar_dir, workdir, capsys):
    assert run_script("lora.py", "--preset", "smoke", "--data", cifar_dir) == 1
    assert "python pretrain.py --arch resnet50 --preset smoke" in one_line_error(capsys)


def test_missing_data_is_one_line(workdir, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    assert run_script("pretrain.py", "--preset", "smoke", "--data", workdir / "nothing") == 1
    assert "CIFAR-10 not found" in one_line_error(capsys)


def test_forget_class_out_of_range_is_one_line(workdir, capsys):
    assert run_script("finetune.py", "--forget-class", "12") == 1
    assert "--forget-class 12 is out of range: cifar10 has classes 0..9" in one_line_error(capsys)
    assert run_script("retrain.py", "--dataset", "cifar100", "--forget-class", "3", "100") == 1
    assert "--forget-class 100 is out of range: cifar100 has classes 0..99" in one_line_error(capsys)
    assert not (workdir / "model_weights").exists()


def test_weights_of_the_other_arch_are_refused_and_nothing_is_overwritten(original_weights, cifar_dir, workdir,
                                                                            capsys):
    out = workdir / "keep.pth"
    out.write_bytes(b"precious")
    assert run_script("pruneft.py", "--arch", "resnet50", "--preset", "smoke", "--data", cifar_dir,
                      "--weights", original_weights("vit"), "--out", out) == 1
    assert "its meta says arch vit, not resnet50 as --arch says" in one_line_error(capsys)
    assert out.read_bytes() == b"precious"


def test_forget_flags_conflict(cifar_dir, workdir, capsys):
    assert run_script("retrain.py", "--preset", "smoke", "--data", cifar_dir,
                      "--forget-class", "3", "--forget-random", "0.1") == 1
    assert "not both" in one_line_error(capsys)


SCRIPTS = sorted(p.name for p in ROOT.glob("*.py") if '__name__ == "__main__"' in p.read_text())  # not the modules


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_help(script, capsys):
    assert run_script(script, "--help") == 0
    assert "python " in capsys.readouterr().out  # the docstring shows the run command


def test_command_line_error_in_a_real_process(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "finetune.py"), "--epochs", "0"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "model_weights").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_asking_for_a_missing_gpu_is_one_line(workdir, capsys):
    assert run_script("evaluate.py", "x.pth", "--device", "cuda") == 2
    assert "no CUDA GPU" in one_line_error(capsys)


def test_pretrain_records_its_accuracy_curve_without_changing_the_training(cifar_dir, workdir, capsys):
    smoke = ["--arch", "vit", "--preset", "smoke", "--data", cifar_dir, "--epochs", "3", "--device", "cpu"]
    assert run_script("pretrain.py", *smoke, "--eval-every", "2", "--out", "curve.pth") == 0
    out = capsys.readouterr().out
    assert "original epoch 2/3: test accuracy" in out and "original epoch 3/3: test accuracy" in out
    assert "epoch 1/3: test" not in out
    checkpoint = torch.load(workdir / "curve.pth", weights_only=True)
    curve = checkpoint["meta"]["curve"]
    assert [point["epoch"] for point in curve] == [2, 3] and checkpoint["meta"]["eval_every"] == 2
    assert 0 < curve[0]["seconds"] < curve[1]["seconds"] and all(p["images_per_s"] > 0 for p in curve)
    model = common.load_checkpoint(workdir / "curve.pth")[0]
    data = common.load_data(cifar_dir, "cpu", "smoke")
    every_test_image = torch.arange(len(data.test_labels))
    final = common.accuracy(common.predict(model, data.test_images, every_test_image), data.test_labels)
    assert curve[-1]["test_accuracy"] == pytest.approx(final, abs=1e-3)
    assert run_script("pretrain.py", *smoke, "--eval-every", "0", "--out", "quiet.pth") == 0
    assert ": test accuracy" not in capsys.readouterr().out
    quiet = torch.load(workdir / "quiet.pth", weights_only=True)
    assert quiet["meta"]["curve"] == []
    assert all(torch.equal(quiet["model"][k], checkpoint["model"][k]) for k in quiet["model"])


def test_retrain_curve_scores_the_retained_classes(cifar_dir, workdir):
    assert run_script("retrain.py", "--arch", "vit", "--preset", "smoke", "--data", cifar_dir, "--epochs", "1",
                      "--forget-class", *range(1, 10), "--out", "one_class.pth") == 0
    curve = torch.load(workdir / "one_class.pth", weights_only=True)["meta"]["curve"]
    assert [point["epoch"] for point in curve] == [1]
    assert curve[0]["test_accuracy"] == 100  # one class retained: every retained test image is of that class
