"""Runs you can watch (--track tensorboard, --track wandb; off by default): what the training loop, the scripts and
the sweep log while a run trains, and the backends that show it.

    python lora.py --arch resnet50 --track tensorboard   # then: tensorboard --logdir runs
    python reproduce.py --track tensorboard --track wandb

Logged: every step train/loss and train/lr, read from the device in one transfer at the training loop's divergence
checks (no host read per step); every epoch train/images_per_s and the accuracy curve (curve/forget_acc,
curve/retain_acc, curve/test_acc); at the end metrics/UA, metrics/RA, metrics/TA, metrics/MIA_efficacy,
metrics/RTE_s, metrics/peak_gpu_mem_mb and the representation metrics that ran, with the run's settings as
hyperparameters. A backend is imported only when asked for. Tracking never changes what a run computes, and a
backend that fails (an unwritable folder, a service error) costs one warning line: the run goes on without it.
"""
import contextlib
import importlib.util
import json
import math
import netrc
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .errors import UserError
from .settings import REPOSITORY

BACKENDS = ("tensorboard", "wandb")  # --track names, each the package it needs
TRACK_DIR = Path("runs")
WANDB_PROJECT = "prunelora"
# Record keys logged at the end as metrics/{key}, when the run has them.
FINAL_METRICS = ("UA", "RA", "TA", "MIA_efficacy", "RTE_s", "peak_gpu_mem_mb", "probe_UA", "CKA_forget",
                 "CKA_retain", "relearn_steps")
TRACKING_FLAGS = ("track", "track_dir", "wandb_project")  # where a run is watched: no part of what it computes


def add_tracking_arguments(parser):
    group = parser.add_argument_group("tracking (docs/tracking.md)")
    group.add_argument("--track", action="append", choices=BACKENDS,
                       help="log the run to tensorboard or wandb (Weights & Biases); repeat for both (default: off)")
    group.add_argument("--track-dir", type=Path, default=TRACK_DIR,
                       help="folder of the TensorBoard runs and of W&B's local files (default: runs)")
    group.add_argument("--wandb-project", default=os.environ.get("WANDB_PROJECT", WANDB_PROJECT),
                       help=f"W&B project (default: $WANDB_PROJECT, else {WANDB_PROJECT})")


def check_tracking(args):
    """A UserError, before any work, for a --track backend whose package is not installed."""
    for backend in dict.fromkeys(getattr(args, "track", None) or ()):
        if importlib.util.find_spec(backend) is None:
            raise UserError(f"--track {backend} needs the {backend} package: pip install {backend}")


def warn(what, error):
    text = str(error).strip().splitlines()
    print(f"warning: tracking: {what} failed ({type(error).__name__}{': ' + text[0] if text else ''}); "
          f"the run goes on without it", file=sys.stderr, flush=True)


def host_values(tensor):
    """The values of a device tensor as a list: one device-to-host transfer."""
    return tensor.tolist()


class Tracker:
    """What a run logs, to each backend (sink) it was opened with; with none, every call does nothing.

    The training loop calls begin_epoch, record_step (device work only), read_steps at its divergence checks and
    end_epoch; the scripts set `evaluate` (the accuracy curve, a dict of accuracies) and add settings; whoever
    opened the run logs the final metrics and closes it."""

    def __init__(self, options=None, opener=None):
        self.options, self.opener = options, opener  # opener: "script", or the caller that opened the run
        self.sinks = []
        self.step = self.epochs = self.images = 0
        self.pending = []  # (step, loss on the device, lr) of the steps not yet read
        self.epoch_start = None
        self.evaluate, self.every, self.eval_seconds = None, 1, 0.0
        self.settings, self.final = {}, {}
        self.started = False

    def __bool__(self):
        return bool(self.sinks)

    def start(self, name, settings, group=None):
        """Open the sinks of options.track for run `name` (once, and only for an opened run), then add settings (a
        dict, or a function that makes it, called only when the run is tracked): a script calls this once its
        output's name is known, whoever opened the run."""
        opening = self.opener is not None and not self.started
        if opening:
            self.started = True
            for backend in dict.fromkeys(getattr(self.options, "track", None) or ()):
                try:
                    self.sinks.append(SINKS[backend](self.options, name, group))
                except Exception as error:
                    warn(f"starting {backend}", error)
        if self:
            settings = settings() if callable(settings) else settings
            self.add_settings({"code_commit": code_commit(), **settings} if opening else settings)
        return self

    def _each(self, call):
        for sink in list(self.sinks):
            try:
                call(sink)
            except Exception as error:  # a backend's failure must never end the run
                warn(sink.name, error)
                self.sinks.remove(sink)

    def log(self, values, step=None):
        step = self.step if step is None else step
        self._each(lambda sink: sink.log(values, step))

    def add_settings(self, settings):
        if self:
            self.settings.update(settings)
            self._each(lambda sink: sink.add_settings(settings))

    def begin_epoch(self):
        if self:
            self.images, self.epoch_start = 0, time.perf_counter()

    def record_step(self, loss, optimizer, images):
        """Keep the step's loss on the device and its learning rate (the one optimizer.step() is about to use)."""
        if self:
            self.step += 1
            lr = optimizer.param_groups[0]["lr"]
            self.pending.append((self.step, loss.detach(), lr.detach().clone() if torch.is_tensor(lr) else lr))
            self.images += images

    def read_steps(self):
        """Log the steps kept so far: their losses come to the host in one transfer."""
        if not (self and self.pending):
            return
        steps, losses, lrs = zip(*self.pending, strict=True)
        self.pending = []
        for step, loss, lr in zip(steps, host_values(torch.stack(losses).float()), lrs, strict=True):
            self.log({"train/loss": loss, "train/lr": float(lr)}, step)

    def end_epoch(self):
        """Log the epoch's images/s and, every `every` epochs, the accuracy curve (its time kept in
        eval_seconds, which is not training time)."""
        if not self:
            return
        self.read_steps()
        values = {}
        if self.epoch_start is not None:
            values["train/images_per_s"] = self.images / max(time.perf_counter() - self.epoch_start, 1e-9)
        self.epochs += 1
        if self.evaluate is not None and self.epochs % self.every == 0:
            begin = time.perf_counter()
            try:
                values.update({f"curve/{key}": value for key, value in self.evaluate().items()})
            except Exception as error:
                warn("the accuracy curve", error)
                self.evaluate = None
            self.eval_seconds += time.perf_counter() - begin
        self.log(values)

    @contextlib.contextmanager
    def watching(self, evaluate, every=1):
        """Inside the block, end_epoch logs evaluate() (a dict of accuracies) every `every` epochs."""
        self.evaluate, self.every = (evaluate if self else None), every
        try:
            yield
        finally:
            self.evaluate = None  # nor does the run keep the model alive

    def log_final(self, metrics):
        """Log the FINAL_METRICS that metrics (a run record, or a script's own) holds as numbers."""
        self.final = {f"metrics/{key}": float(metrics[key]) for key in FINAL_METRICS
                      if isinstance(metrics.get(key), int | float) and not isinstance(metrics[key], bool)}
        if self.final:
            self.log(self.final)

    def close(self):
        self._each(lambda sink: sink.close(self.settings, self.final))
        self.sinks = []


_active = Tracker()


def active():
    """The run the training loop logs to (a Tracker without sinks when none is open)."""
    return _active


@contextlib.contextmanager
def activate(tracker):
    global _active
    previous, _active = _active, tracker
    try:
        yield tracker
    finally:
        _active = previous


def code_commit():
    """The repository's git commit, None outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPOSITORY, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def open_run(options, name, settings, group=None, opener="caller"):
    """A Tracker logging run `name` to each backend of options.track (none: one that does nothing); a backend
    that cannot start is a warning. The caller logs its final metrics and closes it."""
    return Tracker(options, opener).start(name, settings, group)


@contextlib.contextmanager
def script_run(args):
    """Active inside the block: the run a caller opened (a sweep's step), else under --track the script's own,
    whose sinks open at start() and which closes after the block."""
    if active() or not getattr(args, "track", None):
        yield active()
        return
    tracker = Tracker(args, opener="script")
    try:
        with activate(tracker):
            yield tracker
    finally:
        tracker.close()


def _plain(value):
    """A hyperparameter value as TensorBoard's and W&B's tables take it: numbers, text and booleans as they are,
    anything else as JSON text."""
    if value is None or isinstance(value, bool | int | float | str):
        return "none" if value is None else value
    return json.dumps(value, sort_keys=True, default=str)


class TensorBoardSink:
    """Event files in track_dir/name (name-2, ... when that folder holds a run already)."""
    name = "tensorboard"

    def __init__(self, options, name, group=None):
        from torch.utils.tensorboard import SummaryWriter  # imported here: only --track tensorboard needs it

        folder = Path(options.track_dir) / name
        number = 1
        while folder.is_dir() and any(folder.iterdir()):
            number += 1
            folder = Path(options.track_dir) / f"{name}-{number}"
        self.folder = folder
        self.writer = SummaryWriter(log_dir=str(folder))

    def log(self, values, step):
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def add_settings(self, settings):
        text = "\n".join(f"    {key}: {json.dumps(value, default=str)}" for key, value in settings.items())
        self.writer.add_text("settings", text)

    def close(self, settings, final):
        """The settings and final metrics in TensorBoard's HParams table, in this run's own folder."""
        from torch.utils.tensorboard.summary import hparams

        metrics = {tag: value for tag, value in final.items() if not math.isnan(value)}
        for summary in hparams({key: _plain(value) for key, value in settings.items()}, metrics):
            self.writer.file_writer.add_summary(summary)
        self.writer.close()


def _wandb_logged_in():
    """Whether W&B has credentials here (WANDB_API_KEY, or `wandb login`'s netrc entry), read without a network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc(os.environ.get("NETRC")).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


class WandbSink:
    """A W&B run in options.wandb_project (group: the sweep's; WANDB_RUN_GROUP otherwise), its local files under
    track_dir/wandb. WANDB_MODE is honoured; without it and without W&B credentials the run is logged offline
    (said in one line), and a run that cannot reach W&B falls back to offline too. Nothing of a key is written."""
    name = "wandb"

    def __init__(self, options, name, group=None):
        import wandb  # imported here: only --track wandb needs it

        folder = Path(options.track_dir)
        folder.mkdir(parents=True, exist_ok=True)
        mode = os.environ.get("WANDB_MODE")
        if mode is None and not _wandb_logged_in():
            mode = "offline"
            print(f"wandb: no W&B login here (WANDB_API_KEY or `wandb login`): logging offline under "
                  f"{folder / 'wandb'}; `wandb sync` uploads it later", file=sys.stderr, flush=True)

        def start(mode):
            return wandb.init(project=options.wandb_project, name=name, group=group, dir=str(folder), mode=mode,
                              reinit="create_new", settings=wandb.Settings(console="off", init_timeout=60))
        try:
            self.run = start(mode)
        except Exception as error:
            if mode == "offline":
                raise
            warn("reaching W&B (logging offline instead)", error)
            self.run = start("offline")

    def log(self, values, step):
        self.run.log(values, step=step)

    def add_settings(self, settings):
        self.run.config.update({key: _plain(value) for key, value in settings.items()}, allow_val_change=True)

    def close(self, settings, final):
        self.run.summary.update(final)
        self.run.finish()


SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink}
