import json

from conftest import run_script


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
    assert {"device", "date", "torch", "data", "epochs"} <= results.keys()
    table = (workdir / "bench" / "results.md").read_text()
    assert "CIFAR-10 (JPEG copy)" in table and results["torch"] in table and table.count("| vit |") == 7
