"""What every command does around its work: help formatting, the console-script wrapper, the closing summary."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .environment import HubUnavailableError
from .run_config import RunConfigError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's and epilog's line breaks and shows every option's default (unless it is None /
    off, or the help already says what the default is)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default is None or default is False
                or default is argparse.SUPPRESS or action.nargs == 0):
            return text
        if isinstance(default, list):
            default = " ".join(map(str, default))
        return f"{text} (default: {str(default).replace('%', '%%')})"


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give the options that have no help text one, so that `--help` shows their default too."""
    for action in parser._actions:
        if (action.help is None and action.option_strings and action.default is not argparse.SUPPRESS
                and action.default not in (None, False)):
            default = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
            action.help = f"default: {str(default).replace('%', '%%')}"
    return parser


def new_parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, usage=f"{prog} [--config FILE] [options]", description=description,
                                   epilog=epilog, formatter_class=HelpFormatter)


def set_option(parser: argparse.ArgumentParser, dest: str, **changes) -> None:
    """Change the default / help of an option added by a shared argument group."""
    for action in parser._actions:
        if action.dest == dest:
            for key, value in changes.items():
                setattr(action, key, value)
            return
    raise KeyError(dest)


def run_cli(prog: str, main: Callable, argv=None) -> int:
    """A console script: `main(argv)`, with the errors a user can fix printed as one line (exit status 1)."""
    try:
        result = main(argv)
    except (HubUnavailableError, RunConfigError, OSError, ValueError) as err:  # OSError: missing files, bad ids
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:  # a launched process leaves its process group when the command ends (train() keeps it)
        from ..training import destroy_process_group

        destroy_process_group()
    return result if isinstance(result, int) else 0


def print_saved(print_fn, what: dict[str, str]) -> None:
    """The closing lines of a command: where it saved what."""
    print_fn("saved:")
    width = max(len(k) for k in what)
    for name, path in what.items():
        print_fn(f"  {name.ljust(width)}  {path}")
