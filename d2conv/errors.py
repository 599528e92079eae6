"""Errors in what a user gave (a path, a file's contents, an option) and how the command lines
end on them.

``train.py`` and ``evaluate.py`` print such an error's message alone (no traceback) and exit with
status 2; any other exception is a bug and keeps its traceback. The subclasses are also the
built-in errors they stand for, so ``except FileNotFoundError`` catches a missing input too. Their
options are parsed by ``ArgumentParser`` (an error is an InputError) with ``int_range`` and
``positive_float`` types; ``on_sigterm`` turns SIGTERM into ``Terminated``, a Ctrl-C with exit
status 143.
"""

import argparse
import contextlib
import math
import signal
import sys

__all__ = ["InputError", "MissingInput", "BadInput", "Terminated", "on_sigterm", "message",
           "first_line", "exit_status", "ArgumentParser", "int_range", "positive_float"]


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


def first_line(error: BaseException) -> str:
    """The first line of an error's message ("" for none): a library's error in one line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what a cluster scheduler or ``timeout`` sends before it kills a job), raised in
    the main thread as a Ctrl-C is, so that whatever saves on a Ctrl-C saves on it too."""

    status = 143                                   # 128 + SIGTERM, as a shell reports it


@contextlib.contextmanager
def on_sigterm():
    """SIGTERM raises Terminated in the main thread for the duration of a with block (then the
    handler before it is back)."""
    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_status(run, *args) -> int:
    """A command line's exit status: ``run(*args)``'s, or 2 after printing an InputError's
    message as one line on stderr, or 130 after a Ctrl-C (143 after a SIGTERM, see
    ``on_sigterm``) that ``run`` left to its caller."""
    try:
        return run(*args)
    except InputError as error:
        print(f"error: {message(error)}", file=sys.stderr)
        return 2
    except Terminated:
        print("\nterminated", file=sys.stderr)
        return Terminated.status
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors (unknown option, bad choice, a value out of range) are an
    InputError, so the command line prints them as one line and exits with status 2."""

    def error(self, message):
        raise InputError(message)


def int_range(low, high=None):
    """An argparse ``type``: an integer in [low, high] (no upper bound without ``high``)."""
    allowed = f">= {low}" if high is None else f"in [{low}, {high}]"

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {allowed}, got {text!r}")
        return value

    parse.__name__ = f"integer {allowed}"
    return parse


def positive_float(text):
    """An argparse ``type``: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value
