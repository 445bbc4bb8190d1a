"""The errors a command reports as one line (UserError and its kinds) and SIGTERM as an interruption."""


class UserError(Exception):
    """A problem with the user's input (a file, a combination of flags): reported as one line, exit status 1."""
    exit_status = 1


class DamagedFile(UserError):
    """A file this project wrote (a checkpoint, a run record) that no longer reads as one."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: training stops and nothing is written; exit status 3."""
    exit_status = 3


class Terminated(KeyboardInterrupt):
    """SIGTERM (e.g. a cluster's preemption), raised as a KeyboardInterrupt so that the same clean-up runs."""


class ParentGone(Terminated):
    """The sweep or launcher that started this step has died: the step stops without writing anything."""


def raise_terminated(signum, frame):
    """SIGTERM handler: raise Terminated."""
    raise Terminated
