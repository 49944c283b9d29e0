"""The recipe: one frozen, typed object that every stage receives.

Only qlora_app.recipe.loader reads YAML; everything else takes a Recipe. Unknown keys are errors (a typo
must never silently fall back to a default), and defaults are what a 24 GB GPU wants for a 7-8B model.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Dtype = Literal["bfloat16", "float16", "float32"]

# The Llama/Mistral projection names, attention first.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR = ATTENTION_MODULES + MLP_MODULES


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelSpec(Section):
    """The base model."""

    path: str = Field(
        description="Hub id (org/name), a local directory, or 'builtin:NAME' for a model built locally."
    )
    revision: str = Field("main", description="Hub revision; pin a commit sha for reproducible runs.")
    dtype: Dtype = Field("bfloat16", description="Dtype of the weights that are not quantized.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model. Off unless needed.")
    chat_template: str | None = Field(
        None, description="Jinja chat template for base models that have none (replaces the tokenizer's)."
    )
    enable_thinking: bool | None = Field(
        None, description="Reasoning templates (Qwen3 and the like): train and serve with thinking on (true) or off "
                          "(false); null leaves the template's default. Reaches the template in training, vLLM's "
                          "--default-chat-template-kwargs and the model card (docs/chat-templates.md).")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Further variables for the chat template, in training and serving alike.")

    @field_validator("chat_template_kwargs")
    @classmethod
    def _no_reserved_kwargs(cls, value):
        reserved = sorted(set(value) & RESERVED_TEMPLATE_KWARGS)
        if reserved:
            raise ValueError(f"{', '.join(reserved)} cannot be set here (the stages set them per call"
                             + ("; use model.enable_thinking" if "enable_thinking" in reserved else "") + ")")
        return value

    @property
    def template_kwargs(self) -> dict[str, Any]:
        """What training passes to apply_chat_template and vLLM takes as its default chat-template kwargs."""
        thinking = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        return {**self.chat_template_kwargs, **thinking}


# Arguments of apply_chat_template itself, or set by the stages per call: not template variables a recipe sets.
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "conversation", "add_generation_prompt", "continue_final_message",
                                      "tokenize", "chat_template", "tools", "documents", "return_dict",
                                      "enable_thinking"})


class QuantizationSpec(Section):
    """4-bit loading of the base (QLoRA). enabled: false trains plain LoRA on a 16-bit base."""

    enabled: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Dtype = "bfloat16"
    skip_modules: tuple[str, ...] = Field(
        ("lm_head",),
        description="Selective quantization: modules kept in 16-bit (the output head by default).",
    )


class LoraSpec(Section):
    r: int = Field(64, ge=1, le=1024)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: tuple[str, ...] = Field(ALL_LINEAR, min_length=1)
    bias: Literal["none"] = "none"
    use_rslora: bool = False

    @field_validator("target_modules", mode="before")
    @classmethod
    def _all_linear_alone(cls, value):
        value = (value,) if isinstance(value, str) else value
        if "all-linear" in value and len(value) > 1:
            raise ValueError("all-linear (peft's every linear layer but the output head) stands alone")
        return value

    @property
    def all_linear(self) -> bool:
        return self.target_modules == ("all-linear",)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.r, self.use_rslora)


def lora_scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """What B @ A is multiplied by: alpha / r, or alpha / sqrt(r) with rank-stabilized LoRA (as peft does)."""
    return alpha / (r**0.5 if rslora else r)


DataFormat = Literal["auto", "text", "messages", "sharegpt", "alpaca", "prompt_completion",
                     # preference pairs (train.method dpo/orpo): prompt/chosen/rejected strings; chosen/rejected
                     # conversations (UltraFeedback-binarized); a shared prompt with message-list answers
                     "preference", "preference_conversations", "preference_messages"]
PREFERENCE_FORMATS = ("preference", "preference_conversations", "preference_messages")


class DataSpec(Section):
    source: str = Field(description="Hub dataset id, or a local .jsonl/.json/.csv/.parquet file.")
    format: DataFormat = "auto"
    split: str = "train"
    eval_split: str | None = Field(None, description="A named held-out split; else eval_fraction is used.")
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    max_length: int = Field(1024, ge=16)
    packing: bool = True


# The ranks vLLM's --max-lora-rank accepts.
VllmLoraRank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]
VLLM_LORA_RANKS = get_args(VllmLoraRank)  # the ranks vLLM's --max-lora-rank accepts

Optimizer = Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch", "adamw_8bit"]
Scheduler = Literal["constant", "constant_with_warmup", "linear", "cosine"]
Attention = Literal["auto", "flash", "flex", "sdpa", "eager"]
# trl 1.16's DPO losses that need no further setting (exo_pair needs label smoothing; sft is no preference loss).
DpoLoss = Literal["sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "aot", "aot_unpaired",
                  "apo_zero", "apo_down", "discopop", "sigmoid_norm"]
PREFERENCE_SETTINGS = ("beta", "loss_type", "init_adapter")


class TrainSpec(Section):
    method: Literal["sft", "dpo", "orpo"] = Field(
        "sft", description="sft: supervised fine-tuning on demonstrations; dpo / orpo: preference tuning on "
                           "chosen/rejected pairs (docs/preference.md).")
    beta: float | None = Field(
        None, gt=0, description="dpo / orpo: how far the policy may move from the reference (DPO's beta, ORPO's "
                                "lambda); null: 0.1.")
    loss_type: DpoLoss | None = Field(None, description="dpo: trl's DPO loss; null: sigmoid (the DPO paper's).")
    init_adapter: str | None = Field(
        None, description="dpo / orpo: start from a finished run's adapter (a run directory, or a recipe name: its "
                          "latest finished run) with the same model, quantization and lora; null: a new adapter.")
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Overrides epochs when set.")
    batch_size: int | Literal["auto"] = Field(
        4, description="Micro-batch (rows); auto: the planner's fastest layout for the GPU's free memory, keeping "
                       "fallback_batch_size x grad_accum rows per update (qlora_app/layout.py).")
    fallback_batch_size: int = Field(
        4, ge=1, description="With batch_size: auto, the micro-batch where no GPU can be read (CPU included).")
    grad_accum: int = Field(4, ge=1)
    lr: float = Field(2e-4, gt=0, lt=1)
    lr_scheduler: Scheduler = "constant_with_warmup"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.001, ge=0)
    max_grad_norm: float = Field(0.3, gt=0)
    optimizer: Optimizer = "paged_adamw_32bit"
    gradient_checkpointing: bool = True
    attention: Attention = Field(
        "auto", description="Attention kernel: flash (hub kernel, CUDA), flex (torch flex_attention, CUDA), sdpa, "
                            "eager; auto: flash on CUDA when its kernel loads, else flex; on CPU sdpa once per "
                            "packed example (qlora_app/train/attention.py).")
    seed: int = 42
    log_steps: int = Field(10, ge=1)
    eval_steps: int = Field(50, ge=1)
    save_steps: int = Field(50, ge=1)
    save_total_limit: int = Field(3, ge=1)
    report_to: tuple[Literal["tensorboard", "wandb", "mlflow"], ...] = ("tensorboard",)
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With --gpus N: ddp keeps the whole 4-bit base on every GPU and all-reduces the LoRA "
                           "gradients; fsdp shards the base, the adapters and the optimizer over the GPUs (a model "
                           "larger than one card). One GPU ignores it.")

    @model_validator(mode="after")
    def _preference_settings(self) -> TrainSpec:
        given = [name for name in PREFERENCE_SETTINGS if getattr(self, name) is not None]
        if self.method == "sft" and given:
            raise ValueError(f"{', '.join('train.' + n for n in given)}: only for train.method dpo or orpo (this "
                             "recipe trains sft); remove them or set train.method")
        if self.method == "orpo" and self.loss_type is not None:
            raise ValueError("train.loss_type applies to method dpo; orpo has one loss (set train.beta)")
        return self

    @property
    def preference_beta(self) -> float:
        return 0.1 if self.beta is None else self.beta

    @property
    def preference_loss(self) -> str:
        return self.loss_type or "sigmoid"

    @property
    def preference(self) -> bool:
        return self.method != "sft"

    @field_validator("batch_size")
    @classmethod
    def _positive(cls, value):
        if value != "auto" and value < 1:
            raise ValueError("must be a positive number of rows, or auto")
        return value

    @property
    def fixed_batch_size(self) -> int:
        """The micro-batch a fixed layout uses: batch_size, or the fallback when batch_size is auto."""
        return self.fallback_batch_size if self.batch_size == "auto" else self.batch_size

    @property
    def effective_batch(self) -> int:
        return self.fixed_batch_size * self.grad_accum


class MergeSpec(Section):
    dtype: Dtype = "bfloat16"
    base_weights: Literal["auto", "original", "dequantized"] = Field(
        "auto", description="Merge into the original 16-bit weights, into dequant(NF4) (the ones trained on), "
                            "or auto: whichever the held-out check finds closest to the adapter on the 4-bit base.")
    max_loss_increase: float = Field(
        0.01, ge=0, description="Warn when the merged held-out loss exceeds the adapter-on-4-bit loss by more.")


class ServeSpec(Section):
    @field_validator("quantization", mode="before")
    @classmethod
    def _no_bitsandbytes(cls, value):
        if value == "bitsandbytes":
            raise ValueError("vLLM 0.32 has no bitsandbytes loader any more; use 'fp8' (8-bit weights quantized "
                             "as they load) or 'none'")
        return value

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_model_len: int | None = Field(None, ge=16, description="Defaults to data.max_length.")
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1)
    quantization: Literal["none", "fp8"] = Field(
        "none", description="fp8: vLLM quantizes the served weights to FP8 as they load (GPU only; halves their "
                            "memory, room for a longer KV cache or more adapters).")
    max_loras: int = Field(4, ge=1, description="Adapters active in one batch (vLLM --max-loras).")
    max_lora_rank: VllmLoraRank | None = Field(
        None, description="The server's max LoRA rank; default: the smallest that holds every adapter.")
    adapters: dict[str, str] = Field(default_factory=dict, description="Model id -> run directory.")
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs one server splits every layer over (vLLM --tensor-parallel-size): for a model "
                             "larger than one card.")
    data_parallel_size: int = Field(
        1, ge=1, description="Replicas of the model inside one server, each on its own tensor_parallel_size GPUs "
                             "(vLLM --data-parallel-size).")


class EvalSpec(Section):
    """Base vs tuned on the held-out split, through one vLLM server (the base plus the adapter), after merge."""

    enabled: bool = Field(True, description="Run eval in the pipeline, between merge and serve.")
    max_tokens: int = Field(256, ge=1, description="Longest answer generated (greedy); a longer one is cut.")
    concurrency: int = Field(8, ge=1, le=256, description="Requests in flight at once.")
    tasks: tuple[str, ...] = Field(
        ("arc_easy", "hellaswag"),
        description="General-skill tasks run on base and tuned: lm-evaluation-harness names, or local task YAML "
                    "files (./path, relative to the recipe); [] runs none. One whose data cannot be had is skipped.")
    limit: int | None = Field(None, ge=1, description="Held-out examples asked at most (null: all).")
    task_limit: int | None = Field(
        200, ge=1, description="Examples of each general task at most (null: all): a 24 GB GPU's eval then stays "
                               "a small share of training.")
    drop_warning: float = Field(
        0.02, ge=0, le=1, description="Warn when a general task's score drops by more than this (absolute).")

    def settings(self) -> dict:
        """What decides eval.json: two specs equal here give the same evaluation."""
        return self.model_dump(mode="json", exclude={"enabled"})


class Recipe(Section):
    name: str
    description: str = ""
    model: ModelSpec
    quantization: QuantizationSpec = QuantizationSpec()
    lora: LoraSpec = LoraSpec()
    data: DataSpec
    train: TrainSpec = TrainSpec()
    merge: MergeSpec = MergeSpec()
    serve: ServeSpec = ServeSpec()
    eval: EvalSpec = EvalSpec()

    @property
    def method(self) -> Literal["qlora", "lora"]:
        return "qlora" if self.quantization.enabled else "lora"

    def with_section(self, section: str, **changes) -> Recipe:
        """A copy with fields of one section changed (values already valid: used by code, not by users)."""
        return self.model_copy(update={section: getattr(self, section).model_copy(update=changes)})

    def training_fields(self) -> dict:
        """What decides the trained adapter: two recipes equal here train the same run."""
        return self.model_dump(exclude={"name", "description", "merge", "serve", "eval"})

    @property
    def max_model_len(self) -> int:
        return self.serve.max_model_len or self.data.max_length

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Recipe:
        if self.data.eval_split is None and self.data.eval_fraction == 0:
            raise ValueError("data needs a held-out set: set data.eval_fraction > 0 or data.eval_split")
        if self.merge.base_weights == "dequantized" and not self.quantization.enabled:
            raise ValueError("merge.base_weights=dequantized rounds the base to NF4, but this recipe trains on "
                             "16-bit weights (quantization.enabled: false): use 'original' or 'auto'")
        return self
