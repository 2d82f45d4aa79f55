"""Command-line flags and the README's configuration table, made from
:data:`embedq.settings.SETTINGS` (each setting is declared there once).

``python -m embedq.flags README.md --write`` rewrites the table in place;
``--check`` exits 1 when it is stale (tests/test_settings.py does the same).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from embedq.settings import SECURITY, SECURITY_NOTE, SETTINGS, TOP, Setting, SettingsError

TABLE_START = (
    "<!-- generated from src/embedq/settings.py: python -m embedq.flags README.md --write -->"
)
TABLE_END = "<!-- end of settings table -->"


def add_flags(parser: argparse.ArgumentParser, command: str, skip: Iterable[str] = ()) -> None:
    """Every flag of `command`, in declaration order (`skip`: names the command
    declares its own way)."""
    groups: dict[str, Any] = {}
    for setting in settings_of(command):
        if setting.name in skip:
            continue
        target: Any = parser
        if setting.group == SECURITY:
            if SECURITY not in groups:
                groups[SECURITY] = parser.add_argument_group(SECURITY, SECURITY_NOTE)
            target = groups[SECURITY]
        target.add_argument(setting.flag, **argument(setting, command))


def settings_of(command: str) -> list[Setting]:
    return [s for s in SETTINGS.values() if s.flag and command in s.commands]


def argument(setting: Setting, command: str) -> dict[str, Any]:
    """add_argument's keywords. The default is the variable's raw text when set:
    argparse converts it only when the flag is not given, so a bad value is one
    usage line (exit 2) naming the flag, and only on the command that uses it."""
    kwargs: dict[str, Any] = {"dest": setting.name, "help": help_text(setting)}
    if setting.type is not bool and not setting.choices:
        # The flag's name, not the dest: --request-timeout REQUEST_TIMEOUT.
        kwargs["metavar"] = setting.metavar or setting.flag.lstrip("-").replace("-", "_").upper()
    if setting.choices:
        kwargs["choices"] = setting.choices
    raw = setting.raw()
    if setting.type is bool:
        return {**kwargs, "action": "store_true", "default": setting.from_env()}
    if command in setting.repeat_for:
        # A list; the command reads the comma-separated variable itself.
        return {**kwargs, "action": "append", "default": None}
    unset = setting.default if command not in setting.unset_for else None
    kwargs.update(type=converter(setting), default=unset if raw is None else raw)
    if command in setting.required_for and raw is None:
        kwargs["required"] = True
    return kwargs


def shared_flags(first: str, second: str, skip: Iterable[str] = ()) -> list[str]:
    """Names of the settings whose flag both commands have."""
    return [
        s.name
        for s in settings_of(first)
        if second in s.commands and s.name not in skip and first not in s.repeat_for
    ]


def command_line(args: argparse.Namespace, names: Iterable[str]) -> list[str]:
    """The flags that give another command these settings' values from `args`."""
    argv: list[str] = []
    for name in names:
        setting, given = SETTINGS[name], getattr(args, name)
        if setting.type is bool:
            argv += [setting.flag] if given else []
        elif given is not None:
            argv += [setting.flag, str(given)]
    return argv


def converter(setting: Setting) -> Callable[[str], Any]:
    def convert(raw: str) -> Any:
        try:
            return setting.parse(raw)
        except SettingsError as exc:
            where = " or ".join(filter(None, (setting.flag, setting.env)))
            raise argparse.ArgumentTypeError(f"{exc} ({where})") from None

    convert.__name__ = setting.type.__name__
    return convert


def help_text(setting: Setting) -> str:
    """Help, then [VARIABLE; default]. The declared default, never the variable's
    value: an inherited environment may hold a secret (a URL with a password)."""
    where = f"{setting.env}; " if setting.env else ""
    return f"{setting.help} [{where}{setting.default_text}]".replace("%", "%%")


def markdown_table() -> str:
    """The README's configuration table: one row per setting."""
    rows = [
        "| flag | variable | default | what it sets |",
        "| --- | --- | --- | --- |",
    ]
    rows += [_row(setting) for setting in SETTINGS.values()]
    return "\n".join(rows)


def _row(setting: Setting) -> str:
    flag = "(variable only)"
    if setting.flag:
        where = "before the command" if setting.commands == (TOP,) else ", ".join(setting.commands)
        flag = f"`{setting.flag}` ({where})"
    env = f"`{setting.env}`" if setting.env else ""
    literal = setting.shown is None and setting.default is not None and setting.type is not bool
    default = f"`{setting.default_text}`" if literal else setting.default_text
    cells = (flag, env, default, setting.help)
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def with_table(text: str) -> str:
    """`text` (the README) with the part between the table markers replaced."""
    start, end = text.index(TABLE_START), text.index(TABLE_END)
    head = text[: start + len(TABLE_START)]
    return f"{head}\n{markdown_table()}\n{text[end:]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedq.flags", description=__doc__)
    parser.add_argument("readme", type=Path, help="the README holding the table markers")
    parser.add_argument("--write", action="store_true", help="rewrite the table in place")
    parser.add_argument("--check", action="store_true", help="exit 1 when the table is stale")
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    fresh = with_table(text)
    if args.write:
        args.readme.write_text(fresh, encoding="utf-8")
        return 0
    if args.check:
        return 0 if fresh == text else 1
    print(markdown_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
