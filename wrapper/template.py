"""Command templates: placeholders in the program's arguments, checked before anything runs.

A template is the program and its arguments as the user wrote them after ``--``. Placeholders
may stand anywhere inside an argument (``'{calexp}[1]'``):

``{NAME}``
    the path (or URI) of the input called ``NAME``;
``{dataId.KEY}``
    a value of the execution's data ID (``{dataId.visit}``, ``{dataId.band}``);
``{workdir}``
    the program's working directory (the writable overlay).

``{{`` and ``}}`` stand for literal braces. Without a shell, each argument stays one argument
whatever a substitution holds. With a shell (``shell=True``) the arguments are joined with
spaces into one script for ``/bin/sh -c``, and no value ever enters the script's text: each
placeholder becomes a reference to a positional parameter (``"${1}"`` outside quotes,
``${1}`` inside double quotes) and the values follow the script as ``sh -c SCRIPT sh V1 V2``.
Whatever a value holds (quotes, ``$()``, backquotes, ``;``, a newline), the shell only ever
expands it as a parameter, so the user's own quoting cannot undo the protection. A placeholder
inside single quotes, where the shell expands nothing, is refused when the template is parsed.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Collection, Mapping, Sequence

from butlerfs.errors import UsageError

__all__ = ["DATA_ID_PREFIX", "SHELL", "WORKDIR", "CommandTemplate", "TemplateError"]

_LOG = logging.getLogger(__name__)

DATA_ID_PREFIX = "dataId."
"""Prefix of the placeholders naming a data ID value."""
WORKDIR = "workdir"
"""Placeholder of the program's working directory."""
SHELL = "/bin/sh"
"""The shell of ``shell=True`` templates."""

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


class TemplateError(UsageError):
    """A template that cannot be expanded: a malformed or undefined placeholder."""


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str


_Part = str | _Field


def _parse_argument(text: str) -> tuple[_Part, ...]:
    parts: list[_Part] = []
    literal: list[str] = []
    pos = 0
    for match in _TOKEN.finditer(text):
        literal.append(text[pos : match.start()])
        token = match.group(0)
        if token in ("{{", "}}"):
            literal.append(token[0])
        elif token in ("{", "}"):
            raise TemplateError(
                f"unbalanced {token!r} in argument {text!r}: write {token * 2} for a literal brace"
            )
        else:
            name = match.group(1).strip()
            if not name:
                raise TemplateError(f"empty placeholder {{}} in argument {text!r}")
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(_Field(name))
        pos = match.end()
    literal.append(text[pos:])
    if "".join(literal):
        parts.append("".join(literal))
    return tuple(parts)


@dataclasses.dataclass(frozen=True)
class CommandTemplate:
    """A program's argument list with placeholders.

    Use `parse` to build one.

    Attributes
    ----------
    arguments : `tuple` [`str`]
        The arguments as given.
    shell : `bool`
        Whether the arguments form a ``/bin/sh -c`` script.
    """

    arguments: tuple[str, ...]
    shell: bool
    _parsed: tuple[tuple[_Part, ...], ...] = dataclasses.field(repr=False, compare=False)

    @classmethod
    def parse(cls, arguments: Sequence[str], *, shell: bool = False) -> CommandTemplate:
        """Parse the program and its arguments.

        Parameters
        ----------
        arguments : `~collections.abc.Sequence` [`str`]
            The program followed by its arguments.
        shell : `bool`, optional
            Join them into a ``/bin/sh -c`` script, quoting every substitution.

        Returns
        -------
        template : `CommandTemplate`
            The parsed template.

        Raises
        ------
        TemplateError
            Raised for an empty command, an unbalanced brace or an empty placeholder.
        """
        if not arguments or not arguments[0].strip():
            raise TemplateError("no program given: put it after --, e.g. -- source-extractor '{calexp}[1]'")
        template = cls(tuple(arguments), shell, tuple(_parse_argument(a) for a in arguments))
        if shell:
            template._shell_script()  # a placeholder the shell would not expand fails now
        return template

    @property
    def placeholders(self) -> frozenset[str]:
        """Every placeholder name used (``calexp``, ``dataId.visit``, ``workdir``)."""
        return frozenset(p.name for arg in self._parsed for p in arg if isinstance(p, _Field))

    @property
    def program(self) -> str | None:
        """The program as written, or `None` when it is computed by a placeholder or a shell."""
        if self.shell or any(isinstance(p, _Field) for p in self._parsed[0]):
            return None
        return self.arguments[0].replace("{{", "{").replace("}}", "}")

    def validate(self, input_names: Collection[str], data_id_keys: Collection[str]) -> None:
        """Check that every placeholder will have a value.

        Parameters
        ----------
        input_names : `~collections.abc.Collection` [`str`]
            Names of the inputs (``{NAME}``).
        data_id_keys : `~collections.abc.Collection` [`str`]
            Dimensions of the execution's data ID (``{dataId.KEY}``).

        Raises
        ------
        TemplateError
            Raised for the first undefined placeholder, naming the defined ones.
        """
        for name in sorted(self.placeholders):
            if name == WORKDIR or name in input_names:
                continue
            if name.startswith(DATA_ID_PREFIX):
                key = name[len(DATA_ID_PREFIX) :]
                if key in data_id_keys:
                    continue
                raise TemplateError(
                    f"undefined placeholder {{{name}}}: the data ID has {', '.join(sorted(data_id_keys))}"
                )
            defined = [*sorted(input_names), WORKDIR, f"{DATA_ID_PREFIX}KEY"]
            raise TemplateError(
                f"undefined placeholder {{{name}}}: defined are {', '.join('{' + d + '}' for d in defined)}"
                " (write {{ and }} for literal braces)"
            )

    def render(self, inputs: Mapping[str, str], data_id: Mapping[str, object], workdir: str) -> list[str]:
        """Substitute every placeholder.

        Parameters
        ----------
        inputs : `~collections.abc.Mapping` [`str`, `str`]
            Path (or URI) of each input by name.
        data_id : `~collections.abc.Mapping` [`str`, `object`]
            The execution's data ID values.
        workdir : `str`
            The program's working directory.

        Returns
        -------
        argv : `list` [`str`]
            The exact argument vector to execute; ``[SHELL, "-c", script]`` for a shell template.

        Raises
        ------
        TemplateError
            Raised for a placeholder with no value.
        """

        def value(name: str) -> str:
            if name == WORKDIR:
                return workdir
            if name.startswith(DATA_ID_PREFIX) and name[len(DATA_ID_PREFIX) :] in data_id:
                return str(data_id[name[len(DATA_ID_PREFIX) :]])
            if name in inputs:
                return inputs[name]
            raise TemplateError(f"undefined placeholder {{{name}}}")

        if self.shell:
            script, names = self._shell_script()
            return [SHELL, "-c", script, "sh", *(value(name) for name in names)]
        return ["".join(p if isinstance(p, str) else value(p.name) for p in arg) for arg in self._parsed]

    def _shell_script(self) -> tuple[str, list[str]]:
        """Return the script with placeholders as positional parameters, and their names in order.

        Raises
        ------
        TemplateError
            Raised for a placeholder inside single quotes (or a comment), where the shell
            would not expand a parameter.
        """
        parts: list[_Part] = []
        for index, arg in enumerate(self._parsed):
            if index:
                parts.append(" ")
            parts.extend(arg)
        lexer = _ShellQuoting()
        script: list[str] = []
        numbers: dict[str, int] = {}
        for part in parts:
            if isinstance(part, str):
                lexer.feed(part)
                script.append(part)
                continue
            if lexer.state in ("'", "#"):
                where = "inside single quotes" if lexer.state == "'" else "in a comment"
                raise TemplateError(
                    f"placeholder {{{part.name}}} is {where} in a shell command, where the shell "
                    f'expands nothing: write it outside quotes or inside double quotes ("x={{{part.name}}}")'
                )
            number = numbers.setdefault(part.name, len(numbers) + 1)
            script.append(f"${{{number}}}" if lexer.state == '"' else f'"${{{number}}}"')
            lexer.feed("x")  # the reference is part of a word, as the value would be
        return "".join(script), list(numbers)


class _ShellQuoting:
    """Tracks the POSIX shell's quoting context through a script, one piece at a time.

    The state is the innermost context: ``""`` (unquoted, also inside ``$(...)`` and
    backquotes), ``'`` (single quotes), ``"`` (double quotes) or ``#`` (a comment).
    """

    def __init__(self) -> None:
        self._stack: list[str] = [""]
        self._escaped = False
        self._previous = " "

    @property
    def state(self) -> str:
        return self._stack[-1]

    def feed(self, text: str) -> None:
        stack = self._stack
        for char in text:
            top, previous = stack[-1], self._previous
            self._previous = char
            if self._escaped:
                self._escaped = False
            elif top == "'":
                if char == "'":
                    stack.pop()
            elif top == "#":
                if char == "\n":
                    stack.pop()
            elif char == "\\":
                self._escaped = True
            elif top == '"':
                if char == '"':
                    stack.pop()
                elif char == "(" and previous == "$":
                    stack.append("(")
                elif char == "`":
                    stack.append("`")
            elif char == "`":
                if top == "`":
                    stack.pop()
                else:
                    stack.append("`")
            elif char in "'\"":
                stack.append(char)
            elif char == "(":
                stack.append("(")
            elif char == ")" and top == "(":
                stack.pop()
            elif char == "#" and previous in " \t\n;&|()":
                stack.append("#")

    def __repr__(self) -> str:
        return f"_ShellQuoting({self._stack!r})"
