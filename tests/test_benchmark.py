"""A published benchmark in the sweep (--benchmark salun): its units and recipes, the published values, and the
side-by-side table's arithmetic on constructed records."""
import json

import pytest

import common
import reproduce
from unlearning import benchmarks, comparison, records, units

SALUN = benchmarks.BENCHMARKS["salun"]


def run(method, seed, ua, mia, ra, ta, rte=60.0):
    return {"method": method, "seed": seed, "UA": ua, "MIA_efficacy": mia, "RA": ra, "TA": ta, "RTE_s": rte,
            "peak_gpu_mem_mb": None}


def published(*rows):
    return {"title": "t", "citation": "c", "source": "s", "rows": [dict(row) for row in rows]}


def test_the_published_avg_gaps_are_the_gaps_of_the_published_means():
    table = benchmarks.load_published(SALUN)
    rows = {row["method"]: row for row in table["rows"]}
    retrain = {key: comparison.published_stat(rows["Retrain"], key) for key in common.METRIC_KEYS}
    checked = 0
    for name, row in rows.items():
        means = {key: comparison.published_stat(row, key) for key in common.METRIC_KEYS}
        if means["UA"]["mean"] is None:
            continue
        assert comparison.gap_of_means(means, retrain) == pytest.approx(row["avg_gap"][0], abs=0.005), name
        checked += 1
    assert checked == 7  # Retrain, FT, RL, GA, IU, l1-sparse, SalUn
    implemented = {SALUN.retrain_published, *(m.published for m in SALUN.methods.values() if m.published)}
    assert implemented <= set(rows) and {"IU", "BE", "BS"} == set(rows) - implemented


def test_differences_gaps_and_units_on_constructed_records():
    runs = [run("retrain", 0, 6.0, 12.0, 100.0, 94.0, rte=600), run("retrain", 1, 4.0, 14.0, 100.0, 94.0, rte=660),
            run("ft", 0, 1.0, 3.0, 99.0, 93.0, rte=120), run("ft", 1, 3.0, 5.0, 99.0, 93.0, rte=180),
            run("finetune", 0, 2.0, 4.0, 98.0, 92.0)]
    summary = reproduce.summarize(runs)
    table = published({"method": "Retrain", "UA": [5.0, 0.5], "MIA_efficacy": [13.0, 0.1], "RA": [100.0, 0.0],
                       "TA": [94.5, 0.1], "avg_gap": [0.0, None]},
                      {"method": "FT", "UA": [1.5, 0.2], "MIA_efficacy": [3.0, 0.0], "RA": [99.5, 0.1],
                       "TA": [94.0, 0.3], "avg_gap": [3.5, None], "RTE_min": [2.0, None]},
                      {"method": "IU", "UA": [1.0, 0.3]})
    rows = {row["published_method"] or row["method"]: row for row in comparison.compare(SALUN, table, summary)}
    assert list(rows) == ["Retrain", "FT", "IU", "finetune"]  # published order, then ours alone
    ft = rows["FT"]
    assert ft["method"] == "ft" and ft["n"] == 2 and ft["seeds"] == [0, 1]
    assert ft["UA"]["ours"] == pytest.approx({"mean": 2.0, "std": 2 ** 0.5})
    assert ft["UA"]["difference"] == pytest.approx(0.5) and ft["TA"]["difference"] == pytest.approx(-1.0)
    # seed 0: (|1-6| + |3-12| + 1 + 1) / 4 = 4; seed 1: (|3-4| + |5-14| + 1 + 1) / 4 = 3
    assert ft["avg_gap"]["ours"] == pytest.approx({"mean": 3.5, "std": 0.5 ** 0.5})
    assert ft["avg_gap"]["difference"] == pytest.approx(0.0)
    # of the means: ft (2, 4, 99, 93) against retrain (5, 13, 100, 94): (3 + 9 + 1 + 1) / 4
    assert ft["avg_gap_of_means"] == pytest.approx(3.5)
    assert ft["RTE_min"]["ours"] == pytest.approx({"mean": 2.5, "std": 1800 ** 0.5 / 60})  # 120 s and 180 s
    assert ft["RTE_min"]["difference"] == pytest.approx(0.5)
    assert rows["Retrain"]["method"] == "retrain" and rows["Retrain"]["RA"]["difference"] == 0.0
    iu = rows["IU"]
    assert not iu["implemented"] and iu["n"] == 0 and iu["UA"]["ours"]["mean"] is None
    assert iu["UA"]["published"] == {"mean": 1.0, "std": 0.3} and iu["UA"]["difference"] is None
    alone = rows["finetune"]
    assert alone["published_method"] is None and alone["UA"]["published"]["mean"] is None
    assert alone["UA"]["ours"] == {"mean": 2.0, "std": None} and alone["UA"]["difference"] is None


def test_table_files_hold_every_published_value(workdir):
    table = benchmarks.load_published(SALUN)
    summary = reproduce.summarize([run("retrain", 0, 5.0, 13.0, 100.0, 94.0), run("salun", 0, 3.0, 14.0, 99.0, 93.0)])
    rows = comparison.compare(SALUN, table, summary)
    paths = comparison.write(workdir / "table", "title", ["a note"], rows, table, {"benchmark": "salun"})
    markdown, saved = paths[0].read_text(), json.loads(paths[1].read_text())
    assert paths[2].stat().st_size > 0 and saved["rows"] == rows and saved["source"] == table["source"]
    lines = {line.split("|")[1].strip(): line for line in markdown.splitlines() if line.startswith("| ")}
    for entry in table["rows"]:
        line = next(text for name, text in lines.items() if entry["method"] in name)
        for key in comparison.METRICS:
            mean, std = comparison.published_stat(entry, key).values()
            if mean is not None:
                assert comparison.format_stat({"mean": mean, "std": std}) in line, (entry["method"], key)
    assert "not implemented here" in lines["IU (published only: not implemented here)"]
    assert "| +0.15 |" in lines["salun (SalUn)"]  # UA: 3.00 - 2.85


def test_benchmark_units_recipes_and_priority(capsys):
    reproduce.main(["--benchmark", "salun", "--preset", "full", "--list-units", "--device", "cpu"])
    assert capsys.readouterr().out.split() == [f"salun-resnet18-s{seed}-{kind}" for seed in (0, 1, 2)
                                               for kind in ("methods", "retrain")]
    args = reproduce.parse_args(["--benchmark", "salun", "--preset", "full", "--seeds", "0", "--device", "cpu"])
    spec = reproduce.apply_benchmark(args)
    reproduce.resolve_defaults(args)
    methods, retrain = units.plan_units(args, spec)
    assert [r.method for r in methods.runs] == ["original", *SALUN.methods] and spec.random_fraction == 0.1
    by_method = {r.method: r for r in methods.runs}
    ft = by_method["ft"]
    assert ft.script == "l1sparse.py" and "bench=salun" in ft.checkpoint.name and "bench=salun" in ft.record.name
    assert ft.plan_flags[ft.plan_flags.index("--l1-alpha") + 1] == "0.0"
    assert ft.plan_flags[ft.plan_flags.index("--lr") + 1] == "0.01"
    assert records.recipe(ft, "full") == {"epochs": 10, "lr": 0.01, "batch_size": 256}
    assert records.recipe(by_method["salun"], "smoke")["epochs"] == common.SMOKE["epochs"]
    assert "--epochs" not in by_method["finetune"].plan_flags  # the paper's methods keep their own recipe
    assert records.recipe(retrain.runs[0], "full") == common.PRETRAIN_RECIPES["resnet18"]


def test_the_archs_from_scratch_recipe_is_the_benchmarks():
    arch, theirs = common.PRETRAIN_RECIPES[SALUN.arch], SALUN.from_scratch
    assert {key: arch[key] for key in ("epochs", "lr", "batch_size", "optimizer", "weight_decay", "label_smoothing",
                                       "nesterov")} == {key: theirs[key] for key in ("epochs", "lr", "batch_size",
                                                                                     "optimizer", "weight_decay",
                                                                                     "label_smoothing", "nesterov")}
    assert [int(share * arch["epochs"]) for share in arch["lr_milestones"]] == theirs["lr_drop_epochs"]


@pytest.mark.parametrize("flags", [["--arch", "resnet50"], ["--forget-class", "3"], ["--methods", "scrub"],
                                   ["--dataset", "cifar100"]])
def test_benchmark_refuses_flags_that_change_its_setting(flags, capsys):
    with pytest.raises(SystemExit) as stop:
        common.cli(reproduce.main, ["--benchmark", "salun", "--list-units", "--device", "cpu", *flags])
    assert stop.value.code != 0 and len(capsys.readouterr().err.strip().splitlines()) == 1
