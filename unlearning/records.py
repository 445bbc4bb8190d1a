"""Run records: what produced a run (its fingerprint), the schema a record on file must meet, and reading it;
and the bench records the sweep's time estimates read.

A run whose record matches the current plan (PLAN_KEYS of its fingerprint) is done, with or without its checkpoint.
"""
import ast
import functools
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from .checkpoints import device_name, library_versions
from .datasets import DATASET_NAMES
from .errors import DamagedFile
from .models import ARCHS, pretrain_recipe
from .settings import PAPER_RECIPE, PRESETS, REPOSITORY, preset_recipe

# What a record must share with the plan to be reused; a difference in any of them makes it stale. Code
# version, device and library versions are recorded and shown in the tables, but do not make a record stale.
PLAN_KEYS = ("data", "original", "recipe", "flags")
BENCH_DIR = Path("bench")


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
        done = subprocess.run(["git", *command], cwd=REPOSITORY, capture_output=True, text=True, check=True)
        return done.stdout.strip()
    digest = hashlib.sha256()
    code = [*REPOSITORY.glob("*.py"), *REPOSITORY.glob("unlearning/*.py"), REPOSITORY / "requirements.txt"]
    for path in sorted(code):
        if path.is_file():
            digest.update(f"{path.relative_to(REPOSITORY).as_posix()}\0".encode() + path.read_bytes() + b"\0")
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
    for node in ast.parse((REPOSITORY / script).read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "RECIPE" for target in node.targets):
            return ast.literal_eval(node.value)
    return PAPER_RECIPE


def recipe(run, preset):
    """The training recipe the run's script resolves for the sweep's flags: a benchmark's recipe for the run, else
    the pretraining recipe or the method script's own, with the preset's overrides."""
    if run.recipe is not None:
        base = run.recipe
    else:
        base = pretrain_recipe(run.arch, run.dataset) if run.from_scratch else script_recipe(run.script)
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
RECORD_OPTIONAL = {"dataset": one_of(DATASET_NAMES), "peak_gpu_mem_mb": or_none(within(0, math.inf)),
                   "probe_UA": or_none(within(0, 100, nan=True)), "probe_TA": or_none(within(0, 100, nan=True)),
                   "CKA_forget": or_none(within(-1, 1.001, nan=True)),
                   "CKA_retain": or_none(within(-1, 1.001, nan=True)), "relearn_steps": or_none(whole_number),
                   "device": or_none(of_type(str, "a device name")), "created": or_none(of_type(str, "a date")),
                   "model_sha256": sha256_check, "curve": of_type(list, "a list of points"),
                   # a run trained with --compile: the warm-up's compile seconds, compilations, recompilations, and
                   # compilations inside the timed block
                   "compile_s": SECONDS, "compiles": whole_number, "recompiles": whole_number,
                   "late_compiles": whole_number}


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
