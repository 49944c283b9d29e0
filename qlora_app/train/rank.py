"""One rank of a multi-GPU training run, as torchrun starts it:
python -m qlora_app.train.rank RUN_DIR LAYOUT_JSON [CHECKPOINT].

The launching process (qlora_app.train.launch) has already checked the recipe and data, created RUN_DIR and chosen
the layout (LAYOUT_JSON, as the manifest records it); each rank reads the resolved recipe back from RUN_DIR.
A rank never prints a traceback: it leaves its one-line error (and the traceback) in RUN_DIR/logs/rank-N.error
for the launcher to report, and exits non-zero.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

from qlora_app import console
from qlora_app.errors import UserError
from qlora_app.run.directory import RunDir
from qlora_app.train import distributed


def error_file(run: RunDir, rank: int) -> Path:
    return run.path / "logs" / f"rank-{rank}.error"


def record_error(run: RunDir, exc: BaseException) -> int:
    """Write '<ns> <exit code>', the one-line message and the traceback; return the exit code."""
    if isinstance(exc, UserError):
        code, message = exc.exit_code, str(exc)
    elif isinstance(exc, KeyboardInterrupt):
        code, message = 130, "interrupted"
    else:
        code, message = 1, " ".join(f"{type(exc).__name__}: {exc}".split())
    path = error_file(run, distributed.rank())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{time.time_ns()} {code}\n{message}\n{traceback.format_exc()}")
    return code


def main(argv: list[str]) -> int:
    from qlora_app.data.encoding import load_tokenizer
    from qlora_app.plan.layout import from_manifest
    from qlora_app.train.stage import prepare_data, train_in

    run, started = RunDir(Path(argv[0])), time.time()
    if not distributed.is_main():
        console.out.quiet = console.err.quiet = True
    try:  # from the first argument on: a layout mangled on its way here is this rank's one line too
        recorded = json.loads(argv[1])
        chosen = from_manifest(recorded, recorded["reason"])
        checkpoint = Path(argv[2]) if len(argv) > 2 else None
        distributed.bind_device()
        recipe = run.recipe()
        tokenizer = load_tokenizer(recipe)
        train_in(recipe, run, checkpoint, prepare_data(recipe, tokenizer), tokenizer, started, chosen)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one line for the launcher
        return record_error(run, exc)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
