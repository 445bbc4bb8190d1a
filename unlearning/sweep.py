"""The sweep behind reproduce.py: the records on file checked against the plan, and the units' runs that make them.

    python reproduce.py --list-units                          # every unit of the sweep, in priority order
    python reproduce.py --units resnet50-s0-retrain           # run one unit
    python reproduce.py --time-budget 540                     # start units only while they fit in 9 minutes

Units and their runs are planned in units.py, records read and fingerprinted in records.py, units locked in
locks.py and steps run by runners.py; this module drives them.
"""
import functools
import statistics
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from . import representation
from .checkpoints import device_name
from .data import data_key, shared_data
from .errors import DamagedFile
from .files import write_json
from .measure import before_timing
from .metrics import resolved
from .records import (
    bench_speeds,
    code_version,
    differences,
    fingerprint,
    model_sha256,
    read_record,
    recipe,
)
from .runners import free_memory, run_in_process, run_script
from .tracking import activate, open_run
from .units import RUNS_DIR, Run, make_run, unit_name

# Seconds a run is expected to take (training and evaluation) before one of its kind was timed on this
# device: conservative guesses per preset and arch, for --time-budget.
DEFAULT_RUN_SECONDS = {
    ("full", "resnet18"): {"scratch": 3600, "method": 300},
    ("full", "resnet50"): {"scratch": 1800, "method": 300},
    ("full", "vgg16_bn"): {"scratch": 3600, "method": 300},
    ("full", "vit"): {"scratch": 3600, "method": 300},
    ("smoke", "resnet18"): {"scratch": 60, "method": 30},
    ("smoke", "resnet50"): {"scratch": 60, "method": 30},
    ("smoke", "vgg16_bn"): {"scratch": 60, "method": 30},
    ("smoke", "vit"): {"scratch": 60, "method": 30},
}
# Estimates from bench.py's rows: its runs are short and warmed up, so the training and evaluation time they
# give is multiplied by this factor, and a run's own set-up (checkpoint loading, model build, warm-up, saving),
# which no bench row times, is added. Steps run in the sweep's process: imports and the data are paid once.
BENCH_SAFETY_FACTOR = 1.25
RUN_START_SECONDS = 3
# Where a run's wall time went, the keys of a record's "time" (seconds; they add up to its "seconds"), with the
# words reproduce.py prints. Evaluation that ran in the background while the next step set up is not on the list
# (it took no wall time of the sweep's): "background_evaluation_s" says how long it took; what the next step waited
# for it before its timed block is in that step's start-up.
TIME_PARTS = {"training_s": "training", "evaluation_s": "evaluation", "startup_s": "start-up and data",
              "waiting_s": "waiting", "other_s": "other"}


def time_line(parts, seconds, background=0.0):
    """"12.3 s: training 5.0, evaluation 2.1, ..." of a TIME_PARTS dict."""
    text = f"{seconds:.1f} s: " + ", ".join(f"{word} {parts.get(key, 0.0):.1f}" for key, word in TIME_PARTS.items())
    return text + (f" (and {background:.1f} s of evaluation in the background)" if background else "")


@dataclass
class Step:
    """A trained run whose evaluation may still be finishing in the background: what its record needs."""
    run: Run
    record: dict  # metrics (some of them Futures while the background evaluation runs), fingerprint, ...
    times: dict  # TIME_PARTS so far, and wall_s: the step's and its evaluation's wall seconds
    futures: list
    durations: list  # seconds each background task took, once it has finished
    tracker: object = None  # --track: the run's, closed once its record is written


class Sweep:
    """The records on file checked against the plan of one reproduce.py call, and the runs that make them.

    A unit's steps run one after another in this process (the data read and put on the device once, by
    reproduce.py) unless args.step_processes asks for a process per step. With args.overlap_evaluation the MIA's
    and the probe's fits of one step run in a worker thread while the next step sets up (loads, warms up); they
    are finished before its timed block starts (Measure.before_timing), so that no RTE holds them."""

    def __init__(self, args, spec, data_hash, data_cache):
        self.args, self.spec, self.data_hash, self.data_cache = args, spec, data_hash, data_cache
        self.kept = []  # records written by this call
        self.times = dict.fromkeys(TIME_PARTS, 0.0)  # over every run of this call, and the units' own other time
        self.background_s = 0.0
        self.damaged = set()  # damaged files on file that this call runs again

    def say_once(self, path, text):
        if path not in self.damaged:
            self.damaged.add(path)
            print(text, flush=True)

    def redo_damaged(self, path, problem):
        """Under --force or --rerun-stale a damaged record counts as missing, so its run is redone (said once);
        otherwise it is an error."""
        if not (self.args.force or getattr(self.args, "rerun_stale", False)):
            return False
        self.say_once(path, f"{problem}: running it again")
        return True

    def read(self, path):
        """read_record(path), or None for a damaged record that redo_damaged says to run again."""
        try:
            return read_record(path)
        except DamagedFile as damaged:
            if self.redo_damaged(path, damaged.problem):
                return None
            raise

    def records(self):
        """{path: record} of every run record on file, less the damaged ones run again."""
        return {path: record for path in sorted(RUNS_DIR.glob("*.json")) if (record := self.read(path)) is not None}

    def checkpoint_hash(self, path):
        """model_sha256(path), or None for a damaged checkpoint: the sweep made it, so it trains it again."""
        try:
            return model_sha256(path)
        except DamagedFile:
            self.say_once(path, f"checkpoint {path} is damaged (it does not load): training it again")
            return None

    @property
    def data_key(self):
        """The key of the sweep's data in data_cache, as evaluation.evaluate_checkpoint keys it."""
        return self.args.data, self.args.preset, self.args.dataset

    @property
    def overlap(self):
        return getattr(self.args, "overlap_evaluation", False)

    def expected(self, run, original_hash=None):
        return fingerprint(run, self.args.preset, self.data_hash, self.args.data_label, self.args.device,
                           original_hash)

    def check(self, run, original_hash=None):
        """Plan keys in which run's record differs from the plan (None: no record), for a method run against
        the original model of that hash."""
        record = self.read(run.record)
        return None if record is None else differences(record, self.expected(run, original_hash))

    def original_hash(self, arch, seed):
        """The model hash in the record of the original model of arch and seed, if that record matches the plan."""
        original = make_run(arch, "original", seed, self.args, self.spec)
        record = self.read(original.record)
        if record is None or differences(record, self.expected(original)):
            return None
        return record.get("model_sha256")

    def check_on_file(self, run):
        """check(run) against the original model recorded on file for a method run."""
        return self.check(run, None if run.from_scratch else self.original_hash(run.arch, run.seed))

    def needs_run(self, run, original_hash=None):
        return self.args.force or self.check(run, original_hash) != []

    def stale(self, units):
        """[(run, keys)] of records that differ from the plan in data, recipe or flags. A method run whose
        original model alone differs is not listed: its unit reruns it, as a resumed unit must."""
        found = []
        for unit in units:
            for run in unit.runs:
                keys = [key for key in self.check_on_file(run) or [] if key != "original"]
                if keys:
                    found.append((run, keys))
        return found

    def reused_from_elsewhere(self, units):
        """Runs of units whose records match the plan but were made by other code, on another device, with other
        library versions or under another data label: reused, and worth a word."""
        now = self.expected(units[0].runs[0]) if units else {}
        found = []
        for unit in units:
            for run in unit.runs:
                if self.check_on_file(run) != []:
                    continue
                recorded = read_record(run.record)["fingerprint"]
                if (any(recorded.get(key) != now[key] for key in ("code", "device", "versions"))
                        or recorded["data"].get("label") != now["data"]["label"]):
                    found.append(run)
        return found

    def pending(self, unit):
        """The runs of unit that will train: those without a matching record (all under --force). A method
        run needs its original model's checkpoint: when that is not the recorded one, the original is trained
        again, and every method of the unit is counted, since a new original makes their records stale."""
        if unit.kind == "retrain":
            return [run for run in unit.runs if self.needs_run(run)]
        original, methods = unit.runs[0], unit.runs[1:]
        recorded = None if self.args.force else self.original_hash(unit.arch, unit.seed)
        todo = [run for run in methods if self.needs_run(run, recorded)]
        if recorded is None or (todo and not (original.checkpoint.is_file()
                                              and self.checkpoint_hash(original.checkpoint) == recorded)):
            return unit.runs
        return todo

    def estimate(self, runs, records):
        """(seconds, source) expected for runs. A run is expected to take the mean of the earlier runs of its kind
        timed on this device (pretrain and retrain share their timings: the same recipe), else what this device's
        bench record gives (bench_seconds), else DEFAULT_RUN_SECONDS; source names those used, e.g. "records +
        bench"."""
        device = device_name(self.args.device)
        total, sources = 0.0, set()
        for run in runs:
            same_kind = ("original", "retrain") if run.from_scratch else (run.method,)
            timed = [record["seconds"] for record in records.values()
                     if record.get("method") in same_kind and record.get("arch") == run.arch
                     and record.get("preset") == self.args.preset and record.get("device") == device
                     and isinstance(record.get("seconds"), (int, float))]
            if timed:
                seconds, source = statistics.fmean(timed), "records"
            elif (seconds := self.bench_seconds(run)) is not None:
                source = "bench"
            else:
                seconds = DEFAULT_RUN_SECONDS[(self.args.preset, run.arch)]["scratch" if run.from_scratch else "method"]
                source = "default"
            total += seconds
            sources.add(source)
        return total, " + ".join(source for source in ("records", "bench", "default") if source in sources)

    @functools.cached_property
    def bench_speeds(self):
        return bench_speeds(device_name(self.args.device), self.args.preset)

    def bench_seconds(self, run):
        """Seconds run is expected to take from this device's bench rows, None without the rows it needs: its
        epochs over the training images at the measured images/s (pretraining for a from-scratch run; for a
        method, its own unlearning rows or else the slowest method's), plus evaluating the train and test
        images, times BENCH_SAFETY_FACTOR, plus RUN_START_SECONDS."""
        data = self.data_cache[self.data_key]
        train_images, test_images = len(data.train_labels), len(data.test_labels)
        epochs = recipe(run, self.args.preset)["epochs"]
        if run.from_scratch:
            speed = self.bench_speeds.get((run.arch, "pretrain", None))
        else:
            methods = {method: speed for (arch, task, method), speed in self.bench_speeds.items()
                       if arch == run.arch and task == "unlearn"}
            speed = methods.get(run.method, min(methods.values(), default=None))
        evaluate_speed = self.bench_speeds.get((run.arch, "evaluate", None))
        if speed is None or evaluate_speed is None:
            return None
        seconds = epochs * train_images / speed + (train_images + test_images) / evaluate_speed
        return BENCH_SAFETY_FACTOR * seconds + RUN_START_SECONDS

    def run_unit(self, unit):
        """Train and evaluate what unit still needs, writing one record per run; prints a line per run and where
        the unit's time went.

        Each method run is checked against the original model as it is once that has run: a retrained
        original that came out the same (CPU training is deterministic) keeps its methods' records. A step that
        fails or is interrupted still lets the record of the step before it be written."""
        start = time.perf_counter()
        free_memory()
        todo = self.pending(unit)
        original_hash, previous, done = None, None, []
        data = self.data_cache[self.data_key]
        background = []  # the futures of the fits running in the background

        def finish_background_fits():  # none runs while a step is timed: it would slow the step, not the method
            wait(background)
        with (shared_data() as cache, ThreadPoolExecutor(1, thread_name_prefix="evaluation") as pool,
              before_timing(finish_background_fits)):
            cache[data_key(self.args.data, self.args.preset, self.args.device, self.args.dataset)] = data
            try:
                for run in unit.runs:
                    if run.method == "original" and run not in todo:
                        original_hash = self.original_hash(unit.arch, unit.seed)
                    if (run.from_scratch and run not in todo
                            or not run.from_scratch and not self.needs_run(run, original_hash)):
                        print(f"  {run}: record on file, done", flush=True)
                        continue
                    print(f"  {run} ...", flush=True)
                    if getattr(self.args, "step_processes", False):
                        finish_background_fits()  # the step's process cannot wait for them before its timed block
                    step = self.train_and_evaluate(run, original_hash, pool)
                    if run.method == "original":
                        original_hash = step.record["model_sha256"]
                    if previous is not None:  # its evaluation had this step's training to finish in
                        done.append(self.finish(previous))
                        previous = None
                    if self.overlap:
                        previous, background[:] = step, step.futures
                    else:
                        done.append(self.finish(step))
            finally:
                if previous is not None:
                    done.append(self.finish(previous))
                if done:
                    self.report_unit(unit, done, time.perf_counter() - start)

    def train_and_evaluate(self, run, original_hash, pool):
        """Run's step, then its evaluation: the forward passes here, the MIA's and probe's fits in pool when
        overlapping (else here too). A Step whose record finish() completes."""
        start = time.perf_counter()
        tracker = self.open_tracker(run)
        try:
            if getattr(self.args, "step_processes", False):  # the child's training is not tracked, only the end
                step_start = time.perf_counter()
                run_script(run.script, [*run.plan_flags, *run.io_flags])
                step_seconds, startup = time.perf_counter() - step_start, None
            else:
                with activate(tracker):
                    step_seconds, startup = run_in_process(run.script, [*run.plan_flags, *run.io_flags])
        except BaseException:
            tracker.close()  # what the step logged before it failed is kept
            raise
        futures, durations = [], []

        def submit(function, *args):
            def timed():
                begin = time.perf_counter()
                try:
                    return function(*args)
                finally:
                    durations.append(time.perf_counter() - begin)
            futures.append(pool.submit(timed))
            return futures[-1]

        evaluate_start = time.perf_counter()
        record = self.evaluate(run, original_hash, submit if self.overlap else None)
        evaluation = time.perf_counter() - evaluate_start
        free_memory()
        rte = record.get("RTE_s") or 0.0
        startup = step_seconds - rte if startup is None else startup  # a process per step: all of it but training
        times = {"training_s": rte, "evaluation_s": evaluation, "startup_s": startup, "waiting_s": 0.0,
                 "wall_s": time.perf_counter() - start}
        return Step(run, record, times, futures, durations, tracker)

    def finish(self, step):
        """Wait for step's background evaluation, then write its record (its timing in "seconds" and "time")."""
        waited = time.perf_counter()
        wait(step.futures)
        waiting = time.perf_counter() - waited
        record, background = resolved(step.record), sum(step.durations)
        times = {**step.times, "waiting_s": waiting}
        seconds = times.pop("wall_s") + waiting
        times["other_s"] = max(seconds - sum(times[key] for key in TIME_PARTS if key != "other_s"), 0.0)
        record["seconds"] = seconds
        record["time"] = {**{key: round(times[key], 3) for key in TIME_PARTS},
                          "background_evaluation_s": round(background, 3)}
        write_json(step.run.record, record)
        self.kept.append(step.run.record)
        if step.tracker is not None:
            step.tracker.log_final(record)
            step.tracker.close()
        print(f"  {step.run}: {seconds:.1f} s (RTE {record['RTE_s']:.1f} s)", flush=True)
        return record

    def report_unit(self, unit, records, seconds):
        """Print where the unit's time went, and add it to the sweep's: the runs' parts, and the unit's own checks
        (records, lock, hashes) as other."""
        parts = {key: sum(record["time"][key] for record in records) for key in TIME_PARTS}
        parts["other_s"] += max(seconds - sum(parts.values()), 0.0)
        background = sum(record["time"]["background_evaluation_s"] for record in records)
        for key, value in parts.items():
            self.times[key] += value
        self.background_s += background
        print(f"  {unit.name}: {time_line(parts, seconds, background)}", flush=True)

    def open_tracker(self, run):
        """The run's tracker under --track (one that logs nothing otherwise), named like its record; W&B groups the
        sweep's runs by preset and forget setting."""
        def settings():
            return {"arch": run.arch, "method": run.method, "seed": run.seed, "preset": self.args.preset,
                    "forget": self.spec.tag, "dataset": self.args.dataset,
                    "data_label": self.args.data_label, "recipe": recipe(run, self.args.preset),
                    "flags": [run.script, *run.plan_flags], "code": code_version()}
        group = f"reproduce{'-smoke' if self.args.preset == 'smoke' else ''}_{self.spec.tag}"
        return open_run(self.args, run.record.stem, settings, group)

    def representation_options(self, run):
        """representation.evaluate_checkpoint's options: the --probe/--cka/--relearn flags, and as the original
        model that of the run's own seed (for retrain, only when its methods unit has made it)."""
        args = self.args
        original = make_run(run.arch, "original", run.seed, args, self.spec).checkpoint
        return {"probe": args.probe, "cka": args.cka, "relearn": args.relearn,
                "relearn_fraction": args.relearn_fraction, "relearn_max_steps": args.relearn_max_steps,
                "originals": (str(original),) if original.is_file() else ()}

    def evaluate(self, run, original_hash, submit=None):
        """The record of a freshly trained run: metrics, fingerprint, and for the original its model hash. With
        submit, the MIA's and probe's fits go through it and the record holds their Futures (see finish). Each
        evaluation loads the original model it compares with afresh, so that none stays on the device."""
        data_only = {self.data_key: self.data_cache[self.data_key]}
        options = {**self.representation_options(run), **({"submit": submit} if submit else {})}
        metrics = representation.evaluate_checkpoint(run.checkpoint, self.args.data, self.args.device, self.spec,
                                                     run.seed, data_only, **options,
                                                     described={"dataset": self.args.dataset})
        meta = torch.load(run.checkpoint, map_location="cpu", weights_only=True, mmap=True)["meta"]
        benchmark = getattr(self.args, "benchmark", None)
        kind = "retrain" if run.method == "retrain" else "methods"
        record = {**metrics, "method": run.method, "unit": unit_name(run.arch, run.seed, kind, benchmark),
                  **({"benchmark": benchmark} if benchmark else {}),
                  "device": meta.get("device"), "created": meta.get("created"), "data_label": self.args.data_label,
                  "fingerprint": self.expected(run, None if run.from_scratch else original_hash)}
        if run.method == "original":
            record["model_sha256"] = model_sha256(run.checkpoint)
        if meta.get("curve"):
            record["curve"] = meta["curve"]  # pretrain/retrain: test accuracy and images/s during training
        return record
