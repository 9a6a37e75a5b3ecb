"""Run-config files for the commands: ``--config run.yaml`` (or ``.json``) sets any option; a flag given on the
command line overrides the file.

A file holds one mapping of option names to values, spelled like the flag without its dashes, either way:
``learning_rate: 1e-3`` or ``learning-rate: 0.001``. A key that is not an option of the command, a value of the
wrong type or outside the option's choices is an error naming the key and the file. Every training command
writes the arguments it ran with to ``<output-dir>/run_config.json``, which is itself a valid ``--config``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
from pathlib import Path
from typing import Any

RUN_CONFIG_NAME = "run_config.json"
_NOT_IN_FILE = {"help", "config"}


class RunConfigError(ValueError):
    """A run-config file that cannot be used; the message names the file (and key)."""


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="a YAML or JSON file of options (keys spelled like the flags: learning_rate: 1e-3); "
                             "flags given on the command line override it")


def _option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in _NOT_IN_FILE and a.option_strings}


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping held by a YAML (.yaml/.yml) or JSON (.json) file."""
    path = Path(path)
    if not path.is_file():
        raise RunConfigError(f"--config: no such file: {path}")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text) if text.strip() else {}
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise RunConfigError(f"--config {path}: use a .yaml, .yml or .json file")
    except (json.JSONDecodeError, ValueError) as err:
        if isinstance(err, RunConfigError):
            raise
        raise RunConfigError(f"--config {path}: not valid JSON: {err}") from err
    except Exception as err:  # yaml.YAMLError
        raise RunConfigError(f"--config {path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise RunConfigError(f"--config {path}: the file must hold a mapping of option names to values, "
                             f"not a {type(data).__name__}")
    return data


def _convert(action: argparse.Action, key: str, value: Any, path: Path) -> Any:
    where = f"--config {path}: key {key!r}"
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise RunConfigError(f"{where} takes true or false, got {value!r}")
        return value if not isinstance(action, argparse._StoreFalseAction) else value
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        values = value if isinstance(value, list) else [value]
        return [_convert_one(action, where, v) for v in values]
    if isinstance(value, (list, dict)):
        raise RunConfigError(f"{where} takes one value, got {value!r}")
    return _convert_one(action, where, value)


def _convert_one(action: argparse.Action, where: str, value: Any) -> Any:
    kind = action.type
    if isinstance(value, (list, dict)) or (isinstance(value, bool) and kind in (int, float)):
        raise RunConfigError(f"{where} takes a {getattr(kind, '__name__', 'value')}, got {value!r}")
    if kind is not None:
        if kind is int and isinstance(value, float):
            raise RunConfigError(f"{where} takes an integer, got {value!r}")
        try:
            value = kind(value)
        except (TypeError, ValueError) as err:
            raise RunConfigError(f"{where}: {err}") from err
    elif not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise RunConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def config_defaults(parser: argparse.ArgumentParser, path: str | os.PathLike) -> dict[str, Any]:
    """The file's options as `parser` destinations, converted and checked (unknown keys are an error)."""
    actions = _option_actions(parser)
    path = Path(path)
    values = {}
    for raw_key, value in read_config_file(path).items():
        key = str(raw_key).lstrip("-").replace("-", "_")
        if key not in actions:
            close = difflib.get_close_matches(key, actions, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RunConfigError(f"--config {path}: unknown key {raw_key!r}{hint}; `{parser.prog} --help` lists "
                                 "the options")
        values[key] = _convert(actions[key], str(raw_key), value, path)
    return values


def parse_args_with_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse `argv` with the defaults of ``--config FILE`` (when given) under the command-line flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            values = config_defaults(parser, known.config)
        except RunConfigError as err:
            parser.error(str(err))
        for action in parser._actions:
            if action.dest in values and values[action.dest] is not None:
                action.required = False  # given by the file
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    args._option_dests = sorted(_option_actions(parser))  # what save_run_config writes
    return args


def save_run_config(args: argparse.Namespace, output_dir: str | os.PathLike) -> Path:
    """Write the arguments a command ran with to ``<output_dir>/run_config.json`` (usable as ``--config``)."""
    dests = getattr(args, "_option_dests", None)
    values = {k: v for k, v in vars(args).items() if k not in _NOT_IN_FILE and not k.startswith("_")
              and (dests is None or k in dests)}
    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()
              if v is None or isinstance(v, (str, int, float, bool, list, tuple))}
    path = Path(output_dir) / RUN_CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
