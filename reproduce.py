"""Reproduce the paper's comparison: every unlearning method against retraining, over seeds, as tables and plots.

    python reproduce.py                                     # GPU: full preset, resnet50 and vit, seeds 0 1 2
    python reproduce.py --arch resnet50 --methods lora loraprune --seeds 0
    python reproduce.py --forget-random 0.1                 # -> results/{arch}_random10.*
    python reproduce.py --preset smoke --data data          # tiny end-to-end check

Without a GPU and without --preset it runs the smoke preset with seed 0 only, so a CPU check takes minutes.

Per arch: pretrain.py if the original model is missing, then per seed retrain.py and each method's
{method}.py, each in its own process so that its RTE and peak GPU memory are its own. Every checkpoint is
evaluated here and its metrics written to results/runs/{checkpoint stem}.json. A run whose checkpoint and
metrics exist is skipped (--force reruns it; the original model is only ever pretrained when missing), so an
interrupted sweep resumes where it stopped. Tables and plots are rebuilt from every run on file for the
arch, preset and forget setting: results/{arch}[-smoke][_{forget}].json, .md, _metrics.png, _tradeoff.png.
"""
import datetime
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

import common

ROOT = Path(__file__).resolve().parent
RUNS_DIR = common.RESULTS_DIR / "runs"
DEFAULT_METHODS = ("finetune", "pruneft", "lora", "loraprune")
BASELINES = ("ga", "rl", "l1sparse", "salun", "scrub")
DEFAULT_SEEDS = (0, 1, 2)
SMOKE_FALLBACK_SEEDS = (0,)
DEFAULT_DATA_LABEL = "CIFAR-10 (JPEG copy)"
STAT_KEYS = ("UA", "MIA_efficacy", "RA", "TA", "avg_gap", "RTE_s", "peak_gpu_mem_mb")
TABLE_COLUMNS = {"method": "method", "n": "runs", "UA": "UA %", "MIA_efficacy": "MIA-efficacy %", "RA": "RA %",
                 "TA": "TA %", "avg_gap": "avg. gap ↓", "RTE_s": "RTE s", "peak_gpu_mem_mb": "peak GPU MB"}
DIGITS = {"RTE_s": 1, "peak_gpu_mem_mb": 0}
PANELS = {"UA": "UA: unlearning accuracy (%)", "MIA_efficacy": "MIA-efficacy (%)", "RA": "RA: retain accuracy (%)",
          "TA": "TA: test accuracy (%)", "RTE_s": "RTE: run time of the step (s)",
          "peak_gpu_mem_mb": "Peak GPU memory (MB)"}
FIXED_COLORS = {"original": "#9e9e9e", "retrain": "#303030"}
OUTPUT_TAIL_LINES = 25


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
    """One row per method: n, seeds and {"mean", "std"} of each STAT_KEYS entry over its runs.

    avg_gap compares each run with the retrain run of the same seed; the original model (one run) is
    compared with every seed's retrain."""
    retrain = {run["seed"]: run for run in runs if run["method"] == "retrain"}
    rows = []
    for method in method_order({run["method"] for run in runs}):
        group = sorted((run for run in runs if run["method"] == method), key=lambda run: run["seed"])
        if method == "original":
            gaps = [avg_gap(run, reference) for run in group for reference in retrain.values()]
        else:
            gaps = [avg_gap(run, retrain[run["seed"]]) for run in group if run["seed"] in retrain]
        row = {"method": method, "n": len(group), "seeds": [run["seed"] for run in group]}
        for key in STAT_KEYS:
            mean, std = mean_std(gaps if key == "avg_gap" else [run.get(key) for run in group])
            row[key] = {"mean": mean, "std": std}
        rows.append(row)
    return rows


def format_stat(stat, digits=2):
    if stat["mean"] is None:
        return "-"
    text = f"{stat['mean']:.{digits}f}"
    return text if stat["std"] is None else f"{text} ± {stat['std']:.{digits}f}"


# ------------------------------------------------------------------------------------------ the sweep

def forget_flags(spec):
    if spec.random_fraction is not None:
        return ["--forget-random", spec.random_fraction, "--forget-seed", spec.seed]
    return ["--forget-class", *spec.classes, "--forget-seed", spec.seed]


def forget_description(spec):
    if spec.random_fraction is not None:
        return f"random {spec.random_fraction * 100:g}% of training images (forget seed {spec.seed})"
    names = ", ".join(common.CLASS_NAMES[c] for c in spec.classes)
    return f"class{'es' if len(spec.classes) > 1 else ''} {', '.join(map(str, spec.classes))} ({names})"


def results_stem(arch, preset, spec):
    """{arch}[-smoke][_{forget tag}], named like the checkpoints; the default forget setting is unmarked."""
    return common.weights_path(arch, "", preset, spec).stem.removesuffix("_")


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


@dataclass
class Run:
    """One step of the sweep: the script that makes a checkpoint, and where its metrics go."""
    arch: str
    method: str
    seed: int | None
    script: str
    checkpoint: Path
    metrics: Path
    flags: list

    def __str__(self):
        return f"{self.arch} {self.method}" + (f" seed {self.seed}" if self.seed is not None else "")


def plan(args, spec):
    """Every run of the sweep in order: per arch the original model, then per seed retrain and each method."""
    runs = []
    for arch in args.arch:
        base = ["--arch", arch, "--data", args.data, "--device", args.device, "--preset", args.preset]
        original = common.weights_path(arch, "original", args.preset)
        metrics = RUNS_DIR / f"{common.weights_path(arch, 'original', args.preset, spec).stem}.json"
        runs.append(Run(arch, "original", None, "pretrain.py", original, metrics,
                        [*base, "--seed", 0, "--out", original]))
        for seed in args.seeds:
            for method in ["retrain", *args.methods]:
                checkpoint = common.weights_path(arch, method, args.preset, spec, seed)
                flags = [*base, "--seed", seed, *forget_flags(spec), "--out", checkpoint]
                if method != "retrain":
                    flags += ["--weights", original]
                runs.append(Run(arch, method, seed, f"{method}.py", checkpoint, RUNS_DIR / f"{checkpoint.stem}.json",
                                flags))
    return runs


def run_script(script, flags):
    """Run ROOT/script in a fresh Python process; a failure shows the end of its output and stops the sweep."""
    command = [sys.executable, str(ROOT / script), *map(str, flags)]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        tail = (result.stdout or "").strip().splitlines()[-OUTPUT_TAIL_LINES:]
        print("\n".join(f"    {line}" for line in tail), file=sys.stderr)
        raise common.UserError(f"{' '.join(command[1:])} failed with exit status {result.returncode} (output above)")


def execute(run, args, spec, data_cache):
    """Train (unless its checkpoint exists and --force is off) and evaluate one run; returns a status text."""
    train = not run.checkpoint.is_file() or (args.force and run.method != "original")
    if not train and run.metrics.is_file() and not args.force:
        return "done, skipped"
    start = time.perf_counter()
    if train:
        run_script(run.script, run.flags)
    metrics = common.evaluate_checkpoint(run.checkpoint, args.data, args.device, spec, run.seed or 0, data_cache)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    meta = torch.load(run.checkpoint, map_location="cpu", weights_only=True, mmap=True)["meta"]
    metrics.update(device=meta.get("device"), data=str(args.data), data_label=args.data_label)
    common.write_json(run.metrics, metrics)
    how = f"RTE {metrics['RTE_s']:.1f} s" if train else "evaluated the existing checkpoint"
    return f"{time.perf_counter() - start:.1f} s ({how})"


# ------------------------------------------------------------------------------------- tables, plots

def load_runs(arch, preset, spec):
    """Every run on file in results/runs/ for this arch, preset and forget setting."""
    runs = [json.loads(path.read_text()) for path in sorted(RUNS_DIR.glob("*.json"))]
    return [run for run in runs if (run.get("arch"), run.get("preset"), run.get("forget")) == (arch, preset, spec.tag)]


def header(arch, preset, spec, runs, data_label):
    devices = sorted({run.get("device") or "unknown device" for run in runs})
    seeds = sorted({run["seed"] for run in runs if run["method"] != "original"})
    return (f"{arch} · forget {forget_description(spec)} · preset {preset} · {', '.join(devices)} · "
            f"{datetime.date.today().isoformat()} · {len(seeds)} seed{'s' if len(seeds) != 1 else ''} "
            f"({', '.join(map(str, seeds))}) · {data_label}")


def notes(spec):
    lines = [
        "Mean ± sample standard deviation over seeds (a single run shows its value alone). UA, MIA-efficacy, "
        "RA and TA in percent. avg. gap = mean absolute difference to retrain over UA, MIA-efficacy, RA and TA, "
        "computed per seed against the same seed's retrain, then mean ± std over seeds (lower is better, as in "
        "SalUn); the original model, trained once, is compared with every seed's retrain. RTE = wall-clock "
        "seconds of the training step (for the original model: pretraining). Peak GPU memory is that of the "
        "training step's own process ('-' when it ran on CPU).",
    ]
    if spec.random_fraction is not None:
        lines.append("Random forgetting: retrain's UA is about its test error, so a high UA is not the goal here; "
                     "read every metric as a gap to retrain.")
    return lines


def write_markdown(path, title, spec, rows):
    table_rows = []
    for row in rows:
        cells = {"method": row["method"], "n": row["n"]}
        for key in STAT_KEYS:
            cells[key] = format_stat(row[key], DIGITS.get(key, 2))
        if row["method"] == "retrain":
            cells["avg_gap"] = "0 (reference)"
        table_rows.append(cells)
    text = "\n\n".join([f"# {title}", *notes(spec), common.markdown_table(table_rows, TABLE_COLUMNS)])
    path.write_text(text + "\n")


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
    figure.savefig(path, dpi=110)


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
    figure.savefig(path, dpi=110)
    return figure


def write_results(arch, preset, spec, data_label):
    """Rebuild results/{stem}.json, .md and the two plots from the runs on file; returns the stem's path."""
    runs = load_runs(arch, preset, spec)
    if not runs:
        return None
    order = {method: i for i, method in enumerate(method_order({run["method"] for run in runs}))}
    runs.sort(key=lambda run: (order[run["method"]], run["seed"]))
    rows = summarize(runs)
    title = header(arch, preset, spec, runs, data_label)
    stem = common.RESULTS_DIR / results_stem(arch, preset, spec)
    common.write_json(stem.with_suffix(".json"), {"header": title, "notes": notes(spec), "arch": arch,
                                                  "preset": preset, "forget": spec.to_dict(), "summary": rows,
                                                  "runs": runs})
    write_markdown(stem.with_suffix(".md"), title, spec, rows)
    plot_metrics(stem.with_name(f"{stem.name}_metrics.png"), title, rows)
    plot_tradeoff(stem.with_name(f"{stem.name}_tradeoff.png"), title, rows)
    return stem


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv):
    parser = common.make_parser(__doc__)
    parser.add_argument("--arch", nargs="+", choices=common.ARCHS, default=list(common.ARCHS),
                        help="models to run (default: resnet50 vit)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                        help=f"unlearning scripts {{METHOD}}.py to run, e.g. {' '.join(BASELINES)} "
                             f"(default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                        help="seeds of retrain and every method (default: 0 1 2; 0 under the CPU smoke fallback)")
    parser.add_argument("--preset", choices=common.PRESETS,
                        help="full: the paper's settings; smoke: tiny models on a few images per class "
                             "(default: full on a GPU, smoke on CPU)")
    parser.add_argument("--data", default="data", help="folder holding cifar-10-batches-py (default: data)")
    parser.add_argument("--data-label", default=DEFAULT_DATA_LABEL,
                        help=f"name of the data set in table headers (default: {DEFAULT_DATA_LABEL})")
    common.add_forget_arguments(parser)
    common.add_device_argument(parser)
    parser.add_argument("--force", action="store_true",
                        help="rerun runs that are done (the original model is re-evaluated, not retrained)")
    return parser.parse_args(argv)


def resolve_defaults(args):
    """Fill in --preset and --seeds from the device, saying so when the CPU fallback applies."""
    on_gpu = torch.device(args.device).type == "cuda"
    if args.preset is None and not on_gpu:
        print("No GPU found: running the smoke preset (tiny models, a few images per class, seed 0) on CPU; "
              "pass --preset full for the paper's settings.")
        args.preset = "smoke"
        args.seeds = args.seeds or list(SMOKE_FALLBACK_SEEDS)
    elif args.preset == "full" and not on_gpu:
        print("warning: --preset full on CPU will be very slow (days); a GPU is expected.", file=sys.stderr)
    args.preset = args.preset or "full"
    args.seeds = list(dict.fromkeys(args.seeds or DEFAULT_SEEDS))
    args.arch = list(dict.fromkeys(args.arch))
    args.methods = list(dict.fromkeys(args.methods))


def main(argv=None):
    args = parse_args(argv)
    spec = common.forget_spec_from_args(args) or common.ForgetSpec()
    check_methods(args.methods)
    resolve_defaults(args)
    runs = plan(args, spec)
    print(f"{len(runs)} runs: {' '.join(args.arch)} x seeds {' '.join(map(str, args.seeds))} x "
          f"retrain {' '.join(args.methods)}, preset {args.preset}, forget {forget_description(spec)}, "
          f"device {common.device_name(args.device)}")
    data_cache = {}
    written = []
    for i, run in enumerate(runs, start=1):
        print(f"[{i}/{len(runs)}] {run} ...", end=" ", flush=True)
        print(execute(run, args, spec, data_cache), flush=True)
        if i == len(runs) or runs[i].arch != run.arch:
            written.append(write_results(run.arch, args.preset, spec, args.data_label))
    for stem in filter(None, written):
        print(f"wrote {stem}.json, {stem}.md, {stem}_metrics.png, {stem}_tradeoff.png")
    return written


if __name__ == "__main__":
    common.cli(main)
