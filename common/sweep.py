"""The sweep's units, run records and their fingerprints, used by reproduce.py.

    python reproduce.py --list-units                          # every unit of the sweep, in priority order
    python reproduce.py --units resnet50-s0-retrain           # run one unit
    python reproduce.py --time-budget 540                     # start units only while they fit in 9 minutes

A unit is one (arch, seed) half of the comparison that needs nothing from any other unit: "methods"
pretrains that seed's own original model, runs every method from it and evaluates each checkpoint;
"retrain" retrains from scratch on the retain set and evaluates it. Each run leaves a small JSON record in
results/runs/ (metrics, timing and a fingerprint of what produced it); checkpoints are a by-product. A run
whose record matches the current plan is done, with or without its checkpoint.
"""
import ast
import contextlib
import functools
import gc
import hashlib
import io
import json
import math
import os
import runpy
import socket
import statistics
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import representation
from .checkpoints import device_name, library_versions, weights_path
from .data import data_key, shared_data
from .errors import DamagedFile, UserError
from .files import create_new, write_error, write_json
from .measure import Measure
from .metrics import resolved
from .processes import start_child
from .scripts import nested_cli
from .settings import ARCHS, PAPER_RECIPE, PRESETS, PRETRAIN_RECIPES, RESULTS_DIR, preset_recipe

ROOT = Path(__file__).resolve().parent.parent  # the repository: the scripts and requirements.txt
RUNS_DIR = RESULTS_DIR / "runs"
LOCKS_DIR = RESULTS_DIR / "locks"
# What a record must share with the plan to be reused; a difference in any of them makes it stale. Code
# version, device and library versions are recorded and shown in the tables, but do not make a record stale.
PLAN_KEYS = ("data", "original", "recipe", "flags")
# Seconds a run is expected to take (training and evaluation) before one of its kind was timed on this
# device: conservative guesses per preset and arch, for --time-budget.
DEFAULT_RUN_SECONDS = {
    ("full", "resnet50"): {"scratch": 1800, "method": 300},
    ("full", "vit"): {"scratch": 3600, "method": 300},
    ("smoke", "resnet50"): {"scratch": 60, "method": 30},
    ("smoke", "vit"): {"scratch": 60, "method": 30},
}
BENCH_DIR = Path("bench")
# Estimates from bench.py's rows: its runs are short and warmed up, so the training and evaluation time they
# give is multiplied by this factor, and a run's own set-up (checkpoint loading, model build, warm-up, saving),
# which no bench row times, is added. Steps run in the sweep's process: imports and the data are paid once.
BENCH_SAFETY_FACTOR = 1.25
RUN_START_SECONDS = 3
# Where a run's wall time went, the keys of a record's "time" (seconds; they add up to its "seconds"), with the
# words reproduce.py prints. Evaluation that ran in the background while the next step trained is not on the list
# (it took no wall time of the sweep's): "background_evaluation_s" says how long it took.
TIME_PARTS = {"training_s": "training", "evaluation_s": "evaluation", "startup_s": "start-up and data",
              "waiting_s": "waiting", "other_s": "other"}
OUTPUT_TAIL_LINES = 25
CHILD_EXIT_WAIT_S = 10


# ------------------------------------------------------------------------------------------ units

def forget_flags(spec):
    if spec.random_fraction is not None:
        return ["--forget-random", str(spec.random_fraction), "--forget-seed", str(spec.seed)]
    return ["--forget-class", *map(str, spec.classes), "--forget-seed", str(spec.seed)]


def results_stem(arch, preset, spec):
    """{arch}[-smoke][_{forget tag}], named like the checkpoints; the default forget setting is unmarked."""
    return weights_path(arch, "", preset, spec).stem.removesuffix("_")


@dataclass
class Run:
    """One step of a unit: the script that makes a checkpoint, its flags, and the record of its metrics."""
    arch: str
    method: str
    seed: int
    script: str
    checkpoint: Path
    record: Path
    plan_flags: list  # what the run is: part of its fingerprint
    io_flags: list  # where it reads and writes: not part of it

    def __str__(self):
        return f"{self.arch} {self.method} seed {self.seed}"

    @property
    def from_scratch(self):
        return self.method in ("original", "retrain")


@dataclass
class Unit:
    """kind "methods": the seed's original model, then each method from it; kind "retrain": retrain alone."""
    arch: str
    seed: int
    kind: str
    runs: list = field(default_factory=list)

    @property
    def name(self):
        return unit_name(self.arch, self.seed, self.kind)


def unit_name(arch, seed, kind):
    return f"{arch}-s{seed}-{kind}"


def make_run(arch, method, seed, args, spec):
    """The run of method (original, retrain or an unlearning script) for arch and seed under args."""
    checkpoint = weights_path(arch, method, args.preset, spec, seed)
    plan_flags = ["--arch", arch, "--preset", args.preset, "--seed", str(seed)]
    io_flags = ["--data", str(args.data), "--device", args.device, "--out", str(checkpoint)]
    if method == "original":
        script = "pretrain.py"
    else:
        script = f"{method}.py"
        plan_flags += forget_flags(spec)
        if method != "retrain":
            io_flags += ["--weights", str(weights_path(arch, "original", args.preset, spec, seed))]
    return Run(arch, method, seed, script, checkpoint, RUNS_DIR / f"{checkpoint.stem}.json", plan_flags, io_flags)


def plan_units(args, spec):
    """Every unit in priority order: resnet50 before vit, seeds in order, a seed's methods unit before its retrain."""
    units = []
    for arch in sorted(args.arch, key=ARCHS.index):
        for seed in sorted(args.seeds):
            methods = Unit(arch, seed, "methods", [make_run(arch, m, seed, args, spec)
                                                   for m in ["original", *args.methods]])
            units += [methods, Unit(arch, seed, "retrain", [make_run(arch, "retrain", seed, args, spec)])]
    return units


def select_units(units, names):
    """The units called names (all when names is None), in priority order; an unknown name is an error."""
    if names is None:
        return units
    known = {unit.name for unit in units}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UserError(f"unknown unit {unknown[0]!r} for these flags; `--list-units` lists them: "
                        f"{' '.join(unit.name for unit in units)}")
    return [unit for unit in units if unit.name in names]


# ------------------------------------------------------------------------------------- fingerprints

def data_sha256(data):
    """sha256 of the images and labels of both splits, as the runs see them (after the preset's subset)."""
    digest = hashlib.sha256()
    for tensor in (data.train_images, data.train_labels, data.test_images, data.test_labels):
        digest.update(tensor.cpu().contiguous().numpy())
    return digest.hexdigest()


def model_sha256(checkpoint):
    """sha256 of a checkpoint's weights (names and bytes, in name order), whatever else its file holds; a file that
    does not load as a checkpoint (truncated, overwritten) is a DamagedFile error naming it."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)["model"]
        digest = hashlib.sha256()
        for name in sorted(state):
            digest.update(name.encode())
            digest.update(state[name].contiguous().view(-1).view(torch.uint8).numpy())
    except Exception as error:
        raise DamagedFile(f"checkpoint {checkpoint} is damaged ({type(error).__name__}): delete it, and the sweep "
                          f"trains it again") from None
    return digest.hexdigest()


@functools.cache
def code_version():
    """{"commit", "dirty", "sha256"} of the repository's code: the scripts, the common package, requirements.txt.
    commit and dirty (such a file differs from the commit or is untracked; tests do not count) come from git, None
    outside a git checkout (e.g. a copy of the tree without .git); sha256 hashes those files themselves, so a
    record made from such a copy still names its code: the commit whose files hash the same."""
    def git(*command):
        return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("*.py"), *ROOT.glob("common/*.py"), ROOT / "requirements.txt"]):
        if path.is_file():
            digest.update(f"{path.relative_to(ROOT).as_posix()}\0".encode() + path.read_bytes() + b"\0")
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--", "*.py", "requirements.txt", ":(exclude)tests"))
    except (OSError, subprocess.CalledProcessError):
        commit = dirty = None
    return {"commit": commit, "dirty": dirty, "sha256": digest.hexdigest()}


@functools.cache
def script_recipe(script):
    """A method script's own RECIPE (the baselines'), read from its source since nothing imports a method script;
    else the paper's recipe."""
    for node in ast.parse((ROOT / script).read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "RECIPE" for target in node.targets):
            return ast.literal_eval(node.value)
    return PAPER_RECIPE


def recipe(run, preset):
    """The training recipe the run's script resolves for the sweep's flags: the pretraining recipe, or the method
    script's own, with the preset's overrides."""
    base = PRETRAIN_RECIPES[run.arch] if run.from_scratch else script_recipe(run.script)
    return preset_recipe(base, preset, run.from_scratch)


def fingerprint(run, preset, data_hash, data_label, device, original_hash=None):
    """What produced a run: the plan's part (PLAN_KEYS) and the circumstances (code, device, libraries)."""
    return {"data": {"sha256": data_hash, "label": data_label}, "original": original_hash,
            "recipe": recipe(run, preset), "flags": [run.script, *run.plan_flags], "code": code_version(),
            "device": device_name(device), "versions": library_versions()}


def differences(record, expected):
    """The PLAN_KEYS in which record's fingerprint differs from the expected one (all of them without one)."""
    recorded = record.get("fingerprint")
    if not isinstance(recorded, dict):
        return list(PLAN_KEYS)
    plan = {**expected, "data": expected["data"]["sha256"]}
    recorded = {**recorded, "data": (recorded.get("data") or {}).get("sha256")}
    return [key for key in PLAN_KEYS if recorded.get(key) != plan[key]]


# ------------------------------------------------------------------------------------------ records

def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def within(low, high, nan=False):
    """A check: a finite number in [low, high] (or NaN when nan is true)."""
    def check(value):
        if is_number(value) and (math.isfinite(value) and low <= value <= high or nan and math.isnan(value)):
            return None
        return f"a number in [{low:g}, {high:g}]" + (" or NaN" if nan else "")
    return check


def one_of(allowed):
    return lambda value: None if value in allowed else f"one of: {', '.join(allowed)}"


def of_type(types, text):
    return lambda value: None if isinstance(value, types) and not isinstance(value, bool) else text


def or_none(check):
    return lambda value: None if value is None else check(value) and f"{check(value)} or null"


def whole_number(value):
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else "a whole number >= 0"


def fingerprint_check(value):
    ok = isinstance(value, dict) and isinstance(value.get("data"), dict)
    return None if ok else "an object with the data, original model, recipe and flags"


def sha256_check(value):
    ok = isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    return None if ok else "a sha256 hex digest"


PERCENT = within(0, 100)
SECONDS = within(0, math.inf)
# What a run record holds ({key: check}, a check returning None or what the value should be); optional keys are
# checked when present, since runs record more with --probe, --cka and --relearn. The four metrics are finite:
# the forget, retain and test sets of a run are never empty.
RECORD_REQUIRED = {"arch": one_of(ARCHS), "method": of_type(str, "a method name"), "seed": whole_number,
                   "preset": one_of(PRESETS), "forget": of_type(str, "a forget tag"), "UA": PERCENT,
                   "RA": PERCENT, "TA": PERCENT, "MIA_efficacy": PERCENT, "RTE_s": SECONDS, "seconds": SECONDS,
                   "fingerprint": fingerprint_check}
RECORD_OPTIONAL = {"peak_gpu_mem_mb": or_none(within(0, math.inf)), "probe_UA": or_none(within(0, 100, nan=True)),
                   "probe_TA": or_none(within(0, 100, nan=True)), "CKA_forget": or_none(within(-1, 1.001, nan=True)),
                   "CKA_retain": or_none(within(-1, 1.001, nan=True)), "relearn_steps": or_none(whole_number),
                   "device": or_none(of_type(str, "a device name")), "created": or_none(of_type(str, "a date")),
                   "model_sha256": sha256_check, "curve": of_type(list, "a list of points")}


def record_problem(record):
    """What is wrong with a parsed run record (e.g. "UA is missing", "UA is 150 (should be a number in [0, 100])"),
    None when it is whole."""
    if not isinstance(record, dict):
        return f"it holds a {type(record).__name__}, not a run record"
    required = {**RECORD_REQUIRED, **({"model_sha256": sha256_check} if record.get("method") == "original" else {})}
    for key, check in {**RECORD_OPTIONAL, **required}.items():
        if key not in record:
            if key in required:
                return f"{key} is missing"
            continue
        expected = check(record[key])
        if expected:
            return f"{key} is {json.dumps(record[key])[:40]} (should be {expected})"
    return None


def read_record(path):
    """The run record at path, or None when there is none; one that cannot be read, or that breaks its schema
    (RECORD_REQUIRED, RECORD_OPTIONAL), is a DamagedFile error naming it and what to do."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        problem = record_problem(record)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        problem = f"unreadable ({type(error).__name__})"
    if problem:
        error = DamagedFile(f"run record {path} is damaged: {problem}; restore it (git checkout -- {path}), or "
                            f"rerun with --rerun-stale to run it again")
        error.problem = f"run record {path} is damaged: {problem}"
        raise error from None
    return record


def bench_records(device, preset):
    """{path: record} of the bench records (BENCH_DIR/**/results.json) measured on device with preset. A record that
    cannot be read as one is skipped with a one-line warning."""
    found = {}
    for path in sorted(BENCH_DIR.glob("**/results.json")):
        try:
            record = json.loads(path.read_text())
            if (record["device"], record["preset"]) == (device, preset):
                found[path] = record
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            warn_bench_record_skipped(path, error)
    return found


def warn_bench_record_skipped(path, error):
    print(f"warning: bench record {path} skipped: not readable as one ({type(error).__name__}: {error})",
          file=sys.stderr)


def bench_speeds(device, preset):
    """{(arch, task, method): images/s} of the project-loop rows of every bench record measured on device with
    preset (bench_records), the slowest where rows repeat; method is None but for task "unlearn". A record whose
    rows cannot be read is skipped with a one-line warning."""
    speeds = {}
    for path, record in bench_records(device, preset).items():
        try:
            found = {}
            for row in record["rows"]:
                speed = float(row["images_per_s"])
                if not (math.isfinite(speed) and speed > 0):
                    raise ValueError(f"images/s {speed}")
                key = (row["arch"], row["task"], row.get("method"))
                if row["style"] == "project":
                    found[key] = min(speed, found.get(key, speed))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            warn_bench_record_skipped(path, error)
            continue
        for key, speed in found.items():
            speeds[key] = min(speed, speeds.get(key, speed))
    return speeds


# ----------------------------------------------------------------------------------------- locks

class UnitLock:
    """A lock file holding pid, host and SLURM job id; `acquire()` returns None on success, else a description of
    the holder.

    The lock is created whole or not at all (files.create_new: written aside, then hard-linked into place), so a
    lock file is never empty or half-written, and a creation that fails (a full disk) leaves nothing. A lock that
    names a dead process on this host or an earlier attempt of this same SLURM job (requeued, perhaps on another
    node), or that is empty or unreadable (damaged: no process of this project leaves one so), is taken over, with
    a line saying so."""

    def __init__(self, path):
        self.path = Path(path)
        self.held = False

    def _read(self):
        """(the lock's bytes or None when unreadable, its holder or None when damaged); None when there is none."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            return None, None
        try:
            holder = json.loads(raw)
        except ValueError:
            return raw, None
        if isinstance(holder, dict) and isinstance(holder.get("pid"), int) and isinstance(holder.get("host"), str):
            return raw, holder
        return raw, None

    def _why_stale(self, raw, holder):
        """Why the lock may be taken over; None when its holder may be alive."""
        if holder is None:
            return "it is unreadable" if raw is None else "it is empty" if not raw.strip() else "it is damaged"
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job") == job:
            return f"it names an earlier attempt of this SLURM job ({job})"
        if holder["host"] != socket.gethostname():
            return None
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return f"it names pid {holder['pid']} on this host, which is no longer running"
        except (PermissionError, OverflowError):
            return None
        return None

    def acquire(self):
        content = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "slurm_job": os.environ.get("SLURM_JOB_ID"),
                              "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        for _ in range(3):
            if create_new(self.path, content):
                self.held = True
                return None
            found = self._read()
            if found is None:
                continue  # released in the meantime
            raw, holder = found
            why = self._why_stale(raw, holder)
            if why is None:
                return f"{self.path} by pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
            if self._take_over(raw):
                print(f"taking over the lock {self.path}: {why}", flush=True)
        return f"{self.path} (contended)"

    def _take_over(self, raw):
        """Remove the stale lock whose bytes were raw, unless another process replaced it in the meantime."""
        moved = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return False
        except OSError as error:
            raise write_error(self.path, error) from None
        try:
            if raw is not None and moved.read_bytes() != raw:
                os.replace(moved, self.path)  # a live lock: put it back
                return False
        except OSError:
            pass
        moved.unlink(missing_ok=True)
        return True

    def release(self):
        if self.held:
            try:
                self.path.unlink(missing_ok=True)
            except OSError as error:  # e.g. the folder became read-only: the lock is taken over once we are gone
                print(f"warning: cannot remove the lock {self.path}: {error.strerror}", file=sys.stderr)
            self.held = False


def unit_lock(unit, preset, spec):
    return UnitLock(LOCKS_DIR / f"{results_stem(unit.arch, preset, spec)}_s{unit.seed}-{unit.kind}.lock")


# ------------------------------------------------------------------------------------ running units

def run_child(command):
    """Run command to its end; (exit status, output). On Ctrl-C or SIGTERM the child is terminated first; when
    this process dies otherwise (SIGKILL), the child stops too (processes.start_child)."""
    process = start_child(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate()
    except BaseException:
        process.terminate()
        try:
            process.wait(CHILD_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise
    return process.returncode, output


def run_script(script, flags):
    """Run ROOT/script in a fresh Python process; a failure shows the end of its output and stops the sweep."""
    command = [sys.executable, str(ROOT / script), *map(str, flags)]
    status, output = run_child(command)
    if status != 0:
        raise step_failed(" ".join(command[1:]), status, output)


def step_failed(command, status, output):
    """Print the end of a failed step's output; the UserError that stops the sweep."""
    tail = (output or "").strip().splitlines()[-OUTPUT_TAIL_LINES:]
    print("\n".join(f"    {line}" for line in tail), file=sys.stderr)
    return UserError(f"{command} failed with exit status {status} (output above)")


def run_in_process(script, flags):
    """Run ROOT/script's command line in this process, as `python script flags` would, its output held back; a
    failure (an exit status, a UserError, any exception) shows the end of that output and stops the sweep with a
    UserError. Ctrl-C and SIGTERM pass through to the caller. Returns the wall seconds of the step and of its
    set-up (until its training started: Measure.latest), the latter None when it never trained."""
    argv, saved_argv, output = [str(ROOT / script), *map(str, flags)], sys.argv, io.StringIO()
    status, start, sys.argv = 0, time.perf_counter(), argv
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output), nested_cli():
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, int | None):
            print(stop.code, file=output)
    except Exception as error:  # a crash of the script: its traceback from the script on, as `python script` prints
        frames = error.__traceback__
        while frames.tb_next is not None and frames.tb_frame.f_code.co_filename != argv[0]:
            frames = frames.tb_next
        traceback.print_exception(type(error), error, frames, file=output)
        status = 1
    finally:
        sys.argv = saved_argv
    seconds = time.perf_counter() - start
    if status != 0:
        raise step_failed(f"{script} {' '.join(map(str, flags))}", status, output.getvalue())
    latest = Measure.latest
    return seconds, latest.began - start if latest is not None and latest.began >= start else None


def free_memory():
    """Drop what a finished step and its evaluation left behind (the step's model and optimizer sit in reference
    cycles), so that the next step's peak GPU memory is its own. What outlives the collection (the imported
    libraries, above all) is frozen out of the next ones, which then take milliseconds rather than a second;
    frozen objects are still freed when their last reference goes."""
    gc.collect()
    gc.freeze()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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


class Sweep:
    """The records on file checked against the plan of one reproduce.py call, and the runs that make them.

    A unit's steps run one after another in this process (the data read and put on the device once, by
    reproduce.py) unless args.step_processes asks for a process per step. With args.overlap_evaluation the MIA's
    and the probe's fits of one step run in a worker thread while the next step trains."""

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
        data = self.data_cache[(self.args.data, self.args.preset)]
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
        data = self.data_cache[(self.args.data, self.args.preset)]
        with shared_data() as cache, ThreadPoolExecutor(1, thread_name_prefix="evaluation") as pool:
            cache[data_key(self.args.data, self.args.preset, self.args.device)] = data
            try:
                for run in unit.runs:
                    if run.method == "original" and run not in todo:
                        original_hash = self.original_hash(unit.arch, unit.seed)
                    if (run.from_scratch and run not in todo
                            or not run.from_scratch and not self.needs_run(run, original_hash)):
                        print(f"  {run}: record on file, done", flush=True)
                        continue
                    print(f"  {run} ...", flush=True)
                    step = self.train_and_evaluate(run, original_hash, pool)
                    if run.method == "original":
                        original_hash = step.record["model_sha256"]
                    if previous is not None:  # its evaluation had this step's training to finish in
                        done.append(self.finish(previous))
                        previous = None
                    if self.overlap:
                        previous = step
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
        if getattr(self.args, "step_processes", False):
            step_start = time.perf_counter()
            run_script(run.script, [*run.plan_flags, *run.io_flags])
            step_seconds, startup = time.perf_counter() - step_start, None
        else:
            step_seconds, startup = run_in_process(run.script, [*run.plan_flags, *run.io_flags])
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
        return Step(run, record, times, futures, durations)

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
        data_only = {(self.args.data, self.args.preset): self.data_cache[(self.args.data, self.args.preset)]}
        options = {**self.representation_options(run), **({"submit": submit} if submit else {})}
        metrics = representation.evaluate_checkpoint(run.checkpoint, self.args.data, self.args.device, self.spec,
                                                     run.seed, data_only, **options)
        meta = torch.load(run.checkpoint, map_location="cpu", weights_only=True, mmap=True)["meta"]
        record = {**metrics, "unit": unit_name(run.arch, run.seed, "retrain" if run.method == "retrain" else "methods"),
                  "device": meta.get("device"), "created": meta.get("created"), "data_label": self.args.data_label,
                  "fingerprint": self.expected(run, None if run.from_scratch else original_hash)}
        if run.method == "original":
            record["model_sha256"] = model_sha256(run.checkpoint)
        if meta.get("curve"):
            record["curve"] = meta["curve"]  # pretrain/retrain: test accuracy and images/s during training
        return record
