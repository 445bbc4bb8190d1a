"""Faults: a parent killed with SIGKILL, two writers of one file, a full or read-only disk, damaged files on disk.

Processes are real where the fault is about processes. The full and read-only disks are a 1 MiB tmpfs, mounted
when running as root and skipped otherwise (a read-only folder falls back to chmod for other users)."""
import errno
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import test_reproduce
import torch
from conftest import ROOT, run_script
from matplotlib.figure import Figure
from test_reproduce import SWEEP

import common
from unlearning import locks, records, runners, sweep, units
from unlearning.processes import PARENT_PID_ENV

in_process = test_reproduce.in_process  # the fixture that runs the sweep's steps in this process
WAIT_S = 20  # how long a test waits for a process to do what it must (far more than it needs)
# A Python preamble that finds the package from any working directory: `from unlearning import files` imports
# that module alone, without the heavy imports of common.py
LIGHT_COMMON = f"import sys; sys.path.insert(0, {str(ROOT)!r}); "


def one_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def wait_for(condition, what):
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def running(pid):
    """Whether pid is a live process (a zombie that no one has reaped yet is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


# --------------------------------------------------------------------------------- children die with their parent

# The step: says its pid and works for a minute, unless it stops with its parent.
STEP = LIGHT_COMMON + """from unlearning import files
import os, sys, time
open(sys.argv[1] + '.pid', 'w').write(str(os.getpid()))
time.sleep(60)
files.write_json(sys.argv[1], {'written': 'a minute later'})
"""
PARENTS = {
    "start_child": LIGHT_COMMON + "from unlearning import processes; import sys; "
                            "processes.start_child([sys.executable, '-c', sys.argv[1], sys.argv[2]]).wait()",
    "launcher": LIGHT_COMMON + "from unlearning import launch; import sys; from pathlib import Path; "
                               "launch.UnitCommand(launch.UnitJob('unit', [sys.executable, '-c', sys.argv[1], "
                               "sys.argv[2]], Path(sys.argv[2] + '.log')))()",
}


def kill_the_parent_of(step, out, parent=PARENTS["start_child"]):
    """Start parent, which starts step (writing to out); SIGKILL the parent once the step runs, and wait for the
    step to end."""
    process = subprocess.Popen([sys.executable, "-c", parent, step, str(out)])
    try:
        pid_file = Path(f"{out}.pid")
        wait_for(lambda: pid_file.is_file() and pid_file.read_text(), "the step to start")
        step_pid = int(pid_file.read_text())
        process.send_signal(signal.SIGKILL)
        process.wait()
        wait_for(lambda: not running(step_pid), "the step to end after its parent was killed")
    finally:
        process.kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("parent", PARENTS)
def test_a_step_stops_and_writes_nothing_when_its_parent_is_sigkilled(parent, tmp_path):
    out = tmp_path / "record.json"
    kill_the_parent_of(STEP, out, PARENTS[parent])  # the step would work for a minute: only its parent's death ends it
    assert not out.exists() and not list(tmp_path.glob(".record.json.*"))


def test_a_step_that_outlives_its_parent_writes_nothing(tmp_path):
    """A step that ignores SIGTERM (or runs where PR_SET_PDEATHSIG does not exist) still refuses to write."""
    out = tmp_path / "record.json"
    outlives = LIGHT_COMMON + f"""from unlearning import files, processes
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1] + '.pid', 'w').write(str(os.getpid()))
while os.getppid() == int(os.environ[{PARENT_PID_ENV!r}]):
    time.sleep(0.05)
try:
    files.write_json(sys.argv[1], {{'written': 'after the parent died'}})
except processes.ParentGone:
    open(sys.argv[1] + '.refused', 'w').write('refused')
"""
    kill_the_parent_of(outlives, out)
    assert Path(f"{out}.refused").read_text() == "refused"
    assert not out.exists() and not list(tmp_path.glob(".record.json.*"))


def test_the_sweeps_steps_are_started_as_children_that_die_with_it():
    status, output = runners.run_child([sys.executable, "-c", f"import os; print(os.environ[{PARENT_PID_ENV!r}])"])
    assert (status, output.strip()) == (0, str(os.getpid()))


# ---------------------------------------------------------------------------------------- concurrent writers

def test_two_writers_of_one_file_never_fail_and_a_reader_sees_only_whole_files(tmp_path):
    path = tmp_path / "results.json"
    writer = LIGHT_COMMON + """from unlearning import files
import sys
for i in range(300):
    files.write_json(sys.argv[1], {'writer': sys.argv[2], 'i': i, 'payload': 'x' * (i * 97 % 20000)})
"""
    writers = [subprocess.Popen([sys.executable, "-c", writer, str(path), name], stderr=subprocess.PIPE, text=True)
               for name in ("a", "b")]
    reads = 0
    while any(w.poll() is None for w in writers) or not reads:
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue
        record = json.loads(text)  # a partial file fails here
        assert record["payload"] == "x" * (record["i"] * 97 % 20000)
        reads += 1
    errors = [w.communicate()[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0] and errors == ["", ""]
    assert json.loads(path.read_text())["i"] == 299
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind
    assert reads > 0


# ------------------------------------------------------------------------------------- full and read-only disks

def mount_tmpfs(folder, options="size=1m"):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")


def unmount(folder):
    subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder):
    """Fill folder's file system with folder/filler until no byte more fits; returns the filler."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (b"\0" * 4096, b"\0"):
            try:
                while True:
                    f.write(chunk)
            except OSError as error:
                assert error.errno == errno.ENOSPC
    return filler


@pytest.fixture
def full_disk(tmp_path):
    """A folder on a 1 MiB tmpfs holding earlier.json, filled up to the last byte by its file `filler`."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mount_tmpfs(folder)
    try:
        (folder / "earlier.json").write_text('{"kept": true}\n')
        fill(folder)
        yield folder
    finally:
        unmount(folder)


@pytest.fixture
def read_only(tmp_path):
    """A folder holding earlier.json where nothing can be written: a tmpfs remounted read-only when root, else a
    folder without write permission."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        (folder / "earlier.json").write_text('{"kept": true}\n')
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    mount_tmpfs(folder)
    try:
        (folder / "earlier.json").write_text('{"kept": true}\n')
        if subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount a tmpfs read-only here")
        yield folder
    finally:
        unmount(folder)


def write_plot(path):
    figure = Figure()
    figure.subplots().plot([1, 2, 3])
    common.save_figure(path, figure)


WRITERS = {
    "run record": lambda folder: common.write_json(folder / "runs/x.json", {"UA": 1.0, "pad": "x" * 100_000}),
    "table": lambda folder: common.write_text(folder / "x.md", "| a |\n" * 10_000),
    "plot": lambda folder: write_plot(folder / "x_metrics.png"),
    "checkpoint": lambda folder: common.save_checkpoint(folder / "x.pth", torch.nn.Linear(100, 100), {}),
    "lock": lambda folder: locks.UnitLock(folder / "locks/x.lock").acquire(),
}
CAUSES = {"full_disk": "No space left on device (free space and rerun the same command)",
          "read_only": "Read-only file system" if os.geteuid() == 0 else "Permission denied"}


@pytest.mark.parametrize("disk", ["full_disk", "read_only"])
@pytest.mark.parametrize("what", WRITERS)
def test_a_write_that_does_not_fit_is_one_line_naming_the_path_and_leaves_the_rest(what, disk, request):
    folder = request.getfixturevalue(disk)
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    with pytest.raises(common.UserError) as raised:
        WRITERS[what](folder)
    message = str(raised.value)
    assert message.startswith(f"cannot write {folder}/") and CAUSES[disk] in message and "\n" not in message
    assert sorted(p.relative_to(folder) for p in folder.rglob("*") if not p.is_dir()) == [
        p for p in before if not (folder / p).is_dir()]
    assert (folder / "earlier.json").read_text() == '{"kept": true}\n'


def test_after_space_is_freed_the_same_writes_succeed(full_disk):
    with pytest.raises(common.UserError):
        WRITERS["lock"](full_disk)
    (full_disk / "filler").unlink()
    for write in WRITERS.values():
        write(full_disk)
    assert json.loads((full_disk / "runs/x.json").read_text())["UA"] == 1.0
    assert json.loads((full_disk / "locks/x.lock").read_text())["pid"] == os.getpid()
    assert torch.load(full_disk / "x.pth", weights_only=True)["model"]["weight"].shape == (100, 100)


def test_a_script_on_a_full_disk_exits_1_with_one_line(full_disk, original_weights, cifar_dir, workdir, capsys):
    out = full_disk / "finetuned.pth"
    assert run_script("finetune.py", "--arch", "vit", "--preset", "smoke", "--data", cifar_dir, "--weights",
                      original_weights("vit"), "--out", out) == 1
    assert one_line(capsys) == f"error: cannot write {out}: {CAUSES['full_disk']}"
    assert sorted(p.name for p in full_disk.iterdir()) == ["earlier.json", "filler"]


def test_a_sweep_on_a_full_disk_stops_in_one_line_and_the_same_command_continues(cifar_dir, workdir, in_process,
                                                                                capsys):
    runs = workdir / "results/runs"
    runs.mkdir(parents=True)
    mount_tmpfs(runs)
    try:
        filler = fill(runs)
        command = [*SWEEP, "--data", cifar_dir, "--units", "resnet50-s0-retrain", "--no-tables"]
        assert run_script("reproduce.py", *command) == 1
        record = Path("results/runs/resnet50-smoke_retrain_s0.json")
        assert one_line(capsys) == f"error: cannot write {record}: {CAUSES['full_disk']}"
        assert [p.name for p in runs.iterdir()] == ["filler"] and not list((workdir / "results/locks").iterdir())
        filler.unlink()
        assert run_script("reproduce.py", *command) == 0
        assert records.read_record(record)["method"] == "retrain"
        assert in_process.started == ["retrain.py", "retrain.py"]
    finally:
        unmount(runs)


# ------------------------------------------------------------------------------------------------------ locks

def write_lock(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


@pytest.mark.parametrize(("content", "why"), [
    (b"", "it is empty"),
    (b'{"pid": 12', "it is damaged"),
    (b'["not", "a", "lock"]', "it is damaged"),
])
def test_an_empty_or_damaged_lock_is_taken_over_saying_so(content, why, tmp_path, capsys):
    path = tmp_path / "locks/unit.lock"
    write_lock(path, content)
    lock = locks.UnitLock(path)
    assert lock.acquire() is None
    assert capsys.readouterr().out == f"taking over the lock {path}: {why}\n"
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in path.parent.iterdir()) == ["unit.lock"]
    lock.release()


def test_a_lock_naming_a_dead_process_is_taken_over_saying_so(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "unit.lock"
    write_lock(path, json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "earlier"}).encode())
    assert locks.UnitLock(path).acquire() is None
    assert capsys.readouterr().out == (f"taking over the lock {path}: it names pid {dead.pid} on this host, "
                                       f"which is no longer running\n")


def test_a_lock_whose_creation_fails_leaves_nothing(tmp_path, monkeypatch):
    def no_space(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "link", no_space)
    path = tmp_path / "locks/unit.lock"
    with pytest.raises(common.UserError, match=f"cannot write {path}: No space left on device"):
        locks.UnitLock(path).acquire()
    assert list(path.parent.iterdir()) == []


# ------------------------------------------------------------------------------------------- damaged records

def whole_record(**changes):
    """A run record as the sweep writes one, with changes (None: leave that key out)."""
    record = {"arch": "resnet50", "method": "lora", "seed": 0, "preset": "smoke", "forget": "class3", "UA": 100.0,
              "RA": 95.5, "TA": 80.0, "MIA_efficacy": 99.0, "RTE_s": 1.5, "seconds": 3.0, "peak_gpu_mem_mb": None,
              "fingerprint": {"data": {"sha256": "d", "label": "CIFAR-10"}}}
    record.update(changes)
    return {key: value for key, value in record.items() if value is not None}


@pytest.mark.parametrize(("changes", "problem"), [
    ({"UA": None}, "UA is missing"),
    ({"seed": "0"}, 'seed is "0" (should be a whole number >= 0)'),
    ({"seed": True}, "seed is true (should be a whole number >= 0)"),
    ({"TA": 150.0}, "TA is 150.0 (should be a number in [0, 100])"),
    ({"RA": math.nan}, "RA is NaN (should be a number in [0, 100])"),
    ({"MIA_efficacy": "99"}, 'MIA_efficacy is "99" (should be a number in [0, 100])'),
    ({"arch": "vgg"}, 'arch is "vgg" (should be one of: resnet18, resnet50, vgg16_bn, vit)'),
    ({"fingerprint": None}, "fingerprint is missing"),
    ({"method": "original"}, "model_sha256 is missing"),
    ({"CKA_forget": 3.0}, "CKA_forget is 3.0 (should be a number in [-1, 1.001] or NaN or null)"),
])
def test_a_record_that_breaks_its_schema_names_the_problem(changes, problem):
    assert records.record_problem(whole_record()) is None
    assert records.record_problem(whole_record(CKA_forget=math.nan, probe_UA=None, relearn_steps=30)) is None
    assert records.record_problem(whole_record(**changes)) == problem


def test_a_record_without_a_metric_is_a_one_line_error_and_never_done(cifar_dir, workdir, capsys):
    record = Path("results/runs/resnet50-smoke_finetune_s0.json")
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps(whole_record(method="finetune", UA=None)))
    assert run_script("reproduce.py", *SWEEP, "--tables-only", "--data", cifar_dir) == 1
    assert one_line(capsys) == (f"error: run record {record} is damaged: UA is missing; restore it (git checkout -- "
                                f"{record}), or rerun with --rerun-stale to run it again")


def damaged_plan(rerun_stale):
    args = SimpleNamespace(preset="smoke", data="data", dataset="cifar10", device="cpu", data_label="CIFAR-10",
                           force=False, rerun_stale=rerun_stale, methods=["finetune"])
    plan = sweep.Sweep(args, common.ForgetSpec(), "data-hash", {})
    return plan, units.plan_units(SimpleNamespace(**vars(args), arch=["resnet50"], seeds=[0]), common.ForgetSpec())


def test_with_rerun_stale_a_damaged_record_is_run_again(workdir, capsys):
    plan, units = damaged_plan(rerun_stale=False)
    retrain = units[1].runs[0]
    retrain.record.parent.mkdir(parents=True)
    retrain.record.write_text('{"arch": "resnet50", "meth')
    with pytest.raises(common.DamagedFile, match="is damaged: unreadable"):
        plan.pending(units[1])
    plan, units = damaged_plan(rerun_stale=True)
    assert plan.pending(units[1]) == units[1].runs
    assert plan.records() == {}
    assert capsys.readouterr().out == (f"run record {retrain.record} is damaged: unreadable (JSONDecodeError): "
                                       f"running it again\n")


def test_a_truncated_original_checkpoint_is_trained_again(workdir, capsys):
    plan, units = damaged_plan(rerun_stale=False)
    original = units[0].runs[0]
    common.save_checkpoint(original.checkpoint, torch.nn.Linear(10, 10), {})
    whole = original.checkpoint.read_bytes()
    original.checkpoint.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(common.DamagedFile) as raised:
        records.model_sha256(original.checkpoint)
    assert str(raised.value).startswith(f"checkpoint {original.checkpoint} is damaged (")
    assert "\n" not in str(raised.value)
    common.write_json(original.record, whole_record(method="original", model_sha256="a" * 64,
                                                   fingerprint=plan.expected(original)))
    assert plan.pending(units[0]) == units[0].runs  # the original, then its methods
    assert capsys.readouterr().out == (f"checkpoint {original.checkpoint} is damaged (it does not load): "
                                       f"training it again\n")
