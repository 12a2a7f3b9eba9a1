"""What a run tells the user when it stops early: one `error:` line per problem, a documented exit
code.

Guarantees: no traceback for bad input (`--debug` shows it), and one report per run, not per
process."""

import contextlib
import os
import sys
from collections.abc import Iterator

# Set by a process while it calls fabric.launch (machinery/launch.py): the processes Fabric starts
# for it inherit it.
LAUNCHER_ENV = "TEMPLATE_LAUNCHER_PID"
_STARTED_BY_LAUNCHER = os.environ.get(LAUNCHER_ENV) == str(
    os.getppid()
)  # read before this process sets its own


class UsageError(Exception):
    """A problem with what the user asked for. Reported one line per problem, exit code 2, no
    traceback."""

    exit_code = 2

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class NonFiniteLoss(UsageError):
    """Training diverged. `newest`: the name of the newest checkpoint on disk (all hold finite
    weights), if any."""

    exit_code = 3

    def __init__(self, problem: str, newest: str | None) -> None:
        advice = (
            f"resume with a lower --lr or a --grad_clip: it continues from {newest}, the last "
            "finite weights"
            if newest
            else "no checkpoint was saved before it: start again with a lower --lr or a --grad_clip"
        )
        super().__init__(f"{problem}; stopped without saving; {advice}")


class FilesystemError(UsageError):
    """The filesystem refused (disk full, read-only, a path that is a file): exit code 4."""

    exit_code = 4

    @classmethod
    def of(cls, err: OSError) -> "FilesystemError":
        where = " -> ".join(str(path) for path in (err.filename, err.filename2) if path)
        return cls(f"{err.strerror or err}{': ' + where if where else ''}")


@contextlib.contextmanager
def exit_on_usage_error() -> Iterator[None]:
    """Turn a UsageError into one `error:` line per problem on stderr and its exit code (2, 3 for a
    non-finite loss, 4 when the filesystem refused); `--debug` shows the traceback instead."""
    try:
        try:
            yield
        except OSError as err:
            if "--debug" in sys.argv:
                raise
            raise FilesystemError.of(err) from None
    except UsageError as err:
        if "--debug" in sys.argv:
            raise
        # A process that Fabric's launcher started leaves the report to the launching one, which
        # meets the same
        # problem (every rank runs the same checks); a filesystem error may be its own, so it says
        # it, with its rank.
        if not started_by_launcher() or isinstance(err, FilesystemError):
            prefix = (
                f"[local rank {os.environ.get('LOCAL_RANK', '?')}] "
                if started_by_launcher()
                else ""
            )
            for problem in err.problems:
                print(f"{prefix}error: {problem}", file=sys.stderr)
        sys.exit(err.exit_code)


def started_by_launcher() -> bool:
    """Whether this process was started by the Fabric launcher of another process on this node
    (ddp). That one reports how the run ended; and its launcher ends every process as soon as one
    exits with a non-zero code."""
    return _STARTED_BY_LAUNCHER
