import json

import torch
from conftest import TRAIN_PER_CLASS, run_script

SMOKE = ["--arch", "vit", "--preset", "smoke", "--device", "cpu"]


def continual(original_weights, cifar_dir, *args):
    assert run_script("continual.py", *SMOKE, "--data", cifar_dir, "--weights", original_weights("vit"), *args) == 0


def test_each_step_starts_from_the_last_and_the_forget_set_grows(original_weights, cifar_dir, workdir):
    continual(original_weights, cifar_dir, "--methods", "ga", "rl", "--steps", "3", "5", "7", "--no-retrain")
    result = json.loads((workdir / "results/continual_vit-smoke_ga-rl.json").read_text())
    assert [(row["method"], row["step"]) for row in result["rows"]] == [(m, k) for m in ("ga", "rl") for k in (1, 2, 3)]
    for method in ("ga", "rl"):
        rows = [row for row in result["rows"] if row["method"] == method]
        assert [row["forget_classes"] for row in rows] == [[3], [3, 5], [3, 5, 7]]
        assert [row["forget_images"] for row in rows] == [TRAIN_PER_CLASS * k for k in (1, 2, 3)]
        assert all(row["RTE_s"] > 0 and 0 <= row["UA"] <= 100 for row in rows)
        sources = [str(original_weights("vit"))] + [row["checkpoint"] for row in rows[:-1]]
        for row, source in zip(rows, sources, strict=True):
            meta = torch.load(workdir / row["checkpoint"], weights_only=True)["meta"]
            assert meta["source_weights"] == source and meta["forget"]["classes"] == row["forget_classes"]
    table = (workdir / "results/continual_vit-smoke_ga-rl.md").read_text().splitlines()
    assert len(table) == 2 + 6 and table[4].startswith("| ga | 3 | 3 (cat), 5 (dog), 7 (horse) | 60 |")
    assert (workdir / "results/continual_vit-smoke_ga-rl.png").stat().st_size > 10_000


def test_retrain_is_the_reference_at_every_step(original_weights, cifar_dir, workdir):
    continual(original_weights, cifar_dir, "--method", "ga", "--steps", "3", "5")
    rows = json.loads((workdir / "results/continual_vit-smoke_ga.json").read_text())["rows"]
    retrain = [row for row in rows if row["method"] == "retrain"]
    assert [row["forget_classes"] for row in retrain] == [[3], [3, 5]]
    for row in retrain:
        meta = torch.load(workdir / row["checkpoint"], weights_only=True)["meta"]
        assert meta["method"] == "retrain" and meta["train_images"] == row["retain_images"]


def test_repeated_steps_are_refused(cifar_dir, workdir, capsys):
    assert run_script("continual.py", *SMOKE, "--data", cifar_dir, "--steps", "3", "3") == 1
    assert "distinct" in capsys.readouterr().err


def test_a_crashing_step_shows_its_traceback_and_stops_with_one_line(original_weights, cifar_dir, workdir, capsys,
                                                                      monkeypatch):
    from unlearning import scripts

    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(scripts, "train", crash)
    assert run_script("continual.py", *SMOKE, "--data", cifar_dir, "--weights", original_weights("vit"),
                      "--method", "finetune", "--steps", "3", "--no-retrain") == 1
    err = capsys.readouterr().err
    assert "RuntimeError: boom" in err and "Traceback" in err
    assert err.splitlines()[-1].startswith("error: finetune.py --arch vit") and "failed with exit status 1" in err
    assert not (workdir / "model_weights/continual/vit-smoke_finetune_step1.pth").exists()
