"""Terminal output: one rich console for results (stdout) and one for messages and errors (stderr)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape

# Piped output gets room for a table instead of rich's 80-column default.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, soft_wrap=True)


def error(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)


def note(message: str) -> None:
    err.print(f"[dim]{escape(message)}[/]", highlight=False)


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 1024**3:.2f}"


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)
