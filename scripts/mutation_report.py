"""The mutation score per module from mutmut's results (mutants/**/*.py.meta), for docs/development.md.

Killed: a test failed, or timed out, with the mutant in place. Survived: every test passed. Not checked: the
run was stopped before it got there. The score is killed / (killed + survived).
"""

import json
import sys
from collections import Counter
from pathlib import Path

KILLED = {1, 3, 24, -24, 152, 255, 36}
SURVIVED = {0}


def module_counts(meta: Path) -> Counter:
    codes = json.loads(meta.read_text())["exit_code_by_key"].values()
    return Counter("killed" if c in KILLED else "survived" if c in SURVIVED else
                   "not checked" if c is None else "no tests" for c in codes)


def main(root: Path = Path("mutants")) -> int:
    metas = sorted(root.glob("**/*.py.meta"))
    if not metas:
        print(f"no mutmut results under {root}/: run `make mutation` first", file=sys.stderr)
        return 2
    total = Counter()
    print("| module | mutants | killed | survived | no tests | not checked | score |\n|---|---|---|---|---|---|---|")
    for meta in metas:
        counts = module_counts(meta)
        total += counts
        print(row(str(meta.relative_to(root)).removesuffix(".meta"), counts))
    print(row("**all**", total))
    return 0


def row(name: str, c: Counter) -> str:
    judged = c["killed"] + c["survived"]
    score = f"{c['killed'] / judged:.0%}" if judged else "n/a"
    return (f"| {name} | {sum(c.values())} | {c['killed']} | {c['survived']} | {c['no tests']} | "
            f"{c['not checked']} | {score} |")


if __name__ == "__main__":
    sys.exit(main())
