"""Help pages: plain text that reads the same at 80 columns, in a pipe and in a log.

typer's rich pages draw boxes, keep a docstring's hard line breaks, print a type for every
option (``<bool>`` even on ``--help``) and cut long defaults at 80 columns. These pages are
click's plain layout, filled from the commands as they are: each docstring paragraph as
one paragraph, ``--out DIR`` instead of ``--out <str>``, one bracket per option
(``[default: 0 = automatic; >= 1]``, ``[required]``) whichever way its help text wrote
the default, and an example per command. What the CLI adds to the commands' own text is
one :class:`HelpGuide` (``reid_ray.cli.GUIDE``).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Mapping, Sequence
from typing import Any

#: a default stated in an option's help prose: "(default 10)", "(default: model's)"
_PROSE_DEFAULT = re.compile(r"\s*\(default:?\s+((?:[^()]|\([^()]*\))+)\)")
#: a default stated as a trailing "[512]"
_BRACKET_DEFAULT = re.compile(r"\s*\[([^\[\]]+)\]\.?\s*$")
#: what the default 0 means: "(0: automatic)"
_ZERO_MEANS = re.compile(r"\s*\(0: ([^()]+)\)")


#: the name a help page gives an option's value ("--out DIR"), by option
VALUE_NAMES = {
    **dict.fromkeys(
        (
            "--manifest",
            "--split",
            "--config",
            "--reviewed",
            "--calibration",
            "--fusion",
            "--rerank-config",
        ),
        "FILE",
    ),
    **dict.fromkeys(
        (
            "--out",
            "--embeddings",
            "--index",
            "--gallery",
            "--results",
            "--cache-dir",
            "--annotate",
            "--images",
        ),
        "DIR",
    ),
    "--candidates": "PATH",
    "--model": "REF",
    "--set": "KEY=VALUE",
    "--version": "NAME",
    "--budget": "B",
    "--host": "ADDR",
    "--night": "TAG",
    "--splits": "NAMES",
    **dict.fromkeys(
        (
            "--sampler",
            "--oracle",
            "--preset",
            "--split-kind",
            "--kind",
            "--extractor",
            "--matcher",
            "--device",
            "--precision",
            "--decode-mode",
            "--gpu",
        ),
        "NAME",
    ),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class HelpGuide:
    """What the help pages add to the commands' own text (kept in one table in cli.py).

    ``summaries``: command path ("gallery build") -> one line for command lists;
    ``examples``: command path -> example commands (continuation lines end with ``\\``);
    ``groups``: (heading, command names) for the top-level list; ``metavars``: option
    ("--out") or command and option ("split --out") -> the value's name ("DIR");
    ``notes``: (command path, option) -> a requirement note ("required, or in --config").
    """

    summaries: Mapping[str, str] = dataclasses.field(default_factory=dict)
    examples: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    groups: Sequence[tuple[str, Sequence[str]]] = ()
    metavars: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(VALUE_NAMES))
    notes: Mapping[tuple[str, str], str] = dataclasses.field(default_factory=dict)


def one_paragraph(text: str | None) -> str:
    """A docstring's first paragraph as one line (its hard line breaks removed)."""
    import inspect

    text = inspect.cleandoc(text or "").partition("\f")[0]
    return " ".join(text.split("\n\n")[0].split())


def paragraphs(text: str | None) -> list[str]:
    """A docstring's paragraphs, each as one line."""
    import inspect

    text = inspect.cleandoc(text or "").partition("\f")[0]
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def _plain(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ", ".join(map(_plain, value))
    return str(value)


def _option_label(param: Any, metavars: Mapping[str, str], path: str = "") -> str:
    """``--out DIR``, ``--flip``, ``--[no-]resume``, ``--on-ray / --here``."""
    opts = list(getattr(param, "opts", []))
    secondary = list(getattr(param, "secondary_opts", []))
    longs = [o for o in opts if o.startswith("--")] or opts
    shorts = [o for o in opts if not o.startswith("--")]
    name = longs[0]
    if getattr(param, "is_flag", False):
        if secondary:
            other = secondary[0]
            if other == "--no-" + name[2:]:
                # off by default: the flag alone says it; otherwise both spellings matter
                name = name if param.default is False else f"--[no-]{name[2:]}"
            else:
                name = f"{name} / {other}"
        return ", ".join([*shorts, name])
    if getattr(param, "param_type_name", "") == "argument":
        return (param.metavar or param.name).upper()
    metavar = param.metavar or metavars.get(f"{path} {name}".strip()) or metavars.get(name)
    if metavar is None:
        descriptor = getattr(param, "type_descriptor", None)
        choices = getattr(descriptor, "choices", None) if descriptor is not None else None
        annotation = getattr(descriptor, "annotation", str)
        args = typing.get_args(annotation)
        element = args[0] if typing.get_origin(annotation) is list and args else annotation
        if choices:
            metavar = "|".join(str(getattr(c, "value", c)) for c in choices)
        else:
            metavar = {int: "N", float: "X", bool: "BOOL"}.get(element, "TEXT")
    return ", ".join([*shorts, f"{name} {metavar}"])


def _option_text(param: Any, note: str | None) -> str:
    """The option's help as one paragraph with one bracket: default, range, requirement."""
    text = " ".join((param.help or "").split())
    default = param.default
    shown: str | None = None
    if match := _PROSE_DEFAULT.search(text):
        shown, text = match.group(1).strip(), _PROSE_DEFAULT.sub("", text, count=1)
    elif default in (None, "", ()) and (match := _BRACKET_DEFAULT.search(text)):
        shown, text = match.group(1).strip(), _BRACKET_DEFAULT.sub("", text, count=1)
    elif default == 0 and not isinstance(default, bool) and (match := _ZERO_MEANS.search(text)):
        shown, text = f"0 = {match.group(1).strip()}", _ZERO_MEANS.sub("", text, count=1)
    text = re.sub(r"\s+([.;,])", r"\1", text).strip()
    extra = []
    if getattr(param, "is_flag", False):
        if shown is None and default is True:
            shown = "on"
    elif shown is None and default not in (None, "", (), []) and not callable(default):
        shown = _plain(default)
    if shown is not None:
        extra.append(f"default: {shown}")
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    if low is not None and high is not None:
        extra.append(f"{_plain(low)} to {_plain(high)}")
    elif low is not None:
        extra.append(f">= {_plain(low)}")
    elif high is not None:
        extra.append(f"<= {_plain(high)}")
    if note:
        extra.append(note)
    elif getattr(param, "required", False):
        extra.append("required")
    return f"{text} [{'; '.join(extra)}]" if extra else text


def format_command_help(command: Any, ctx: Any, formatter: Any, guide: HelpGuide) -> None:
    """Write ``command``'s help page into the click ``formatter``: usage, one paragraph per
    docstring paragraph, options (required first) with one bracket each, sub-commands
    with one-line summaries, then examples. No boxes, no type noise, nothing cut off."""
    path = " ".join(ctx.command_path.split()[1:])
    command.format_usage(ctx, formatter)
    for paragraph in paragraphs(command.help):
        formatter.write_paragraph()
        with formatter.indentation():
            formatter.write_text(paragraph)
    params = [p for p in command.get_params(ctx) if not getattr(p, "hidden", False)]
    arguments = [p for p in params if getattr(p, "param_type_name", "") == "argument"]
    options = [p for p in params if getattr(p, "param_type_name", "") == "option"]
    options.sort(key=lambda p: not (p.required or (path, p.opts[0]) in guide.notes))
    for title, group in (("Arguments", arguments), ("Options", options)):
        rows = [
            (
                _option_label(p, guide.metavars, path),
                _option_text(p, guide.notes.get((path, p.opts[0]))),
            )
            for p in group
        ]
        if rows:
            with formatter.section(title):
                formatter.write_dl(rows, col_max=26)
    subcommands = getattr(command, "commands", None) or {}
    if subcommands:

        def summary_of(name: str) -> str:
            key = f"{path} {name}".strip()
            return guide.summaries.get(key) or one_paragraph(subcommands[name].help)

        visible = [n for n, c in subcommands.items() if not getattr(c, "hidden", False)]
        sections = (
            [] if path else [(h, [n for n in names if n in visible]) for h, names in guide.groups]
        )
        listed = {n for _, names in sections for n in names}
        rest = [n for n in visible if n not in listed]
        if rest:
            sections.append(("Commands" if not sections else "Other commands", rest))
        for heading, names in sections:
            if names:
                with formatter.section(heading):
                    formatter.write_dl([(n, summary_of(n)) for n in names], col_max=12)
        formatter.write_paragraph()
        formatter.write_text(
            f"Run '{ctx.command_path} COMMAND --help' for its options and an example."
        )
    examples = guide.examples.get(path) or ()
    if examples:
        with formatter.section("Example" if len(examples) == 1 else "Examples"):
            for example in examples:  # one command each; continuation lines end with "\\"
                for line in example.splitlines():
                    formatter.write(f"{'':>{formatter.current_indent}}{line}\n")


def use_help_guide(root: Any, guide: HelpGuide) -> Any:
    """``root`` (a click command tree) with every page rendered by
    :func:`format_command_help` and ``guide``; returns ``root``."""
    import types

    todo = [root]
    while todo:
        command = todo.pop()
        command.format_help = types.MethodType(
            lambda self, ctx, formatter: format_command_help(self, ctx, formatter, guide), command
        )
        todo.extend((getattr(command, "commands", None) or {}).values())
    return root


__all__ = ["VALUE_NAMES", "HelpGuide", "format_command_help", "one_paragraph", "use_help_guide"]
