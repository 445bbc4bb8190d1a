import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TEST_PER_CLASS, TRAIN_PER_CLASS, run_script

import common
from unlearning import locks, records, runners, sweep, units

SMOKE = ["--preset", "smoke", "--arch", "resnet50", "--seeds", "0", "--device", "cpu"]


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_only_data_original_recipe_and_flags_make_a_record_stale(monkeypatch):
    args = SimpleNamespace(preset="smoke", data="data", dataset="cifar10", device="cpu")
    run = units.make_run("resnet50", "lora", 0, args, common.ForgetSpec())
    planned = records.fingerprint(run, "smoke", "data-hash", "CIFAR-10", "cpu", "original-hash")
    assert planned["flags"] == ["lora.py", "--arch", "resnet50", "--preset", "smoke", "--seed", "0",
                                "--forget-class", "3", "--forget-seed", "0"]
    assert records.differences({"fingerprint": planned}, planned) == []
    elsewhere = {**planned, "code": {"commit": "0" * 40, "dirty": True}, "device": "NVIDIA H100",
                 "versions": {"torch": "0.1"}, "data": {"sha256": "data-hash", "label": "another label"}}
    assert records.differences({"fingerprint": elsewhere}, planned) == []
    other_data = {**planned, "data": {"sha256": "other", "label": "CIFAR-10"}}
    assert records.differences({"fingerprint": other_data}, planned) == ["data"]
    assert records.differences({"fingerprint": {**planned, "original": "retrained"}}, planned) == ["original"]
    other_seed = records.fingerprint(units.make_run("resnet50", "lora", 1, args, common.ForgetSpec()), "smoke",
                                     "data-hash", "CIFAR-10", "cpu", "original-hash")
    assert records.differences({"fingerprint": other_seed}, planned) == ["flags"]
    monkeypatch.setitem(common.PAPER_RECIPE, "lr", 0.5)
    changed = records.fingerprint(run, "smoke", "data-hash", "CIFAR-10", "cpu", "original-hash")
    assert records.differences({"fingerprint": planned}, changed) == ["recipe"]
    assert records.differences({"method": "lora"}, planned) == list(records.PLAN_KEYS)


def test_lock_is_exclusive_and_released(tmp_path):
    path = tmp_path / "unit.lock"
    first, second = locks.UnitLock(path), locks.UnitLock(path)
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
    lock = locks.UnitLock(path)
    assert lock.acquire() is None
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()

    other_host = {"pid": dead_pid(), "host": "another-host", "slurm_job": "41", "since": "earlier"}
    path.write_text(json.dumps(other_host))  # whether it lives cannot be told from here
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert "on another-host" in locks.UnitLock(path).acquire()
    assert json.loads(path.read_text()) == other_host

    monkeypatch.setenv("SLURM_JOB_ID", "41")  # the same job, requeued: its earlier attempt is gone
    assert locks.UnitLock(path).acquire() is None
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

    previous = signal.signal(signal.SIGTERM, common.raise_terminated)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        runners.subprocess.Popen = popen
        timer.start()
        begin = time.monotonic()
        with pytest.raises(common.Terminated):
            runners.run_child([sys.executable, "-c", "import time; time.sleep(60)"])
    finally:
        runners.subprocess.Popen = real_popen
        signal.signal(signal.SIGTERM, previous)
        timer.cancel()
    assert time.monotonic() - begin < 30
    assert started[0].poll() is not None


def test_code_version_outside_a_git_checkout_hashes_the_files(monkeypatch, tmp_path):
    monkeypatch.setattr(records, "REPOSITORY", tmp_path)
    (tmp_path / "unlearning").mkdir()
    (tmp_path / "unlearning" / "data.py").write_text("A = 1\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("")

    def version():
        records.code_version.cache_clear()
        return records.code_version()
    try:
        first = version()
        assert (first["commit"], first["dirty"]) == (None, None) and len(first["sha256"]) == 64
        (tmp_path / "tests" / "test_a.py").write_text("changed")
        assert version() == first  # tests are not the code that made a record
        (tmp_path / "unlearning" / "data.py").write_text("A = 2\n")
        assert version()["sha256"] != first["sha256"]
    finally:
        records.code_version.cache_clear()


def test_data_and_model_hashes_follow_the_content(tmp_path):
    data = common.Data(*(torch.zeros(4, 3, 2, 2, dtype=torch.uint8),
                            torch.arange(4), torch.zeros(2, 3, 2, 2, dtype=torch.uint8),
                            torch.arange(2)))
    before = records.data_sha256(data)
    data.train_images[0, 0, 0, 0] = 1
    assert records.data_sha256(data) != before

    model = torch.nn.Linear(2, 2)
    common.save_checkpoint(tmp_path / "a.pth", model, {"created": "then"})
    common.save_checkpoint(tmp_path / "b.pth", model, {"created": "now"})
    assert records.model_sha256(tmp_path / "a.pth") == records.model_sha256(tmp_path / "b.pth")
    with torch.no_grad():
        model.bias[0] += 1
    common.save_checkpoint(tmp_path / "b.pth", model, {"created": "now"})
    assert records.model_sha256(tmp_path / "a.pth") != records.model_sha256(tmp_path / "b.pth")


def bench_record(path, device="cpu", preset="smoke", rows=None):
    """A bench.py results.json at path: resnet50 pretraining at 100 images/s, evaluation at 400, finetune at 200
    and lora at 50 images/s (the slower of its two prune modes; a reference-loop row is not the sweep's loop)."""
    def row(task, speed, method=None, style="project"):
        return {"arch": "resnet50", "task": task, "method": method, "style": style, "seconds": 1.0,
                "images_per_s": speed}
    rows = rows if rows is not None else [row("pretrain", 100.0), row("evaluate", 400.0),
                                          row("unlearn", 200.0, "finetune"), row("unlearn", 50.0, "lora"),
                                          row("unlearn", 80.0, "lora"),
                                          row("unlearn", 1.0, "lora", style="reference")]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": device, "preset": preset, "epochs": 1, "limit": None, "rows": rows}))


def estimate_plan(preset="smoke", train_images=300, test_images=100):
    """A Sweep on cpu whose data has train_images and test_images (only their counts matter to estimates)."""
    args = SimpleNamespace(preset=preset, data="data", dataset="cifar10", device="cpu", data_label="CIFAR-10",
                           force=False)
    data = common.Data(torch.zeros(train_images, 3, 32, 32, dtype=torch.uint8),
                       torch.zeros(train_images, dtype=torch.long),
                       torch.zeros(test_images, 3, 32, 32, dtype=torch.uint8),
                       torch.zeros(test_images, dtype=torch.long))
    plan = sweep.Sweep(args, common.ForgetSpec(), "data-hash", {("data", preset, "cifar10"): data})
    return plan, {method: units.make_run("resnet50", method, 0, args, common.ForgetSpec())
                  for method in ("original", "retrain", "finetune", "lora", "ga")}


@pytest.fixture
def estimates(workdir, monkeypatch):
    """Round constants: estimates are 2 x (training + evaluation seconds) + 5 s."""
    monkeypatch.setattr(sweep, "BENCH_SAFETY_FACTOR", 2.0)
    monkeypatch.setattr(sweep, "RUN_START_SECONDS", 5)
    monkeypatch.setitem(sweep.DEFAULT_RUN_SECONDS, ("smoke", "resnet50"), {"scratch": 1000, "method": 500})


def test_bench_record_of_this_device_and_preset_gives_the_estimates(estimates, workdir, capsys):
    bench_record(workdir / "bench/cpu-smoke/results.json")
    slow = [{"arch": "resnet50", "task": task, "method": None, "style": "project", "images_per_s": 1e-3}
            for task in ("pretrain", "evaluate")]
    bench_record(workdir / "bench/gpu/results.json", device="NVIDIA H100 80GB HBM3", rows=slow)
    bench_record(workdir / "bench/cpu-full/results.json", preset="full", rows=slow)
    plan, runs = estimate_plan()
    evaluation = (300 + 100) / 400
    pretrain_epochs = common.SMOKE["pretrain_epochs"]
    # from scratch: the pretraining recipe's epochs over the training images; a method: its own row, and a method
    # bench did not time (ga) gets the slowest one's (lora's)
    assert plan.estimate([runs["original"]], {}) == (2 * (pretrain_epochs * 300 / 100 + evaluation) + 5, "bench")
    assert plan.estimate([runs["retrain"]], {}) == plan.estimate([runs["original"]], {})
    assert plan.estimate([runs["finetune"]], {}) == (2 * (300 / 200 + evaluation) + 5, "bench")
    assert plan.estimate([runs["ga"]], {}) == (2 * (300 / 50 + evaluation) + 5, "bench")
    both = plan.estimate([runs["finetune"], runs["lora"]], {})[0]
    assert both == pytest.approx(2 * (300 / 200 + 300 / 50 + 2 * evaluation) + 10)
    assert capsys.readouterr().err == ""


def test_records_come_before_bench_and_bench_before_the_default(estimates, workdir):
    plan, runs = estimate_plan()
    assert plan.estimate([runs["original"], runs["finetune"]], {}) == (1500, "default")
    bench_record(workdir / "bench/results.json")
    del plan.bench_speeds  # read again
    bench_finetune = plan.estimate([runs["finetune"]], {})[0]
    timed = {"a": {"method": "retrain", "arch": "resnet50", "preset": "smoke", "device": "cpu", "seconds": 40.0},
             "b": {"method": "retrain", "arch": "resnet50", "preset": "smoke", "device": "cpu", "seconds": 60.0},
             "other device": {"method": "finetune", "arch": "resnet50", "preset": "smoke", "device": "NVIDIA H100",
                              "seconds": 1.0}}
    assert plan.estimate([runs["original"], runs["finetune"]], timed) == (50 + bench_finetune, "records + bench")
    vit_original = units.make_run("vit", "original", 0, plan.args, common.ForgetSpec())
    vit_default = sweep.DEFAULT_RUN_SECONDS[("smoke", "vit")]["scratch"]
    assert plan.estimate([vit_original, runs["original"]], timed) == (vit_default + 50, "records + default")


@pytest.mark.parametrize("content", ["{not json", '["a list"]', '{"device": "cpu", "preset": "smoke"}',
                                     '{"device": "cpu", "preset": "smoke", "rows": [{"arch": "resnet50", '
                                     '"task": "pretrain", "style": "project", "images_per_s": 0}]}'])
def test_unreadable_bench_record_is_skipped_with_a_one_line_warning(estimates, workdir, capsys, content):
    corrupt = workdir / "bench/a/results.json"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_text(content)
    plan, runs = estimate_plan()
    assert plan.estimate([runs["original"]], {}) == (1000, "default")
    err = capsys.readouterr().err
    assert err.startswith(f"warning: bench record {Path('bench/a/results.json')} skipped") and err.count("\n") == 1
    bench_record(workdir / "bench/b/results.json")  # a readable record beside it is used
    plan, runs = estimate_plan()
    assert plan.estimate([runs["original"]], {})[1] == "bench"
    assert corrupt.read_text() == content


def test_method_estimates_follow_each_scripts_own_epochs(estimates, workdir):
    bench_record(workdir / "bench/results.json", preset="full")
    plan, runs = estimate_plan("full", train_images=1000, test_images=200)
    evaluation = 1200 / 400
    for method, epochs in (("finetune", common.PAPER_RECIPE["epochs"]), ("rl", 10), ("scrub", 3)):
        run = units.make_run("resnet50", method, 0, plan.args, common.ForgetSpec())
        speed = 200 if method == "finetune" else 50
        assert plan.estimate([run], {}) == (2 * (epochs * 1000 / speed + evaluation) + 5, "bench")
        assert records.recipe(run, "full")["epochs"] == epochs  # the recipe fingerprinted in its record too
    rl = units.make_run("resnet50", "rl", 0, plan.args, common.ForgetSpec())
    assert records.recipe(rl, "full") == {"epochs": 10, "lr": 0.013, "batch_size": 256}
    assert records.recipe(rl, "smoke")["epochs"] == common.SMOKE["epochs"]
    original = common.PRETRAIN_RECIPES["resnet50"]["epochs"]
    assert plan.estimate([runs["original"]], {}) == (2 * (original * 1000 / 100 + evaluation) + 5, "bench")


def test_time_budget_uses_the_bench_record(cifar_dir, workdir, monkeypatch, capsys):
    monkeypatch.setitem(sweep.DEFAULT_RUN_SECONDS, ("smoke", "resnet50"), {"scratch": 1000, "method": 500})
    bench_record(workdir / "bench/results.json")
    assert run_script("reproduce.py", *SMOKE, "--units", "resnet50-s0-retrain", "--no-tables", "--data", cifar_dir,
                      "--time-budget", "1") == 0
    plan, runs = estimate_plan(train_images=TRAIN_PER_CLASS * 10, test_images=TEST_PER_CLASS * 10)
    expected = plan.estimate([runs["retrain"]], {})[0]
    assert f"resnet50-s0-retrain: expected {expected:.0f} s (from bench)" in capsys.readouterr().out
    assert not (workdir / "results/runs").exists()
