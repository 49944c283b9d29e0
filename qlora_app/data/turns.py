"""Assistant turns as a server sees them: the prompt it renders before each turn, and the answer it should generate.

vLLM 0.32 renders a chat request with the tokenizer's apply_chat_template(tokenize=True, return_dict=False)
(vllm/renderers/hf.py, safe_apply_chat_template), which tokenizes the rendered text with
add_special_tokens=False (transformers/tokenization_utils_base.py, apply_chat_template): BOS appears only where
the template writes it. A turn's prompt here is tokenized the same way, from the conversation before the turn
rendered with add_generation_prompt=True. Its answer is what the template renders for the turn after that
prompt, through the end-of-turn token: found where the full render continues the prompt, or, for a template
that renders the last turns differently (Mistral-Nemo puts the system prompt before the last user message only;
a thinking template closes an empty think block in the prompt), located by the answer's text and the end of
the prompt that precedes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qlora_app.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Turn:
    prompt: list[int]  # what the server feeds the model before this turn
    answer: list[int]  # what the model should generate, ending with the end-of-turn token

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.answer


def assistant_turns(messages: list[dict], tokenizer: PreTrainedTokenizerBase, where: str,
                    template_kwargs: dict[str, Any] | None = None) -> list[Turn]:
    kwargs = template_kwargs or {}
    return [one_turn(messages, i, tokenizer, where, kwargs)
            for i, message in enumerate(messages) if message["role"] == "assistant"]


def one_turn(messages: list[dict], i: int, tokenizer, where: str, kwargs: dict) -> Turn:
    if i == 0:
        raise UserError(f"{where}: turn 0 is an assistant turn with nothing before it; a conversation starts with "
                        "a user (or system) turn")
    prompt = render(tokenizer, messages[:i], where, add_generation_prompt=True, **kwargs)
    full = render(tokenizer, messages[: i + 1], where, **kwargs)
    end = end_of_turn(full, tokenizer, visible_answer(messages[i]), where, i)
    start = len(prompt) if full.startswith(prompt) else aligned_start(prompt, full, messages[i], where, i)
    prompt_ids = tokens(tokenizer, prompt)
    return Turn(prompt_ids, answer_tokens(tokenizer, prompt, full[start:end], prompt_ids))


def visible_answer(message: dict) -> str:
    """The answer's text as a template shows it: after any think block, without surrounding whitespace."""
    content = message["content"]
    return content.split("</think>")[-1].strip() or content.strip()


def end_of_turn(full: str, tokenizer, answer: str, where: str, i: int) -> int:
    """Where the turn's end-of-turn token ends in the render: the last special token, after the answer."""
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    special = special_ids(tokenizer)
    ends = [(a, b) for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True) if tid in special]
    answer_at = full.rfind(answer)
    if answer_at < 0:
        raise UserError(f"{where}: turn {i}: the chat template does not show the assistant's answer as written, so "
                        "the answer cannot be located in its render")
    if not ends or ends[-1][0] < answer_at + len(answer):
        raise UserError(f"{where}: the chat template ends assistant turns without a special end-of-turn token, so "
                        "the model would never learn to stop; fix model.chat_template")
    return ends[-1][1]


def aligned_start(prompt: str, full: str, message: dict, where: str, i: int) -> int:
    """Where the answer begins in a render that does not continue the prompt: right after the longest end of the
    prompt found before the answer (binary search: a shorter end of the prompt is found wherever a longer one is)."""
    before = full[: full.rfind(visible_answer(message))]
    lo, hi = 0, len(prompt)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if prompt[-mid:] in before:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        raise UserError(f"{where}: turn {i}: the chat template renders this turn unlike the prompt a server would "
                        "send before it, so its answer cannot be located")
    return before.rfind(prompt[-lo:]) + lo


def answer_tokens(tokenizer, prompt: str, answer: str, prompt_ids: list[int]) -> list[int]:
    """The answer's tokens after the prompt's: as the whole tokenizes, unless a token would straddle the two."""
    joint = tokens(tokenizer, prompt + answer)
    if joint[: len(prompt_ids)] == prompt_ids:
        return joint[len(prompt_ids):]
    return tokens(tokenizer, answer)


def tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def special_ids(tokenizer) -> set[int]:
    """Named special tokens and every added token flagged special (Qwen's <|im_end|>, Gemma's <end_of_turn>)."""
    added = {tid for tid, token in tokenizer.added_tokens_decoder.items() if token.special}
    return set(tokenizer.all_special_ids) | added


def check_template_kwargs(tokenizer, kwargs: dict[str, Any]) -> None:
    """Refuse template arguments the template never reads: vLLM passes a template only the variables it reads
    (vllm/renderers/hf.py, resolve_chat_template_kwargs), so they would silently change nothing."""
    import jinja2.meta
    from transformers.utils.chat_template_utils import _compile_jinja_template

    template = tokenizer.get_chat_template()
    read = jinja2.meta.find_undeclared_variables(_compile_jinja_template(template).environment.parse(template))
    unread = ["model.enable_thinking" if k == "enable_thinking" else f"model.chat_template_kwargs.{k}"
              for k in sorted(set(kwargs) - read)]
    if unread:
        raise UserError(f"{', '.join(unread)} is set but the chat template never reads it, so it would change "
                        "nothing in training or serving; remove it or use a template that reads it")


def render(tokenizer, messages: list[dict], where: str, add_generation_prompt: bool = False, **kwargs) -> str:
    """The template's text for these messages; reasoning goes in under both names vLLM gives it
    (vllm/renderers/chat_utils.py, the assistant branch that sets 'reasoning' and 'reasoning_content')."""
    served = [{**m, "reasoning": m["reasoning_content"]} if "reasoning_content" in m else m for m in messages]
    try:
        return tokenizer.apply_chat_template(served, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **kwargs)
    except Exception as exc:  # jinja raises its own errors, e.g. "roles must alternate"
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{where}: the chat template rejects this conversation: {message}") from None
