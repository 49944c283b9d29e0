"""Task metrics of one model's answers against the held-out references, and the base vs tuned table.

Exact match compares after normalising whitespace; ROUGE-L comes from rouge-score (Google's implementation,
F-measure with stemming) and chrF from sacrebleu (corpus level, 0-100); no metric is written by hand here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rich.table import Table

MODELS = ("base", "tuned")
WORST = 3  # examples shown side by side


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str  # "stop": the model ended its turn; "length": cut at max_tokens
    tokens: int  # completion tokens


@dataclass(frozen=True)
class Scores:
    exact_match: float  # share of answers equal to the reference after normalising whitespace
    rouge_l: float  # mean ROUGE-L F-measure, 0-1
    chrf: float  # corpus chrF, 0-100
    stopped: float  # share of answers that ended with "stop", not at the length limit
    mean_tokens: float  # mean answer length in tokens

    def as_dict(self) -> dict:
        return asdict(self)


def normalise(text: str) -> str:
    return " ".join(text.split())


def rouge_l(answers: list[str], references: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, ans)["rougeL"].fmeasure for ans, ref in zip(answers, references)]


def sentence_chrf(answer: str, reference: str) -> float:
    import sacrebleu

    return sacrebleu.sentence_chrf(answer, [reference]).score


def score(answers: list[Answer], references: list[str]) -> Scores:
    import sacrebleu

    if not answers or len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    texts = [a.text for a in answers]
    n = len(answers)
    return Scores(
        exact_match=sum(normalise(t) == normalise(r) for t, r in zip(texts, references)) / n,
        rouge_l=sum(rouge_l(texts, references)) / n,
        chrf=sacrebleu.corpus_chrf(texts, [references]).score,
        stopped=sum(a.finish_reason == "stop" for a in answers) / n,
        mean_tokens=sum(a.tokens for a in answers) / n,
    )


ROWS = (  # (label, field, format); higher is better for all but the last two, which describe the answers
    ("exact match", "exact_match", "{:.0%}"),
    ("ROUGE-L", "rouge_l", "{:.3f}"),
    ("chrF", "chrf", "{:.1f}"),
    ("finished (stop)", "stopped", "{:.0%}"),
    ("mean answer tokens", "mean_tokens", "{:.1f}"),
)


def table(scores: dict[str, dict], title: str) -> Table:
    """Base vs tuned, one row a metric, with the difference (scores as stored in eval.json)."""
    out = Table(title=title)
    for column in ("metric", *MODELS, "tuned - base"):
        out.add_column(column, justify="left" if column == "metric" else "right")
    for label, field, fmt in ROWS:
        base, tuned = scores["base"][field], scores["tuned"][field]
        delta = fmt.format(tuned - base)
        out.add_row(label, fmt.format(base), fmt.format(tuned), delta if delta.startswith("-") else f"+{delta}")
    return out


def worst(items: list[dict], n: int = WORST) -> list[dict]:
    """The n examples where the tuned answer is furthest from the reference (lowest chrF), worst first."""
    return sorted(items, key=lambda item: item["tuned_chrf"])[:n]


def worst_table(items: list[dict]) -> Table:
    out = Table(title="worst tuned answers (lowest chrF), side by side")
    for column in ("question", "reference", "base", "tuned"):
        out.add_column(column, overflow="fold")
    for item in worst(items):
        out.add_row(*(printable(item[key]) for key in ("question", "reference", "base", "tuned")))
    return out


def printable(text: str):
    """A model's answer as plain text for the terminal: control characters shown as U+FFFD, no rich markup."""
    from rich.text import Text

    return Text("".join(c if c.isprintable() or c == "\n" else "\ufffd" for c in text))
