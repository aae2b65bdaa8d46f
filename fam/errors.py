"""The one exception type for user mistakes.

Anything a researcher can fix (a wrong layer name, a reference of the wrong shape, a
missing dataset, an unknown method) raises :class:`FamBenchError` with a message that
says what is wrong and how to fix it. ``run.py`` prints such errors as one paragraph
and exits non-zero without a traceback; every other exception is a bug and keeps its
traceback.
"""


class FamBenchError(ValueError):
    """A user-fixable problem; the message names it and the fix."""
