"""unlearning.launch on CPU: the worker pool and its GPUs, failures, SLURM job parameters, submitit's local cluster,
requeue."""
import argparse
import collections
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import submitit
import torch

import common
from unlearning import launch

ROOT = Path(__file__).resolve().parent.parent

# a unit that sleeps, then writes when it ran, which GPU it saw and its thread count to OUT/NAME.json
RECORDING_UNIT = """
import json, os, sys, time
out, name, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
start = time.time()
print("working on", name, flush=True)
time.sleep(seconds)
record = {"start": start, "end": time.time(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
          "threads": os.environ.get("OMP_NUM_THREADS"), "cwd": os.getcwd()}
with open(os.path.join(out, name + ".json"), "w") as f:
    json.dump(record, f)
"""
FAILING_UNIT = "import sys\nfor i in range(30): print(f'line {i}')\nsys.exit(3)"


def parse(*flags):
    parser = argparse.ArgumentParser()
    launch.add_launcher_arguments(parser)
    parser.add_argument("--device", default="cpu")
    return parser.parse_args([str(flag) for flag in flags])


def units(out, seconds=0.4, failing=()):
    """argv_for_unit: the recording unit, or the failing one for the names in failing."""
    def argv_for_unit(name):
        if name in failing:
            return [sys.executable, "-c", FAILING_UNIT]
        return [sys.executable, "-c", RECORDING_UNIT, out, name, seconds]
    return argv_for_unit


def records(out):
    return {path.stem: json.loads(path.read_text()) for path in Path(out).glob("*.json")}


def max_overlap(runs):
    """The most units running at one moment (each unit's start checked against every interval)."""
    return max(sum(other["start"] <= run["start"] < other["end"] for other in runs) for run in runs)


def test_local_runs_two_units_at_a_time_each_on_its_own_gpu(tmp_path):
    args = parse("--launcher", "local", "--workers", 2, "--gpus", 0, 1, "--device", "cuda",
                 "--log-dir", tmp_path / "logs")
    names = ["a", "b", "c", "d", "e"]
    assert launch.launch_units(args, names, units(tmp_path)) == []
    runs = records(tmp_path)
    assert sorted(runs) == names
    assert max_overlap(list(runs.values())) == 2
    assert {run["gpu"] for run in runs.values()} == {"0", "1"}
    for run in runs.values():
        together = [other for other in runs.values() if other is not run
                    and other["start"] <= run["start"] < other["end"]]
        assert all(other["gpu"] != run["gpu"] for other in together)
    log = (tmp_path / "logs" / "c.log").read_text()
    assert log.startswith("=== ") and "working on c" in log


def test_workers_per_gpu_share_each_gpu(tmp_path):
    args = parse("--launcher", "local", "--workers-per-gpu", 2, "--gpus", 0, 1, "--device", "cuda",
                 "--log-dir", tmp_path / "logs")
    assert launch.launch_units(args, ["a", "b", "c", "d"], units(tmp_path)) == []
    runs = list(records(tmp_path).values())
    assert collections.Counter(run["gpu"] for run in runs) == {"0": 2, "1": 2}
    assert max_overlap(runs) == 4


def test_a_failing_unit_is_reported_and_the_others_finish(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    args = parse("--launcher", "local", "--workers", 2, "--log-dir", tmp_path / "logs")
    failed = launch.launch_units(args, ["ok1", "bad", "ok2"], units(tmp_path, 0.2, failing={"bad"}))
    assert failed == ["bad"]
    runs = records(tmp_path)
    assert sorted(runs) == ["ok1", "ok2"]
    assert all(run["gpu"] is None for run in runs.values())  # CPU workers: no GPU assigned
    assert {run["threads"] for run in runs.values()} == {str(max(1, os.cpu_count() // 2))}
    err = capsys.readouterr().err
    assert "    line 29" in err and "    line 10" in err and "    line 9\n" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "unit bad failed: exit status 3" in errors[0] and str(tmp_path / "logs" / "bad.log") in errors[0]


@pytest.mark.parametrize("listed, expected", [(None, ["0", "1"]), ("3,5", ["3", "5"]),
                                              ("GPU-a,GPU-b,GPU-c", ["GPU-a", "GPU-b"])])
def test_default_workers_are_one_per_visible_gpu_named_as_the_driver_names_it(monkeypatch, listed, expected):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    if listed is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
    assert launch.worker_devices(parse("--launcher", "local", "--device", "cuda")) == expected
    assert launch.worker_devices(parse("--launcher", "local", "--device", "cuda", "--workers-per-gpu", 2)) == [
        *expected, *expected]
    assert launch.worker_devices(parse("--launcher", "local", "--device", "cpu", "--workers", 3)) == [None] * 3


@pytest.mark.parametrize("flags, message", [
    (["--workers-per-gpu", 2], "--workers-per-gpu needs GPUs"),
    (["--gpus", 0, 1, "--device", "cuda:1"], "choose GPUs with --gpus"),
    (["--gpus", 0, 1, "--workers", 3, "--workers-per-gpu", 2, "--device", "cuda"], "disagree"),
    (["--gpus", 0], "--gpus with --device cpu"),
])
def test_local_flags_that_contradict_each_other_are_refused(tmp_path, flags, message):
    args = parse("--launcher", "local", "--log-dir", tmp_path / "logs", *flags)
    with pytest.raises(common.UserError, match=message):
        launch.launch_units(args, ["a"], units(tmp_path))
    assert not (tmp_path / "logs").exists()


def test_bad_counts_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parse("--workers", 0)
    assert "must be at least 1" in capsys.readouterr().err


def test_without_launcher_arguments_keeps_the_sweep_flags():
    argv = ["--arch", "vit", "--launcher", "local", "--gpus", "0", "1", "--seeds", "0", "1",
            "--slurm-option", "qos=high", "--workers=2", "--preset", "smoke"]
    assert launch.without_launcher_arguments(argv) == ["--arch", "vit", "--seeds", "0", "1", "--preset", "smoke"]


def fake_slurm(folder, sbatch_body):
    """A bin folder with an srun and an sbatch (given body) standing in for SLURM's."""
    bin_dir = Path(folder) / "bin"
    bin_dir.mkdir()
    for name, body in {"srun": "exit 0", "sbatch": sbatch_body}.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def test_slurm_jobs_carry_the_flags_parameters(tmp_path, monkeypatch):
    bin_dir = fake_slurm(tmp_path, f'cp "$1" {tmp_path}/job.sh\necho "$PYTHONPATH" > {tmp_path}/pythonpath\n'
                                   'echo "Submitted batch job 4242"')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    args = parse("--launcher", "slurm", "--slurm-partition", "gpu", "--slurm-time", 90, "--slurm-gpus", 2,
                 "--slurm-account", "proj", "--slurm-cpus", 6, "--slurm-mem", 32, "--slurm-option", "qos=high")
    executor = launch.slurm_executor(args, tmp_path / "slurm")
    unit = launch.UnitJob("resnet50-s0-methods", [sys.executable, "reproduce.py", "--units", "resnet50-s0-methods"],
                          tmp_path / "logs" / "resnet50-s0-methods.log")
    [job] = launch.submit_units(executor, [unit])
    assert job.job_id == "4242"
    script = (tmp_path / "job.sh").read_text().splitlines()
    for line in ["--partition=gpu", "--time=90", "--gpus-per-node=2", "--account=proj", "--cpus-per-task=6",
                 "--mem=32GB", "--qos=high", "--job-name=resnet50-s0-methods", "--nodes=1", "--ntasks-per-node=1"]:
        assert f"#SBATCH {line}" in script
    assert str(ROOT) in (tmp_path / "pythonpath").read_text().split(os.pathsep)[0]
    submitted = job.submission().function
    assert isinstance(submitted, launch.UnitCommand) and submitted.job == unit


def test_slurm_refusals_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(common.UserError, match="srun is not on PATH"):
        launch.slurm_executor(parse("--launcher", "slurm"), tmp_path / "slurm")
    bin_dir = fake_slurm(tmp_path, 'echo "sbatch: error: invalid partition specified: nope" >&2\nexit 1')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    executor = launch.slurm_executor(parse("--launcher", "slurm", "--slurm-partition", "nope"), tmp_path / "slurm")
    unit = launch.UnitJob("u", ["true"], tmp_path / "u.log")
    with pytest.raises(common.UserError, match="submitting unit u failed: .*invalid partition specified: nope"):
        launch.submit_units(executor, [unit])
    monkeypatch.setitem(sys.modules, "submitit", None)  # makes `import submitit` raise ImportError
    with pytest.raises(common.UserError, match="--launcher slurm needs submitit: pip install"):
        launch.slurm_executor(parse("--launcher", "slurm"), tmp_path / "slurm")


def test_slurm_path_runs_units_through_submitits_local_cluster(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the jobs must find unlearning.launch from any working directory
    (tmp_path / "out").mkdir()
    args = parse("--launcher", "slurm", "--slurm-time", 5)
    failed = launch.launch_units(args, ["ok", "bad"], units(tmp_path / "out", 0.1, failing={"bad"}), cluster="local")
    assert failed == ["bad"]
    assert sorted(records(tmp_path / "out")) == ["ok"]
    err = capsys.readouterr().err
    assert "    line 29" in err
    assert any(line.startswith("error: unit bad failed: exit status 3") for line in err.splitlines())
    assert (tmp_path / "logs" / "ok.log").is_file() and any((tmp_path / "logs" / "slurm").iterdir())


def test_checkpoint_stops_the_unit_gracefully_and_resubmits_the_same_unit(tmp_path):
    started, kept = tmp_path / "started", tmp_path / "kept"
    code = ("import pathlib, signal, sys, time\n"
            f"def stop(*_): pathlib.Path({str(kept)!r}).write_text('finished work kept'); sys.exit(143)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            f"pathlib.Path({str(started)!r}).touch()\n"
            "time.sleep(60)")
    unit = launch.UnitJob("u", [sys.executable, "-c", code], tmp_path / "u.log")
    command = launch.UnitCommand(unit)
    result = {}
    thread = threading.Thread(target=lambda: result.update(status=command()))
    thread.start()
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    resubmission = command.checkpoint()
    thread.join(timeout=30)
    assert result["status"] == 143 and kept.read_text() == "finished work kept"
    again = pickle.loads(pickle.dumps(resubmission)).function
    assert isinstance(again, launch.UnitCommand) and again is not command and again.job == unit


def test_a_preempted_job_is_requeued_and_its_unit_runs_again(tmp_path):
    """SLURM signals every process of the job; submitit's handler checkpoints, and the job runs the unit again."""
    marker, done = tmp_path / "first-attempt", tmp_path / "done"
    code = ("import os, pathlib, sys, time\n"
            f"marker, done = pathlib.Path({str(marker)!r}), pathlib.Path({str(done)!r})\n"
            "if marker.exists():\n    done.write_text('second attempt'); sys.exit(0)\n"
            "marker.write_text(f'{os.getpid()} {os.getppid()}')\n"
            "time.sleep(60)")
    executor = launch.slurm_executor(parse("--launcher", "slurm", "--slurm-time", 5), tmp_path / "slurm", "local")
    unit = launch.UnitJob("u", [sys.executable, "-c", code], tmp_path / "u.log")
    [job] = launch.submit_units(executor, [unit])
    deadline = time.monotonic() + 60
    while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    unit_pid, job_pid = map(int, marker.read_text().split())
    os.kill(unit_pid, signal.SIGUSR2)
    time.sleep(0.5)
    os.kill(job_pid, signal.SIGUSR2)
    list(submitit.helpers.as_completed([job], timeout=60, poll_frequency=0.2))
    assert job.result() == 0
    assert done.read_text() == "second attempt"
    assert unit.log.read_text().count("=== ") == 2


def test_sigterm_to_the_launcher_stops_its_units_gracefully(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(f"""import argparse, sys
sys.path.insert(0, {str(ROOT)!r})
import common
from unlearning import launch
parser = argparse.ArgumentParser()
launch.add_launcher_arguments(parser)
parser.add_argument("--device", default="cpu")
args = parser.parse_args(sys.argv[1:])
unit = ("import signal, sys, time\\n"
        "def stop(*_): print('stopped by SIGTERM', flush=True); sys.exit(143)\\n"
        "signal.signal(signal.SIGTERM, stop)\\n"
        "print('started', flush=True); time.sleep(60)")
common.cli(lambda argv: launch.launch_units(args, ["u1", "u2", "u3"], lambda name: [sys.executable, "-c", unit]))
""")
    logs = tmp_path / "logs"
    launcher = subprocess.Popen([sys.executable, str(driver), "--launcher", "local", "--workers", "2",
                                 "--log-dir", str(logs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    started = [logs / "u1.log", logs / "u2.log"]
    while time.monotonic() < deadline and not all(log.is_file() and "started" in log.read_text().splitlines()
                                                  for log in started):
        time.sleep(0.1)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 1 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: interrupted: stopped 2 running units (0 had failed); their finished work is kept, "
        "and the same command resumes them"]
    for name in ("u1", "u2"):
        assert "stopped by SIGTERM" in (logs / f"{name}.log").read_text()
    assert not (logs / "u3.log").exists()
