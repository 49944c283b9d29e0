"""Steady-state training throughput: tokens/s over the optimizer steps after warm-up, and nothing else.

The stage's wall time also holds model loading, the base model's evaluation, evaluations and checkpoint saves;
the Trainer's own runtime still holds the warm-up steps (allocator growth, kernel selection, compilation) and
the evaluations. This times each optimizer step from the end of the previous one (its data loading included),
restarting the clock after an evaluation or a save, and counts tokens with trl's own counter (`num_tokens`
in its logs: the real, non-pad tokens fed), so no step pays for a host-device sync of ours. The window runs
from the first log after warm-up to the last log of the session.
"""

from __future__ import annotations

import math
import time

from transformers import TrainerCallback


def warmup_steps(session_steps: int) -> int:
    """Steps left out at the start: at least 2, or 10% of the session's steps."""
    return max(2, math.ceil(0.1 * session_steps))


class StepTimer(TrainerCallback):
    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.seconds: dict[int, float] = {}  # optimizer step -> its wall time
        self.tokens: dict[int, int] = {}  # logged step -> tokens fed this session so far
        self.warmup = 2
        self._mark = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.warmup = state.global_step + warmup_steps(state.max_steps - state.global_step)
        self._mark = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_evaluate or control.should_save:
            _synchronize()  # let the step's queued GPU work count here, not in the evaluation or save after it
        now = self.clock()
        self.seconds[state.global_step] = now - self._mark
        self._mark = now

    def on_evaluate(self, args, state, control, **kwargs):
        self._mark = self.clock()

    def on_save(self, args, state, control, **kwargs):
        self._mark = self.clock()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "num_tokens" in logs:
            self.tokens[state.global_step] = max(int(logs["num_tokens"]), self.tokens.get(state.global_step, 0))

    def session_tokens(self) -> int:
        return max(self.tokens.values(), default=0)

    def steady_state(self) -> dict | None:
        """Tokens/s over the timed window, or None when the session was too short to have one."""
        logged = sorted(step for step in self.tokens if step in self.seconds and step >= self.warmup)
        if len(logged) < 2:
            return None
        start, end = logged[0], logged[-1]
        seconds = sum(self.seconds[step] for step in range(start + 1, end + 1))
        tokens = self.tokens[end] - self.tokens[start]
        return {"steady_tokens_per_second": round(tokens / seconds, 1), "steady_steps": end - start,
                "steady_seconds": round(seconds, 2)}


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
