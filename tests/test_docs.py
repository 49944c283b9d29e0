"""The manual: README.md and docs/ build as a site with no warnings, and what they show exists.

Every `qlora-app ...` line in their code blocks parses with the real command line (click, in process: a
misspelled command or option, a missing argument or a bad value fails), every `make ...` line passes `make -n`
with only variables the Makefile reads, README's links lead somewhere, the data format examples are read as the
format they illustrate, and every one-line error the code raises is in the troubleshooting page.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from conftest import REPO
from markdown.extensions.toc import slugify

from qlora_app.cli import main

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
SEPARATORS = {"&&", "||", "|", ";", "&"}


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    tool: str  # "qlora-app" or "make"
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {self.tool} {shlex.join(self.args)}"


def shell_lines(path: Path):
    """(line number, line) of the shell code blocks of a Markdown file, continuation lines joined."""
    fence, language, pending, start = None, "", "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        opening = re.match(r"\s*(```+|~~~+)\s*(\w*)", line)
        if fence is None:
            if opening:
                fence, language = opening[1], opening[2]
            continue
        if line.strip().startswith(fence):
            fence = None
            continue
        if language not in SHELL_BLOCKS:
            continue
        text = line.strip()
        if not pending:
            start = number
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        yield start, pending + text
        pending = ""


def without_comment(line: str) -> str:
    """The line up to a shell comment: a # that starts a word outside quotes (a comment may hold an apostrophe)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def words(line: str) -> list[str]:
    lexer = shlex.shlex(without_comment(line.removeprefix("$ ")), posix=True, punctuation_chars="|&;")
    lexer.whitespace_split = True
    lexer.commenters = ""
    return list(lexer)


def commands_in(path: Path) -> list[Command]:
    found = []
    for number, line in shell_lines(path):
        where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{number}"
        try:
            tokens = words(line)
        except ValueError:  # unbalanced quotes: fine for a line that runs neither qlora-app nor make
            assert not re.search(r"\bqlora-app\b|^make\b", line.strip()), f"{where}: cannot split {line!r}"
            continue
        segment: list[str] = []
        for token in [*tokens, ";"]:
            if token not in SEPARATORS:
                segment.append(token)
                continue
            while segment and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", segment[0]):  # VAR=value before a command
                segment.pop(0)
            if segment and Path(segment[0]).name == "qlora-app":
                found.append(Command(where, "qlora-app", tuple(segment[1:])))
            elif segment and segment[0] == "make":
                found.append(Command(where, "make", tuple(segment[1:])))
            elif segment[:2] == ["docker", "run"]:  # the image's entrypoint runs qlora-app with the arguments
                image = next((i for i, word in enumerate(segment) if re.search(r"(^|/)qlora-app:\S+$", word)), None)
                if image is not None and segment[image + 1:]:
                    found.append(Command(where, "qlora-app", tuple(segment[image + 1:])))
            segment = []
    return found


COMMANDS = [command for page in PAGES for command in commands_in(page)]
CLI_COMMANDS = [c for c in COMMANDS if c.tool == "qlora-app"]
MAKE_COMMANDS = [c for c in COMMANDS if c.tool == "make"]


def parse_cli(args: list[str]) -> None:
    """Parse `qlora-app ARGS` as the real command line does, without running it (click raises on a mistake)."""
    try:
        if not args or args[0].startswith("-"):
            main.make_context("qlora-app", list(args))
            return
        context = click.Context(main, info_name="qlora-app")
        name, command, rest = main.resolve_command(context, list(args))
        command.make_context(name, rest, parent=context)
    except click.exceptions.Exit as done:  # --help or --version: parsed, and would have printed
        assert done.exit_code == 0


def makefile_variables() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([A-Z_][A-Z0-9_]*)\s*[:?+]?=", text, re.MULTILINE)) | set(
        re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", text))


def make_dry_run(args: list[str]) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("MAKEFLAGS", "MFLAGS", "HF_TOKEN", "QLORA_API_KEY")}
    return subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=REPO, env=environment, text=True,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=60)


def check_make(args: list[str]) -> None:
    unknown = [a.split("=", 1)[0] for a in args if "=" in a and a.split("=", 1)[0] not in makefile_variables()]
    assert not unknown, f"variables the Makefile never reads: {unknown}"
    result = make_dry_run(args)
    assert result.returncode == 0, result.stderr


# --- the site -----------------------------------------------------------------------------------------------

def test_the_site_builds_without_a_warning(tmp_path):
    """mkdocs.yml's validation turns a page missing from the nav, a broken link or anchor into a warning, and
    --strict turns a warning into a failure."""
    mkdocs = Path(sys.executable).with_name("mkdocs")
    result = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "troubleshooting" / "index.html").is_file()


def headings(path: Path) -> set[str]:
    text = re.sub(r"^\s*```.*?^\s*```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {slugify(re.sub(r"[`*]", "", title).strip(), "-") for title in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def test_readme_links_lead_to_files_and_headings():
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert len(links) >= 10
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        path = (REPO / target) if target else REPO / "README.md"
        assert path.exists(), link
        if anchor:
            assert anchor in headings(path), link


# --- the commands ---------------------------------------------------------------------------------------------

def test_commands_are_found():
    assert len(CLI_COMMANDS) >= 30 and len(MAKE_COMMANDS) >= 15
    shown = {c.args[0] for c in CLI_COMMANDS if c.args}
    assert {"train", "merge", "serve", "plan", "chat", "push", "pipeline", "doctor", "recipes", "show"} <= shown
    readme = {c.args[0] for c in MAKE_COMMANDS if c.where.startswith("README.md")}
    assert {"demo", "test", "smoke", "image", "plan", "train", "merge", "serve"} <= readme


@pytest.mark.parametrize("command", CLI_COMMANDS, ids=str)
def test_qlora_app_command_parses(command):
    parse_cli(list(command.args))


@pytest.mark.parametrize("command", MAKE_COMMANDS, ids=str)
def test_make_command_is_a_target_with_known_variables(command):
    check_make(list(command.args))


@pytest.mark.parametrize("args", [["trian", "llama3-8b"], ["train", "llama3-8b", "--resum"], ["train"],
                                  ["serve", "--port", "http"], ["push"], ["merge", "--base-weights", "nf4"]])
def test_the_cli_check_refuses_a_wrong_command(args):
    with pytest.raises(click.UsageError):
        parse_cli(args)


@pytest.mark.parametrize("args", [["trian"], ["train", "RECIPE=llama3-8b", "RESUEM=1"]])
def test_the_make_check_refuses_a_wrong_command(args):
    with pytest.raises(AssertionError):
        check_make(args)


def test_continuations_comments_and_chains_are_read(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\nexport X=1 && qlora-app train tiny \\\n  --set train.lr=1e-4   # a comment\n"
                    "make plan RECIPE=tiny | tee log\n```\n```python\nqlora-app = 1\n```\n")
    seen = [(c.tool, c.args) for c in commands_in(page)]
    assert seen == [("qlora-app", ("train", "tiny", "--set", "train.lr=1e-4")), ("make", ("plan", "RECIPE=tiny"))]


# --- data formats and errors --------------------------------------------------------------------------------

def test_the_data_format_examples_are_read_as_their_format():
    import json

    from qlora_app.data.preference import detect_layout, normalize_pairs
    from qlora_app.data.sources import FORMAT_COLUMNS, detect_format, normalize
    from qlora_app.recipe.schema import PREFERENCE_FORMATS

    rows = re.findall(r"^\| `(\w+)` \| .* \| `(\{.*\})` \|$", (REPO / "docs" / "recipes.md").read_text(), re.MULTILINE)
    assert sorted(name for name, _ in rows) == sorted([*FORMAT_COLUMNS, *PREFERENCE_FORMATS])
    for name, example in rows:
        record = [("example", json.loads(example))]
        detect, read = (detect_layout, normalize_pairs) if name in PREFERENCE_FORMATS else (detect_format, normalize)
        assert detect("auto", record, "example") == name
        read(record, name, "example")


def literal_parts(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [part.value for part in node.values if isinstance(part, ast.Constant)]
    return []


def raised_messages() -> list[tuple[str, str]]:
    """(where, the longest literal part) of every UserError the package raises, and of the ValueErrors that
    recipe validation and record checks turn into one."""
    found = []
    for path in sorted((REPO / "qlora_app").rglob("*.py")):
        relative = str(path.relative_to(REPO))
        user_facing_value_errors = relative in ("qlora_app/recipe/schema.py", "qlora_app/data/sources.py",
                                                "qlora_app/data/preference.py")
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            if name == "UserError" or (user_facing_value_errors and name in ("ValueError", "TypeError")):
                parts = [" ".join(p.split()).strip() for p in literal_parts(node.args[0])]
                longest = max(parts, key=len, default="")
                if len(longest) >= 15:
                    found.append((f"{relative}:{node.lineno}", longest))
    return found


def test_every_one_line_error_is_in_troubleshooting():
    page = " ".join((REPO / "docs" / "troubleshooting.md").read_text().split())
    messages = raised_messages()
    assert len(messages) >= 80
    missing = [f"{where}: {text!r}" for where, text in messages if text not in page]
    assert not missing, "errors docs/troubleshooting.md does not list (with what to do):\n" + "\n".join(missing)
