"""Every ``brats-fl`` command the README and the docs show parses with the real command line (issue 40): its
subcommand exists, each option exists for that subcommand, a value from a fixed set is one of the set, and a command
in a code block parses whole. A page that names a removed or misspelt option fails here, not in a reader's shell."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
from brats_fl.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
#: a placeholder a reader replaces: <job id>, <its FL_global_model.pt>
PLACEHOLDER = re.compile(r"<[^<>\n]*>")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def _shell_commands(text: str) -> list[str]:
    """The ``brats-fl`` commands of a shell snippet: continuation lines joined, comments cut, one per ``&&``/``;``,
    and the snippet's own variables (``A="--sites 4"``) expanded."""
    text = text.replace("\\\n", " ")
    found, env = [], {}
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip().removeprefix("$ ")
        assignment = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", line)
        if assignment:
            env[assignment[1]] = " ".join(shlex.split(assignment[2]))
            continue
        line = re.sub(r"\$\{?([A-Z_][A-Z0-9_]*)\}?", lambda m: env.get(m[1], m[0]), line)
        for part in re.split(r"&&|;|\|\|", line):
            part = part.strip()
            if part.startswith("brats-fl ") or part == "brats-fl":
                found.append(part)
    return found


def commands() -> list[tuple[str, bool, str]]:
    """(where, whole, command) for every ``brats-fl`` command of every page; ``whole`` for code blocks, whose commands
    are meant to be typed as they stand, unlike inline code that may name one option of a command."""
    out = []
    for page in PAGES:
        text = page.read_text()
        name = page.relative_to(ROOT).as_posix()
        for block in FENCE.findall(text):
            out += [(name, True, c) for c in _shell_commands(block)]
        prose = FENCE.sub("", text)
        out += [(name, False, c) for span in INLINE.findall(prose) for c in _shell_commands(span)]
    return out


def _tokens(command: str) -> list[str]:
    return shlex.split(PLACEHOLDER.sub("X", command))[1:]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    # argparse keeps a parser's subcommands in a private action; no public accessor exists
    return next((dict(a.choices) for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def check_names(command: str) -> None:
    """The subcommand (and its subcommand) exist, every option exists for it, and a fixed-set option's value (or
    each of ``a|b`` alternatives) is in its set."""
    parser, words = build_parser(), _tokens(command)
    path = ["brats-fl"]
    while words and _subparsers(parser):
        choices = _subparsers(parser)
        word = words.pop(0)
        alternatives = word.split("|")
        assert all(w in choices for w in alternatives), f"{' '.join(path)}: no subcommand {word!r}"
        path.append(word)
        parser = choices[alternatives[0]]
    options = {s: a for a in parser._actions for s in a.option_strings}
    for i, word in enumerate(words):
        if not word.startswith("-") or word in ("-", "--") or re.fullmatch(r"-\d.*", word):
            continue
        flag, _, inline = word.partition("=")
        assert flag in options, f"{' '.join(path)}: no option {flag}"
        action = options[flag]
        value = inline or (words[i + 1] if i + 1 < len(words) else "")
        if action.choices and value and value not in ("X", "..."):
            wrong = [v for v in value.split("|") if v not in map(str, action.choices)]
            assert not wrong, f"{' '.join(path)} {flag}: {wrong} not among {list(action.choices)}"


def check_parses(command: str) -> None:
    """The whole command parses as argparse would parse it in a shell."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(_tokens(command))
        except SystemExit as exit_:
            assert exit_.code == 0, err.getvalue().strip().splitlines()[-1]


COMMANDS = commands()


def test_the_pages_show_commands():
    """The extraction finds commands in code blocks and inline code alike (a broken pattern would pass every page)."""
    assert sum(whole for _, whole, _ in COMMANDS) >= 10
    assert sum(not whole for _, whole, _ in COMMANDS) >= 10
    assert ("README.md", True, "brats-fl demo") in COMMANDS


@pytest.mark.parametrize(("page", "whole", "command"), COMMANDS, ids=[f"{p}:{c[:60]}" for p, _, c in COMMANDS])
def test_command_parses(page: str, whole: bool, command: str):
    check_names(command)
    if whole:
        check_parses(command)


@pytest.mark.parametrize(
    "command",
    [
        "brats-fl runn brats_fedavg",  # no such subcommand
        "brats-fl run brats_fedavg --round 3",  # misspelt option (argparse would take the prefix)
        "brats-fl poc strat",  # no such POC subcommand
        "brats-fl run brats_fedavg --recipe adam",  # not one of the recipes
        "brats-fl table runs/a --per-sites",
    ],
)
def test_a_wrong_command_is_caught(command: str):
    with pytest.raises(AssertionError):
        check_names(command)


def test_a_command_missing_its_arguments_fails_whole():
    with pytest.raises(AssertionError, match="required"):
        check_parses("brats-fl evaluate --split test")
