"""What a run tells the user when it stops early: one `error:` line per problem and a documented exit code."""

import contextlib
import sys
from typing import Iterator


class UsageError(Exception):
    """A problem with what the user asked for. Reported one line per problem, exit code 2, no traceback."""

    exit_code = 2

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class NonFiniteLoss(UsageError):
    exit_code = 3

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem}; stopped without saving, so the newest checkpoint holds the last finite weights. "
                         "Resume from it with a lower --lr or a --grad_clip")


@contextlib.contextmanager
def exit_on_usage_error() -> Iterator[None]:
    """Turn a UsageError into one `error:` line per problem on stderr and its exit code (2, or 3 for a
    non-finite loss); `--debug` shows the traceback instead."""
    try:
        yield
    except UsageError as err:
        if "--debug" in sys.argv:
            raise
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        sys.exit(err.exit_code)
