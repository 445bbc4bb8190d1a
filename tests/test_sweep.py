import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from conftest import run_script

import common
import sweep

SMOKE = ["--preset", "smoke", "--arch", "resnet50", "--seeds", "0", "--device", "cpu"]


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_only_data_original_recipe_and_flags_make_a_record_stale(monkeypatch):
    args = SimpleNamespace(preset="smoke", data="data", device="cpu")
    run = sweep.make_run("resnet50", "lora", 0, args, common.ForgetSpec())
    planned = sweep.fingerprint(run, "smoke", "data-hash", "CIFAR-10", "cpu", "original-hash")
    assert planned["flags"] == ["lora.py", "--arch", "resnet50", "--preset", "smoke", "--seed", "0",
                                "--forget-class", "3", "--forget-seed", "0"]
    assert sweep.differences({"fingerprint": planned}, planned) == []
    elsewhere = {**planned, "code": {"commit": "0" * 40, "dirty": True}, "device": "NVIDIA H100",
                 "versions": {"torch": "0.1"}, "data": {"sha256": "data-hash", "label": "another label"}}
    assert sweep.differences({"fingerprint": elsewhere}, planned) == []
    other_data = {**planned, "data": {"sha256": "other", "label": "CIFAR-10"}}
    assert sweep.differences({"fingerprint": other_data}, planned) == ["data"]
    assert sweep.differences({"fingerprint": {**planned, "original": "retrained"}}, planned) == ["original"]
    other_seed = sweep.fingerprint(sweep.make_run("resnet50", "lora", 1, args, common.ForgetSpec()), "smoke",
                                   "data-hash", "CIFAR-10", "cpu", "original-hash")
    assert sweep.differences({"fingerprint": other_seed}, planned) == ["flags"]
    monkeypatch.setitem(common.PAPER_RECIPE, "lr", 0.5)
    assert sweep.differences({"fingerprint": planned}, sweep.fingerprint(run, "smoke", "data-hash", "CIFAR-10", "cpu",
                                                                         "original-hash")) == ["recipe"]
    assert sweep.differences({"method": "lora"}, planned) == list(sweep.PLAN_KEYS)


def test_lock_is_exclusive_and_released(tmp_path):
    path = tmp_path / "unit.lock"
    first, second = sweep.UnitLock(path), sweep.UnitLock(path)
    assert first.acquire() is None
    assert json.loads(path.read_text())["pid"] == os.getpid()
    holder = second.acquire()
    assert holder.startswith(f"{path} by pid {os.getpid()} on {socket.gethostname()}")
    first.release()
    assert not path.exists()
    assert second.acquire() is None
    second.release()


def test_lock_of_a_dead_process_on_this_host_or_of_this_slurm_job_is_taken_over(tmp_path, monkeypatch):
    path = tmp_path / "unit.lock"
    path.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "since": "earlier"}))
    lock = sweep.UnitLock(path)
    assert lock.acquire() is None
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()

    other_host = {"pid": dead_pid(), "host": "another-host", "slurm_job": "41", "since": "earlier"}
    path.write_text(json.dumps(other_host))  # whether it lives cannot be told from here
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert "on another-host" in sweep.UnitLock(path).acquire()
    assert json.loads(path.read_text()) == other_host

    monkeypatch.setenv("SLURM_JOB_ID", "41")  # the same job, requeued: its earlier attempt is gone
    assert sweep.UnitLock(path).acquire() is None
    assert json.loads(path.read_text())["slurm_job"] == "41"


def test_locked_unit_is_skipped(cifar_dir, workdir, capsys):
    lock = workdir / "results/locks/resnet50-smoke_s0-retrain.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}))
    assert run_script("reproduce.py", *SMOKE, "--units", "resnet50-s0-retrain", "--no-tables", "--data", cifar_dir) == 0
    assert "resnet50-s0-retrain: skipped, another process holds its lock" in capsys.readouterr().out
    assert lock.is_file() and not (workdir / "results/runs").exists()


def test_unknown_unit_is_a_one_line_error(workdir, capsys):
    assert run_script("reproduce.py", *SMOKE, "--units", "resnet50-s9-retrain") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown unit 'resnet50-s9-retrain'") and err.count("\n") == 1


@pytest.mark.parametrize("content", ["{not json", '["a list"]'])
def test_corrupt_record_is_a_one_line_error_naming_it(cifar_dir, workdir, capsys, content):
    record = workdir / "results/runs/resnet50-smoke_finetune_s0.json"
    record.parent.mkdir(parents=True)
    record.write_text(content)
    assert run_script("reproduce.py", *SMOKE, "--tables-only", "--data", cifar_dir) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: run record {record.relative_to(workdir)} is ") and err.count("\n") == 1
    assert record.read_text() == content


def test_sigterm_stops_the_child_process():
    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    previous = signal.signal(signal.SIGTERM, sweep.raise_interrupted)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        sweep.subprocess.Popen = popen
        timer.start()
        begin = time.monotonic()
        with pytest.raises(sweep.Interrupted):
            sweep.run_child([sys.executable, "-c", "import time; time.sleep(60)"])
    finally:
        sweep.subprocess.Popen = real_popen
        signal.signal(signal.SIGTERM, previous)
        timer.cancel()
    assert time.monotonic() - begin < 30
    assert started[0].poll() is not None


def test_code_version_outside_a_git_checkout(monkeypatch, tmp_path):
    monkeypatch.setattr(sweep, "ROOT", tmp_path)
    sweep.code_version.cache_clear()
    try:
        assert sweep.code_version() == {"commit": None, "dirty": None}
    finally:
        sweep.code_version.cache_clear()


def test_data_and_model_hashes_follow_the_content(tmp_path):
    data = common.CIFAR10(*(common.torch.zeros(4, 3, 2, 2, dtype=common.torch.uint8),
                            common.torch.arange(4), common.torch.zeros(2, 3, 2, 2, dtype=common.torch.uint8),
                            common.torch.arange(2)))
    before = sweep.data_sha256(data)
    data.train_images[0, 0, 0, 0] = 1
    assert sweep.data_sha256(data) != before

    model = common.torch.nn.Linear(2, 2)
    common.save_checkpoint(tmp_path / "a.pth", model, {"created": "then"})
    common.save_checkpoint(tmp_path / "b.pth", model, {"created": "now"})
    assert sweep.model_sha256(tmp_path / "a.pth") == sweep.model_sha256(tmp_path / "b.pth")
    with common.torch.no_grad():
        model.bias[0] += 1
    common.save_checkpoint(tmp_path / "b.pth", model, {"created": "now"})
    assert sweep.model_sha256(tmp_path / "a.pth") != sweep.model_sha256(tmp_path / "b.pth")
