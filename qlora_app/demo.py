"""The demo: the built-in tiny recipe through train -> merge -> serve on CPU, then questions from its data
asked through the official openai client, answers printed beside what was taught, and the server stopped."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

from rich.table import Table

from qlora_app import console
from qlora_app.data.splits import chat_splits
from qlora_app.pipeline import ensure_merged, ensure_trained
from qlora_app.recipe.loader import load_recipe
from qlora_app.serve.auth import KEY_ENV
from qlora_app.serve.stage import running
from qlora_app.serve.target import merged_target

QUESTIONS = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def taught_pairs(recipe, n: int) -> list[tuple[list[dict], str]]:
    """n (prompt messages, taught answer) pairs from the training data, the same n every time (seeded)."""
    rows = chat_splits(recipe)[0].rows  # a preference pair: its prompt and chosen answer
    picked = random.Random(recipe.train.seed).sample(rows, min(n, len(rows)))
    return [(row["messages"][:-1], row["messages"][-1]["content"]) for row in picked]


def demo(root: Path, port: int | None = None, recipe_name: str = "tiny") -> None:
    from openai import OpenAI

    recipe = load_recipe(recipe_name)
    run = ensure_trained(recipe, root)
    ensure_merged(run, recipe)
    # echo off: vLLM's request log would bury the table
    with running(merged_target(run, recipe), "127.0.0.1", port or free_port(), root, echo=False) as endpoint:
        client = OpenAI(base_url=f"{endpoint.url}/v1", api_key=os.environ.get(KEY_ENV) or "not-needed")
        table = Table(title=f"demo: {recipe.name} served by vLLM at {endpoint.url}/v1 "
                            f"(up in {endpoint.startup_seconds:.0f} s)")
        for column in ("question", "answer (served model)", "taught", "finish"):
            table.add_column(column)
        for messages, taught in taught_pairs(recipe, QUESTIONS):
            reply = client.chat.completions.create(model=recipe.name, messages=messages, temperature=0,
                                                   max_tokens=64).choices[0]
            mark = "[green]same[/]" if reply.message.content.strip() == taught.strip() else "[red]differs[/]"
            table.add_row(messages[-1]["content"], reply.message.content, mark, reply.finish_reason)
        client.close()  # an open keep-alive connection would hold up the server's shutdown
    console.out.print(table)
    console.note(f"server stopped. Serve it yourself with: qlora-app serve --recipe {recipe.name}")
