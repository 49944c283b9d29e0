"""The mutation score per module from mutmut's results (mutants/**/*.py.meta), for docs/development.md.

Killed: a test failed, or timed out, with the mutant in place. Survived: every test passed. No tests: no fast
test calls the function in process. Not checked: the run was stopped before it got there. The score is
killed / (killed + survived + no tests): a function no fast test reaches is a mistake nothing would catch.

`--names` prints the mutant names `make mutation` runs: every mutant of pyproject's [tool.mutmut] only_mutate
modules, except in the modules of PARTS, where only the functions named there are mutation-tested (the rest of
train/stage.py loads and trains a model, which no fast test does).
"""

import json
import sys
import tomllib
from collections import Counter
from pathlib import Path

KILLED = {1, 3, 24, -24, 152, 255, 36}
SURVIVED = {0}
NO_TESTS = {5, 33}
PARTS = {"qlora_app/train/stage.py": ("find_resumable", "run_to_resume", "resume_point", "check_same_data",
                                      "check_same_ranks")}


def modules(pyproject: Path = Path("pyproject.toml")) -> list[str]:
    return tomllib.loads(pyproject.read_text())["tool"]["mutmut"]["only_mutate"]


def name_patterns(module: str) -> list[str]:
    """mutmut's names (fnmatch patterns) of the mutants of `module` that are tested."""
    dotted = module.removesuffix(".py").replace("/", ".")
    if module not in PARTS:
        return [f"{dotted}.*"]
    return [f"{dotted}.x_{function}__mutmut_*" for function in PARTS[module]]


def in_scope(module: str, key: str) -> bool:
    return module not in PARTS or any(f".x_{function}__mutmut_" in key for function in PARTS[module])


def module_counts(meta: Path, module: str) -> Counter:
    codes = [code for key, code in json.loads(meta.read_text())["exit_code_by_key"].items() if in_scope(module, key)]
    return Counter("killed" if c in KILLED else "survived" if c in SURVIVED else "no tests" if c in NO_TESTS else
                   "not checked" if c is None else "other" for c in codes)


def main(args: list[str], root: Path = Path("mutants")) -> int:
    if args == ["--names"]:
        print(" ".join(pattern for module in modules() for pattern in name_patterns(module)))
        return 0
    metas = sorted(root.glob("**/*.py.meta"))
    if not metas:
        print(f"no mutmut results under {root}/: run `make mutation` first", file=sys.stderr)
        return 2
    total = Counter()
    print("| module | mutants | killed | survived | no tests | not checked | score |\n|---|---|---|---|---|---|---|")
    for meta in metas:
        module = str(meta.relative_to(root)).removesuffix(".meta")
        counts = module_counts(meta, module)
        total += counts
        label = module.removeprefix("qlora_app/") + (" (resume checks)" if module in PARTS else "")
        print(row(label, counts))
    print(row("**all**", total))
    return 0


def row(name: str, c: Counter) -> str:
    judged = c["killed"] + c["survived"] + c["no tests"]
    score = f"{c['killed'] / judged:.0%}" if judged else "n/a"
    return (f"| {name} | {sum(c.values())} | {c['killed']} | {c['survived']} | {c['no tests']} | "
            f"{c['not checked']} | {score} |")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
