"""Run independent units of a sweep in parallel: on every GPU of one machine, or as one SLURM job per unit.

    python reproduce.py --launcher local --workers 4 --gpus 0 1 2 3
    python reproduce.py --launcher slurm --slurm-partition gpu --slurm-time 60 --slurm-gpus 1

A unit is one command (a list of arguments) that can run on its own and resumes from what it left on disk.
A script offers this with two calls:

    launch.add_launcher_arguments(parser)                       # --launcher, --workers, --gpus, --slurm-* ...
    failed = launch.launch_units(args, unit_names, argv_for_unit)

argv_for_unit(name) returns the command that runs that one unit in the foreground (no --launcher flags:
without_launcher_arguments(argv) strips them). launch_units runs every unit, each with its output in
{--log-dir}/{name}.log, shows progress, reports each failure with the end of its log, and returns the
names of the units that failed; the caller rebuilds its tables and exits non-zero when that list is not empty.

local: a pool of --workers processes on this machine. Worker i gets GPU --gpus[i % len(--gpus)] as its only
visible device (CUDA_VISIBLE_DEVICES), so `--device cuda` in a unit means that GPU.
slurm: one submitit job per unit. A job stopped for preemption or its time limit stops its unit, is requeued
and runs the same unit again, which resumes from its records.
"""
import argparse
import os
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from .errors import UserError
from .files import write_error
from .processes import start_child

LAUNCHERS = ("local", "slurm")
LOG_TAIL_LINES = 20
STOP_GRACE_S = 60  # a stopped unit gets this long to finish writing; SLURM signals 90 s before the time limit
REQUEUE_GRACE_S = 60  # under SLURM: how long a unit that died from a signal waits for submitit to requeue the job
POLL_S = 0.2
SLURM_POLL_S = 15
DEFAULT_SLURM_TIME_MIN = 60
DEFAULT_SLURM_CPUS = 8


# -------------------------------------------------------------------------------------- one unit, one process

@dataclass
class UnitJob:
    """One unit: the command that runs it, the file its output is appended to, and environment overrides."""
    name: str
    argv: list
    log: Path
    env: dict = field(default_factory=dict)
    cwd: Path = field(default_factory=Path.cwd)


class UnitCommand:
    """Run a UnitJob as a subprocess; returns its exit status. Also the callable that submitit runs in a job.

    submitit requeues a callable that has a checkpoint() method (its helpers.Checkpointable adds nothing else
    we need, and this module must import without submitit: only --launcher slurm uses it).
    checkpoint() is what submitit calls on preemption or at the time limit: it stops the unit (SIGTERM, so
    the unit keeps what it finished) and resubmits the same unit, which resumes from its records."""

    def __init__(self, job, requeue_grace_s=0.0):
        self.job = job
        self.requeue_grace_s = requeue_grace_s
        self._process = None
        self._stopping = False

    def __call__(self):
        job = self.job
        try:
            job.log.parent.mkdir(parents=True, exist_ok=True)
            log = open(job.log, "a")
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}: {shlex.join(job.argv)}\n")
            log.flush()
        except OSError as error:
            raise write_error(job.log, error) from None
        with log:
            # the unit stops when this process dies, however it dies (processes.start_child)
            self._process = start_child(job.argv, cwd=job.cwd, env={**os.environ, **job.env},
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            if self._stopping:  # stop() came while the process was being started
                self._process.terminate()
            # poll() rather than wait(): checkpoint() runs in a signal handler on this thread, and a blocking
            # wait() here would hold the lock that its own wait needs
            while (status := self._process.poll()) is None:
                time.sleep(POLL_S)
        if status < 0 or status > 128:
            # SLURM signals every process of a preempted or timed-out job, so the unit may die before
            # submitit's handler has requeued the job; give the handler the time to do so
            time.sleep(self.requeue_grace_s)
        return status

    def stop(self, grace_s=STOP_GRACE_S):
        """SIGTERM the running unit, SIGKILL it if it is still running after grace_s seconds."""
        self._stopping = True
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        deadline = time.monotonic() + grace_s
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if process.poll() is None:
            process.kill()

    def checkpoint(self, *args, **kwargs):
        self.stop()
        import submitit
        return submitit.helpers.DelayedSubmission(UnitCommand(self.job, self.requeue_grace_s))

    def __getstate__(self):
        return {**self.__dict__, "_process": None, "_stopping": False}


def log_size(path):
    return path.stat().st_size if path.is_file() else 0


def log_tail(path, offset=0, lines=LOG_TAIL_LINES):
    """The last lines written to path from byte offset on."""
    if not path.is_file():
        return []
    with open(path, "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace").rstrip().splitlines()[-lines:]


def report_failure(job, offset, reason):
    """The end of the unit's log, then one error line."""
    tail = log_tail(job.log, offset)
    if tail:
        tqdm.write(f"{job.name}: last lines of its log:", file=sys.stderr)
        tqdm.write("\n".join(f"    {line}" for line in tail), file=sys.stderr)
    tqdm.write(f"error: unit {job.name} failed: {reason}; full log: {job.log}", file=sys.stderr)



# ----------------------------------------------------------------------------------------------- local

def visible_gpus():
    """The CUDA_VISIBLE_DEVICES values of this machine's usable GPUs, as the driver names them."""
    import torch
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    return [gpu.strip() for gpu in listed.split(",")][:count]


def worker_devices(args):
    """One entry per worker: the GPU it sees (a CUDA_VISIBLE_DEVICES value), or None for a CPU worker."""
    device = str(getattr(args, "device", "") or "")
    if args.gpus and device == "cpu":
        raise UserError("--gpus with --device cpu: leave out --gpus to run CPU workers")
    gpus = args.gpus if args.gpus is not None else ([] if device == "cpu" else visible_gpus())
    if not gpus:
        if args.workers_per_gpu is not None:
            raise UserError("--workers-per-gpu needs GPUs; no GPU is visible (use --workers on CPU)")
        return [None] * (args.workers or 1)
    if device.startswith("cuda:") and device != "cuda:0":
        raise UserError(f"--device {device} with --launcher local: choose GPUs with --gpus; "
                         "each worker sees its GPU as cuda")
    per_gpu = args.workers_per_gpu or 1
    if args.workers is not None and args.workers_per_gpu is not None and args.workers != per_gpu * len(gpus):
        raise UserError(f"--workers {args.workers} and --workers-per-gpu {per_gpu} disagree for "
                         f"{len(gpus)} GPUs; give one of them")
    return [gpus[i % len(gpus)] for i in range(args.workers or per_gpu * len(gpus))]


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM to the launcher stops its units the way Ctrl-C does (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_local(jobs, devices):
    """Run jobs in len(devices) worker processes; returns the names of the jobs that failed.

    devices[i] is what worker i sees: a CUDA_VISIBLE_DEVICES value, or None (the environment as it is)."""
    free_devices = queue.SimpleQueue()
    for device in devices:
        free_devices.put(device)
    threads_each = str(max(1, (os.cpu_count() or 1) // len(devices)))
    running = set()
    stopping = threading.Event()
    offsets = {job.name: log_size(job.log) for job in jobs}

    def work(job):
        device = free_devices.get()
        try:
            env = dict(job.env)
            if device is not None:
                env["CUDA_VISIBLE_DEVICES"] = device
            if "OMP_NUM_THREADS" not in os.environ:  # the workers share the CPU cores instead of each taking all
                env["OMP_NUM_THREADS"] = threads_each
            command = UnitCommand(replace(job, env=env))
            if stopping.is_set():
                return None, device, 0.0
            running.add(command)
            start = time.perf_counter()
            try:
                return command(), device, time.perf_counter() - start
            finally:
                running.discard(command)
        finally:
            free_devices.put(device)

    failed = []
    where = "on CPU" if devices[0] is None else "on GPUs " + " ".join(dict.fromkeys(devices))
    print(f"running {len(jobs)} units, {len(devices)} at a time {where}; logs in {jobs[0].log.parent}/")
    with (sigterm_as_interrupt(), ThreadPoolExecutor(min(len(devices), len(jobs))) as pool,
          tqdm(total=len(jobs), desc="units", unit="unit", file=sys.stderr) as bar):
        futures = {pool.submit(work, job): job for job in jobs}
        try:
            for future in as_completed(futures):
                job = futures[future]
                status, device, seconds = future.result()
                on = "" if device is None else f" on GPU {device}"
                if status == 0:
                    tqdm.write(f"{job.name}: done in {seconds:.0f} s{on}")
                else:
                    failed.append(job.name)
                    report_failure(job, offsets[job.name], f"exit status {status}{on}")
                bar.update()
                bar.set_postfix_str(f"{len(failed)} failed" if failed else "")
        except KeyboardInterrupt:
            stopping.set()
            for future in futures:
                future.cancel()
            stopped = list(running)
            for command in stopped:
                command.stop()
            raise UserError(f"interrupted: stopped {len(stopped)} running units ({len(failed)} had failed); "
                             "their finished work is kept, and the same command resumes them") from None
    return failed


# ----------------------------------------------------------------------------------------------- SLURM

def slurm_parameters(args):
    """submitit.AutoExecutor.update_parameters arguments for the --slurm-* flags (None: the cluster's default)."""
    return {"timeout_min": args.slurm_time, "gpus_per_node": args.slurm_gpus or None, "nodes": 1,
            "tasks_per_node": 1, "cpus_per_task": args.slurm_cpus, "mem_gb": args.slurm_mem,
            "slurm_partition": args.slurm_partition, "slurm_account": args.slurm_account,
            "slurm_additional_parameters": dict(args.slurm_option or []) or None}


def slurm_executor(args, folder, cluster="slurm"):
    """An AutoExecutor writing its files under folder/{job id}; cluster="local" or "debug" runs jobs here."""
    if cluster == "slurm" and shutil.which("srun") is None:
        raise UserError("--launcher slurm needs SLURM: srun is not on PATH (run this on the cluster's login node)")
    try:
        import submitit
    except ImportError:
        raise UserError("--launcher slurm needs submitit: pip install 'submitit>=1.5'") from None
    executor = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster=cluster)
    executor.update_parameters(**slurm_parameters(args))
    return executor


@contextmanager
def importable_here():
    """Jobs unpickle UnitCommand from this module: let them import it whatever their working directory."""
    previous = os.environ.get("PYTHONPATH")
    here = str(Path(__file__).resolve().parent.parent)  # the folder that holds the common package
    os.environ["PYTHONPATH"] = here if not previous else f"{here}{os.pathsep}{previous}"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous


def submit_units(executor, jobs):
    """One job per unit, named after it; returns the submitit jobs in the same order."""
    from submitit.core.utils import FailedSubmissionError, UncompletedJobError
    submitted = []
    with importable_here():
        for job in jobs:
            executor.update_parameters(name=job.name)
            try:
                submitted.append(executor.submit(UnitCommand(job, REQUEUE_GRACE_S)))
            except (UncompletedJobError, FailedSubmissionError) as error:
                lines = [line for line in str(error).splitlines() if line.strip()]
                already = (f"; the {len(submitted)} jobs submitted before it keep running: "
                           f"{' '.join(s.job_id for s in submitted)}") if submitted else ""
                raise UserError(f"submitting unit {job.name} failed: {lines[-1] if lines else error}"
                                 f"{already}") from None
    return submitted


def run_slurm(jobs, executor, poll_s=SLURM_POLL_S):
    """Submit one job per unit and wait for all of them; returns the names of the units that failed."""
    import submitit
    offsets = {job.name: log_size(job.log) for job in jobs}
    submitted = submit_units(executor, jobs)
    unit_of = {id(s): job for s, job in zip(submitted, jobs, strict=True)}
    print(f"submitted {len(jobs)} jobs ({' '.join(s.job_id for s in submitted)}); unit output in "
          f"{jobs[0].log.parent}/, submitit's files in {executor.folder.parent}/{{job id}}/")
    failed = []
    finished = set()
    with tqdm(total=len(jobs), desc="units", unit="unit", file=sys.stderr) as bar:
        try:
            for done in submitit.helpers.as_completed(submitted, poll_frequency=poll_s):
                job = unit_of[id(done)]
                finished.add(id(done))
                error = done.exception()
                status = None if error else done.result()
                if status == 0:
                    tqdm.write(f"{job.name}: done (job {done.job_id})")
                else:
                    failed.append(job.name)
                    reason = f"exit status {status}" if error is None else first_line(error)
                    report_failure(job, offsets[job.name], f"{reason} (job {done.job_id}, submitit's logs in "
                                                           f"{done.paths.folder})")
                bar.update()
                bar.set_postfix_str(f"{len(failed)} failed" if failed else "")
        except KeyboardInterrupt:
            waiting = [s.job_id for s in submitted if id(s) not in finished]
            raise UserError(f"stopped waiting: {len(waiting)} jobs keep running on the cluster "
                             f"({' '.join(waiting)}); scancel stops them") from None
    return failed


def first_line(error):
    """The informative line of a submitit error: the job's own exception, else the first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    raised = [line for line in lines if line.split(":")[0].endswith(("Error", "Exception"))]
    if raised:
        return raised[-1]
    return lines[0] if lines else type(error).__name__


# --------------------------------------------------------------------------------------- the interface

def at_least(minimum):
    """An argparse type: an integer no smaller than minimum."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def key_value(text):
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_launcher_arguments(parser):
    """--launcher and its options, in their own --help group."""
    group = parser.add_argument_group(
        "parallel units (--launcher)",
        "Without --launcher the units run one after another in this process.")
    group.add_argument("--launcher", choices=LAUNCHERS,
                       help="local: worker processes on this machine, one GPU each; "
                            "slurm: one SLURM job per unit through submitit")
    group.add_argument("--log-dir", default="logs", metavar="DIR",
                       help="each unit's output goes to DIR/{unit}.log, submitit's files to DIR/slurm/ "
                            "(default: logs)")
    group.add_argument("--workers", type=at_least(1), metavar="N",
                       help="local: units run at a time (default: one per GPU in --gpus; 1 without a GPU)")
    group.add_argument("--gpus", nargs="+", metavar="GPU",
                       help="local: GPUs given to the workers in turn, as CUDA_VISIBLE_DEVICES names them "
                            "(default: every visible GPU; none with --device cpu)")
    group.add_argument("--workers-per-gpu", type=at_least(1), metavar="K",
                       help="local: workers sharing each GPU (default: 1)")
    group.add_argument("--slurm-partition", metavar="NAME", help="slurm: partition (default: the cluster's)")
    group.add_argument("--slurm-time", type=at_least(1), default=DEFAULT_SLURM_TIME_MIN, metavar="MINUTES",
                       help=f"slurm: time limit of each job; a unit still running then is requeued and resumes "
                            f"(default: {DEFAULT_SLURM_TIME_MIN})")
    group.add_argument("--slurm-gpus", type=at_least(0), default=1, metavar="N",
                       help="slurm: GPUs per job (default: 1)")
    group.add_argument("--slurm-account", metavar="NAME", help="slurm: account charged for the jobs (default: yours)")
    group.add_argument("--slurm-cpus", type=at_least(1), default=DEFAULT_SLURM_CPUS, metavar="N",
                       help=f"slurm: CPU cores per job (default: {DEFAULT_SLURM_CPUS})")
    group.add_argument("--slurm-mem", type=at_least(1), metavar="GB",
                       help="slurm: memory per job in GB (default: the cluster's)")
    group.add_argument("--slurm-option", nargs="+", type=key_value, metavar="KEY=VALUE",
                       help="slurm: any other sbatch option, e.g. qos=high constraint=h100")
    return group


def without_launcher_arguments(argv):
    """argv with every flag of add_launcher_arguments (and its values) removed, in its order otherwise."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_launcher_arguments(parser)
    return parser.parse_known_args(list(argv))[1]


def launch_units(args, unit_names, argv_for_unit, cluster="slurm"):
    """Run every unit with args.launcher; returns the names of the units that failed (in finishing order).

    argv_for_unit(name): the command that runs one unit in the foreground, e.g.
    [sys.executable, "reproduce.py", *sweep_flags, "--units", name, "--no-tables"].
    cluster: submitit's cluster for --launcher slurm ("local" or "debug" run the jobs on this machine)."""
    log_dir = Path(args.log_dir).resolve()
    jobs = [UnitJob(name, [str(arg) for arg in argv_for_unit(name)], log_dir / f"{name}.log") for name in unit_names]
    if not jobs:
        return []
    if args.launcher == "local":
        failed = run_local(jobs, worker_devices(args))
    elif args.launcher == "slurm":
        failed = run_slurm(jobs, slurm_executor(args, log_dir / "slurm", cluster),
                           SLURM_POLL_S if cluster == "slurm" else POLL_S)
    else:
        raise ValueError(f"unknown launcher {args.launcher!r}")
    print(f"{len(jobs) - len(failed)} of {len(jobs)} units done" + (f"; failed: {' '.join(failed)}" if failed else ""))
    return failed
