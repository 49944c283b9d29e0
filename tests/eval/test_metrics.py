"""The task metrics (rouge-score, sacrebleu) on hand-made answers, and the base vs tuned table."""

from __future__ import annotations

import pytest

from qlora_app.eval.metrics import Answer, score, table, worst

REFERENCES = ["The capital of Dateul is Neul.", "The capital of Lomito is Ulqu."]


def test_exact_match_ignores_whitespace_only():
    answers = [Answer("The capital of  Dateul\nis Neul. ", "stop", 9), Answer("The capital of Lomito is Ulqu", "stop", 8)]
    assert score(answers, REFERENCES).exact_match == 0.5


def test_perfect_answers_score_full_marks():
    scores = score([Answer(r, "stop", 10) for r in REFERENCES], REFERENCES)
    assert (scores.exact_match, scores.rouge_l, scores.chrf, scores.stopped) == (1.0, 1.0, 100.0, 1.0)
    assert scores.mean_tokens == 10


def test_rambling_cut_at_the_limit_scores_low_and_counts_as_unfinished():
    scores = score([Answer("zq zq zq zq zq", "length", 48), Answer("The capital of Lomito is Ulqu.", "stop", 8)],
                   REFERENCES)
    assert scores.stopped == 0.5 and scores.mean_tokens == 28
    assert scores.rouge_l == pytest.approx(0.5)
    assert 40 < scores.chrf < 70


def test_table_shows_both_models_and_the_difference():
    from rich.console import Console

    base = {"exact_match": 0.0, "rouge_l": 0.1, "chrf": 12.0, "stopped": 0.0, "mean_tokens": 48.0}
    tuned = {"exact_match": 1.0, "rouge_l": 1.0, "chrf": 100.0, "stopped": 1.0, "mean_tokens": 10.0}
    console = Console(width=120, record=True)
    console.print(table({"base": base, "tuned": tuned}, "eval"))
    text = console.export_text()
    assert "exact match" in text and "+100%" in text and "+88.0" in text and "-38.0" in text


def test_worst_examples_are_the_lowest_tuned_chrf_first():
    items = [{"tuned_chrf": c, "id": i} for i, c in enumerate([90.0, 10.0, 50.0, 100.0])]
    assert [item["id"] for item in worst(items, 2)] == [1, 2]


def test_worst_answers_are_shown_as_plain_printable_text():
    from rich.console import Console

    from qlora_app.eval.metrics import worst_table

    item = {"question": "q?", "reference": "r", "base": "[bold]x\x1c", "tuned": "t", "tuned_chrf": 0.0}
    console = Console(width=120, record=True)
    console.print(worst_table([item]))
    assert "[bold]x\ufffd" in console.export_text()
