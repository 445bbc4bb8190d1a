"""Benchmark: wall time of the default CPU smoke sweep, `python reproduce.py`, and where it went.

    python bench/smoke_sweep.py --data data                           # this tree, 3 sweeps
    python bench/smoke_sweep.py --data data --base /tmp/base --repeats 3   # and another checkout, interleaved

Each sweep runs `python reproduce.py --data DATA` from a tree in a fresh empty folder (nothing on file, so every
step trains), with --base's sweeps interleaved with this tree's so that both see the same load on a shared machine.
Prints per tree: the median wall seconds of the sweep, of `import common` (python -X importtime), the sum of RTEs,
where the time went (the records' "time" parts, where the tree writes them) and the largest fixed cost of a method
step (its seconds beyond its RTE and its evaluation); then whether the tables' metric columns (UA, MIA-efficacy, RA,
TA, avg. gap: everything but RTE and peak memory) are identical between the trees and across repeats.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMING_COLUMNS = ("RTE s", "peak GPU MB")
PARTS = ("training_s", "evaluation_s", "startup_s", "waiting_s", "other_s")


def import_seconds(tree):
    """Seconds `import common` takes in tree (python -X importtime, cumulative)."""
    finished = subprocess.run([sys.executable, "-X", "importtime", "-c", "import common"], cwd=tree,
                              capture_output=True, text=True, check=True)
    line = next(line for line in reversed(finished.stderr.splitlines()) if line.rstrip().endswith("| common"))
    return int(line.split("|")[1]) / 1e6


def metric_columns(markdown):
    """{method: [metric cells]} of a results table, without its timing columns."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    keep = [i for i, name in enumerate(header) if name not in TIMING_COLUMNS]
    rows = {}
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = [cells[i] for i in keep]
    return rows


def one_sweep(tree, data):
    """Wall seconds, tables' metric columns and run records of `python reproduce.py` from tree in a fresh folder."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        finished = subprocess.run([sys.executable, str(Path(tree) / "reproduce.py"), "--data", str(data)], cwd=folder,
                                  capture_output=True, text=True)
        wall = time.perf_counter() - start
        if finished.returncode:
            sys.exit(f"{tree}: reproduce.py failed:\n{finished.stderr[-2000:]}")
        tables = {path.name: metric_columns(path.read_text()) for path in sorted(Path(folder, "results").glob("*.md"))}
        records = [json.loads(path.read_text()) for path in sorted(Path(folder, "results/runs").glob("*.json"))]
    printed = [line for line in finished.stdout.splitlines() if line.startswith("sweep: ")]
    if printed:
        print(f"    {printed[-1]}")
    return wall, tables, records


def summary(name, sweeps, imports):
    walls = [wall for wall, _, _ in sweeps]
    rte = statistics.median(sum(record["RTE_s"] for record in records) for _, _, records in sweeps)
    print(f"{name}: sweep wall {statistics.median(walls):.1f} s (median of {', '.join(f'{w:.1f}' for w in walls)}); "
          f"import common {statistics.median(imports):.2f} s; sum of RTEs {rte:.1f} s")
    timed = [records for _, _, records in sweeps if all("time" in record for record in records)]
    if not timed:
        return
    parts = {key: statistics.median(sum(record["time"][key] for record in records) for records in timed)
             for key in PARTS}
    print("  the runs' time (medians): " + ", ".join(f"{key.removesuffix('_s')} {value:.1f} s"
                                                      for key, value in parts.items()))
    fixed = [max(record["time"]["startup_s"] + record["time"]["other_s"] for record in records
                 if record["method"] not in ("original", "retrain")) for records in timed]
    mean_fixed = [statistics.fmean(record["time"]["startup_s"] + record["time"]["other_s"] for record in records
                                   if record["method"] not in ("original", "retrain")) for records in timed]
    print(f"  fixed cost of a method step beyond its RTE and evaluation: largest {statistics.median(fixed):.2f} s, "
          f"mean {statistics.median(mean_fixed):.2f} s (medians over sweeps)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data", help="folder holding cifar-10-batches-py (default: data)")
    parser.add_argument("--base", help="another checkout of this project to compare with (e.g. an older commit)")
    parser.add_argument("--repeats", type=int, default=3, help="sweeps per tree (default: 3)")
    args = parser.parse_args()
    data = Path(args.data).resolve()
    trees = {"this tree": ROOT, **({"base": Path(args.base).resolve()} if args.base else {})}
    sweeps = {name: [] for name in trees}
    imports = {name: [] for name in trees}
    for repeat in range(args.repeats):
        for name, tree in (trees.items() if repeat % 2 == 0 else reversed(trees.items())):
            imports[name].append(import_seconds(tree))
            sweeps[name].append(one_sweep(tree, data))
            print(f"  sweep {repeat + 1}/{args.repeats} of {name}: {sweeps[name][-1][0]:.1f} s (load average "
                  f"{os.getloadavg()[0]:.1f})", flush=True)
        compare(trees, sweeps, imports, args.base)  # after every repeat, so that a bench cut short still says it


def compare(trees, sweeps, imports, base):
    for name in trees:
        summary(name, sweeps[name], imports[name])
    tables = {name: [table for _, table, _ in runs] for name, runs in sweeps.items()}
    repeatable = all(all(table == runs[0] for table in runs) for runs in tables.values())
    print(f"metric columns identical across repeats: {'yes' if repeatable else 'NO'}")
    if base and tables["base"]:
        same = tables["this tree"][0] == tables["base"][0]
        print(f"metric columns identical to base's: {'yes' if same else 'NO'}")
        if not same:
            for table, rows in tables["this tree"][0].items():
                base_rows = tables["base"][0].get(table, {})
                for method in rows:
                    if rows[method] != base_rows.get(method):
                        print(f"  {table} {method}: {rows[method]} vs base {base_rows.get(method)}")
    if Path("/proc/loadavg").exists():
        print(f"load average now: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}", flush=True)


if __name__ == "__main__":
    main()
