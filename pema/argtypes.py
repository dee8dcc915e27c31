"""argparse types shared by the command lines: bad numbers fail at parsing with a clear message."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, NoReturn


def _number(
    cast: Callable[[str], Any], kind: str, ok: Callable[[Any], bool], rule: str
) -> Callable[[str], Any]:
    """An argparse type: `cast` the text, then require `ok` (nan fails every comparison)."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {kind}: {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return value

    return parse


positive_int: Callable[[str], int] = _number(
    int, "an integer", lambda v: v >= 1, "must be at least 1"
)
positive_float: Callable[[str], float] = _number(
    float, "a number", lambda v: v > 0, "must be positive"
)
non_negative_int: Callable[[str], int] = _number(
    int, "an integer", lambda v: v >= 0, "must not be negative"
)
non_negative_float: Callable[[str], float] = _number(
    float, "a number", lambda v: v >= 0, "must not be negative"
)


def auto_or(number: Callable[[str], float]) -> Callable[[str], float | str]:
    """An argparse type taking the word `auto` or what `number` takes."""

    def parse(text: str) -> float | str:
        if text == "auto":
            return text
        try:
            return number(text)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e} (or the word auto)") from None

    return parse


def port(text: str) -> int:
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (0-65535), got {value}")
    return value


def non_empty_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(text: str) -> str:
    value = text.upper()
    if value not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show (None, an off switch): the
    help text then says what happens without the flag."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        if isinstance(action.default, str) and "\n" in action.default:
            return f"{action.help} (default: %(default)r)"  # the line break shown as \n
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Usage errors as one line (`prog: error: …; see --help`), exit 2: the usage block would
    bury the one line that matters."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def new_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """A top-level parser with the shared help formatter, one-line errors and `--version`."""
    from pema.settings import version

    parser = Parser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    return parser


def add_subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """Subcommands that inherit the help formatter and the one-line errors."""
    return parser.add_subparsers(dest="command", required=True, parser_class=Parser)
