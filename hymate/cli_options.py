"""What the three commands share about options: ``--config FILE`` and deprecated spellings.

``--config FILE`` is TOML whose keys are the commands' long flags without ``--`` (flags given
on the command line win). An old spelling of a flag stays for a release as a hidden alias that
still works and says once, on stderr, what replaced it; in a config file it is accepted the
same way.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path
from typing import Any


class DeprecatedAlias(argparse.Action):
    """An old spelling of a flag: stores into the new flag's destination and warns once."""

    def __init__(self, option_strings, dest, replacement: str, nargs=None, const=None, type=None, choices=None, **_):  # noqa: A002
        super().__init__(
            option_strings,
            dest,
            nargs=nargs,
            const=const,
            type=type,
            choices=choices,
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )
        self.replacement = replacement
        self.warned = False

    def warn(self, prog: str, spelling: str) -> None:
        if not self.warned:
            print(f"{prog}: warning: {spelling} is deprecated; use {self.replacement}", file=sys.stderr)
            self.warned = True

    def __call__(self, parser, namespace, values, option_string=None):
        self.warn(parser.prog, option_string)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """``old`` works like ``new`` (which must already be defined) for one more release."""
    action = _action_of(parser, new)
    takes_value = action.nargs != 0
    parser.add_argument(
        old,
        action=DeprecatedAlias,
        dest=action.dest,
        replacement=new,
        nargs=None if takes_value else 0,
        const=None if takes_value else action.const,
        type=action.type,
        choices=action.choices,
    )


def _action_of(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    for action in parser._actions:
        if flag in action.option_strings:
            return action
    raise KeyError(flag)


def config_file_options(
    path: Path, parser: argparse.ArgumentParser, error: type[Exception]
) -> dict[str, tuple[Any, str]]:
    """The config file's options as ``dest -> (value, key as written)``, each converted like its flag."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise error(f"--config {path}: {e}") from e
    known = {
        flag.removeprefix("--"): a
        for a in parser._actions
        for flag in a.option_strings
        if flag.startswith("--") and a.dest not in ("help", "config")
    }
    unknown = sorted(k for k in raw if k not in known and k.replace("_", "-") not in known)
    if unknown:
        raise error(f"--config {path}: unknown options {unknown}")
    options = {}
    for key, value in raw.items():
        action = known.get(key) or known[key.replace("_", "-")]
        if isinstance(action, DeprecatedAlias):
            action.warn(parser.prog, f"{key} (in --config {path})")
            action = _action_of(parser, action.replacement)
        where = f"--config {path}: {key} = {value!r}"
        if action.nargs == 0:
            if not isinstance(value, bool):
                raise error(f"{where} must be true or false ({action.option_strings[-1]})")
        elif isinstance(action, argparse._AppendAction):
            items = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str) for v in items):
                raise error(f"{where} must be text or a list of text ({action.option_strings[-1]})")
            value = [(action.type or str)(v) for v in items]
        else:
            kind = action.type or str
            accepted = {float: (int, float), int: (int,), Path: (str,), str: (str,)}[kind]
            if isinstance(value, bool) or not isinstance(value, accepted):
                raise error(f"{where} must be a {kind.__name__} ({action.option_strings[-1]})")
            value = kind(value)
            if action.choices and value not in action.choices:
                raise error(f"{where} must be one of {', '.join(action.choices)}")
        options[action.dest] = (value, key)
    return options


def parse_with_config_file(
    parser: argparse.ArgumentParser, argv: list[str] | None, error: type[Exception] = ValueError
) -> argparse.Namespace:
    """Parse ``argv`` with ``--config FILE``'s values as the defaults, so flags win over the file."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    if known.config is not None:
        values = {dest: value for dest, (value, _) in config_file_options(known.config, parser, error).items()}
        parser.set_defaults(**values)
    return parser.parse_args(argv)
