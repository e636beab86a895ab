"""User-facing errors, the command-line wrapper that prints them as one line, the refusal to
resume an interrupted run under other settings, and the shared argparse type for counts."""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable


class OccError(Exception):
    """A problem with the user's input or setup, worded so the message alone says what to do.

    Messages name the file (and line, where there is one), what is wrong, and how to fix it.
    Command-line entry points print it as one ``error: ...`` line and exit with status 2.
    """


def where(path, line: int | None = None) -> str:
    """``file:line`` (or ``file``) for error messages."""
    return f"{path}:{line}" if line is not None else str(path)


def refuse_other_settings(partial, saved: dict, now: dict, what: str = "run") -> None:
    """An interrupted ``what``'s state in ``partial`` was saved with ``saved``: resuming it with
    other settings would mix two runs, so it stops in one line naming the settings that differ."""
    changed = sorted(k for k in {**saved, **now} if saved.get(k) != now.get(k))
    if changed:
        raise OccError(f"{partial}: an interrupted {what} with other settings ({', '.join(changed)}); rerun it with "
                       f"those, or remove {partial} to start afresh")


def cli(main: Callable[..., int | None]) -> Callable[..., int | None]:
    """Wrap a command's ``main`` so an OccError ends the program with a one-line message."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except OccError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (argparse turns the error into its usage line)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
