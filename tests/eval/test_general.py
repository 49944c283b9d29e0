"""eval's general skills (eval/general.py) without a server: local task files, the paired comparison, the drop
warnings and the card's table. The tasks themselves run through vLLM in test_eval.py."""

from __future__ import annotations

import json
import math

import pytest
from conftest import REPO

from qlora_app.errors import UserError
from qlora_app.eval.general import compare, comparisons, drops, local_config, score_metric


def test_a_local_task_reads_its_data_files_relative_to_itself(tmp_path):
    task = tmp_path / "tasks" / "mine.yaml"
    task.parent.mkdir()
    task.write_text((REPO / "data" / "tiny" / "capitals-choice.yaml").read_text())
    config = local_config(str(task))
    assert config["task"] == "tiny_capitals_choice" and config["output_type"] == "multiple_choice"
    assert config["dataset_kwargs"]["data_files"] == {"test": str(task.parent / "capitals-choice.jsonl")}


@pytest.mark.parametrize(("text", "expected"), [
    (None, "eval.tasks: no task file"),
    ("task: [unclosed", "is not an lm-eval task file"),
    ("- a list, not a task", "is not an lm-eval task file"),
])
def test_a_missing_or_broken_task_file_is_one_line(tmp_path, text, expected):
    task = tmp_path / "broken.yaml"
    if text is not None:
        task.write_text(text)
    with pytest.raises(UserError) as info:
        local_config(str(task))
    assert expected in str(info.value) and "\n" not in str(info.value)


def samples(values: list[float], metric: str = "acc") -> dict[int, dict]:
    return {i: {"doc_id": i, metric: v} for i, v in enumerate(values)}


def test_the_delta_and_its_standard_error_are_paired_over_the_same_examples():
    result = compare(samples([1, 0, 1, 0, 1]), samples([1, 1, 1, 1, 0, 1]))  # example 5 only the tuned answered
    assert (result.metric, result.examples) == ("acc", 5)
    assert (result.base, result.tuned, result.delta) == (0.6, 0.8, pytest.approx(0.2))
    deltas = [0, 1, 0, 1, -1]
    mean = sum(deltas) / 5
    assert result.stderr == pytest.approx(math.sqrt(sum((d - mean) ** 2 for d in deltas) / 4) / math.sqrt(5))


def test_the_same_answers_give_no_delta_and_no_error_and_acc_norm_is_preferred():
    both = {i: {"doc_id": i, "acc": 1.0, "acc_norm": float(i % 2)} for i in range(4)}
    result = compare(both, both)
    assert (result.metric, result.base, result.delta, result.stderr) == ("acc_norm", 0.5, 0.0, 0.0)


@pytest.mark.parametrize(("sample", "expected"), [
    ({"metrics": ["acc", "acc_norm"], "acc": 1.0, "acc_norm": 0.0}, "acc_norm"),
    ({"metrics": ["exact_match"], "exact_match": 1}, "exact_match"),
    ({"metrics": ["f1", "em"], "f1": 0.5, "em": 0.0}, "f1"),  # a task of its own: its first numeric score
    ({"metrics": ["word_perplexity"], "word_perplexity": (1.2, 3)}, None),  # scored over the corpus only
])
def test_the_per_example_score_of_a_task(sample, expected):
    assert score_metric(sample) == expected


def test_a_task_without_a_per_example_score_is_skipped_in_one_line_and_the_rest_compared():
    rolling = {0: {"doc_id": 0, "metrics": ["word_perplexity"], "word_perplexity": (1.2, 3)}}
    compared, skipped = comparisons({"wikitext": rolling, "mine": samples([0, 1])},
                                    {"wikitext": rolling, "mine": samples([1, 1])})
    assert list(compared) == ["mine"] and compared["mine"]["delta"] == 0.5
    assert skipped == ["eval: general task wikitext skipped: it gives no per-example score to compare"]


def test_a_drop_beyond_the_threshold_is_a_warning_and_one_within_it_is_not():
    tasks = {"arc_easy": compare(samples([1, 1, 1, 0]), samples([1, 0, 0, 0])).as_dict(),
             "hellaswag": compare(samples([1, 1, 0, 0]), samples([1, 1, 0, 0])).as_dict(),
             "piqa": compare(samples([0, 0, 0, 0]), samples([1, 1, 1, 1])).as_dict()}
    warnings = drops(tasks, 0.02)
    assert len(warnings) == 1 and warnings[0].startswith("arc_easy: acc fell 0.500 (base 0.750, tuned 0.250")
    assert drops(tasks, 0.5) == []


def test_the_card_shows_the_general_table_and_a_line_per_drop(tmp_path):
    from qlora_app.hub.card import evaluation_section
    from qlora_app.run.directory import RunDir

    run = RunDir(tmp_path)
    scores = {"exact_match": 0.5, "rouge_l": 0.5, "chrf": 50.0, "stopped": 1.0, "mean_tokens": 8.0}
    tasks = {"arc_easy": compare(samples([1, 1, 1, 0]), samples([1, 0, 0, 0])).as_dict()}
    run.eval_report.write_text(json.dumps({"examples": 4, "settings": {"max_tokens": 8},
                                           "scores": {"base": scores, "tuned": scores},
                                           "general": {"tasks": tasks, "warnings": drops(tasks, 0.02)}}))
    card = evaluation_section(run)
    assert "| arc_easy | acc | 4 | 0.750 | 0.250 | -0.500 ± 0.289 |" in card
    assert "**Warning:** general skill dropped: arc_easy: acc fell 0.500" in card
