"""--track: a smoke sweep's TensorBoard runs read back equal to its records (and the records equal to an untracked
sweep's), a script's offline W&B run read back from its own files, and tracking that fails costs a warning line."""
import argparse
import json
import os
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_script
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_reproduce import SWEEP, in_process  # noqa: F401 (a fixture)

import common
from unlearning import records, tracking, training

STEP_TAGS = {"train/loss", "train/lr", "train/images_per_s", "curve/forget_acc", "curve/retain_acc",
             "curve/test_acc"}
FINAL_TAGS = {"metrics/UA", "metrics/RA", "metrics/TA", "metrics/MIA_efficacy", "metrics/RTE_s"}


def scalars(folder):
    """{tag: [(step, value)]} of the TensorBoard run in folder."""
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_tracked_sweep_logs_each_step_as_a_tensorboard_run_equal_to_its_record(cifar_dir, workdir,
                                                                                in_process):  # noqa: F811
    """Every step a run named like its record: losses and lr per step, the accuracy curve per epoch, the record's
    metrics at the end; the records and checkpoints are those of the same sweep without tracking."""
    made = {}
    for track in ([], ["--track", "tensorboard", "--track-dir", "boards"]):
        folder = workdir / ("tracked" if track else "plain")
        folder.mkdir()
        os.chdir(folder)
        assert run_script("reproduce.py", *SWEEP, "--data", cifar_dir, "--units", "resnet50-s0-methods",
                          "--no-tables", *track) == 0
        made[bool(track)] = {path.stem: json.loads(path.read_text()) for path in Path("results/runs").glob("*.json")}
    plain, tracked = made[False], made[True]
    assert sorted(tracked) == ["resnet50-smoke_finetune_s0", "resnet50-smoke_original_s0"]
    for name, record in tracked.items():
        assert records.model_sha256(workdir / f"tracked/model_weights/{name}.pth") == \
            records.model_sha256(workdir / f"plain/model_weights/{name}.pth")
        assert {key: record[key] for key in common.METRIC_KEYS} == {key: plain[name][key] for key in common.METRIC_KEYS}
        logged = scalars(workdir / "tracked/boards" / name)
        assert set(logged) >= STEP_TAGS | FINAL_TAGS
        epochs = record["fingerprint"]["recipe"]["epochs"]
        steps = epochs * -(-(200 if name.endswith("original_s0") else 180) // common.SMOKE["batch_size"])
        assert [step for step, _ in logged["train/loss"]] == list(range(1, steps + 1))
        assert all(value > 0 for _, value in logged["train/loss"] + logged["train/lr"])
        assert [step for step, _ in logged["curve/retain_acc"]] == [steps * epoch // epochs
                                                                    for epoch in range(1, epochs + 1)]
        for tag in FINAL_TAGS:
            key = tag.removeprefix("metrics/")
            assert logged[tag] == [(steps, pytest.approx(record[key], rel=1e-6))]
    assert not (workdir / "plain/runs").exists() and not (workdir / "plain/boards").exists()


def wandb_records(run_folder):
    """(config, history rows, summary) of an offline W&B run, read from its run-*.wandb file: W&B's record log
    (LevelDB's log layout: 32 KiB blocks of chunks, each a 7-byte header and part of a protobuf Record)."""
    from wandb.proto import wandb_internal_pb2

    data = next(Path(run_folder).glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    config, history, summary, position, pending = {}, [], {}, 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            which = record.WhichOneof("record_type")
            if which in ("run", "config"):
                updates = record.run.config.update if which == "run" else record.config.update
                config.update({item.key: json.loads(item.value_json) for item in updates})
            elif which == "history":
                history.append({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                                for item in record.history.item})
            elif which == "summary":
                summary.update({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                                for item in record.summary.update})
        elif kind == 0 and length == 0:
            break
    return config, history, summary


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B with no login and no network: its own files in tmp_path; its service stopped afterwards."""
    import wandb

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_RUN_GROUP"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    yield wandb
    wandb.teardown()


def test_a_script_logs_to_wandb_offline_and_tensorboard_at_once(original_weights, cifar_dir, workdir,
                                                                wandb_offline, capsys):
    """--track wandb --track tensorboard without a W&B login: an offline run (said once), in the project and with
    the settings given; its summary holds the metrics evaluate.py gives the checkpoint; the checkpoint keeps its
    default name."""
    assert run_script("finetune.py", "--arch", "resnet50", "--preset", "smoke", "--data", cifar_dir, "--device",
                      "cpu", "--weights", original_weights("resnet50"), "--track", "wandb", "--track", "tensorboard",
                      "--wandb-project", "unlearning-test") == 0
    err = capsys.readouterr().err
    assert "logging offline" in err and "wandb sync" in err and "warning" not in err
    checkpoint = workdir / "model_weights/resnet50-smoke_finetune.pth"
    evaluated = common.evaluate_checkpoint(checkpoint, cifar_dir, "cpu")
    (run_folder,) = (workdir / "runs/wandb").glob("offline-run-*")
    config, history, summary = wandb_records(run_folder)
    assert config["arch"] == "resnet50" and config["method"] == "finetune" and config["seed"] == 0
    assert json.loads(config["recipe"]) == {"epochs": 1, "lr": 1e-3, "batch_size": common.SMOKE["batch_size"]}
    for key in (*common.METRIC_KEYS, "RTE_s"):
        assert summary[f"metrics/{key}"] == pytest.approx(evaluated[key], rel=1e-6)
    losses = [row["train/loss"] for row in history if "train/loss" in row]
    board = scalars(workdir / "runs/resnet50-smoke_finetune")
    assert losses == pytest.approx([value for _, value in board["train/loss"]], rel=1e-6) and len(losses) == 3
    assert board["metrics/UA"][0][1] == pytest.approx(evaluated["UA"], rel=1e-6)


def test_a_missing_package_is_one_line_naming_the_install(monkeypatch, workdir, capsys):
    real_find_spec = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name, *args: None if name == "wandb" else real_find_spec(name, *args))
    assert run_script("finetune.py", "--preset", "smoke", "--track", "wandb") == 1
    assert capsys.readouterr().err.strip() == "error: --track wandb needs the wandb package: pip install wandb"


class FailingSink:
    name = "failing"

    def __init__(self):
        self.calls = 0

    def log(self, values, step):
        self.calls += 1
        raise OSError("disk full")

    def add_settings(self, settings):
        pass

    def close(self, settings, final):
        pass


def test_a_failing_backend_is_one_warning_and_the_run_goes_on(tmp_path, capsys):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    tracker = tracking.open_run(argparse.Namespace(track=["tensorboard"], track_dir=not_a_folder), "run", {})
    assert not tracker and capsys.readouterr().err.count("warning: tracking: starting tensorboard failed") == 1
    failing = FailingSink()
    tracker = tracking.Tracker()
    tracker.sinks = [failing]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    tracker.begin_epoch()
    for _ in range(3):
        tracker.record_step(torch.tensor(1.0), optimizer, 4)
    tracker.end_epoch()
    tracker.record_step(torch.tensor(1.0), optimizer, 4)  # the run goes on; nothing is logged any more
    tracker.log_final({"UA": 1.0})
    tracker.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert failing.calls == 1 and err == ["warning: tracking: failing failed (OSError: disk full); the run goes on "
                                          "without it"]


def test_only_numbers_of_the_final_metrics_are_logged():
    logged = []
    tracker = tracking.Tracker()
    tracker.sinks = [SimpleNamespace(log=lambda values, step: logged.append((step, values)))]
    tracker.log_final({"UA": 12.5, "RA": 90, "TA": None, "MIA_efficacy": float("nan"), "RTE_s": 3.0,
                       "relearn_reached": True, "path": "x.pth", "probe_UA": 40.0})
    assert logged[0][0] == 0 and set(logged[0][1]) == {"metrics/UA", "metrics/RA", "metrics/MIA_efficacy",
                                                        "metrics/RTE_s", "metrics/probe_UA"}


def test_a_tracked_run_that_diverges_shows_its_last_losses(monkeypatch):
    monkeypatch.setattr(training, "DIVERGENCE_CHECK_STEPS", 2)
    logged = []
    tracker = tracking.Tracker()
    tracker.sinks = [SimpleNamespace(name="list", log=lambda values, step: logged.append((step, values)))]
    model = torch.nn.Linear(2, 2)
    batches = [(torch.ones(4, 2), torch.zeros(4, dtype=torch.long))] * 5
    losses = iter([1.0, 0.5, float("inf"), 0.25, 0.125])

    def loss_fn(model, inputs, labels):
        return model(inputs).sum() * 0 + next(losses)
    with tracking.activate(tracker), pytest.raises(common.TrainingDiverged, match="step 3/5"):
        common.train(model, batches, epochs=1, loss_fn=loss_fn)
    assert [(step, values["train/loss"]) for step, values in logged] == [(1, 1.0), (2, 0.5), (3, float("inf")),
                                                                         (4, 0.25)]
