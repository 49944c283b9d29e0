"""`qlora-app pod`: the image as the machine. Pod clouds (RunPod, Vast.ai, Kubernetes) start the image itself
and give you a terminal in it; this keeps the container alive, after saying whether the GPU is usable and
what to type. It is PID 1 there: it stops on SIGTERM (the pod being stopped) and reaps orphaned processes that
terminal sessions leave behind, as an init would.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from qlora_app import console
from qlora_app.machine.doctor import doctor

WHAT_TO_TYPE = """\
what to type (in this pod's terminal; runs in {runs}):
  qlora-app recipes                      the recipes and the VRAM they plan for
  qlora-app plan llama3-8b               whether it fits this GPU
  qlora-app train llama3-8b              fine-tune (Ctrl-C saves a checkpoint; --resume continues)
  qlora-app merge                        fold the latest run's adapter into a 16-bit model
  export QLORA_API_KEY=<a long random key>
  qlora-app serve --host 0.0.0.0 --port 8000   the latest merged model, on the provider's port 8000
  qlora-app chat                         talk to it from here
  qlora-app push --repo USER/NAME        take the latest run home (HF_TOKEN set in the pod's secrets)"""


def pod(runs_root: Path) -> None:
    doctor(runs_root)
    console.out.print(WHAT_TO_TYPE.format(runs=runs_root.resolve()), markup=False, highlight=False)
    wait_for_stop()


def wait_for_stop() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    signal.signal(signal.SIGCHLD, lambda *_: reap())
    console.out.print("waiting (stop the pod to end)", highlight=False)  # only now can a stop be handled
    sys.stdout.flush()
    while True:
        signal.pause()


def reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:  # no children left
        pass
