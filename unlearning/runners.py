"""Running one step of a unit: a method script's command line in this process (runpy), or in a child process."""
import contextlib
import gc
import io
import runpy
import subprocess
import sys
import time
import traceback

import torch

from .errors import UserError
from .measure import Measure, reset_compiler_caches
from .processes import start_child
from .scripts import nested_cli
from .settings import REPOSITORY

OUTPUT_TAIL_LINES = 25
CHILD_EXIT_WAIT_S = 10


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
    """Run REPOSITORY/script in a fresh Python process; a failure shows the end of its output and stops the sweep."""
    command = [sys.executable, str(REPOSITORY / script), *map(str, flags)]
    status, output = run_child(command)
    if status != 0:
        raise step_failed(" ".join(command[1:]), status, output)


def step_failed(command, status, output):
    """Print the end of a failed step's output; the UserError that stops the sweep."""
    tail = (output or "").strip().splitlines()[-OUTPUT_TAIL_LINES:]
    if tail:
        print("\n".join(f"    {line}" for line in tail), file=sys.stderr)
    return UserError(f"{command} failed with exit status {status} (output above)")


def run_in_process(script, flags, hold_output=True):
    """Run REPOSITORY/script's command line in this process, as `python script flags` would, its output held back
    (or, without hold_output, printed as it comes); a failure (an exit status, a UserError, any exception) shows the
    end of that output and stops the caller with a UserError. Ctrl-C and SIGTERM pass through to the caller.
    Dynamo's caches are reset first (reset_compiler_caches). Returns the wall seconds of the step and of its
    set-up (until its training started: Measure.latest), the latter None when it never trained."""
    argv, saved_argv = [str(REPOSITORY / script), *map(str, flags)], sys.argv
    output = io.StringIO() if hold_output else sys.stderr
    reset_compiler_caches()  # a step that compiles pays its compile time, as in a process of its own
    status, start, sys.argv = 0, time.perf_counter(), argv
    held = (contextlib.redirect_stdout(output), contextlib.redirect_stderr(output)) if hold_output else ()
    try:
        with contextlib.ExitStack() as stack:
            for context in (*held, nested_cli()):
                stack.enter_context(context)
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
        raise step_failed(f"{script} {' '.join(map(str, flags))}", status, output.getvalue() if hold_output else "")
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

