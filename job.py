"""One short, time-limited GPU job: get the data, torch-pruning, a bench record for this device, then the sweep while
time lasts; what must come back is gathered into one folder. Built for machines that keep nothing between jobs, have
no network and return only a few files (a SLURM job with a time limit, for instance).

    python job.py --data-archive cifar-10-python.tar.gz --time-limit 540 --gather $OUT
    python job.py --data-command "python .data/cifar10_unpack.py --pack .data/cifar10_jpeg.npz --out data" \\
        --data-label "CIFAR-10 (JPEG copy)" --wheels .whl --time-limit 540 --gather $OUT -- --arch resnet50
    python job.py --time-limit 540 --gather $OUT --dry-run     # print the plan, run nothing
    python job.py --restore returned/job-results.tar.gz       # at home: put the records back, then commit them

Steps (each one's output is logged under .job/; a failing or cut step never stops the gathering):
  1. data: --data if it already holds cifar-10-batches-py; else unpack --data-archive (the official
     cifar-10-python.tar.gz) into it, or run --data-command (a leading `python` means this interpreter).
  2. torch-pruning: if it does not import, pip-install the wheels in --wheels (offline, --no-deps) into .job/site,
     which every later step gets on its path. Without it only physical pruning and MAC counts are missing.
  3. bench: `bench.py --epochs 1` into bench/{device}-{preset}/ when no bench record of this device and preset is on
     file; stopped after --bench-limit seconds (the rows measured by then are kept).
  4. sweep: `reproduce.py --time-budget S` with S = what is left of --time-limit minus --reserve, plus every argument
     after `--`; stopped (SIGTERM, then SIGKILL) if it runs into the reserve.
  5. gather into --gather, at most 8 files of at most 16 MiB: job-results.tar.gz (every file under results/ and
     bench/ that this job wrote or changed: run records, tables, plots, bench records; never weights), tables.md
     (those tables as plain text) and the logs job.log, setup.log, bench.log, reproduce.log.

The exit status is 0 when every step did its work or simply ran out of time, 1 when a step failed.
"""
import functools
import hashlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import common
import sweep

ROOT = Path(__file__).resolve().parent
BENCH = [sys.executable, str(ROOT / "bench.py")]
REPRODUCE = [sys.executable, str(ROOT / "reproduce.py")]
PRUNING_MODULE = "torch_pruning"
JOB_DIR = Path(".job")
LOGS = ("setup.log", "bench.log", "reproduce.log")
ARCHIVE = "job-results.tar.gz"
OFFICIAL_LABEL = "CIFAR-10"  # what --data-archive holds: the official archive's pixels
GATHERED_FOLDERS = ("results", "bench")
NEVER_GATHERED = (".pth", ".pt", ".tmp", ".lock")  # weights, half-written files, the sweep's unit locks
MAX_FILE_BYTES = 16 * 2**20
TAR_HEADER_BYTES = 1024  # about what a tar member adds to its file: a header and padding
KILL_GRACE_S = 10  # between SIGTERM and SIGKILL of a step
MIN_BENCH_S = 30  # less time than this left for bench.py: skip it
LEFT_LINES = 12  # lines of the sweep's output quoted in the summary (what it ran and what is left)


class JobStopped(Exception):
    """SIGTERM or Ctrl-C reached the job: stop the running step, then gather."""


def _raise_stopped(signum, frame):
    raise JobStopped(signal.Signals(signum).name)


def parse_args(argv):
    argv = [str(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    sweep_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = common.make_parser(__doc__)
    parser.add_argument("--data", default="data", help="folder that holds or receives cifar-10-batches-py "
                                                       "(default: data)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data-archive", metavar="TAR_GZ",
                        help="the official cifar-10-python.tar.gz, unpacked into --data when the data is not there")
    source.add_argument("--data-command", metavar="COMMAND",
                        help="a command that writes cifar-10-batches-py into --data when it is not there")
    parser.add_argument("--data-label", help="name of the data set for the tables and the bench record (default: "
                                             f"{OFFICIAL_LABEL} with --data-archive, else the scripts' own)")
    parser.add_argument("--wheels", metavar="DIR", help="folder of wheels (torch-pruning) installed when "
                                                        "torch_pruning does not import")
    parser.add_argument("--time-limit", type=common.positive_float, metavar="SECONDS",
                        help="the job's time, counted from the start of job.py (default: no limit)")
    parser.add_argument("--reserve", type=common.nonnegative_float, default=60, metavar="SECONDS",
                        help="time kept back from the sweep for stopping it (SIGTERM, then SIGKILL 10 s later) "
                             "and gathering (default: 60)")
    parser.add_argument("--bench", default="auto", choices=("auto", "always", "never"),
                        help="auto: run bench.py when no record of this device and preset is on file (default)")
    parser.add_argument("--bench-limit", type=common.nonnegative_float, default=180, metavar="SECONDS",
                        help="the most time bench.py gets (default: 180)")
    parser.add_argument("--preset", choices=common.PRESETS,
                        help="preset of bench.py and reproduce.py (default: full with a GPU, smoke without)")
    parser.add_argument("--gather", metavar="DIR", help="folder that receives what must come back")
    parser.add_argument("--dry-run", action="store_true", help="print what the job would do, run nothing")
    parser.add_argument("--restore", metavar="ARCHIVE",
                        help="unpack a gathered job-results.tar.gz (or the folder holding it) into this repository")
    args = parser.parse_args(argv)
    args.sweep_args = sweep_args
    if args.data_archive and not args.data_label:
        args.data_label = OFFICIAL_LABEL
    if args.gather and Path(args.gather).is_file():
        parser.error(f"--gather {args.gather} is a file; give a folder")
    return args


# --------------------------------------------------------------------------------------------- the job

def process_age():
    """Seconds since this process started (Linux; 0 elsewhere), so that interpreter start-up and imports count
    against --time-limit too."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return max(float(Path("/proc/uptime").read_text().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


class Job:
    """The clock, the log and the environment shared by the steps."""

    def __init__(self, args, started=None):
        self.args = args
        self.start = time.monotonic() if started is None else started
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.status = {}  # step -> one line for the summary
        self.failed = []
        JOB_DIR.mkdir(exist_ok=True)
        for name in ("job.log", *LOGS):
            (JOB_DIR / name).write_text("")

    def elapsed(self):
        return time.monotonic() - self.start

    def left(self):
        """Seconds left of --time-limit (infinite without one)."""
        return float("inf") if self.args.time_limit is None else self.args.time_limit - self.elapsed()

    def say(self, line):
        print(line, flush=True)
        with open(JOB_DIR / "job.log", "a") as log:
            log.write(line + "\n")

    def record(self, step, line, failed=False):
        self.status[step] = line
        if failed:
            self.failed.append(step)
        self.say(f"{step}: {line}")

    def run(self, command, log_name, timeout=None):
        """Run command with its output copied to stdout and .job/{log_name}. Past timeout seconds it gets SIGTERM,
        then SIGKILL. Returns (exit status, seconds, whether it was stopped for time)."""
        started = time.monotonic()
        with open(JOB_DIR / log_name, "a") as log:
            log.write(f"$ {shlex.join(map(str, command))}\n")
            log.flush()
            process = subprocess.Popen(list(map(str, command)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, env=self.env, start_new_session=True)
            copier = threading.Thread(target=_copy_lines, args=(process.stdout, log), daemon=True)
            copier.start()
            try:
                process.wait(timeout=None if timeout in (None, float("inf")) else max(timeout, 0))
                stopped = False
            except subprocess.TimeoutExpired:
                _stop(process)
                stopped = True
            except BaseException:
                _stop(process)
                raise
            finally:
                copier.join(timeout=5)
        return process.returncode, time.monotonic() - started, stopped


def _copy_lines(stream, log):
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        log.write(line)
        log.flush()


def _stop(process):
    """SIGTERM to the step's whole process group, SIGKILL after KILL_GRACE_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


# ------------------------------------------------------------------------------------------- the steps

def has_cifar(folder):
    return all((folder / name).is_file() for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"])


def interpreter_command(text):
    """shlex-split text, with a leading python/python3 replaced by this interpreter."""
    words = shlex.split(text)
    if words and re.fullmatch(r"python(3(\.\d+)?)?", words[0]):
        words[0] = sys.executable
    return words


def get_data(job):
    args = job.args
    folder = Path(args.data) / "cifar-10-batches-py"
    if has_cifar(folder):
        return job.record("data", f"found {folder}")
    if args.dry_run:
        how = (f"unpack {args.data_archive} into {args.data}" if args.data_archive else
               f"run {shlex.join(interpreter_command(args.data_command))}" if args.data_command else "nothing to do it")
        return job.record("data", f"{folder} missing: would {how}")
    started = time.monotonic()
    if args.data_archive:
        archive = Path(args.data_archive)
        if not archive.is_file() or not tarfile.is_tarfile(archive):
            return job.record("data", f"{archive} is not a tar archive such as cifar-10-python.tar.gz "
                                      f"(for another pack use --data-command)", failed=True)
        with tarfile.open(archive) as tar:
            tar.extractall(args.data, filter="data")
        how = f"unpacked {archive}"
    elif args.data_command:
        status, _, stopped = job.run(interpreter_command(args.data_command), "setup.log", job.left())
        if status != 0:
            return job.record("data", f"--data-command failed (exit {status}{', out of time' if stopped else ''}; "
                                      f"see setup.log)", failed=True)
        how = "ran --data-command"
    else:
        return job.record("data", f"no CIFAR-10 under {folder}: give --data-archive or --data-command", failed=True)
    if not has_cifar(folder):
        return job.record("data", f"{how}, but {folder} still lacks data_batch_1..5 and test_batch", failed=True)
    job.record("data", f"{how} into {args.data} ({time.monotonic() - started:.1f} s)")


def ensure_torch_pruning(job):
    """Install the carried wheels when torch_pruning does not import; later steps get them on PYTHONPATH."""
    if importlib.util.find_spec(PRUNING_MODULE) is not None:
        return job.record("torch-pruning", "present")
    missing = "physical pruning unavailable, MACs not counted"
    if not job.args.wheels:
        return job.record("torch-pruning", f"missing and no --wheels: {missing}")
    wheels = sorted(Path(job.args.wheels).glob("*.whl"))
    if not wheels:
        return job.record("torch-pruning", f"no *.whl in {job.args.wheels}: {missing}", failed=True)
    site = (JOB_DIR / "site").resolve()
    if job.args.dry_run:
        return job.record("torch-pruning", f"missing: would install {len(wheels)} wheel(s) into {site}")
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
               "--disable-pip-version-check", "--quiet", "--upgrade", "--target", site, *wheels]
    status, seconds, _ = job.run(command, "setup.log", job.left())
    if status != 0:
        return job.record("torch-pruning", f"pip failed (exit {status}; see setup.log): {missing}", failed=True)
    sys.path.insert(0, str(site))
    job.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), job.env.get("PYTHONPATH")]))
    importlib.invalidate_caches()
    if importlib.util.find_spec(PRUNING_MODULE) is None:
        return job.record("torch-pruning", f"installed {len(wheels)} wheel(s), but {PRUNING_MODULE} is still not "
                                           f"there: {missing}", failed=True)
    job.record("torch-pruning", f"installed {len(wheels)} wheel(s) from {job.args.wheels} ({seconds:.1f} s)")


def detect_device(job):
    """(device name as the scripts record it, whether CUDA is there), asked in a short child process so that this
    process never holds GPU memory."""
    code = ("import json, torch; cuda = torch.cuda.is_available(); "
            "print(json.dumps([torch.cuda.get_device_name(0) if cuda else 'cpu', cuda]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=job.env)
    if done.returncode != 0:
        raise common.UserError(f"cannot ask torch for the device: {done.stderr.strip().splitlines()[-1:]}")
    name, cuda = json.loads(done.stdout.strip().splitlines()[-1])
    return name, cuda


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def bench_records(device, preset):
    """{path: whether complete} of the bench records measured on device with preset (sweep.bench_records)."""
    return {path: record.get("complete", True) for path, record in sweep.bench_records(device, preset).items()}


def bench_command(args, device, preset):
    command = [*BENCH, "--preset", preset, "--data", args.data, "--epochs", 1,
               "--out", sweep.BENCH_DIR / f"{slug(device)}-{preset}"]
    return command + (["--data-label", args.data_label] if args.data_label else [])


def run_bench(job, device, preset):
    args = job.args
    on_file = bench_records(device, preset)
    if args.bench == "never":
        return job.record("bench", "skipped (--bench never)")
    if on_file and args.bench == "auto":
        incomplete = "" if any(on_file.values()) else " (stopped early: --bench always runs it again)"
        return job.record("bench", f"on file for {device}, preset {preset}: "
                                   f"{', '.join(map(str, on_file))}{incomplete}")
    timeout = min(args.bench_limit, job.left() - args.reserve)
    command = bench_command(args, device, preset)
    if args.dry_run:
        return job.record("bench", f"would run for at most {timeout:.0f} s: {shlex.join(map(str, command))}")
    if timeout < MIN_BENCH_S:
        return job.record("bench", f"skipped: {max(timeout, 0):.0f} s left for it")
    out = command[command.index("--out") + 1]
    run_step(job, "bench", command, "bench.log", timeout,
             stopped=f"stopped at its {timeout:.0f} s limit; the rows measured by then are in {out}",
             done=f"ran in {{seconds:.0f}} s -> {out}")


def run_step(job, step, command, log_name, timeout, stopped, done):
    """Run a step's command and record how it ended: stopped and done are texts formatted with its seconds."""
    status, seconds, was_stopped = job.run(command, log_name, timeout)
    if was_stopped:
        job.record(step, stopped.format(seconds=seconds))
    elif status != 0:
        job.record(step, f"failed (exit {status}) after {seconds:.0f} s; see {log_name}", failed=True)
    else:
        job.record(step, done.format(seconds=seconds))


def sweep_command(args, preset, budget):
    """reproduce.py with the time budget (none without --time-limit) and the arguments given after --."""
    command = [*REPRODUCE] + (["--time-budget", int(budget)] if budget != float("inf") else [])
    command += ["--preset", preset, "--data", args.data]
    return command + (["--data-label", args.data_label] if args.data_label else []) + args.sweep_args


def run_sweep(job, preset):
    args = job.args
    budget = job.left() - args.reserve
    command = sweep_command(args, preset, budget)
    if args.dry_run:
        return job.record("sweep", f"would run (budget as if it started now): {shlex.join(map(str, command))}")
    if budget < 1:
        return job.record("sweep", f"not started: {max(job.left(), 0):.0f} s left, {args.reserve:.0f} s of it "
                                   f"reserved for gathering")
    # past its budget the sweep may still be finishing a unit: it is stopped halfway into the reserve, in time to
    # end (SIGTERM, then SIGKILL) and be gathered
    run_step(job, "sweep", command, "reproduce.log", max(budget, job.left() - args.reserve / 2 - KILL_GRACE_S),
             stopped="stopped after {seconds:.0f} s, past its time budget; its finished records are kept",
             done="reproduce.py exited 0 after {seconds:.0f} s")


# ------------------------------------------------------------------------------------------- gathering

def fingerprints():
    """{path: sha1} of every file under the gathered folders."""
    found = {}
    for folder in GATHERED_FOLDERS:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                found[path] = hashlib.sha1(path.read_bytes()).hexdigest()
    return found


def gather_priority(path):
    """Run records first, then bench records, tables, and plots last."""
    if path.parts[:2] == ("results", "runs"):
        return 0
    if path.parts[0] == "bench":
        return 1
    return 3 if path.suffix == ".png" else 2


def changed_files(before):
    changed = [path for path, digest in fingerprints().items() if before.get(path) != digest
               and path.suffix not in NEVER_GATHERED and not path.name.startswith(".")]
    return sorted(changed, key=lambda path: (gather_priority(path), str(path)))


def gather(job, before):
    """Copy what must come back into --gather: the archive of changed records, tables.md and the logs."""
    folder = Path(job.args.gather)
    folder.mkdir(parents=True, exist_ok=True)
    changed = changed_files(before)
    packed, left_out, size = [], [], 0
    for path in changed:
        cost = path.stat().st_size + TAR_HEADER_BYTES
        if size + cost > MAX_FILE_BYTES - 64 * 1024:  # room for the end-of-archive blocks and gzip's framing
            left_out.append(path)
            continue
        packed.append(path)
        size += cost
    written = []
    if packed:
        tmp = folder / f".{ARCHIVE}.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for path in packed:
                tar.add(path)
        os.replace(tmp, folder / ARCHIVE)
        written.append(f"{ARCHIVE} ({len(packed)} files, {(folder / ARCHIVE).stat().st_size / 2**20:.2f} MiB)")
    tables = [path for path in packed if path.suffix == ".md"]
    if tables:
        text = "\n\n".join(f"<!-- {path} -->\n{path.read_text()}" for path in tables)
        _write_tail(folder / "tables.md", text.encode())
        written.append(f"tables.md ({len(tables)} table{'s' if len(tables) != 1 else ''})")
    for name in LOGS:
        if (JOB_DIR / name).stat().st_size:
            _write_tail(folder / name, (JOB_DIR / name).read_bytes())
            written.append(name)
    if left_out:
        job.say(f"left out of {ARCHIVE} (over {MAX_FILE_BYTES // 2**20} MiB): {' '.join(map(str, left_out))}")
    return written


def _write_tail(path, data):
    """Write data, keeping only its last MAX_FILE_BYTES."""
    path.write_bytes(data[-MAX_FILE_BYTES:])


def summarize(job, gathered):
    job.say("")
    job.say(f"== job summary ({job.elapsed():.0f} s" + (f" of {job.args.time_limit:.0f} s)" if job.args.time_limit
                                                        else ")"))
    for step, line in job.status.items():
        job.say(f"{step:>14}: {line}")
    log = JOB_DIR / "reproduce.log"
    tail = log.read_text().strip().splitlines()[-LEFT_LINES:] if log.stat().st_size else []
    if tail:
        job.say("end of the sweep's output (what it ran, what is left):")
        for line in tail:
            job.say(f"    {line}")
    if gathered is not None:
        job.say(f"gathered into {job.args.gather}: {', '.join(gathered + ['job.log']) if gathered else 'job.log'}")
        if any(item.startswith(ARCHIVE) for item in gathered):
            job.say(f"at home: python job.py --restore {Path(job.args.gather) / ARCHIVE}, then commit results/ "
                    f"and bench/")
    job.say("status: " + (f"failed ({', '.join(job.failed)})" if job.failed else "ok"))


def run_job(args, started=None):
    job = Job(args, started)
    before = fingerprints()
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        get_data(job)
        if "data" not in job.failed:
            ensure_torch_pruning(job)
            device, cuda = detect_device(job)
            preset = args.preset or ("full" if cuda else "smoke")
            job.record("device", f"{device}, preset {preset}")
            run_bench(job, device, preset)
            run_sweep(job, preset)
    except JobStopped as stop:  # the scheduler's time limit, most often: not a failure of the job
        job.record("stopped", f"{stop} after {job.elapsed():.0f} s: gathering what finished")
    except Exception as error:  # whatever went wrong, what finished is still gathered
        job.record("error", f"{type(error).__name__}: {error}", failed=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    gathered = gather(job, before) if args.gather and not args.dry_run else None
    summarize(job, gathered)
    if gathered is not None:
        _write_tail(Path(args.gather) / "job.log", (JOB_DIR / "job.log").read_bytes())
    return 1 if job.failed else 0


# --------------------------------------------------------------------------------------------- restore

def restore(archive):
    """Unpack a gathered archive's results/ and bench/ files into the current folder."""
    archive = Path(archive)
    if archive.is_dir():
        archive = archive / ARCHIVE
    if not archive.is_file() or not tarfile.is_tarfile(archive):
        raise common.UserError(f"{archive} is not a {ARCHIVE} gathered by job.py")
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in members:
            parts = Path(member.name).parts
            if not member.isfile() or not parts or parts[0] not in GATHERED_FOLDERS or ".." in parts:
                raise common.UserError(f"{archive} holds {member.name!r}, outside {' and '.join(GATHERED_FOLDERS)}/: "
                                       f"not restoring anything")
        tar.extractall(".", members=members, filter="data")
    for member in members:
        print(f"restored {member.name}")
    print(f"{len(members)} files restored; commit them: git add {' '.join(GATHERED_FOLDERS)} && git commit")
    return 0


def main(argv=None, started=None):
    """Run the job (or --restore); started: time.monotonic() of the job's start (default: now)."""
    args = parse_args(argv)
    if args.restore:
        return restore(args.restore)
    return run_job(args, started)


if __name__ == "__main__":
    sys.exit(common.cli(functools.partial(main, started=time.monotonic() - process_age())))
