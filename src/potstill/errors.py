"""One error type for bad input: its message is one line that names the problem and the fix.

The CLI prints ``error: <message>`` and exits non-zero (no traceback unless ``--debug``).
"""


class PotstillError(Exception):
    """Bad input a user can fix. ``str(err)`` is one line: what is wrong, then how to fix it."""


class VocabMismatchError(PotstillError):
    """Teacher and student vocabularies differ beyond padding rows."""
