"""One way for every command to report a user's mistake: one line on stderr and an exit code, never a traceback.

Exit codes shared by the commands: 0 success, 1 the work ran but something
failed (a file, a busy knowledge base, a check), 2 usage errors (bad names,
options, settings, missing models).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError
from rich.console import Console
from rich.text import Text

err = Console(stderr=True)

ExitCodes = Mapping[type[BaseException] | tuple[type[BaseException], ...], int]


class UsageError(Exception):
    """A bad option or argument the command found itself (exit code 2)."""


def print_error(message: str) -> None:
    """``error: message`` on stderr; the message is shown as is (file names may hold ``[...]``)."""
    err.print(Text("error: ", style="red") + Text(message))


@contextmanager
def user_errors(known: ExitCodes | None = None, settings_field: str = "settings") -> Iterator[None]:
    """Turn ``known`` exceptions (checked in order), settings problems and :class:`UsageError` into one line and
    their exit code. Anything else is a bug and keeps its traceback."""
    try:
        yield
    except typer.Exit:
        raise
    except ValidationError as exc:
        for problem in exc.errors():
            print_error(f"{'.'.join(str(p) for p in problem['loc']) or settings_field}: {problem['msg']}")
        raise typer.Exit(2)
    except SettingsError as exc:  # e.g. a list setting in the environment that is not JSON
        print_error(f"settings: {exc}")
        raise typer.Exit(2)
    except UsageError as exc:
        print_error(str(exc))
        raise typer.Exit(2)
    except Exception as exc:
        for kinds, code in (known or {}).items():
            if isinstance(exc, kinds):
                print_error(str(exc))
                raise typer.Exit(code) from None
        raise
