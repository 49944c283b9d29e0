"""Greedy chat generation with a transformers model: how stages and tests ask a model the questions it learned."""

from __future__ import annotations

from dataclasses import dataclass

from qlora_app.data.encoding import render


@dataclass(frozen=True)
class Answer:
    text: str
    stopped: bool  # ended with an end-of-turn/end-of-sequence token rather than the token limit


def answer(model, tokenizer, messages: list[dict], stop_ids: list[int], max_new_tokens: int = 64) -> Answer:
    import torch

    prompt = render(tokenizer, messages, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    stopped = bool(new) and new[-1] in stop_ids
    text = tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=False)
    return Answer(text.strip(), stopped)
