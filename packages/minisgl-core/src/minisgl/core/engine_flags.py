"""The engine's command-line flags, derived from EngineConfig's declarations (minisgl.core.engine_config).

`add_engine_flags(parser)` adds one flag per EngineConfig field, with the field's spellings, help text
(plus its default) and a type function that parses and checks the value, so that a bad value fails at the
command line naming the flag ("argument --page-size: must be a power of two >= 1, got 3").
`engine_config_from(parser, namespace)` builds the EngineConfig of the parsed flags; values that do not go
together fail the same way. `minisgl serve`, `minisgl bench offline` and the shell use both. Torch-free.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Collection
from typing import Any

from minisgl.core.engine_config import Check, EngineConfig, EngineOptionError, option_spec

_KIND_NAMES: dict[type, str] = {int: "an integer", float: "a number", str: "a string"}


def value_parser(kind: type, check: Check | None = None) -> Callable[[str], Any]:
    """An argparse type function: the text as `kind`, then checked. argparse shows its error after
    "argument --flag: "."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_KIND_NAMES[kind]}, got {text!r}") from None
        problem = check(value) if check is not None else None
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__
    return parse


def flags_of(declared: dataclasses.Field[Any]) -> tuple[str, ...]:
    """A field's command-line spellings: its declared flags, else --field-name."""
    return option_spec(declared).flags or ("--" + declared.name.replace("_", "-"),)


def add_engine_flags(
    parser: argparse._ActionsContainer,
    config_class: type[EngineConfig] = EngineConfig,
    names: Collection[str] | None = None,
    exclude: Collection[str] = (),
) -> tuple[str, ...]:
    """One flag per field of config_class (EngineConfig, or a subclass that declares more): only the
    fields in `names` when given, none in `exclude` (a tool that sets them itself). Returns the fields
    that got a flag: their values are the namespace's attributes of the same names."""
    hints = typing.get_type_hints(config_class)
    added: list[str] = []
    for declared in dataclasses.fields(config_class):
        if (names is None or declared.name in names) and declared.name not in exclude:
            _add_flag(parser, declared, _value_kind(hints[declared.name]))
            added.append(declared.name)
    return tuple(added)


def _add_flag(parser: argparse._ActionsContainer, declared: dataclasses.Field[Any], kind: type) -> None:
    """A bool field is a switch (its flag sets the value its default is not); others take a value."""
    help_text = option_spec(declared).help.replace("%", "%%")  # argparse %-formats help
    flags = flags_of(declared)
    if kind is bool:
        action = "store_false" if declared.default else "store_true"
        parser.add_argument(*flags, dest=declared.name, action=action, help=help_text)
        return
    if declared.default is not None:
        help_text += f" (default {declared.default})"
    parser.add_argument(
        *flags,
        dest=declared.name,
        type=value_parser(kind, option_spec(declared).check),
        default=declared.default,
        metavar=flags[0].lstrip("-").replace("-", "_").upper(),
        help=help_text,
    )


def engine_config_from(
    parser: argparse.ArgumentParser,
    namespace: argparse.Namespace,
    config_class: type[EngineConfig] = EngineConfig,
) -> EngineConfig:
    """The EngineConfig of parsed flags; values that do not go together exit through parser.error,
    naming the flag of the field they are about."""
    fields = {declared.name: declared for declared in dataclasses.fields(config_class)}
    try:
        return config_class(**{name: getattr(namespace, name) for name in fields})
    except EngineOptionError as error:
        parser.error(f"argument {flags_of(fields[error.option])[0]}: {error.problem}")


def _value_kind(hint: Any) -> type:
    """int for `int` and `int | None`; likewise float, str and bool."""
    kinds = [arg for arg in typing.get_args(hint) if arg is not type(None)] or [hint]
    if len(kinds) != 1 or kinds[0] not in (*_KIND_NAMES, bool):
        raise TypeError(f"an engine option must be int, float, str or bool (or None), not {hint}")
    return typing.cast(type, kinds[0])
