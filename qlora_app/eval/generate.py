"""Greedy, bounded answers from a running server through the OpenAI chat API, a few requests at a time.

The server renders each chat with the training chat template (it was started with it), so the questions are
asked exactly as the tuned model saw them in training.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from qlora_app import console
from qlora_app.errors import UserError
from qlora_app.eval.metrics import Answer


@dataclass(frozen=True)
class Question:
    messages: list[dict]  # the conversation up to the answer to give
    reference: str  # the held-out answer


def questions(rows: list[dict], limit: int | None) -> list[Question]:
    """The held-out chats ending in an assistant turn, as (prompt, reference); plain-text rows ask nothing."""
    found = [Question(row["messages"][:-1], row["messages"][-1]["content"]) for row in rows
             if "messages" in row and row["messages"][-1]["role"] == "assistant" and len(row["messages"]) > 1]
    if not found:
        raise UserError("the held-out split has no chat ending in an assistant answer: nothing to evaluate "
                        "(eval needs chat data, not plain text)")
    return found[:limit]


def ask(client, model: str, question: Question, max_tokens: int) -> Answer:
    choice_and_usage = client.chat.completions.create(model=model, messages=question.messages, temperature=0,
                                                      max_tokens=max_tokens)
    choice = choice_and_usage.choices[0]
    return Answer(choice.message.content or "", choice.finish_reason, choice_and_usage.usage.completion_tokens)


def answer_all(client, models: list[str], asked: list[Question], max_tokens: int,
               concurrency: int) -> dict[str, list[Answer]]:
    """Every question to every model, one model after the other, `concurrency` requests in flight, with a
    progress bar. Models never share a batch: vLLM 0.32's CPU build applied the adapter to base requests
    batched beside adapter requests (the base then "knew" a third of the tuned answers)."""
    from rich.progress import Progress

    with Progress(console=console.err, transient=True) as progress:
        task = progress.add_task("eval: answering", total=len(models) * len(asked))
        return {model: answer_one_model(client, model, asked, max_tokens, concurrency,
                                        lambda: progress.advance(task)) for model in models}


def answer_one_model(client, model: str, asked: list[Question], max_tokens: int, concurrency: int,
                     advance) -> list[Answer]:
    import openai

    answers: list = [None] * len(asked)
    pool = ThreadPoolExecutor(max_workers=concurrency)
    try:
        futures = {pool.submit(ask, client, model, q, max_tokens): i for i, q in enumerate(asked)}
        for future in as_completed(futures):
            answers[futures[future]] = future.result()
            advance()
    except openai.APIError as exc:
        raise UserError(f"the eval server refused a question to {model}: {str(exc).splitlines()[0]}") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return answers
