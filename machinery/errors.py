"""A run that stops early says why in `error:` lines, with an exit code and no traceback."""

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

# Set while a process calls fabric.launch: the processes it starts inherit it.
LAUNCHER_ENV = "TEMPLATE_LAUNCHER_PID"
STARTED_BY_LAUNCHER = os.environ.get(LAUNCHER_ENV) == str(os.getppid())
MAIN_PID = os.getpid()


class UsageError(Exception):
    exit_code = 2

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class NonFiniteLoss(UsageError):
    exit_code = 3

    def __init__(self, problem: str, newest: str | None) -> None:
        fix = "a lower --lr or a --grad_clip"
        advice = f"resume with {fix}: it continues from {newest}, the last finite weights"
        if not newest:
            advice = f"no checkpoint was saved before it: start again with {fix}"
        super().__init__(f"{problem}; stopped without saving; {advice}")


class FilesystemError(UsageError):
    exit_code = 4

    @classmethod
    def of(cls, err: OSError) -> "FilesystemError":
        where = " -> ".join(str(path) for path in (err.filename, err.filename2) if path)
        return cls(f"{err.strerror or err}{': ' + where if where else ''}")


def interrupted(signum: int = 2, frame: Any = None, said: str = "") -> None:
    """Ctrl-C outside the loop (where it saves first), or a second one."""
    if os.getpid() != MAIN_PID:  # a DataLoader worker: the main process stops it
        return
    if not STARTED_BY_LAUNCHER:  # the launcher's own line is enough
        print(f"error: {said or 'interrupted by Ctrl-C: stopped without saving'}", file=sys.stderr)
    sys.exit(130)


class LostProcess(UsageError):
    exit_code = 1


@contextlib.contextmanager
def exit_on_usage_error(ctrl_c: bool = False) -> Iterator[None]:
    """`ctrl_c`: Ctrl-C is one line too, from here on."""
    if ctrl_c and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    except (UsageError, OSError) as raised:
        if "--debug" in sys.argv:
            raise
        err = FilesystemError.of(raised) if isinstance(raised, OSError) else raised
        # The launcher reports for those it started, but for their own disk and a lost launcher.
        if not STARTED_BY_LAUNCHER or isinstance(err, (FilesystemError, LostProcess)):
            prefix = f"[local rank {os.environ.get('LOCAL_RANK')}] " if STARTED_BY_LAUNCHER else ""
            for problem in err.problems:
                print(f"{prefix}error: {problem}", file=sys.stderr)
        sys.exit(err.exit_code)
