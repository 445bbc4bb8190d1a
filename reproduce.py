"""Reproduce the paper's comparison: every unlearning method against retraining, over seeds, as tables and plots.

    python reproduce.py                                     # GPU: full preset, resnet50 and vit, seeds 0 1 2
    python reproduce.py --arch resnet50 --methods lora loraprune --seeds 0
    python reproduce.py --forget-random 0.1                 # -> results/{arch}_random10.*
    python reproduce.py --preset smoke --data data          # tiny end-to-end check
    python reproduce.py --time-budget 540                   # start units only while they fit in 9 minutes
    python reproduce.py --list-units                        # one unit name per line, in priority order
    python reproduce.py --units vit-s1-retrain --no-tables  # run one unit, leave the tables alone
    python reproduce.py --tables-only                       # rebuild tables and plots from the run records
    python reproduce.py --benchmark salun --preset smoke    # SalUn's Table 1 setting, ours beside theirs (CPU check)
    python reproduce.py --track tensorboard                 # watch it: tensorboard --logdir runs

Without a GPU and without --preset it runs the smoke preset with seed 0 only, so a CPU check takes minutes.

The sweep is a list of independent units (unlearning/units.py), per arch and seed: "methods" pretrains that seed's own
original model, then runs each method of --methods from it; "retrain" retrains from scratch. Each step runs
its script's own command line in this process (the data read once), with its seed set and its RTE and peak GPU
memory measured as its own, and is evaluated here; its metrics, where its time went,
and a fingerprint of what produced it (data, original model, recipe, flags, code, device, libraries) go to
results/runs/{checkpoint stem}.json. A run whose record matches the plan is done, even without its checkpoint
(--force reruns it); a record that differs in data, original model, recipe or flags is never reused.
Tables and plots are rebuilt from every matching record for the arch, preset and forget setting:
results/{arch}[-smoke][_{dataset}][_{forget}].json, .md, _metrics.png, _tradeoff.png (the dataset named unless
CIFAR-10, --dataset as in the method scripts).

--benchmark NAME runs a published benchmark (unlearning/benchmarks.py) the same way, with its arch, forget setting
and recipes, and sets our table beside the published one: results/{NAME}_table1[-smoke].md, .json, .png
(docs/reproducing.md).
"""
import argparse
import shlex
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

import common
from unlearning import benchmarks, comparison, launch, locks, records, representation, sweep, units

ROOT = Path(__file__).resolve().parent
DEFAULT_METHODS = ("finetune", "pruneft", "lora", "loraprune")
BASELINES = ("ga", "rl", "l1sparse", "salun", "scrub")
DEFAULT_SEEDS = (0, 1, 2)
SMOKE_FALLBACK_SEEDS = (0,)
STAT_KEYS = ("UA", "MIA_efficacy", "RA", "TA", "avg_gap", "RTE_s", "peak_gpu_mem_mb")
TABLE_COLUMNS = {"method": "method", "n": "runs", "UA": "UA %", "MIA_efficacy": "MIA-efficacy %", "RA": "RA %",
                 "TA": "TA %", "avg_gap": "avg. gap ↓", "RTE_s": "RTE s", "peak_gpu_mem_mb": "peak GPU MB"}
DIGITS = {"RTE_s": 1, "peak_gpu_mem_mb": 0, "relearn_steps": 0, "compile_s": 1}
# Under --compile: the steps' compile seconds (outside the RTE), in the tables when the records hold them.
COMPILE_COLUMNS = {"compile_s": "compile s"}
# Representation-level metrics (unlearning/representation.py), in the tables when the records hold them.
REPRESENTATION_COLUMNS = {key: header for table in representation.COLUMNS.values() for key, header in table.items()}
PANELS = {"UA": "UA: unlearning accuracy (%)", "MIA_efficacy": "MIA-efficacy (%)", "RA": "RA: retain accuracy (%)",
          "TA": "TA: test accuracy (%)", "RTE_s": "RTE: run time of the step (s)",
          "peak_gpu_mem_mb": "Peak GPU memory (MB)"}
FIXED_COLORS = {"original": "#9e9e9e", "retrain": "#303030"}


# ------------------------------------------------------------------------------------------ statistics

def mean_std(values):
    """(mean, sample standard deviation) of the values that are not None; std is None for fewer than two."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def avg_gap(run, reference):
    """Mean absolute difference of run to reference over UA, MIA-efficacy, RA and TA (percentage points)."""
    return statistics.fmean(abs(run[key] - reference[key]) for key in common.METRIC_KEYS)


def method_order(methods):
    """original, retrain, the paper's methods, the baselines, then anything else alphabetically."""
    known = ["original", "retrain", *DEFAULT_METHODS, *BASELINES]
    return [m for m in known if m in methods] + sorted(set(methods) - set(known))


def summarize(runs):
    """One row per method: n, seeds, gap_seeds and {"mean", "std"} of each STAT_KEYS entry over its runs.

    avg_gap compares each run (the original model included) with the retrain run of the same seed; a seed
    without its retrain run has no gap, so gap_seeds may be fewer than n."""
    retrain = {run["seed"]: run for run in runs if run["method"] == "retrain"}
    rows = []
    for method in method_order({run["method"] for run in runs}):
        group = sorted((run for run in runs if run["method"] == method), key=lambda run: run["seed"])
        gaps = [avg_gap(run, retrain[run["seed"]]) for run in group if run["seed"] in retrain]
        row = {"method": method, "n": len(group), "seeds": [run["seed"] for run in group],
               "gap_seeds": [run["seed"] for run in group if run["seed"] in retrain]}
        for key in STAT_KEYS:
            mean, std = mean_std(gaps if key == "avg_gap" else [run.get(key) for run in group])
            row[key] = {"mean": mean, "std": std}
        for key in (*REPRESENTATION_COLUMNS, *COMPILE_COLUMNS):
            if any(key in run for run in group):
                mean, std = mean_std([run.get(key) for run in group])
                row[key] = {"mean": mean, "std": std}
        capped = [run for run in group if run.get("relearn_reached") is False]
        if capped:
            row["relearn_capped"] = {"runs": len(capped), "max_steps": max(run["relearn_max_steps"] for run in capped)}
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ the sweep

def forget_description(spec, class_names):
    if spec.random_fraction is not None:
        return f"random {spec.random_fraction * 100:g}% of training images (forget seed {spec.seed})"
    names = ", ".join(class_names[c] for c in spec.classes)
    return f"class{'es' if len(spec.classes) > 1 else ''} {', '.join(map(str, spec.classes))} ({names})"


def unlearning_scripts():
    return sorted(path.stem for path in ROOT.glob("*.py") if "common.run_method(" in path.read_text())


def check_methods(methods):
    available = unlearning_scripts()
    for method in methods:
        if method in ("original", "retrain"):
            raise common.UserError(f"{method} is always part of the sweep; list only unlearning methods in --methods")
        if method not in available:
            raise common.UserError(f"unknown method {method!r}: no unlearning script {method}.py in {ROOT}; "
                                   f"available: {' '.join(available)}")


def apply_benchmark(args):
    """The forget setting of this call, the methods checked; under --benchmark, also the benchmark's arch and methods in
    args (--methods picks among its methods). Flags that would change the benchmark's setting are refused."""
    if not args.benchmark:
        check_methods(args.methods or DEFAULT_METHODS)
        return common.forget_spec_from_args(args) or common.ForgetSpec()
    benchmark = benchmarks.get_benchmark(args.benchmark)
    if args.arch or args.forget_class or args.forget_random is not None:
        raise common.UserError(f"--benchmark {benchmark.name} sets the arch ({benchmark.arch}) and the forget setting "
                               f"(random {benchmark.forget_random:.0%}); drop --arch, --forget-class and "
                               f"--forget-random")
    if args.dataset != benchmark.dataset:
        raise common.UserError(f"--benchmark {benchmark.name} runs on {benchmark.dataset}, not {args.dataset}; drop "
                               f"--dataset")
    if benchmark.arch not in common.ARCHS:
        raise common.UserError(f"--benchmark {benchmark.name} needs arch {benchmark.arch}, which this checkout does "
                               f"not have (archs: {' '.join(common.ARCHS)})")
    args.arch = [benchmark.arch]
    args.methods = args.methods or list(benchmark.methods)
    for method in args.methods:
        benchmark.method(method)
    return common.ForgetSpec(random_fraction=benchmark.forget_random, seed=args.forget_seed)


def check_stale(plan, units, args, argv):
    """List the records that differ from the plan; refuse unless --force or --rerun-stale says to rerun them."""
    stale = plan.stale(units)
    for run, keys in stale:
        print(f"differs from this plan in {', '.join(keys)}: {run.record}")
    if stale and not (args.force or args.rerun_stale):
        raise common.UserError(f"{len(stale)} run record(s) on file differ from this plan (listed above) and are not "
                               f"reused; rerun them with: python reproduce.py {shlex.join([*argv, '--rerun-stale'])}")


def run_units(plan, units, args, argv, started):
    """Run the units that are not done, in order, within --time-budget counted from time.monotonic() value
    started; returns the units left to run."""
    check_stale(plan, units, args, argv)
    elsewhere = plan.reused_from_elsewhere(units)
    if elsewhere:
        print(f"reusing {len(elsewhere)} record(s) made by other code, on another device, with other library "
              f"versions or under another data label (the tables show the records' own; --force reruns): "
              f"{' '.join(run.record.stem for run in elsewhere)}")
    records = plan.records()
    left = []
    for i, unit in enumerate(units, start=1):
        prefix = f"[{i}/{len(units)}] {unit.name}"
        todo = plan.pending(unit)
        if not todo:
            print(f"{prefix}: done (records on file)")
            continue
        if args.time_budget is not None:
            expected, source = plan.estimate(todo, records)
            remaining = args.time_budget - (time.monotonic() - started)
            if expected > remaining:
                print(f"{prefix}: expected {expected:.0f} s (from {source}), {max(remaining, 0):.0f} s of the time "
                      f"budget left; not started")
                left.append(unit)
                continue
            prefix += f" (expected {expected:.0f} s from {source}, {remaining:.0f} s of the budget left)"
        lock = locks.unit_lock(unit, args.preset, plan.spec, args.dataset)
        holder = lock.acquire()
        if holder:
            print(f"{prefix}: skipped, another process holds its lock: {holder}")
            continue
        try:
            print(prefix, flush=True)
            plan.run_unit(unit)
        finally:
            lock.release()
        records = plan.records()
    if left:
        print(f"{len(left)} unit(s) left to run: {' '.join(unit.name for unit in left)}; "
              f"the same command continues with them")
    return left


# ------------------------------------------------------------------------------------- tables, plots

def load_runs(arch, spec, plan):
    """(records that match the plan, names of those that do not) in results/runs/ for this arch, preset and
    forget setting."""
    matching, left_out = [], []
    for path, record in plan.records().items():
        what = (record.get("arch"), record.get("preset"), record.get("forget"), record.get("benchmark"),
                record.get("dataset", common.DEFAULT_DATASET))  # records before datasets were named: CIFAR-10
        if what != (arch, plan.args.preset, spec.tag, getattr(plan.args, "benchmark", None), plan.args.dataset):
            continue
        run = units.make_run(arch, record["method"], record["seed"], plan.args, spec)
        original_hash = None if run.from_scratch else plan.original_hash(arch, record["seed"])
        keys = records.differences(record, plan.expected(run, original_hash))
        if keys:
            left_out.append(f"{path.stem} ({', '.join(keys)})")
        else:
            matching.append(record)
    return matching, left_out


def distinct(runs, key, missing):
    return sorted({run.get(key) or missing for run in runs})


def header(arch, dataset, preset, spec, runs, class_names):
    """Title line from the records themselves: their devices, the dates they were made, their data labels."""
    devices = distinct(runs, "device", "unknown device")
    dates = sorted({(run.get("created") or "")[:10] for run in runs} - {""})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}" if dates else "date unknown"
    seeds = sorted({run["seed"] for run in runs})
    return (f"{arch} · {dataset} · forget {forget_description(spec, class_names)} · preset {preset} · "
            f"{', '.join(devices)} · {when} · "
            f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}) · "
            f"{', '.join(distinct(runs, 'data_label', 'unlabelled data'))}")


def provenance(runs):
    """One line: which code versions and library versions made the runs, with counts."""
    def code(run):
        version = (run.get("fingerprint") or {}).get("code") or {}
        if not version.get("commit"):
            return f"files sha256 {version['sha256'][:10]} (no git checkout)" if version.get("sha256") else "unknown"
        return f"commit {version['commit'][:10]}" + (" with uncommitted changes" if version.get("dirty") else "")

    def libraries(run):
        versions = (run.get("fingerprint") or {}).get("versions") or {}
        return ", ".join(f"{name} {version}" for name, version in sorted(versions.items())) or "unknown"

    def counted(counter):
        return "; ".join(f"{text} ({n} run{'s' if n != 1 else ''})" for text, n in sorted(counter.items()))
    codes, library_sets = Counter(map(code, runs)), Counter(map(libraries, runs))
    mixed = len(codes) > 1 or len(library_sets) > 1 or len({run.get("device") for run in runs}) > 1
    return (f"Code: {counted(codes)}. Libraries: {counted(library_sets)}."
            + (" Runs from other commits, library versions or devices are reused (see README); rerun with --force "
               "to refresh them." if mixed else ""))


def notes(spec, rows, runs):
    lines = [
        "Mean ± sample standard deviation over seeds (a single run shows its value alone); each seed is an "
        "independent replicate with its own original model, so the original row is a mean over seeds too. UA, "
        "MIA-efficacy, RA and TA in percent. avg. gap = mean absolute difference to retrain over UA, "
        "MIA-efficacy, RA and TA, computed per seed against the same seed's retrain, then mean ± std over seeds "
        "(lower is better, as in SalUn). RTE = wall-clock seconds of the training step (for the original model: "
        "pretraining). Peak GPU memory is that of the training step's own process ('-' when it ran on CPU).",
    ]
    if any(len(row["gap_seeds"]) < row["n"] for row in rows if row["method"] != "retrain"):
        lines.append("Some seeds lack their retrain run: their runs have no avg. gap, and the gap cell says over "
                     "how many of the row's seeds it is averaged.")
    if any(key in row for row in rows for key in REPRESENTATION_COLUMNS):
        lines.append("Representation-level metrics (README, 'Representation-level metrics'): Probe-UA = 100 - "
                     "accuracy of a linear probe on the penultimate features for the forgotten data (high: the "
                     "features no longer tell it apart); CKA = linear CKA of the penultimate features with the same "
                     "seed's original model on forget and retain images (1: unchanged; '-' for retrain when its "
                     "seed's original model was not on disk); relearn steps = fine-tuning steps on 1 % of the forget "
                     "set until forget accuracy is within 5 points of the original's ('> N': not within the cap).")
    if spec.random_fraction is not None:
        lines.append("Random forgetting: retrain's UA is about its test error, so a high UA is not the goal here; "
                     "read every metric as a gap to retrain.")
    lines.append(provenance(runs))
    return lines


def write_markdown(path, title, lines, rows):
    table_rows = []
    for row in rows:
        cells = {"method": row["method"], "n": row["n"]}
        for key in STAT_KEYS:
            cells[key] = comparison.format_stat(row[key], DIGITS.get(key, 2))
        for key in (*REPRESENTATION_COLUMNS, *COMPILE_COLUMNS):
            if key in row:
                cells[key] = comparison.format_stat(row[key], DIGITS.get(key, 2))
        if "relearn_capped" in row:
            capped = row["relearn_capped"]
            cells["relearn_steps"] = (f"> {capped['max_steps']}" if capped["runs"] == row["n"] else
                                      f"{cells['relearn_steps']} ({capped['runs']} of {row['n']} > "
                                      f"{capped['max_steps']})")
        if row["method"] == "retrain":
            cells["avg_gap"] = "0 (reference)"
        elif len(row["gap_seeds"]) < row["n"]:
            cells["avg_gap"] += f" ({len(row['gap_seeds'])} of {row['n']} seeds)"
        table_rows.append(cells)
    measured = {key: header for key, header in REPRESENTATION_COLUMNS.items() if any(key in row for row in rows)}
    compiled = {key: header for key, header in COMPILE_COLUMNS.items() if any(key in row for row in rows)}
    columns = {**dict(list(TABLE_COLUMNS.items())[:-2]), **measured, **dict(list(TABLE_COLUMNS.items())[-2:-1]),
               **compiled, **dict(list(TABLE_COLUMNS.items())[-1:])}
    text = "\n\n".join([f"# {title}", *lines, common.markdown_table(table_rows, columns)])
    common.write_text(path, text + "\n")


def method_colors(methods):
    others = [m for m in methods if m not in FIXED_COLORS]
    palette = [f"C{i}" for i in range(10)]
    return {**FIXED_COLORS, **{m: palette[i % len(palette)] for i, m in enumerate(others)}}


def plot_metrics(path, title, rows):
    """One bar panel per metric, methods side by side, error bars of ±1 std; retrain's level dashed."""
    methods = [row["method"] for row in rows]
    colors = method_colors(methods)
    by_method = {row["method"]: row for row in rows}
    figure = Figure(figsize=(16, 9), layout="constrained")
    for ax, (key, label) in zip(figure.subplots(2, 3).flat, PANELS.items(), strict=True):
        ax.set_title(label)
        measured = [row for row in rows if row[key]["mean"] is not None]
        if not measured:
            ax.text(0.5, 0.5, "not measured\n(the steps ran on CPU)", ha="center", va="center",
                    transform=ax.transAxes, fontsize=12, color="#666666")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        positions = range(len(measured))
        means = [row[key]["mean"] for row in measured]
        stds = [row[key]["std"] or 0 for row in measured]
        ceiling = 100 if key in common.METRIC_KEYS else float("inf")
        error = [[min(std, mean) for mean, std in zip(means, stds, strict=True)],
                 [min(std, ceiling - mean) for mean, std in zip(means, stds, strict=True)]]
        bars = ax.bar(positions, means, yerr=error, capsize=4, color=[colors[row["method"]] for row in measured])
        ax.bar_label(bars, fmt=f"%.{DIGITS.get(key, 1)}f", fontsize=8, padding=2)
        ax.set_xticks(list(positions), [row["method"] for row in measured], rotation=30, ha="right")
        ax.set_ylabel(label.rsplit("(", 1)[-1].rstrip(")"))
        if key in common.METRIC_KEYS:
            ax.set_ylim(0, 112)
            if "retrain" in by_method:
                ax.axhline(by_method["retrain"][key]["mean"], color=colors["retrain"], linestyle="--", linewidth=1)
        else:
            ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
    handles = [Patch(color=colors[m], label=m) for m in methods]
    handles.append(Patch(facecolor="none", edgecolor="none",
                         label="dashed: retrain (the target); error bars: ±1 std, clipped to the range"))
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 8))
    figure.suptitle(title, fontsize=11)
    common.save_figure(path, figure, dpi=110)


def spread(heights, spacing):
    """Positions for labels at the sorted heights: at least spacing apart, in the same order, each run of crowded
    labels centred on its points' mean height (so a label stays as close to its own point as the crowd allows)."""
    groups = []  # [sum of heights, count] of runs of labels set spacing apart
    for height in heights:
        groups.append([height, 1])
        while len(groups) > 1:
            (sum_low, n_low), (sum_high, n_high) = groups[-2], groups[-1]
            top_of_low = sum_low / n_low + (n_low - 1) * spacing / 2
            bottom_of_high = sum_high / n_high - (n_high - 1) * spacing / 2
            if bottom_of_high - top_of_low >= spacing:
                break
            groups[-2:] = [[sum_low + sum_high, n_low + n_high]]
    return [total / n + (i - (n - 1) / 2) * spacing for total, n in groups for i in range(n)]


def label_points(ax, points, colors, fontsize=10):
    """Label each (method, x, y) point to its right, in its colour. Labels that would overlap are spread apart
    vertically in the order of their points' heights, with a thin line back to their point. Call after the axes'
    limits and scales are final."""
    ax.figure.draw_without_rendering()  # lay the figure out, so data -> display coordinates are final
    to_points = 72 / ax.figure.dpi
    line_height, gap = 1.3 * fontsize, 7
    labels = []
    for method, x, y in points:
        px, py = (v * to_points for v in ax.transData.transform((x, y)))
        labels.append({"method": method, "xy": (x, y), "y": py, "left": px + gap,
                       "right": px + gap + 0.62 * fontsize * len(method)})
    labels.sort(key=lambda label: label["left"])
    crowds, right = [], float("-inf")  # labels whose horizontal extents overlap, transitively
    for label in labels:
        if label["left"] >= right:
            crowds.append([])
        crowds[-1].append(label)
        right = max(right, label["right"])
    for crowd in crowds:
        crowd.sort(key=lambda label: label["y"])
        for label, label_y in zip(crowd, spread([label["y"] for label in crowd], line_height), strict=True):
            color = colors[label["method"]]
            moved = abs(label_y - label["y"]) > 0.3 * line_height
            ax.annotate(label["method"], label["xy"], textcoords="offset points", xytext=(gap, label_y - label["y"]),
                        va="center", color=color, fontsize=fontsize,
                        arrowprops={"arrowstyle": "-", "color": color, "linewidth": 0.6} if moved else None)


def plot_tradeoff(path, title, rows):
    """avg. gap to retrain against RTE, one point per method; the original model's gap as a dashed line.

    Returns the figure (written to path)."""
    colors = method_colors([row["method"] for row in rows])
    figure = Figure(figsize=(9, 6.5), layout="constrained")
    ax = figure.subplots()
    points = [row for row in rows if row["method"] != "original"
              and row["RTE_s"]["mean"] is not None and row["avg_gap"]["mean"] is not None]
    for row in points:
        rte, gap = row["RTE_s"], row["avg_gap"]
        ax.errorbar(rte["mean"], gap["mean"], xerr=rte["std"] or 0, yerr=gap["std"] or 0, fmt="o", markersize=8,
                    capsize=4, color=colors[row["method"]],
                    label="retrain (the reference: gap 0)" if row["method"] == "retrain" else row["method"])
    original = next((row for row in rows if row["method"] == "original"), None)
    if original and original["avg_gap"]["mean"] is not None:
        ax.axhline(original["avg_gap"]["mean"], color=colors["original"], linestyle="--",
                   label="original model (no unlearning)")
    rtes = [row["RTE_s"]["mean"] for row in points if row["RTE_s"]["mean"] > 0]
    ax.margins(x=0.12)
    if rtes and max(rtes) / min(rtes) > 20:
        ax.set_xscale("log")
    else:
        ax.set_xlim(left=0)
    ax.set_xlabel("RTE: run time of the unlearning step (s)")
    ax.set_ylabel("avg. gap to retrain (percentage points, lower is better)")
    top = ax.get_ylim()[1]
    ax.set_ylim(-0.04 * top, top)
    ax.grid(alpha=0.3)
    ax.legend(title="method (±1 std)")
    ax.set_title(title, fontsize=10)
    label_points(ax, [(row["method"], row["RTE_s"]["mean"], row["avg_gap"]["mean"]) for row in points], colors)
    common.save_figure(path, figure, dpi=110)
    return figure


def write_results(arch, spec, plan):
    """Rebuild results/{stem}.json, .md and the two plots from the matching records; returns the stem's path."""
    runs, left_out = load_runs(arch, spec, plan)
    stem = common.RESULTS_DIR / units.results_stem(arch, plan.args.preset, spec, plan.args.dataset)
    if left_out:
        print(f"left out of {stem}.*: {len(left_out)} record(s) that differ from this plan: {', '.join(left_out)}")
    if not runs:
        return None
    order = {method: i for i, method in enumerate(method_order({run["method"] for run in runs}))}
    runs.sort(key=lambda run: (order[run["method"]], run["seed"]))
    rows = summarize(runs)
    data = plan.data_cache[plan.data_key]
    title = header(arch, plan.args.dataset, plan.args.preset, spec, runs, data.class_names)
    lines = notes(spec, rows, runs)
    common.write_json(stem.with_suffix(".json"), {"header": title, "notes": lines, "arch": arch,
                                                  "dataset": plan.args.dataset, "preset": plan.args.preset,
                                                  "forget": spec.to_dict(),
                                                  "summary": rows, "runs": runs, "left_out": left_out})
    write_markdown(stem.with_suffix(".md"), title, lines, rows)
    plot_metrics(stem.with_name(f"{stem.name}_metrics.png"), title, rows)
    plot_tradeoff(stem.with_name(f"{stem.name}_tradeoff.png"), title, rows)
    print(f"wrote {stem}.json, {stem}.md, {stem}_metrics.png, {stem}_tradeoff.png")
    return stem


def write_benchmark_results(spec, plan):
    """Rebuild results/{benchmark}_table1[-smoke].md, .json and .png: ours beside the published values, from the
    matching records (the published rows alone while there are none)."""
    benchmark = benchmarks.get_benchmark(plan.args.benchmark)
    published = benchmarks.load_published(benchmark)
    arch = benchmark.arch
    runs, left_out = load_runs(arch, spec, plan)
    if left_out:
        print(f"left out of the {benchmark.name} table: {len(left_out)} record(s) that differ from this plan: "
              f"{', '.join(left_out)}")
    order = {method: i for i, method in enumerate(method_order({run["method"] for run in runs}))}
    runs.sort(key=lambda run: (order[run["method"]], run["seed"]))
    summary = summarize(runs)
    rows = comparison.compare(benchmark, published, summary)
    smoke = "-smoke" if plan.args.preset == "smoke" else ""
    stem = common.RESULTS_DIR / f"{benchmark.name}_table1{smoke}"
    ours = header(arch, plan.args.preset, spec, runs) if runs else "no runs of ours on file yet"
    lines = [f"Published: {published['citation']} {published['title']}.", f"Source of the published values: "
             f"{published['source']}", f"Ours: {ours}.", *comparison_notes(runs, summary)]
    paths = comparison.write(stem, f"{benchmark.title}: ours beside the published values", lines, rows, published,
                             {"benchmark": benchmark.name, "ours": ours, "summary": summary, "runs": runs,
                              "left_out": left_out})
    print(f"wrote {', '.join(map(str, paths))}")
    return stem


def comparison_notes(runs, summary):
    notes_ = [comparison.READING]
    if runs:
        notes_.append(provenance(runs))
    if any(len(row["gap_seeds"]) < row["n"] for row in summary if row["method"] != "retrain"):
        notes_.append("Some seeds lack their retrain run: their runs have no avg. gap.")
    return notes_


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv):
    parser = common.make_parser(__doc__)
    parser.add_argument("--arch", nargs="+", choices=common.ARCHS,
                        help=f"models to run (default: the paper's, {' '.join(common.PAPER_ARCHS)})")
    parser.add_argument("--methods", nargs="+", metavar="METHOD",
                        help=f"unlearning scripts {{METHOD}}.py to run, e.g. {' '.join(BASELINES)} "
                             f"(default: {' '.join(DEFAULT_METHODS)}; under --benchmark, the benchmark's methods)")
    parser.add_argument("--benchmark", choices=sorted(benchmarks.BENCHMARKS),
                        help="run a published benchmark with its arch, forget setting and recipes, and set our table "
                             "beside the published one (docs/reproducing.md)")
    parser.add_argument("--seeds", nargs="+", type=common.seed_int, metavar="SEED",
                        help="seeds: one original model, its methods and one retrain each "
                             "(default: 0 1 2; 0 under the CPU smoke fallback)")
    parser.add_argument("--preset", choices=common.PRESETS,
                        help="full: the paper's settings; smoke: tiny models on a few images per class "
                             "(default: full on a GPU, smoke on CPU)")
    common.add_dataset_arguments(parser)
    parser.add_argument("--data-label",
                        help="name of the data set, recorded with each run; table headers show the labels of "
                             "their runs (default: named by the data itself: e.g. CIFAR-10 when the files match the "
                             "official release's checksums, else the text of a PROVENANCE file beside them)")
    common.add_forget_arguments(parser)
    common.add_device_argument(parser)
    parser.add_argument("--force", action="store_true",
                        help="rerun every run of the selected units, even those whose record matches the plan")
    parser.add_argument("--rerun-stale", action="store_true",
                        help="rerun the runs whose records differ from this plan in data, recipe or flags "
                             "(without it the sweep lists them and stops)")
    parser.add_argument("--time-budget", type=common.nonnegative_float, metavar="SECONDS",
                        help="start a unit only when its expected time fits in what is left of SECONDS; "
                             "exit 0 naming the units left to run")
    parser.add_argument("--list-units", action="store_true",
                        help="print the sweep's unit names, one a line, in priority order, and exit")
    parser.add_argument("--units", nargs="+", metavar="NAME",
                        help="run only these units (names as --list-units prints them, e.g. resnet50-s0-methods)")
    tables = parser.add_mutually_exclusive_group()
    tables.add_argument("--no-tables", action="store_true", help="run units, but do not rebuild tables and plots")
    tables.add_argument("--tables-only", action="store_true",
                        help="only rebuild tables and plots from the run records on file")
    parser.add_argument("--probe", action=argparse.BooleanOptionalAction,
                         help="Probe-UA of every run (default: on for the full preset, off for smoke)")
    parser.add_argument("--cka", action=argparse.BooleanOptionalAction,
                         help="linear CKA to the seed's original model (default: on for the full preset, off for "
                              "smoke)")
    parser.add_argument("--relearn", action="store_true",
                         help="relearn time of every run (off by default: it can cost a third of a unit)")
    parser.add_argument("--relearn-fraction", type=common.open_unit_interval,
                         default=representation.RELEARN["fraction"], metavar="F",
                         help=f"share of the forget set relearned from (default: {representation.RELEARN['fraction']})")
    parser.add_argument("--relearn-max-steps", type=common.number(int, 1, 10**6),
                         default=representation.RELEARN["max_steps"], metavar="N",
                         help=f"give up relearning after N steps (default: {representation.RELEARN['max_steps']})")
    parser.add_argument("--overlap-evaluation", action=argparse.BooleanOptionalAction,
                        help="fit the MIA's SVC and the linear probe of one step in a worker thread while the next "
                             "step trains; the same results either way (default: on with a GPU, off on CPU, where the "
                             "fits would take cores from the training and its RTE)")
    parser.add_argument("--step-processes", action="store_true",
                        help="run each step in a fresh Python process, as separate commands would (slower: imports, "
                             "data and device start-up paid per step)")
    parser.add_argument("--compile", action="store_true",
                        help="pass --compile to every step: the unlearning steps compile their training step in the "
                             "untimed warm-up (compile s, apart from the RTE), pretraining and retraining compile as "
                             "their --compile does; part of every run's fingerprint, so a compiled record never counts "
                             "as an eager one")
    launch.add_launcher_arguments(parser)
    common.add_tracking_arguments(parser)
    args = parser.parse_args(argv)
    common.check_tracking(args)
    if args.launcher and (args.time_budget is not None or args.tables_only or args.list_units):
        parser.error("--launcher runs units in parallel: it does not go with --time-budget, --tables-only or "
                     "--list-units")
    return args


def resolve_defaults(args):
    """Fill in --preset and --seeds from the device, saying so when the CPU fallback applies."""
    on_gpu = torch.device(args.device).type == "cuda"
    say = sys.stderr if args.list_units else sys.stdout  # --list-units prints unit names alone
    if args.preset is None and not on_gpu:
        print("No GPU found: running the smoke preset (tiny models, a few images per class, seed 0) on CPU; "
              "pass --preset full for the paper's settings.", file=say)
        args.preset = "smoke"
        args.seeds = args.seeds or list(SMOKE_FALLBACK_SEEDS)
    elif args.preset == "full" and not on_gpu:
        print("warning: --preset full on CPU will be very slow (days); a GPU is expected.", file=sys.stderr)
    args.preset = args.preset or "full"
    if args.overlap_evaluation is None:
        args.overlap_evaluation = on_gpu
    for flag in ("probe", "cka"):  # cheap next to a unit at full size, not next to the tiny smoke runs
        if getattr(args, flag) is None:
            setattr(args, flag, args.preset == "full")
    args.seeds = list(dict.fromkeys(args.seeds or DEFAULT_SEEDS))
    args.arch = list(dict.fromkeys(args.arch or common.PAPER_ARCHS))
    args.methods = list(dict.fromkeys(args.methods or DEFAULT_METHODS))


def interruptible(work, kept):
    """Run work(); on Ctrl-C or SIGTERM, exit 128 + the signal's number (the running child is stopped first).

    kept: the list of records written so far by this call."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, common.raise_terminated) if in_main_thread else None
    try:
        return work()
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM as common.Terminated
        signum = signal.SIGTERM if isinstance(stop, common.Terminated) else signal.SIGINT
        print(f"interrupted by {signal.Signals(signum).name}: the running step was stopped and left no record; "
              f"kept the {len(kept)} record(s) this call finished and every earlier one; the same command resumes",
              file=sys.stderr)
        sys.exit(128 + signum)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def launch_in_parallel(plan, units, args, argv):
    """Run the units that are not done with --launcher, each as `reproduce.py ... --units NAME --no-tables`.

    Stale records are checked here once, so that no unit starts only to refuse; failed units are a one-line
    error after the others have finished (the tables are rebuilt from what finished all the same)."""
    check_stale(plan, units, args, argv)
    todo = [unit.name for unit in units if args.force or plan.pending(unit)]
    print(f"{len(units) - len(todo)} unit(s) done (records on file); {len(todo)} to run with --launcher "
          f"{args.launcher}", flush=True)
    unit_flags = launch.without_launcher_arguments(argv)
    failed = launch.launch_units(
        args, todo, lambda name: [sys.executable, str(ROOT / "reproduce.py"), *unit_flags, "--units", name,
                                  "--no-tables"])
    if failed:
        if not args.no_tables:
            write_tables(plan.spec, plan)
        raise common.UserError(f"{len(failed)} unit(s) failed: {' '.join(failed)} (logs in {args.log_dir}/); "
                               f"the same command reruns them")


def main(argv=None):
    started = time.monotonic()
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    args = parse_args(argv)
    spec = apply_benchmark(args)
    resolve_defaults(args)
    planned = units.plan_units(args, spec)
    if args.list_units:
        print("\n".join(unit.name for unit in planned))
        return []
    selected = units.select_units(planned, args.units)
    data_start = time.monotonic()
    data = common.load_data(args.data, args.device, args.preset, args.dataset)
    args.data_label = args.data_label or common.data_label(args.data, args.dataset)
    plan = sweep.Sweep(args, spec, records.data_sha256(data), {(args.data, args.preset, args.dataset): data})
    plan.times["startup_s"] += time.monotonic() - data_start
    if not args.tables_only:
        print(f"{len(selected)} units: {' '.join(args.arch)} x seeds {' '.join(map(str, args.seeds))} x "
              f"(original {' '.join(args.methods)} | retrain), preset {args.preset}, "
              f"{args.dataset}, forget {forget_description(spec, data.class_names)}, "
              f"device {common.device_name(args.device)}", flush=True)
        if args.launcher:
            launch_in_parallel(plan, selected, args, argv)
        else:
            interruptible(lambda: run_units(plan, selected, args, argv, started), plan.kept)
    written = [] if args.no_tables else write_tables(spec, plan)
    if plan.kept:
        print_sweep_time(plan, time.monotonic() - started)
    return written


def write_tables(spec, plan):
    """The benchmark's side-by-side table under --benchmark, else each arch's tables; the stems written."""
    if getattr(plan.args, "benchmark", None):
        return [write_benchmark_results(spec, plan)]
    return [stem for arch in plan.args.arch if (stem := write_results(arch, spec, plan))]


def print_sweep_time(plan, seconds):
    """Where this call's time went (after its imports): its units' parts, reading the data as start-up, and the rest
    (planning, tables and plots) as other."""
    parts = dict(plan.times)
    parts["other_s"] += max(seconds - sum(parts.values()), 0.0)
    print(f"sweep: {sweep.time_line(parts, seconds, plan.background_s)}")


if __name__ == "__main__":
    common.cli(main)
