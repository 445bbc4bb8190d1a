import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_script, write_synthetic_cifar
from matplotlib.text import Text

import common
import reproduce
from unlearning import data, measure, metrics, records, representation, runners, scripts, sweep

ROOT = Path(__file__).resolve().parent.parent
SMOKE_PRETRAIN_EPOCHS = common.SMOKE["pretrain_epochs"]
SWEEP = ["--preset", "smoke", "--arch", "resnet50", "--methods", "finetune", "--seeds", "0", "--device", "cpu"]


@pytest.fixture
def in_process(monkeypatch):
    """Watch reproduce.py's in-process steps (and run them with one epoch of pretraining: these tests check the sweep,
    not the models). in_process.on_start, if set, is called with each script's name before it runs."""
    monkeypatch.setitem(common.SMOKE, "pretrain_epochs", 1)
    hooks = SimpleNamespace(on_start=None, started=[])
    real_run_in_process = runners.run_in_process

    def run_in_process(script, flags):
        hooks.started.append(script)
        if hooks.on_start:
            hooks.on_start(script)
        return real_run_in_process(script, flags)

    monkeypatch.setattr(sweep, "run_in_process", run_in_process)
    return hooks


def table_rows(markdown):
    return {line.split("|")[1].strip(): line for line in markdown.splitlines() if line.startswith("| ")}


def test_mean_std_and_avg_gap_on_constructed_runs():
    assert reproduce.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert reproduce.mean_std([4.0, None]) == (4.0, None)
    assert reproduce.mean_std([]) == (None, None)

    def run(method, seed, ua, mia, ra, ta):
        return {"method": method, "seed": seed, "UA": ua, "MIA_efficacy": mia, "RA": ra, "TA": ta,
                "RTE_s": 10.0 * (seed + 1), "peak_gpu_mem_mb": None}

    runs = [run("retrain", 0, 100, 100, 90, 80), run("retrain", 1, 100, 100, 92, 82),
            run("lora", 0, 96, 100, 90, 84), run("lora", 1, 100, 92, 92, 82),
            run("original", 0, 0, 0, 100, 90), run("original", 1, 0, 0, 100, 88)]
    assert reproduce.avg_gap(runs[2], runs[0]) == 2.0
    rows = {row["method"]: row for row in reproduce.summarize(runs)}
    assert list(rows) == ["original", "retrain", "lora"]
    assert rows["lora"]["avg_gap"] == {"mean": 2.0, "std": 0.0}
    assert rows["lora"]["UA"] == pytest.approx({"mean": 98.0, "std": 8 ** 0.5})
    assert rows["lora"]["RTE_s"] == pytest.approx({"mean": 15.0, "std": 50 ** 0.5})
    assert rows["lora"]["peak_gpu_mem_mb"] == {"mean": None, "std": None}
    assert rows["retrain"]["avg_gap"] == {"mean": 0.0, "std": 0.0}
    # each seed's original model against the same seed's retrain: (100+100+10+10)/4 and (100+100+8+6)/4
    assert rows["original"]["avg_gap"] == pytest.approx({"mean": (55 + 53.5) / 2, "std": 1.5 / 2 ** 0.5})
    assert rows["original"]["n"] == 2 and rows["original"]["gap_seeds"] == [0, 1]


def test_seed_without_retrain_shows_both_counts(workdir):
    def run(method, seed, ua):
        return {"method": method, "seed": seed, "UA": ua, "MIA_efficacy": 50.0, "RA": 90.0, "TA": 80.0,
                "RTE_s": 1.0, "peak_gpu_mem_mb": None}

    rows = reproduce.summarize([run("retrain", 0, 100.0), run("lora", 0, 96.0), run("lora", 1, 60.0)])
    lora = rows[1]
    assert (lora["n"], lora["gap_seeds"], lora["avg_gap"]["mean"]) == (2, [0], 1.0)
    lines = reproduce.notes(common.ForgetSpec(), rows, [])
    reproduce.write_markdown(workdir / "table.md", "title", lines, rows)
    markdown = (workdir / "table.md").read_text()
    assert "| lora | 2 |" in table_rows(markdown)["lora"] and "1.00 (1 of 2 seeds)" in table_rows(markdown)["lora"]
    assert "Some seeds lack their retrain run" in markdown


def sweep_files(workdir):
    """{relative path: bytes} of the records and tables a sweep leaves in workdir/results."""
    return {str(path.relative_to(workdir)): path.read_bytes() for path in sorted((workdir / "results").rglob("*"))
            if path.suffix in (".json", ".md")}


def metric_summary(workdir):
    """The table's rows without the timings, which differ between two sweeps of the same runs."""
    report = json.loads((workdir / "results/resnet50-smoke.json").read_text())
    return [{key: value for key, value in row.items() if key not in ("RTE_s", "peak_gpu_mem_mb")}
            for row in report["summary"]]


def test_sweep_writes_records_and_tables_then_rebuilds_them_without_checkpoints(cifar_dir, workdir, in_process,
                                                                              capsys, tmp_path_factory):
    assert run_script("reproduce.py", *SWEEP, "--list-units") == 0
    assert capsys.readouterr().out == "resnet50-s0-methods\nresnet50-s0-retrain\n"
    assert run_script("reproduce.py", *SWEEP, "--data", cifar_dir, "--probe", "--cka", "--relearn",
                      "--relearn-max-steps", "10") == 0
    out = capsys.readouterr().out
    assert "[1/2] resnet50-s0-methods" in out and "[2/2] resnet50-s0-retrain" in out
    assert in_process.started == ["pretrain.py", "finetune.py", "retrain.py"]

    report = json.loads((workdir / "results/resnet50-smoke.json").read_text())
    assert [(run["method"], run["seed"]) for run in report["runs"]] == [("original", 0), ("retrain", 0),
                                                                       ("finetune", 0)]
    original, retrain, finetune = report["runs"]
    assert finetune["fingerprint"]["original"] == original["model_sha256"] == \
        records.model_sha256(workdir / "model_weights/resnet50-smoke_original_s0.pth")
    assert finetune["fingerprint"]["data"]["sha256"] == retrain["fingerprint"]["data"]["sha256"]
    assert original["fingerprint"]["flags"] == ["pretrain.py", "--arch", "resnet50", "--preset", "smoke", "--seed", "0"]
    assert retrain["fingerprint"]["recipe"]["epochs"] == 1 and finetune["fingerprint"]["recipe"]["epochs"] == 1
    assert {"commit", "dirty", "sha256"} == set(finetune["fingerprint"]["code"])
    assert original["curve"][-1]["epoch"] == 1 and "test_accuracy" in retrain["curve"][-1]
    assert "curve" not in finetune
    # representation-level metrics, each run against its seed's own original (retrain too)
    for run in (original, retrain, finetune):
        assert 0 <= run["probe_UA"] <= 100 and run["relearn_max_steps"] == 10
        assert run["original_weights"] == str(Path("model_weights/resnet50-smoke_original_s0.pth"))
    assert original["CKA_forget"] == pytest.approx(1.0) and original["relearn_steps"] == 0
    assert 0 <= retrain["CKA_forget"] < 1
    assert [row["n"] for row in report["summary"]] == [1, 1, 1]
    markdown = (workdir / "results/resnet50-smoke.md").read_text()
    assert markdown.startswith(f"# resnet50 · cifar10 · forget class 3 (cat) · preset smoke · cpu · "
                               f"{original['created'][:10]} · "
                               f"1 seed (0) · {common.DIFFERENT_DATA_LABEL}\n")  # synthetic data, no PROVENANCE
    assert "the original row is a mean over seeds too" in markdown and "Code: " in markdown
    assert "are reused" not in markdown  # one commit, one device: nothing to warn about
    assert list(table_rows(markdown)) == ["method", "original", "retrain", "finetune"]
    assert "| Probe-UA % | CKA forget | CKA retain | relearn steps | RTE s |" in markdown
    assert "Representation-level metrics" in markdown
    for name in ("metrics", "tradeoff"):
        assert (workdir / f"results/resnet50-smoke_{name}.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(path.name for path in (workdir / "results/runs").iterdir()) == [
        "resnet50-smoke_finetune_s0.json", "resnet50-smoke_original_s0.json", "resnet50-smoke_retrain_s0.json"]
    assert not list((workdir / "results/locks").iterdir())

    # a fresh clone: records, no checkpoints. Nothing is trained; the same tables come out.
    before = sweep_files(workdir)
    for checkpoint in (workdir / "model_weights").glob("*.pth"):
        checkpoint.unlink()
    assert run_script("reproduce.py", *SWEEP, "--data", cifar_dir) == 0
    assert capsys.readouterr().out.count("done (records on file)") == 2
    assert in_process.started == ["pretrain.py", "finetune.py", "retrain.py"]
    assert sweep_files(workdir) == before

    # another label for the same data: the records are reused, and say so
    assert run_script("reproduce.py", *SWEEP, "--data", cifar_dir, "--data-label", "relabelled", "--no-tables") == 0
    assert "reusing 3 record(s) made by other code, on another device, with other library versions or under " \
           "another data label" in capsys.readouterr().out
    assert len(in_process.started) == 3 and sweep_files(workdir) == before

    # other data: the records are listed and not reused; nothing is trained or overwritten
    other = write_synthetic_cifar(tmp_path_factory.mktemp("other"), seed=1)
    assert run_script("reproduce.py", *SWEEP, "--data", other, "--data-label", "other") == 1
    captured = capsys.readouterr()
    assert captured.out.count("differs from this plan in data") == 3
    assert captured.err.count("\n") == 1 and "3 run record(s) on file differ from this plan" in captured.err
    assert captured.err.rstrip().endswith("--data-label other --rerun-stale")
    assert sweep_files(workdir) == before and len(in_process.started) == 3

    # the retrain unit alone, on the other data: only retrain trains; the old records stay out of its table
    assert run_script("reproduce.py", *SWEEP, "--data", other, "--data-label", "other", "--rerun-stale",
                      "--units", "resnet50-s0-retrain") == 0
    out = capsys.readouterr().out
    assert in_process.started[3:] == ["retrain.py"]
    assert "left out of results/resnet50-smoke.*: 2 record(s) that differ from this plan" in out
    report = json.loads((workdir / "results/resnet50-smoke.json").read_text())
    assert [run["method"] for run in report["runs"]] == ["retrain"]
    assert report["header"].endswith("· other")


def test_sweep_cut_short_by_time_budget_continues_from_records_alone(cifar_dir, workdir, in_process, capsys,
                                                                     monkeypatch):
    # before anything was timed here, a methods unit (original + finetune) is expected to take 200 s, a retrain 100 s
    monkeypatch.setitem(sweep.DEFAULT_RUN_SECONDS, ("smoke", "resnet50"), {"scratch": 100, "method": 100})
    assert run_script("reproduce.py", *SWEEP, "--data", cifar_dir, "--time-budget", "1") == 0
    out = capsys.readouterr().out
    assert "2 unit(s) left to run: resnet50-s0-methods resnet50-s0-retrain" in out
    assert in_process.started == [] and not (workdir / "results/runs").exists()

    assert run_script("reproduce.py", *SWEEP, "--data", cifar_dir, "--time-budget", "150", "--no-tables") == 0
    assert "1 unit(s) left to run: resnet50-s0-methods" in capsys.readouterr().out
    assert in_process.started == ["retrain.py"] and not (workdir / "results/resnet50-smoke.md").exists()
    for checkpoint in (workdir / "model_weights").glob("*.pth"):
        checkpoint.unlink()
    assert run_script("reproduce.py", *SWEEP, "--data", cifar_dir) == 0
    assert in_process.started == ["retrain.py", "pretrain.py", "finetune.py"]
    resumed = metric_summary(workdir)

    (workdir / "uninterrupted").mkdir()
    os.chdir(workdir / "uninterrupted")
    assert run_script("reproduce.py", *SWEEP, "--data", cifar_dir) == 0
    assert metric_summary(workdir / "uninterrupted") == resumed


def test_sigterm_during_a_unit_keeps_finished_records(cifar_dir, workdir, in_process, capsys):
    def terminate_finetune(script):
        if script == "finetune.py":
            os.kill(os.getpid(), signal.SIGTERM)

    in_process.on_start = terminate_finetune
    methods = [*SWEEP, "--data", cifar_dir, "--units", "resnet50-s0-methods", "--no-tables"]
    assert run_script("reproduce.py", *methods) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted by SIGTERM")
    assert "kept the 1 record(s) this call finished" in err
    original = workdir / "results/runs/resnet50-smoke_original_s0.json"
    assert [path.name for path in (workdir / "results/runs").iterdir()] == [original.name]
    assert not list((workdir / "results/locks").iterdir())
    kept = original.read_bytes()

    in_process.on_start = None
    assert run_script("reproduce.py", *methods) == 0
    assert in_process.started == ["pretrain.py", "finetune.py", "finetune.py"]
    assert original.read_bytes() == kept
    assert (workdir / "results/runs/resnet50-smoke_finetune_s0.json").is_file()


def test_sigterm_inside_an_in_process_step_keeps_the_record_finishing_in_the_background(cifar_dir, workdir,
                                                                                         in_process, capsys,
                                                                                         monkeypatch):
    """SIGTERM while finetune trains, with the original model's MIA still being fitted in the worker thread: the
    sweep stops with 143 and writes the original's record; the same command then runs finetune alone."""
    real_train = scripts.train

    def train_then_terminate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(scripts, "train", train_then_terminate)
    methods = [*SWEEP, "--data", cifar_dir, "--units", "resnet50-s0-methods", "--no-tables", "--overlap-evaluation"]
    assert run_script("reproduce.py", *methods) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err.startswith("interrupted by SIGTERM") and "kept the 1 record(s) this call finished" in err
    original = json.loads((workdir / "results/runs/resnet50-smoke_original_s0.json").read_text())
    assert 0 <= original["MIA_efficacy"] <= 100
    assert [path.name for path in (workdir / "results/runs").iterdir()] == ["resnet50-smoke_original_s0.json"]
    assert not list((workdir / "results/locks").iterdir())

    monkeypatch.setattr(scripts, "train", real_train)
    assert run_script("reproduce.py", *methods) == 0
    assert in_process.started == ["pretrain.py", "finetune.py", "finetune.py"]


def test_a_crashing_step_stops_the_sweep_with_its_traceback_and_the_unit_resumes(cifar_dir, workdir, in_process,
                                                                                  capsys, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    real_train = scripts.train
    monkeypatch.setattr(scripts, "train", crash)
    methods = [*SWEEP, "--data", cifar_dir, "--units", "resnet50-s0-methods", "--no-tables"]
    assert run_script("reproduce.py", *methods) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: boom" in err and "Traceback" in err
    assert err.splitlines()[-1].startswith("error: finetune.py --arch resnet50") and "failed with exit status 1" in err
    assert [path.name for path in (workdir / "results/runs").iterdir()] == ["resnet50-smoke_original_s0.json"]
    assert not list((workdir / "results/locks").iterdir())

    monkeypatch.setattr(scripts, "train", real_train)
    assert run_script("reproduce.py", *methods) == 0
    assert in_process.started == ["pretrain.py", "finetune.py", "finetune.py"]


def test_overlapped_evaluation_gives_the_same_records_and_every_record_says_where_its_time_went(
        cifar_dir, workdir, in_process, capsys, monkeypatch):
    """The MIA's and probe's fits in a worker thread give the same metrics as in line, and none of them is running
    while a step is timed; each record's time parts add up to its seconds; the data is read from disk once for the
    whole sweep."""
    reads = []
    real_read = data._read_data
    monkeypatch.setattr(data, "_read_data", lambda *args: reads.append(args) or real_read(*args))
    fitting, fitting_when_timed = [], []

    def watched(fit):
        def run(*args):
            fitting.append(fit)
            try:
                time.sleep(0.2)  # a slow fit: without the wait before the next timed block, it would overlap it
                return fit(*args)
            finally:
                fitting.remove(fit)
        return run
    monkeypatch.setattr(metrics, "mia_efficacy", watched(metrics.mia_efficacy))
    monkeypatch.setattr(representation, "fit_probe", watched(representation.fit_probe))
    real_enter = measure.Measure.__enter__
    monkeypatch.setattr(measure.Measure, "__enter__",
                        lambda block: (real_enter(block), fitting_when_timed.append(len(fitting)))[0])

    def records():
        found = {}
        for path in sorted((Path.cwd() / "results/runs").iterdir()):
            record = json.loads(path.read_text())
            found[path.name] = {key: record[key] for key in (*common.METRIC_KEYS, "probe_UA", "probe_TA")}
        return found, json.loads(path.read_text())

    sweeps = {}
    for flag in ("--no-overlap-evaluation", "--overlap-evaluation"):
        (workdir / flag).mkdir()
        os.chdir(workdir / flag)
        assert run_script("reproduce.py", *SWEEP, "--methods", "finetune", "ga", "--data", cifar_dir, "--probe",
                          "--no-tables", flag) == 0
        sweeps[flag] = records()
        out = capsys.readouterr().out
        assert len(reads) == 1  # read by reproduce.py, shared by every step
        reads.clear()
        assert "  resnet50-s0-methods: " in out and "training" in out and "start-up and data" in out
        assert out.splitlines()[-1].startswith("sweep: ")
    inline, overlapped = sweeps["--no-overlap-evaluation"][0], sweeps["--overlap-evaluation"][0]
    assert len(inline) == 4 and inline == overlapped
    assert len(fitting_when_timed) == 2 * (2 + 2 * 2) and not any(fitting_when_timed)  # pre- and retrain; 2 a method
    last = sweeps["--overlap-evaluation"][1]
    parts = [last["time"][key] for key in sweep.TIME_PARTS]
    assert last["time"]["training_s"] == pytest.approx(last["RTE_s"], abs=1e-3)
    assert sum(parts) == pytest.approx(last["seconds"], abs=0.01) and min(parts) >= 0
    assert last["time"]["background_evaluation_s"] > 0


def test_steps_in_processes_of_their_own_give_the_records_of_in_process_steps(cifar_dir, workdir, monkeypatch):
    """--step-processes runs each step as a fresh `python retrain.py ...` (a real process): the same weights and
    metrics as the step run in this process, which shares it with earlier steps (CPU training is deterministic)."""
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # the child's threads, as this process's
    results = {}
    for mode in ([], ["--step-processes"]):
        folder = workdir / ("processes" if mode else "in-process")
        folder.mkdir()
        os.chdir(folder)
        assert run_script("reproduce.py", *SWEEP, "--data", cifar_dir, "--units", "resnet50-s0-retrain", "--no-tables",
                          *mode) == 0
        record = json.loads((folder / "results/runs/resnet50-smoke_retrain_s0.json").read_text())
        results[bool(mode)] = ({key: record[key] for key in common.METRIC_KEYS},
                               records.model_sha256(folder / "model_weights/resnet50-smoke_retrain_s0.pth"))
    assert results[True] == results[False]


def test_failed_step_shows_its_output_and_stops(workdir, capsys):
    """The one real subprocess of these tests: a method script that cannot find its original model."""
    with pytest.raises(common.UserError, match=r"finetune.py .* failed with exit status 1"):
        runners.run_script("finetune.py", ["--preset", "smoke", "--weights", "missing.pth"])
    assert "no original model at missing.pth" in capsys.readouterr().err


def test_unknown_method_is_a_one_line_error(workdir, capsys):
    assert run_script("reproduce.py", "--methods", "lora", "nosuch", "--preset", "smoke") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown method 'nosuch'") and err.count("\n") == 1
    assert not (workdir / "results").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without a GPU")
def test_without_gpu_defaults_to_smoke_with_one_seed(capsys):
    args = reproduce.parse_args([])
    reproduce.resolve_defaults(args)
    assert (args.preset, args.seeds, args.arch) == ("smoke", [0], ["resnet50", "vit"])
    assert capsys.readouterr().out.startswith("No GPU found: running the smoke preset")
    args = reproduce.parse_args(["--preset", "full"])
    reproduce.resolve_defaults(args)
    assert (args.preset, args.seeds) == ("full", [0, 1, 2])
    assert "very slow" in capsys.readouterr().err


def test_local_launcher_matches_the_sequential_sweep_and_reruns_a_killed_unit(cifar_dir, workdir, in_process,
                                                                              monkeypatch):
    """Two workers, real processes, in a folder left as by a methods unit killed (e.g. a lost node) after its
    original model: its dead lock, the original's checkpoint and record, no finetune record, no retrain. The
    launcher finishes both units, reusing the original, and gives the table of the sequential sweep."""
    monkeypatch.setitem(common.SMOKE, "pretrain_epochs", SMOKE_PRETRAIN_EPOCHS)  # as the real processes run
    (workdir / "sequential").mkdir()
    os.chdir(workdir / "sequential")
    assert run_script("reproduce.py", *SWEEP, "--data", cifar_dir) == 0

    killed = workdir / "killed"
    for name in ("model_weights/resnet50-smoke_original_s0.pth", "results/runs/resnet50-smoke_original_s0.json"):
        (killed / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(workdir / "sequential" / name, killed / name)
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    lock = killed / "results/locks/resnet50-smoke_s0-methods.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "slurm_job": None, "since": "-"}))

    command = [sys.executable, str(ROOT / "reproduce.py"), *SWEEP, "--data", str(cifar_dir),
               "--launcher", "local", "--workers", "2"]
    finished = subprocess.run(command, cwd=killed, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True)
    assert finished.returncode == 0, finished.stderr
    assert "0 unit(s) done (records on file); 2 to run with --launcher local" in finished.stdout
    methods_log = (killed / "logs/resnet50-s0-methods.log").read_text()
    assert "resnet50 original seed 0: record on file, done" in methods_log
    assert "resnet50 finetune seed 0 ..." in methods_log
    assert "resnet50 retrain seed 0 ..." in (killed / "logs/resnet50-s0-retrain.log").read_text()
    assert not lock.exists()
    assert metric_summary(killed) == metric_summary(workdir / "sequential")


def test_tradeoff_labels_sit_next_to_their_own_points(tmp_path):
    """Two methods with almost the same RTE and gap: each label names, points at and is coloured like its own point."""
    def row(method, rte, gap):
        return {"method": method, "RTE_s": {"mean": rte, "std": None}, "avg_gap": {"mean": gap, "std": None}}

    rows = [row("retrain", 60.0, 0.0), row("finetune", 20.0, 12.0), row("pruneft", 10.0, 2.0),
            row("loraprune", 10.05, 2.3), row("lora", 35.0, 6.0)]
    figure = reproduce.plot_tradeoff(tmp_path / "tradeoff.png", "title", rows)
    assert (tmp_path / "tradeoff.png").read_bytes().startswith(b"\x89PNG")
    ax = figure.axes[0]
    figure.draw_without_rendering()
    labels = {text.get_text(): text for text in ax.texts}
    assert set(labels) == {r["method"] for r in rows}
    colors = reproduce.method_colors([r["method"] for r in rows])
    for r in rows:
        assert labels[r["method"]].xy == (r["RTE_s"]["mean"], r["avg_gap"]["mean"])
        assert labels[r["method"]].get_color() == colors[r["method"]]
    # the label text alone, without the line back to its point
    box = {m: Text.get_window_extent(text) for m, text in labels.items()}
    # the two near points: their labels do not overlap, and the higher point has the higher label
    assert not box["pruneft"].overlaps(box["loraprune"]) and box["loraprune"].y0 > box["pruneft"].y1
    # each point's nearest label (at its left middle, where labels attach) is its own
    for r in rows:
        x, y = ax.transData.transform((r["RTE_s"]["mean"], r["avg_gap"]["mean"]))
        nearest = min(box, key=lambda m: (box[m].x0 - x) ** 2 + ((box[m].y0 + box[m].y1) / 2 - y) ** 2)
        assert nearest == r["method"]


def test_table_shows_capped_relearn_runs_and_leaves_out_unmeasured_columns(workdir):
    def run(method, seed, steps, reached=True):
        return {"method": method, "seed": seed, "UA": 100.0, "MIA_efficacy": 50.0, "RA": 90.0, "TA": 80.0,
                "RTE_s": 1.0, "peak_gpu_mem_mb": None, "probe_UA": 10.0 * (seed + 1), "relearn_steps": steps,
                "relearn_reached": reached, "relearn_max_steps": 500}

    rows = reproduce.summarize([run("retrain", 0, None, False), run("retrain", 1, None, False),
                                run("lora", 0, 20), run("lora", 1, None, False)])
    reproduce.write_markdown(workdir / "table.md", "title", [], rows)
    cells = {name: [cell.strip() for cell in line.split("|")] for name, line in
             table_rows((workdir / "table.md").read_text()).items()}
    header = cells["method"]
    assert "CKA forget" not in header and header.index("relearn steps") == header.index("Probe-UA %") + 1
    assert cells["retrain"][header.index("relearn steps")] == "> 500"
    assert cells["lora"][header.index("relearn steps")] == "20 (1 of 2 > 500)"
    assert cells["lora"][header.index("Probe-UA %")] == "15.00 ± 7.07"


def test_provenance_warns_only_when_runs_come_from_different_code_or_devices():
    def run(commit, device):
        return {"device": device, "fingerprint": {"code": {"commit": commit, "dirty": False},
                                                  "versions": {"torch": "2.9"}}}

    same = reproduce.provenance([run("a" * 40, "cpu"), run("a" * 40, "cpu")])
    assert same == f"Code: commit {'a' * 10} (2 runs). Libraries: torch 2.9 (2 runs)."
    assert "are reused" in reproduce.provenance([run("a" * 40, "cpu"), run("b" * 40, "cpu")])
    assert "are reused" in reproduce.provenance([run("a" * 40, "cpu"), run("a" * 40, "NVIDIA H100")])
