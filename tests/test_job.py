"""job.py on CPU. bench.py and reproduce.py are replaced by small stand-in scripts (job.BENCH, job.REPRODUCE) that
record their command line, write records like the real ones and, where a test asks, sleep or fail: these tests
check the job's own work (data, wheels, time budget, stopping, gathering, restoring), not the sweep."""
import json
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
from conftest import run_script

import bench
import job

STAND_IN = '''
import json, os, sys, time
from pathlib import Path
argv = sys.argv[1:]
with open("calls.jsonl", "a") as f:
    f.write(json.dumps(argv) + "\\n")
if "--out" in argv:  # bench.py
    out = Path(argv[argv.index("--out") + 1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"device": "cpu", "preset": "smoke", "complete": True}))
    (out / "results.md").write_text("# Benchmark\\n\\n| bench table |\\n")
    sys.exit(0)
Path("results/runs").mkdir(parents=True, exist_ok=True)
Path("results/runs/vit-smoke_lora_s0.json").write_text('{"method": "lora"}')
Path("results/vit-smoke.md").write_text("# vit table\\n\\n| lora | 1 |\\n")
Path("results/vit-smoke_tradeoff.png").write_bytes(b"\\x89PNG" + os.urandom(1000))
Path("results/stray.pth").write_bytes(b"weights")
print("units done: 1; left: vit seed 1 methods", flush=True)
time.sleep(float(os.environ.get("STAND_IN_SLEEP", "0")))
Path("results/runs/vit-smoke_lora_s1.json").write_text('{"method": "lora", "seed": 1}')
sys.exit(int(os.environ.get("STAND_IN_EXIT", "0")))
'''


@pytest.fixture
def stand_ins(workdir, monkeypatch):
    """bench.py and reproduce.py replaced by the stand-in; returns a function giving the recorded command lines."""
    script = workdir / "stand_in.py"
    script.write_text(STAND_IN)
    monkeypatch.setattr(job, "BENCH", [sys.executable, str(script)])
    monkeypatch.setattr(job, "REPRODUCE", [sys.executable, str(script)])
    monkeypatch.setattr(job, "detect_device", lambda _: ("cpu", False))

    def calls():
        path = workdir / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return calls


@pytest.fixture
def cifar_archive(cifar_dir, tmp_path_factory):
    """A tar.gz laid out like the official cifar-10-python.tar.gz, holding the synthetic data."""
    archive = tmp_path_factory.mktemp("archive") / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cifar_dir / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive


def test_job_unpacks_the_data_runs_the_steps_and_gathers_within_the_limits(workdir, stand_ins, cifar_archive,
                                                                             cifar_dir, capsys):
    (workdir / "results").mkdir()
    (workdir / "results/committed.json").write_text("{}")  # on file before the job: not gathered again
    assert job.main(["--data-archive", cifar_archive, "--time-limit", "100", "--reserve", "20", "--gather", "out",
                     "--preset", "smoke", "--", "--arch", "vit"]) == 0
    for name in ("data_batch_1", "test_batch"):
        assert (workdir / "data/cifar-10-batches-py" / name).read_bytes() == \
            (cifar_dir / "cifar-10-batches-py" / name).read_bytes()
    bench_call, sweep_call = stand_ins()
    assert bench_call == ["--preset", "smoke", "--data", "data", "--epochs", "1", "--out", "bench/cpu-smoke",
                          "--data-label", "CIFAR-10"]
    assert bench.parse_args(bench_call).out == "bench/cpu-smoke"  # the real bench.py accepts it
    budget = int(sweep_call[sweep_call.index("--time-budget") + 1])
    assert 60 <= budget <= 80 and sweep_call[-4:] == ["--data-label", "CIFAR-10", "--arch", "vit"]

    out = workdir / "out"
    files = sorted(path.name for path in out.iterdir())
    assert files == ["bench.log", "job-results.tar.gz", "job.log", "reproduce.log", "tables.md"]
    assert all(path.is_file() and path.stat().st_size <= job.MAX_FILE_BYTES for path in out.iterdir())
    with tarfile.open(out / "job-results.tar.gz") as tar:
        packed = {name: tar.extractfile(name).read() for name in tar.getnames()}
    assert packed.get("results/vit-smoke_tradeoff.png") == (workdir / "results/vit-smoke_tradeoff.png").read_bytes()
    assert sorted(packed) == ["bench/cpu-smoke/results.json", "bench/cpu-smoke/results.md",
                      "results/runs/vit-smoke_lora_s0.json", "results/runs/vit-smoke_lora_s1.json",
                      "results/vit-smoke.md", "results/vit-smoke_tradeoff.png"]
    tables = (out / "tables.md").read_text()
    assert "| lora | 1 |" in tables and "| bench table |" in tables
    summary = (out / "job.log").read_text()
    assert "torch-pruning: present" in summary and "left: vit seed 1 methods" in summary
    assert summary.rstrip().endswith("status: ok")
    assert not (workdir / ".job/site").exists()  # torch_pruning imports: no wheel installed
    assert "job.py --restore out/job-results.tar.gz" in capsys.readouterr().out

    # a second job finds the data and this device's bench record, and runs only the sweep
    assert job.main(["--time-limit", "100", "--reserve", "20", "--preset", "smoke"]) == 0
    assert len(stand_ins()) == 3 and "--time-budget" in stand_ins()[-1]

    # at home: the records come back into a checkout
    home = workdir / "home"
    home.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(home)
        assert job.main(["--restore", str(out)]) == 0
    for name, content in packed.items():
        assert (home / name).read_bytes() == content


def test_job_out_of_time_stops_the_sweep_exits_0_and_gathers_what_finished(workdir, stand_ins, cifar_dir,
                                                                            monkeypatch):
    monkeypatch.setenv("STAND_IN_SLEEP", "60")
    monkeypatch.setattr(job, "KILL_GRACE_S", 1)
    started = time.monotonic()
    assert job.main(["--data", cifar_dir, "--time-limit", "8", "--reserve", "4", "--bench", "never",
                     "--gather", "out", "--preset", "smoke"]) == 0
    assert time.monotonic() - started < 8
    with tarfile.open(workdir / "out/job-results.tar.gz") as tar:
        packed = tar.getnames()
    assert "results/runs/vit-smoke_lora_s0.json" in packed and "results/runs/vit-smoke_lora_s1.json" not in packed
    summary = (workdir / "out/job.log").read_text()
    assert "sweep: stopped after" in summary and summary.rstrip().endswith("status: ok")


def test_sigterm_stops_the_job_which_still_gathers(workdir, stand_ins, cifar_dir, monkeypatch):
    monkeypatch.setenv("STAND_IN_SLEEP", "60")
    monkeypatch.setattr(job, "KILL_GRACE_S", 1)
    late = []  # a SIGTERM arriving after the job returned lands here, not on pytest
    outside = signal.signal(signal.SIGTERM, lambda *_: late.append(1))
    try:
        timer = threading.Timer(3, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM))
        timer.start()
        assert job.main(["--data", cifar_dir, "--bench", "never", "--gather", "out", "--preset", "smoke"]) == 0
        timer.join()
        assert not late and signal.getsignal(signal.SIGTERM) is not job._raise_stopped
    finally:
        signal.signal(signal.SIGTERM, outside)
    with tarfile.open(workdir / "out/job-results.tar.gz") as tar:
        assert "results/runs/vit-smoke_lora_s0.json" in tar.getnames()
    assert "stopped: SIGTERM after" in (workdir / "out/job.log").read_text()


def test_failed_sweep_and_data_command(workdir, stand_ins, monkeypatch, capsys):
    monkeypatch.setenv("STAND_IN_EXIT", "3")
    (workdir / "make_data.py").write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                                          f"import conftest\nconftest.write_synthetic_cifar(sys.argv[1])\n")
    assert job.main(["--data", "made", "--data-command", "python make_data.py made", "--bench", "never",
                     "--gather", "out", "--preset", "smoke"]) == 1
    assert (workdir / "made/cifar-10-batches-py/test_batch").is_file()
    summary = (workdir / "out/job.log").read_text()
    assert "data: ran --data-command into made" in summary and "sweep: failed (exit 3)" in summary
    assert summary.rstrip().endswith("status: failed (sweep)")
    assert (workdir / "out/job-results.tar.gz").is_file()  # what it wrote before failing still comes back


def test_dry_run_runs_nothing(workdir, stand_ins, cifar_archive, capsys):
    assert job.main(["--data-archive", cifar_archive, "--time-limit", "540", "--gather", "out", "--dry-run",
                     "--preset", "smoke"]) == 0
    out = capsys.readouterr().out
    assert f"would unpack {cifar_archive} into data" in out and "--time-budget 4" in out
    assert stand_ins() == [] and not (workdir / "data").exists() and not (workdir / "out").exists()


def test_missing_data_is_reported_and_nothing_else_runs(workdir, stand_ins):
    assert job.main(["--data", "nowhere", "--gather", "out"]) == 1
    assert "no CIFAR-10 under nowhere/cifar-10-batches-py" in (workdir / "out/job.log").read_text()
    assert stand_ins() == []


def make_wheel(folder, name):
    """A minimal pure-Python wheel of package `name` (what pip needs: the module, METADATA, WHEEL, RECORD)."""
    dist = f"{name}-0.1.dist-info"
    files = {f"{name}/__init__.py": "VERSION = '0.1'\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{dist}/RECORD"])
    wheel = folder / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def test_missing_torch_pruning_is_installed_from_the_carried_wheels(workdir, monkeypatch):
    monkeypatch.setattr(job, "PRUNING_MODULE", "carried_pruning_stand_in")
    monkeypatch.setattr(sys, "path", list(sys.path))
    (workdir / "wheels").mkdir()
    make_wheel(workdir / "wheels", "carried_pruning_stand_in")
    running = job.Job(job.parse_args(["--wheels", "wheels"]))
    job.ensure_torch_pruning(running)
    assert running.status["torch-pruning"].startswith("installed 1 wheel(s) from wheels")
    site = str((workdir / ".job/site").resolve())
    assert running.env["PYTHONPATH"].split(":")[0] == site
    child = subprocess.run([sys.executable, "-c", "import carried_pruning_stand_in as m; print(m.VERSION)"],
                           env=running.env, capture_output=True, text=True)
    assert child.stdout.strip() == "0.1"


def test_restore_refuses_paths_outside_the_records(workdir, capsys):
    with tarfile.open(workdir / "evil.tar.gz", "w:gz") as tar:
        (workdir / "common.py").write_text("overwritten")
        tar.add(workdir / "common.py", arcname="common.py")
    assert run_script("job.py", "--restore", "evil.tar.gz") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: evil.tar.gz holds 'common.py', outside results and bench/") and err.count("\n") == 1
