"""Peak GPU memory of a training run, from the recipe and the model's shape alone.

Every term is counted in bytes from first principles, term by term, so that the table explains itself:

- 4-bit base: bitsandbytes stores each quantized weight as packed 4-bit codes plus one absmax per block of
  64 values (fp32, or with double quantization an 8-bit code per block plus an fp32 absmax per 256 blocks).
  Embeddings, the output head, norms and the recipe's skip_modules stay in the model dtype; norms are
  upcast to fp32 for stability by the train stage.
- LoRA: adapters are fp32 (peft upcasts them over a 16-bit base): weights, gradients and optimizer state.
- Activations: with gradient checkpointing each layer keeps only its input, and one layer's full set is
  rebuilt during backward; without it every layer keeps everything. Attention is flash/memory-efficient
  SDPA, so nothing grows with the square of the sequence.
- Output head and loss: trl's tiled head computes the loss without materializing the full logits tensor
  (which for a 128k vocabulary at batch 4 x 1024 would take about 6 GiB); what remains per token is a
  fraction of a vocabulary row, measured.
- Overhead: CUDA context, cuBLAS workspace and the caching allocator's fragmentation.
- Preference tuning (train.method dpo / orpo): each row is two sequences (prompt + chosen, prompt + rejected), both
  of data.max_length at most, so activations and the head count twice the tokens of a row. DPO adds the
  reference forward (the adapter off, or the frozen copy of the init adapter under `ref`): no gradients, so it
  keeps no activations, but one layer's full set for both sequences is live while the policy's are kept, and
  its log-probs come from trl's fused head like the policy's. A DPO run that continues an adapter holds that
  frozen copy (fp32). trl's experimental ORPO materializes the full logits (bf16, their fp32 upcast and
  log-softmax: 10 bytes per vocabulary entry per token). These terms are counted, not measured on a GPU: the
  SFT figures below are (docs/preference.md).
- Several GPUs (`ranks`): data parallel (ddp) changes nothing per GPU. FSDP (train.distributed: fsdp) shards
  the 4-bit layers, the adapters, their gradients and the optimizer state over the ranks, and gathers one
  layer at a time while it computes (plus the next, prefetched); embeddings, head and norms are counted whole
  (the root unit holds them gathered), activations stay per rank.

The totals are checked against peaks measured on an H100 with the train stage's own code path
(docs/gpu-measurements.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_app.model.architecture import Architecture
from qlora_app.recipe.schema import Recipe

GiB = 1024**3
BLOCK = 64  # bitsandbytes 4-bit block size
NESTED_BLOCK = 256  # double quantization block size (over the absmax values)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
OPTIMIZER_STATE_BYTES = {"paged_adamw_32bit": 8, "adamw_torch": 8, "paged_adamw_8bit": 2, "adamw_8bit": 2}
HEAD_BYTES_PER_VOCAB = 2.5  # per token, trl's tiled LM head + loss; fitted on an H100 (docs/gpu-measurements.md)
CUDA_CONTEXT = int(0.75 * GiB)  # measured on an H100: context, cuBLAS workspace, kernels
ORPO_LOGIT_BYTES_PER_VOCAB = 2 + 4 + 4  # trl.experimental.orpo: bf16 logits, fp32 copy, log-softmax
# What the Trainer adds beyond a bare training step (evaluation buffers, its own bookkeeping): the train stage's
# measured peak on an H100 minus the bare step's at the same batch (docs/gpu-measurements.md).
TRAINER_OVERHEAD = int(0.95 * GiB)
# Share of dynamic (activation) memory the caching allocator reserves beyond its peak allocation, measured with
# PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (which the train stage sets; without it, about twice this).
FRAGMENTATION = 0.12


def nf4_bytes(numel: int, double_quant: bool) -> int:
    """Bytes bitsandbytes uses for one 4-bit weight of `numel` values, quantization state included."""
    blocks = -(-numel // BLOCK)
    packed = -(-numel // 2)
    code = 16 * 4  # the 16-entry NF4/FP4 table, fp32
    if not double_quant:
        return packed + blocks * 4 + code
    nested_blocks = -(-blocks // NESTED_BLOCK)
    return packed + blocks + nested_blocks * 4 + 256 * 4 + 4 + code  # 8-bit absmax, nested absmax, table, offset


@dataclass(frozen=True)
class MemoryPlan:
    base_quantized: int
    base_16bit: int
    lora_weights: int
    lora_gradients: int
    optimizer_state: int
    activations: int
    logits: int
    overhead: int
    trainer_overhead: int
    batch_size: int
    ranks: int
    seq_len: int
    trainable_params: int
    gathered: int = 0
    reference: int = 0  # dpo: the reference forward's live layer, and a frozen adapter copy when it continues one
    sequences_per_row: int = 1

    @property
    def base_weights(self) -> int:
        return self.base_quantized + self.base_16bit

    @property
    def total(self) -> int:
        return self.step_total + self.trainer_overhead

    @property
    def step_total(self) -> int:
        """Peak of a bare training step (what bench/gpu_memory.py measures), without the Trainer's extras."""
        return (self.base_weights + self.lora_weights + self.lora_gradients + self.optimizer_state
                + self.gathered + self.activations + self.reference + self.logits + self.overhead)

    def rows(self) -> list[tuple[str, int]]:
        labels = {
            "base_quantized": "base weights, 4-bit (incl. quantization constants)",
            "base_16bit": "base weights, 16-bit (embeddings, head, norms, skipped)",
            "lora_weights": "LoRA weights (fp32)",
            "lora_gradients": "LoRA gradients (fp32)",
            "optimizer_state": "optimizer state",
            "gathered": "FSDP: a layer gathered, and the next prefetched",
            "activations": "activations",
            "reference": "DPO reference forward (no gradients; frozen adapter copy)",
            "logits": "output head and loss (tiled)",
            "overhead": "CUDA context, workspace, fragmentation",
            "trainer_overhead": "Trainer (evaluation, bookkeeping)",
        }
        optional = {"gathered", "reference"}
        return [(label, getattr(self, key)) for key, label in labels.items() if key not in optional or getattr(self, key)]


def plan(recipe: Recipe, arch: Architecture, *, batch_size: int | None = None, seq_len: int | None = None,
         gradient_checkpointing: bool | None = None, ranks: int = 1) -> MemoryPlan:
    """Peak memory of one GPU when `ranks` GPUs train the recipe together."""
    batch = batch_size or recipe.train.fixed_batch_size
    seq = seq_len or recipe.data.max_length
    checkpointing = recipe.train.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    quantized, sixteen = base_weight_bytes(recipe, arch)
    trainable = lora_params(recipe, arch)
    sequences = 1 if recipe.train.method == "sft" else 2  # a preference row: prompt + chosen, prompt + rejected
    tokens = batch * seq * sequences
    activations = tokens * activation_bytes_per_token(recipe, arch, checkpointing)
    logits = int(tokens * arch.vocab * (ORPO_LOGIT_BYTES_PER_VOCAB if recipe.train.method == "orpo"
                                        else HEAD_BYTES_PER_VOCAB))
    reference = reference_bytes(recipe, arch, tokens, trainable)
    transient = 2 * max(i * o for i, o in arch.linear_shapes().values()) * 2 if recipe.quantization.enabled else 0
    overhead = CUDA_CONTEXT + transient + int(FRAGMENTATION * (activations + reference + logits))
    shards = ranks if recipe.train.distributed == "fsdp" else 1
    gathered = 2 * (quantized + trainable * 4) // arch.layers if shards > 1 else 0
    return MemoryPlan(
        base_quantized=quantized // shards,
        base_16bit=sixteen,
        lora_weights=trainable * 4 // shards,
        lora_gradients=trainable * 4 // shards,
        optimizer_state=trainable * OPTIMIZER_STATE_BYTES[recipe.train.optimizer] // shards,
        gathered=gathered,
        activations=activations,
        reference=reference,
        sequences_per_row=sequences,
        logits=logits,
        overhead=overhead,
        trainer_overhead=TRAINER_OVERHEAD,
        batch_size=batch,
        ranks=ranks,
        seq_len=seq,
        trainable_params=trainable,
    )


def reference_bytes(recipe: Recipe, arch: Architecture, tokens: int, trainable: int) -> int:
    """DPO's reference forward: one layer's activations live at a time (no gradients, nothing kept), and the
    frozen fp32 copy of the adapter it starts from when it continues a run."""
    if recipe.train.method != "dpo":
        return 0
    frozen_copy = trainable * 4 if recipe.train.init_adapter else 0
    return tokens * layer_activation_bytes_per_token(recipe, arch) + frozen_copy


def base_weight_bytes(recipe: Recipe, arch: Architecture) -> tuple[int, int]:
    """(4-bit bytes, 16/32-bit bytes) of the frozen base as loaded for training."""
    q = recipe.quantization
    width = DTYPE_BYTES[recipe.model.dtype]
    skipped = set(q.skip_modules)
    quantized = sixteen = 0
    for name, (i, o) in arch.linear_shapes().items():
        if q.enabled and name not in skipped:
            quantized += arch.layers * nf4_bytes(i * o, q.double_quant)
        else:
            sixteen += arch.layers * i * o * width
    heads = 1 if arch.tied_embeddings else 2
    if q.enabled and "lm_head" not in skipped and not arch.tied_embeddings:
        quantized += nf4_bytes(arch.embedding_params, q.double_quant)
        heads = 1
    sixteen += heads * arch.embedding_params * width
    sixteen += arch.norm_params * (4 if q.enabled else width)
    return quantized, sixteen


def lora_targets(recipe: Recipe, arch: Architecture) -> list[str]:
    """The projections of one decoder layer that carry an adapter (all-linear: every one)."""
    shapes = arch.linear_shapes()
    return list(shapes) if recipe.lora.all_linear else [m for m in recipe.lora.target_modules if m in shapes]


def lora_params(recipe: Recipe, arch: Architecture) -> int:
    shapes = arch.linear_shapes()
    r = recipe.lora.r
    return arch.layers * sum(r * (shapes[m][0] + shapes[m][1]) for m in lora_targets(recipe, arch))


def activation_bytes_per_token(recipe: Recipe, arch: Architecture, checkpointing: bool) -> int:
    """Bytes kept for backward per token across all layers (bf16 activations)."""
    full = layer_activation_bytes_per_token(recipe, arch)
    if checkpointing:
        return arch.layers * arch.hidden * 2 + full  # every layer's input, plus one layer rebuilt
    return arch.layers * full + arch.hidden * 2


def layer_activation_bytes_per_token(recipe: Recipe, arch: Architecture) -> int:
    h, f = arch.hidden, arch.intermediate
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    family = arch.family
    norms = family.norms_per_layer * (4 * h + 2 * h)  # RMSNorm keeps its fp32 input and its 16-bit output
    norms += (4 + 2) * (q + kv) if family.qk_norm else 0  # Qwen3's and Gemma 3's norms on queries and keys
    attention = 2 * (q + 2 * kv) + 2 * (q + kv) + 2 * q  # q/k/v, q/k after RoPE, attention output
    mlp = 4 * 2 * f  # gate, SiLU(gate), up, and their product
    shapes = arch.linear_shapes()
    per_input = 3 if recipe.lora.dropout > 0 else 0  # each adapter's dropout keeps its mask and output
    lora = sum(per_input * shapes[m][0] + 4 * recipe.lora.r for m in lora_targets(recipe, arch))
    return norms + attention + mlp + lora


def largest_batch(recipe: Recipe, arch: Architecture, budget: int, seq_len: int | None = None,
                  ranks: int = 1) -> int:
    """Largest micro-batch whose plan fits in `budget` bytes (0 when not even one sequence fits)."""
    one = plan(recipe, arch, batch_size=1, seq_len=seq_len, ranks=ranks)
    two = plan(recipe, arch, batch_size=2, seq_len=seq_len, ranks=ranks)
    per_sample = two.total - one.total
    return max(0, (budget - (one.total - per_sample)) // per_sample)


def largest_seq_len(recipe: Recipe, arch: Architecture, budget: int, multiple: int = 64, ranks: int = 1) -> int:
    """Largest sequence length (a multiple of 64) that fits at the recipe's batch size."""
    a = plan(recipe, arch, seq_len=multiple, ranks=ranks)
    b = plan(recipe, arch, seq_len=2 * multiple, ranks=ranks)
    per_step = b.total - a.total
    steps = (budget - (a.total - per_step)) // per_step
    return int(max(0, steps) * multiple)


@dataclass(frozen=True)
class Layout:
    batch_size: int
    grad_accum: int
    gradient_checkpointing: bool


def fastest_layout(recipe: Recipe, arch: Architecture, budget: int, rows_per_step: int | None = None,
                   ranks: int = 1) -> Layout:
    """The quickest way to run `rows_per_step` sequences per optimizer step (default: the recipe's batch x
    accumulation) within `budget` bytes per GPU, `ranks` GPUs sharing them: no recomputation when at least 4
    rows (or all of a rank's) fit without it, then the largest batch that fits and divides a rank's rows.
    Tokens per update stay the recipe's: that is a hyperparameter, not a speed knob. The accumulation is the
    whole update's, as on one GPU (each rank runs grad_accum / ranks of it)."""
    rows = rows_per_step or recipe.train.effective_batch
    if rows % ranks:
        raise ValueError(f"{rows} rows per update cannot be split evenly over {ranks} ranks")
    per_rank = rows // ranks
    no_ckpt = recipe.with_section("train", gradient_checkpointing=False)
    batch, checkpointing = largest_batch(no_ckpt, arch, budget, ranks=ranks), False
    if batch < min(4, per_rank):
        with_ckpt = recipe.with_section("train", gradient_checkpointing=True)
        batch, checkpointing = largest_batch(with_ckpt, arch, budget, ranks=ranks), True
    batch = max([d for d in range(1, per_rank + 1) if per_rank % d == 0 and d <= batch] or [1])
    return Layout(batch, rows // batch, checkpointing)


def gpus_needed(recipe: Recipe, arch: Architecture, budget: int, most: int = 64) -> int | None:
    """The fewest GPUs of `budget` bytes each that train the recipe (None: not even `most`; ddp: 1 or None,
    since every GPU holds everything)."""
    counts = range(1, most + 1) if recipe.train.distributed == "fsdp" else [1]
    return next((n for n in counts if plan(recipe, arch, ranks=n).total <= budget), None)


def as_lora(recipe: Recipe) -> Recipe:
    """The same recipe with the quantization section switched off (plain LoRA on a 16-bit base)."""
    return recipe.with_section("quantization", enabled=False)
