import json

import pytest
from conftest import run_script

import bench
import common


def test_bench_smoke_writes_rows_for_each_run(workdir, cifar_dir):
    assert run_script("bench.py", "--preset", "smoke", "--arch", "vit", "--methods", "finetune", "loraprune",
                      "--epochs", "1", "--data", cifar_dir, "--device", "cpu") == 0
    results = json.loads((workdir / "bench" / "results.json").read_text())
    runs = {(row["task"], row.get("method"), row.get("prune_mode"), row["style"]) for row in results["rows"]}
    assert runs == {("unlearn", "finetune", None, "reference"), ("unlearn", "finetune", None, "project"),
                    ("unlearn", "loraprune", "mask", "reference"), ("unlearn", "loraprune", "mask", "project"),
                    ("unlearn", "loraprune", "physical", "project"), ("pretrain", None, None, "project"),
                    ("evaluate", None, None, "project")}
    for row in results["rows"]:
        assert row["seconds"] > 0 and row["images_per_s"] > 0
        if row["task"] == "unlearn":
            assert row["params"] > 0 and row["macs"] > 0
            assert (row.get("speedup") is not None) == (row["style"] == "project" and row["prune_mode"] != "physical")
    assert results["physical_over_finetune"]["vit"] > 0
    assert {"device", "date", "torch", "data", "epochs"} <= results.keys() and results["complete"]
    table = (workdir / "bench" / "results.md").read_text()
    assert results["data"] == common.DIFFERENT_DATA_LABEL  # synthetic data, no PROVENANCE file
    assert results["data"] in table and results["torch"] in table and table.count("| vit |") == 7
    assert "Incomplete" not in table


def test_bench_stopped_early_keeps_its_finished_rows(workdir, cifar_dir, monkeypatch):
    def stop(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "bench_evaluation", stop)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--preset", "smoke", "--arch", "vit", "--methods", "finetune", "--data", str(cifar_dir),
                    "--device", "cpu", "--out", "partial"])
    results = json.loads((workdir / "partial/results.json").read_text())
    assert not results["complete"]
    assert [(row["task"], row["style"]) for row in results["rows"]] == [
        ("unlearn", "reference"), ("unlearn", "project"), ("pretrain", "project")]
    assert "Incomplete" in (workdir / "partial/results.md").read_text()
