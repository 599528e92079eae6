"""Progress bars on a terminal only: redrawn bars written to a file or a pipe fill it with lines
of spaces, so there the bars are off and the callers print plain log lines instead."""
import sys

from tqdm import tqdm

__all__ = ["interactive", "progress"]


def interactive() -> bool:
    """Whether stderr (where tqdm draws) is a terminal."""
    return sys.stderr.isatty()


def progress(iterable=None, **options) -> tqdm:
    """``tqdm(iterable, **options)``, disabled (a plain pass-through) off a terminal."""
    options.setdefault("dynamic_ncols", True)
    disable = options.pop("disable", False) or not interactive()
    return tqdm(iterable, disable=disable, **options)
