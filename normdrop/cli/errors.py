"""One-line errors for every command: an error the user can act on (a damaged, foreign or read-only store, a bad
path, a bad study file, a bad environment variable) is printed as ``error: <what is wrong>`` on one line, exit
status 2, whenever it is raised -- before work starts or in the middle of a sweep. Other exceptions are bugs and
keep their traceback."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import typer

_F = TypeVar("_F", bound=Callable[..., Any])

# Environment variables read deep inside the library (at a layer's first call, in a worker): checked by every
# command before any work, so a typo is one line, not a traceback from a worker or a run that fails later.
_ENVIRONMENT_CHOICES: dict[str, tuple[str, ...]] = {
    "NORMDROP_BACKEND": ("auto", "composite", "numba"),
    "NORMDROP_FASTPATH": ("0", "1"),
}


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr (one line: newlines become "; ") and exit with ``code``."""
    from rich.console import Console
    from rich.text import Text

    line = "; ".join(part.strip() for part in str(message).splitlines() if part.strip())
    Console(stderr=True).print(Text.assemble(("error: ", "red"), line), soft_wrap=True)
    raise typer.Exit(code)


def check_environment() -> None:
    """Refuse an environment variable of normdrop's with a value it does not know (an empty value is unset)."""
    for name, choices in _ENVIRONMENT_CHOICES.items():
        value = os.environ.get(name)
        if value and value not in choices:
            fail(f"${name}={value!r} is not one of {', '.join(choices)}")


def _user_errors() -> tuple[type[BaseException], ...]:
    import sqlite3

    from normdrop.store import StoreError
    from normdrop.sweep import StudyError, SweepError

    return (StoreError, StudyError, SweepError, sqlite3.Error, OSError, ImportError)


def _describe(error: BaseException) -> str:
    import sqlite3

    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    if isinstance(error, sqlite3.Error):
        return f"the run store: {error}"
    return str(error)


def one_line_errors(command: _F) -> _F:
    """Wrap a command: check the environment first, and turn a user error raised anywhere into one line, exit 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        check_environment()
        try:
            return command(*args, **kwargs)
        except Exception as error:
            if isinstance(error, _user_errors()):
                fail(_describe(error))
            raise

    return wrapper  # type: ignore[return-value]
