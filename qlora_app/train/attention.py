"""Which attention kernel training uses (recipe `train.attention`), decided before any weight loads.

With padding-free packing a micro-batch is one row whose examples are told apart by `position_ids` (and trl's
`cu_seq_lens`). sdpa and eager then get a dense block-diagonal (rows x rows) mask from transformers and compute
every pair; the other paths attend within each example only:

- flash: transformers' flash-attention-2 path served by the `kernels` package's hub kernel (PyPI has no
  flash-attn wheel for this torch), varlen over `cu_seq_lens`. transformers 5.19 loads FLASH_KERNEL at its
  major version 3 (FLASH_ATTN_KERNEL_VERSIONS); `repo@sha` would pin one revision. CUDA only.
- flex: torch's flex_attention, compiled, with a block-sparse mask that masking_utils builds per example from
  `position_ids`. CUDA only for training: torch 2.13 has no flex backward on CPU.
- per_example: torch's sdpa called once per example of the packed row (qlora_app/train/per_example.py), so the
  work is the sum of the examples' squares; sliding windows and soft-capping as the model says. Runs anywhere;
  the CPU path (docs/attention.md has the measured speed-up over sdpa's dense mask).
- sdpa (transformers' default) and eager run anywhere.

auto picks flash on CUDA when its kernel loads, else flex; on CPU, per_example. A kernel that cannot be had (not
installed, offline without a cached copy) or a CUDA-only kernel asked for on CPU falls back with one warning:
a recipe written for the GPU still runs on a laptop, still attending per example.
"""

from __future__ import annotations

from dataclasses import dataclass

FLASH_KERNEL = "kernels-community/flash-attn2"
PER_EXAMPLE = "sdpa_per_example"  # qlora_app.train.per_example.NAME, registered with transformers on first use
IMPLEMENTATION = {"flash": FLASH_KERNEL, "flex": "flex_attention", "per_example": PER_EXAMPLE, "sdpa": "sdpa",
                  "eager": "eager"}


@dataclass(frozen=True)
class AttentionChoice:
    name: str  # flash | flex | per_example | sdpa | eager
    message: str
    fell_back: bool = False  # the recipe asked for something this machine cannot run

    @property
    def implementation(self) -> str:
        """What from_pretrained(attn_implementation=...) receives (per_example: registered with transformers)."""
        if self.name == "per_example":
            from qlora_app.train.per_example import register

            return register()
        return IMPLEMENTATION[self.name]


def choose(requested: str, cuda: bool, flash_problem: str | None = None) -> AttentionChoice:
    """The attention to use for `requested` on this machine; flash_problem: why the flash kernel cannot load
    (None: it loads). Pure, so every branch is testable without a GPU."""
    if not cuda:
        if requested in ("flash", "flex"):
            why = "a CUDA GPU" if requested == "flash" else "a CUDA GPU to train (torch has no flex backward on CPU)"
            return AttentionChoice("per_example", f"train.attention={requested} needs {why}: using sdpa per example",
                                   fell_back=True)
        name = "per_example" if requested == "auto" else requested
        return AttentionChoice(name, f"attention: {name} (CPU)")
    if requested in ("auto", "flash"):
        if flash_problem is None:
            return AttentionChoice("flash", f"attention: flash ({FLASH_KERNEL})")
        return AttentionChoice("flex", f"flash attention unavailable ({flash_problem}): using flex attention",
                               fell_back=True)
    return AttentionChoice(requested, f"attention: {requested}")


def flash_problem() -> str | None:
    """Why the flash kernel cannot be loaded here, or None once it is loaded (and registered with
    transformers, so from_pretrained finds it without asking the hub again)."""
    import importlib.util

    if importlib.util.find_spec("kernels") is None:
        return "the 'kernels' package is not installed"
    from transformers.integrations.hub_kernels import load_and_register_attn_kernel

    try:
        load_and_register_attn_kernel(FLASH_KERNEL)
    except Exception as exc:  # offline without a cached kernel, no build for this GPU: any of several types
        return f"{FLASH_KERNEL}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return None


def resolve(requested: str) -> AttentionChoice:
    """choose() for this machine, said once: a note, or a warning when the recipe's choice cannot run here."""
    import torch

    from qlora_app import console

    cuda = torch.cuda.is_available()
    problem = flash_problem() if cuda and requested in ("auto", "flash") else None
    choice = choose(requested, cuda, problem)
    (console.warn if choice.fell_back else console.note)(choice.message)
    return choice
