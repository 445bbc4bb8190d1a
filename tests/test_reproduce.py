import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_script
from matplotlib.text import Text

import common
import reproduce

SWEEP = ["--preset", "smoke", "--arch", "resnet50", "--methods", "finetune", "--device", "cpu"]


@pytest.fixture
def in_process(monkeypatch):
    """Run reproduce.py's training subprocesses inside this process: the same scripts, without ~9 s of imports each
    (and with one epoch of retraining: these tests check the sweep, not the models)."""
    monkeypatch.setitem(common.SMOKE, "pretrain_epochs", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra threads only spin, and cost much when the CPU is shared
    real_run = subprocess.run

    def run(command, **kwargs):
        if command[0] != sys.executable:
            return real_run(command, **kwargs)
        output = io.StringIO()
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            status = run_script(Path(command[1]).name, *command[2:])
        return subprocess.CompletedProcess(command, status, output.getvalue(), None)

    monkeypatch.setattr(subprocess, "run", run)
    yield
    torch.set_num_threads(threads)


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
            run("original", 0, 0, 0, 100, 90)]
    assert reproduce.avg_gap(runs[2], runs[0]) == 2.0
    rows = {row["method"]: row for row in reproduce.summarize(runs)}
    assert list(rows) == ["original", "retrain", "lora"]
    assert rows["lora"]["avg_gap"] == {"mean": 2.0, "std": 0.0}
    assert rows["lora"]["UA"] == pytest.approx({"mean": 98.0, "std": 8 ** 0.5})
    assert rows["lora"]["RTE_s"] == pytest.approx({"mean": 15.0, "std": 50 ** 0.5})
    assert rows["lora"]["peak_gpu_mem_mb"] == {"mean": None, "std": None}
    assert rows["retrain"]["avg_gap"] == {"mean": 0.0, "std": 0.0}
    # the original model is compared with each seed's retrain: gaps (100+100+10+10)/4 and (100+100+8+8)/4
    assert rows["original"]["avg_gap"]["mean"] == pytest.approx((55 + 54) / 2)
    assert rows["original"]["n"] == 1


def test_sweep_writes_tables_and_plots_then_resumes(cifar_dir, workdir, original_weights, in_process, capsys):
    original = workdir / "model_weights/resnet50-smoke_original.pth"
    original.parent.mkdir()
    original.write_bytes(original_weights("resnet50").read_bytes())
    assert run_script("reproduce.py", *SWEEP, "--seeds", "0", "1", "--data", cifar_dir) == 0
    first = capsys.readouterr().out
    assert "[5/5] resnet50 finetune seed 1 ..." in first

    report = json.loads((workdir / "results/resnet50-smoke.json").read_text())
    assert [(run["method"], run["seed"]) for run in report["runs"]] == [
        ("original", 0), ("retrain", 0), ("retrain", 1), ("finetune", 0), ("finetune", 1)]
    assert {key for key in ("path", "arch", "method", "seed", "UA", "RA", "TA", "MIA_efficacy", "RTE_s",
                            "peak_gpu_mem_mb", "forget")} <= set(report["runs"][0])
    assert [row["n"] for row in report["summary"]] == [1, 2, 2]

    markdown = (workdir / "results/resnet50-smoke.md").read_text()
    assert markdown.startswith("# resnet50 · forget class 3 (cat) · preset smoke · cpu · ")
    assert "2 seeds (0, 1) · CIFAR-10 (JPEG copy)" in markdown.splitlines()[0]
    rows = table_rows(markdown)
    assert list(rows) == ["method", "original", "retrain", "finetune"]
    assert " ± " in rows["finetune"]
    for name in ("metrics", "tradeoff"):
        assert (workdir / f"results/resnet50-smoke_{name}.png").read_bytes().startswith(b"\x89PNG")
    assert len(list((workdir / "results/runs").iterdir())) == 5

    finetune = workdir / "model_weights/resnet50-smoke_finetune_s1.pth"
    stamp = finetune.stat().st_mtime_ns
    assert run_script("reproduce.py", *SWEEP, "--seeds", "0", "1", "--data", cifar_dir) == 0
    assert capsys.readouterr().out.count("done, skipped") == 5
    assert finetune.stat().st_mtime_ns == stamp

    finetune = workdir / "model_weights/resnet50-smoke_finetune_s0.pth"
    stamps = finetune.stat().st_mtime_ns, original.stat().st_mtime_ns
    assert run_script("reproduce.py", *SWEEP, "--seeds", "0", "--data", cifar_dir, "--force") == 0
    out = capsys.readouterr().out
    assert "[1/3] resnet50 original ... " in out and "evaluated the existing checkpoint" in out
    assert "[3/3] resnet50 finetune seed 0 ... " in out and "skipped" not in out
    assert finetune.stat().st_mtime_ns != stamps[0] and original.stat().st_mtime_ns == stamps[1]
    assert "| finetune | 2 |" in (workdir / "results/resnet50-smoke.md").read_text()


def test_failed_step_shows_its_output_and_stops(workdir, capsys):
    """The one real subprocess of these tests: a method script that cannot find its original model."""
    with pytest.raises(common.UserError, match=r"finetune.py .* failed with exit status 1"):
        reproduce.run_script("finetune.py", ["--preset", "smoke", "--weights", "missing.pth"])
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
