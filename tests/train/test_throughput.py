"""Steady-state throughput: timed optimizer steps after warm-up, evaluations and saves left out."""

from __future__ import annotations

import json

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from qlora_app.run.directory import RunDir
from qlora_app.train.throughput import StepTimer, warmup_steps


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drive(timer: StepTimer, clock: Clock, steps: int, tokens_per_step: int, step_seconds: float,
          eval_at: int, eval_seconds: float, log_steps: int) -> None:
    """The Trainer's order of calls: step end, then log, evaluate and save at the steps that have them."""
    args, state = TrainingArguments(output_dir="/nonexistent", report_to=[]), TrainerState(max_steps=steps)
    timer.on_train_begin(args, state, TrainerControl())
    for step in range(1, steps + 1):
        clock.now += step_seconds * (5 if step <= 2 else 1)  # warm-up steps are slow
        state.global_step = step
        timer.on_step_end(args, state, TrainerControl(should_evaluate=step == eval_at))
        if step % log_steps == 0:
            timer.on_log(args, state, TrainerControl(), logs={"loss": 1.0, "num_tokens": step * tokens_per_step})
        if step == eval_at:
            clock.now += eval_seconds
            timer.on_log(args, state, TrainerControl(), logs={"eval_loss": 1.0})
            timer.on_evaluate(args, state, TrainerControl())
            clock.now += eval_seconds  # the save after it
            timer.on_save(args, state, TrainerControl())


def test_steady_state_leaves_out_warmup_evaluation_and_saves():
    clock = Clock()
    timer = StepTimer(clock)
    drive(timer, clock, steps=20, tokens_per_step=1000, step_seconds=0.5, eval_at=10, eval_seconds=30.0, log_steps=5)
    steady = timer.steady_state()
    assert steady == {"steady_tokens_per_second": 2000.0, "steady_steps": 15, "steady_seconds": 7.5}
    assert timer.session_tokens() == 20_000


def test_a_session_too_short_for_a_window_has_no_steady_state():
    clock = Clock()
    timer = StepTimer(clock)
    drive(timer, clock, steps=4, tokens_per_step=1000, step_seconds=0.5, eval_at=0, eval_seconds=0, log_steps=5)
    assert timer.steady_state() is None and warmup_steps(4) == 2 and warmup_steps(100) == 10


@pytest.mark.slow
def test_manifest_and_summary_carry_steady_state_and_stage_throughput(trained_run):
    run = RunDir(trained_run.path)
    t = run.read_manifest()["training"]
    logged = {m["step"]: m["num_tokens"] for m in map(json.loads, run.metrics.read_text().splitlines())
              if "num_tokens" in m and "loss" in m}
    window = [step for step in sorted(logged) if step >= warmup_steps(t["steps"])]
    assert t["steady_steps"] == window[-1] - window[0] > 0
    steady_tokens = logged[window[-1]] - logged[window[0]]
    assert t["steady_tokens_per_second"] == pytest.approx(steady_tokens / t["steady_seconds"], rel=1e-3)
    assert 0 < t["steady_seconds"] < t["train_seconds"] < t["stage_seconds"]
    # the stage also loads the model and evaluates: it cannot be faster than its own training steps
    assert 0 < t["stage_tokens_per_second"] < t["steady_tokens_per_second"]
    assert "tokens/s: steady-state / whole stage" in trained_run.stdout
    assert f"{t['steady_tokens_per_second']:,.0f} / {t['stage_tokens_per_second']:,.0f}" in trained_run.stdout


def test_a_resumed_run_reports_the_rate_and_time_of_its_own_session():
    """Session 1 stopped at step 5 (500 tokens in 10 s), session 2 trained steps 6-10 (trl's count restarted:
    400 tokens in 12 s) within a 15 s stage: the rate is 400 / 12, and training never outlasts the stage."""
    from qlora_app.train.outputs import session_timing

    first = [{"step": s, "num_tokens": 100 * s} for s in range(1, 6)] + [{"step": 5, "train_runtime": 10.0}]
    second = [{"step": s, "num_tokens": 80 * (s - 5)} for s in range(6, 11)] + [{"step": 10, "train_runtime": 12.0}]
    timing = session_timing(first + second + [{"step": 10, "eval_loss": 1.0}], 400, 15.0)
    assert timing["tokens_per_second"] == pytest.approx(400 / 12, abs=0.1)
    assert timing["train_seconds"] == 12.0 <= timing["stage_seconds"] == 15.0
    assert timing["train_seconds_all_sessions"] == 22.0
    assert timing["stage_tokens_per_second"] == pytest.approx(400 / 15, abs=0.1)
