"""What a run does when things go wrong or are repeated: divergence, interruptions, same seed same weights,
checkpoint names that follow every model-changing setting."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_script

import common
from unlearning import scripts


def one_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_non_finite_loss_stops_training_naming_epoch_and_step():
    model = torch.nn.Linear(4, 2)
    batches = [(torch.randn(3, 4), torch.tensor([0, 1, 0]))] * 5
    calls = []

    def nan_at_step_3_of_epoch_2(model, inputs, labels):
        calls.append(1)
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        return loss * float("nan") if len(calls) == 8 else loss

    with pytest.raises(common.TrainingDiverged, match=r"loss became nan at epoch 2/3, step 3/5"):
        common.train(model, batches, 3, loss_fn=nan_at_step_3_of_epoch_2)
    assert len(calls) == 10  # read at the end of epoch 2, not after every step


def test_diverged_run_writes_nothing(original_weights, cifar_dir, workdir, capsys):
    assert run_script("ga.py", "--arch", "vit", "--preset", "smoke", "--data", cifar_dir, "--weights",
                      original_weights("vit"), "--lr", "1e30", "--epochs", "3") == 3
    assert "training diverged (ga): the loss became" in one_line(capsys)
    assert not (workdir / "model_weights").exists()


def test_interruption_while_saving_keeps_the_old_checkpoint(original_weights, cifar_dir, workdir, capsys,
                                                            monkeypatch):
    out = workdir / "keep.pth"
    out.write_bytes(b"precious")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", interrupted)
    assert run_script("finetune.py", "--arch", "vit", "--preset", "smoke", "--data", cifar_dir, "--weights",
                      original_weights("vit"), "--out", out) == 130
    assert one_line(capsys) == "interrupted: nothing written; other existing files unchanged"
    assert out.read_bytes() == b"precious" and [p.name for p in workdir.iterdir()] == ["keep.pth"]


def test_sigterm_during_training_in_a_real_process_exits_143_and_writes_nothing(original_weights, cifar_dir,
                                                                                tmp_path):
    out = tmp_path / "keep.pth"
    out.write_bytes(b"precious")
    process = subprocess.Popen([sys.executable, str(ROOT / "finetune.py"), "--arch", "vit", "--preset", "smoke",
                                "--data", str(cifar_dir), "--weights", str(original_weights("vit")),
                                "--epochs", "100000", "--out", str(out)],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().startswith("finetune: 180 retain and 20 forget images")  # training starts
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143
    assert err.strip() == "interrupted: nothing written; other existing files unchanged"
    assert out.read_bytes() == b"precious" and [p.name for p in tmp_path.iterdir()] == ["keep.pth"]


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_training_exits_with_its_status(signum, status, original_weights, cifar_dir, workdir, capsys,
                                                      monkeypatch):
    weights = original_weights("vit")

    def signalled_train(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("the signal did not stop training")
    monkeypatch.setattr(scripts, "train", signalled_train)
    assert run_script("finetune.py", "--arch", "vit", "--preset", "smoke", "--data", cifar_dir, "--weights",
                      weights) == status
    assert one_line(capsys) == "interrupted: nothing written; other existing files unchanged"
    assert not (workdir / "model_weights").exists()


def test_interrupted_continual_run_names_the_steps_it_kept(original_weights, cifar_dir, workdir, capsys,
                                                          monkeypatch):
    weights, real_train, calls = original_weights("vit"), common.train, []

    def interrupted_at_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)
    monkeypatch.setattr(scripts, "train", interrupted_at_step_2)
    assert run_script("continual.py", "--arch", "vit", "--preset", "smoke", "--data", cifar_dir, "--weights", weights,
                      "--method", "finetune", "--steps", "3", "5", "--no-retrain") == 130
    step1 = "model_weights/continual/vit-smoke_finetune_step1.pth"
    assert one_line(capsys) == f"interrupted: wrote {step1} before stopping; other existing files unchanged"
    assert [p.name for p in (workdir / "model_weights/continual").iterdir()] == ["vit-smoke_finetune_step1.pth"]
    assert not (workdir / "results").exists()


def test_sigterm_handler_is_restored_after_a_run(workdir):
    before = signal.getsignal(signal.SIGTERM)
    run_script("finetune.py", "--epochs", "0")
    assert signal.getsignal(signal.SIGTERM) is before


def test_same_command_same_seed_gives_identical_weights_and_metrics(original_weights, cifar_dir, workdir):
    """Twice each: pretraining (augmentation, init) and PruneLoRA (pruning, LoRA dropout, shuffling)."""
    again = workdir / "original_again.pth"
    assert run_script("pretrain.py", "--arch", "vit", "--preset", "smoke", "--data", cifar_dir, "--out", again) == 0
    runs = [workdir / "a.pth", workdir / "b.pth"]
    for out in runs:
        assert run_script("loraprune.py", "--arch", "vit", "--preset", "smoke", "--data", cifar_dir, "--weights",
                          original_weights("vit"), "--seed", "3", "--out", out) == 0
    for first, second in [(original_weights("vit"), again), runs]:
        first_state = torch.load(first, weights_only=True)["model"]
        second_state = torch.load(second, weights_only=True)["model"]
        assert first_state.keys() == second_state.keys()
        assert all(torch.equal(first_state[key], second_state[key]) for key in first_state)
    metrics = [common.evaluate_checkpoint(out, cifar_dir, "cpu") for out in runs]
    assert {key: metrics[0][key] for key in common.METRIC_KEYS} == {key: metrics[1][key] for key in common.METRIC_KEYS}


def test_model_changing_flags_change_the_default_name(original_weights, cifar_dir, workdir):
    smoke = ["--arch", "vit", "--preset", "smoke", "--data", cifar_dir, "--weights", original_weights("vit")]
    assert run_script("pruneft.py", *smoke) == 0
    mask = workdir / "model_weights/vit-smoke_pruneft.pth"
    before = mask.read_bytes()
    assert run_script("pruneft.py", *smoke, "--prune-mode", "physical", "--lr", "0.002") == 0
    physical = workdir / "model_weights/vit-smoke_pruneft_lr=0.002_prune-mode=physical.pth"
    assert physical.is_file() and mask.read_bytes() == before
    meta = torch.load(physical, weights_only=True)["meta"]
    assert meta["prune_mode"] == "physical" and meta["settings"] == {"lr": "0.002", "prune-mode": "physical"}


def parsed(argv, extra=None):
    parser = common.make_parser("")
    common.add_common_arguments(parser)
    common.add_method_arguments(parser)
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    return common.name_settings(parser, args, common.PAPER_RECIPE)


def test_name_settings_are_generic_exact_and_skip_defaults():
    assert parsed([]) == {}
    assert parsed(["--epochs", "5", "--lr", "0.001", "--prune-mode", "mask", "--seed", "2", "--device", "cpu"]) == {}
    assert parsed(["--lora-rank", "4", "--lr", "1e-05"]) == {"lr": "1e-05", "lora-rank": "4"}
    assert parsed(["--lora-train-full"]) == {"lora-train-full": "none"}
    targets = parsed(["--lora-targets", r"layer\d\.0\.conv1"])["lora-targets"]
    assert targets.startswith("h") and targets != parsed(["--lora-targets", r"layer\d\.1\.conv1"])["lora-targets"]
    assert parsed(["--weights", "elsewhere/resnet50_original.pth"]) == {}
    assert parsed(["--weights", "model_weights/resnet50_lora.pth"]) == {"from": "resnet50_lora"}

    def batchnorm_flag(parser):  # a flag a script adds itself is picked up without being listed anywhere
        parser.add_argument("--bn", choices=("train", "frozen"), default="train")
    assert parsed(["--bn", "frozen"], batchnorm_flag) == {"bn": "frozen"}
    assert parsed(["--bn", "train"], batchnorm_flag) == {}
    name = common.weights_path("resnet50", "lora", "smoke", common.ForgetSpec((3, 5)), 1, settings={"bn": "frozen"})
    assert name.name == "resnet50-smoke_class3-5_lora_bn=frozen_s1.pth"


def test_nearby_forget_fractions_get_different_exact_tags():
    tags = {fraction: common.ForgetSpec((), fraction).tag for fraction in (0.1, 0.1000001, 0.025, 0.5)}
    assert tags == {0.1: "random10", 0.1000001: "random10p00001", 0.025: "random2p5", 0.5: "random50"}


def test_lora_dropout_zero_is_not_replaced_by_the_default():
    parser = common.make_parser("")
    common.add_lora_arguments(parser)
    args = parser.parse_args(["--lora-dropout", "0"])
    assert common.lora_settings("vit", args, common.build_model("vit", "smoke")).dropout == 0.0


def test_deterministic_flag_is_recorded_and_restored(original_weights, cifar_dir, workdir):
    assert run_script("finetune.py", "--arch", "vit", "--preset", "smoke", "--data", cifar_dir, "--weights",
                      original_weights("vit"), "--deterministic") == 0
    meta = torch.load(workdir / "model_weights/vit-smoke_finetune.pth", weights_only=True)["meta"]
    assert meta["deterministic"] is True and meta["settings"] == {}
    assert not torch.are_deterministic_algorithms_enabled()
