"""The one exception type for user mistakes.

Anything a researcher can fix (a wrong layer name, a reference of the wrong shape, a
missing dataset, an unknown method) raises :class:`FamBenchError` with a message that
says what is wrong and how to fix it. ``run.py`` prints such errors as one paragraph
and exits non-zero without a traceback; every other exception is a bug and keeps its
traceback.
"""

import sys
from collections.abc import Callable
from typing import NoReturn

#: the one prefix of every user-error message the suite prints
PREFIX = "fam-bench: error: "


class FamBenchError(ValueError):
    """A user-fixable problem; the message names it and the fix."""


def exit_on_user_error(main: Callable[[], int]) -> NoReturn:
    """Run a command-line ``main() -> exit status``; a :class:`FamBenchError` is printed as
    ``fam-bench: error: <message>`` on stderr with exit status 2 and no traceback."""
    try:
        status = main()
    except FamBenchError as err:
        print(f"{PREFIX}{err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status)


#: how PyTorch and the host allocator word running out of memory
_OOM_MARKERS = ("out of memory", "can't allocate memory", "not enough memory")


def out_of_memory_message(err: BaseException) -> str | None:
    """The user-facing message of an out-of-memory error (CUDA or host), else ``None``."""
    text = str(err)
    if type(err).__name__ != "OutOfMemoryError" and not any(m in text for m in _OOM_MARKERS):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return (
        f"The run ran out of memory ({first[:200]}). Lower the batch sizes: "
        "eval.batch_size (images per explainer call) and metric.batch_size (images per "
        "deletion/insertion forward pass), or data.image_size. Finished units are kept; "
        "the same command resumes."
    )
