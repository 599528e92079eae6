"""Errors in what a user gave: a path, a file's contents, an option.

``train.py`` and ``evaluate.py`` print such an error's message alone (no traceback) and exit with
status 2; any other exception is a bug and keeps its traceback. The subclasses are also the
built-in errors they stand for, so ``except FileNotFoundError`` catches a missing input too.
"""

import sys

__all__ = ["InputError", "MissingInput", "BadInput", "message", "exit_status"]


class InputError(Exception):
    """Something the user gave is wrong; the message names it and says what is wrong."""


class MissingInput(InputError, FileNotFoundError):
    """A file or folder the user pointed to (or that a dataset needs) does not exist."""


class BadInput(InputError, ValueError):
    """A file exists but cannot be used (unreadable image, wrong size, not a checkpoint...)."""


def message(error: BaseException) -> str:
    """The error's own message: for one re-raised from a DataLoader worker (whose message is
    the worker's traceback) the last line, which is the original message."""
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def exit_status(run, *args) -> int:
    """A command line's exit status: ``run(*args)``'s, or 2 after printing an InputError's
    message as one line on stderr, or 130 after a Ctrl-C that ``run`` left to its caller."""
    try:
        return run(*args)
    except InputError as error:
        print(f"error: {message(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
