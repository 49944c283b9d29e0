"""Loading the base model as a recipe says, and preparing it for LoRA training.

Shared by the train stage and the GPU benchmarks, so what the benchmarks measure is what training runs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from qlora_app.hub import access
from qlora_app.model import tiny
from qlora_app.recipe.schema import ModelSpec, Recipe

# On CPU bitsandbytes offers to fetch faster kernels from the Hub at every load; the fallback it uses is
# correct, and the offer is noise in every run's output.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, PreTrainedModel


def model_location(model: ModelSpec) -> str:
    """What from_pretrained should be given: a built-in model's folder, a local folder, or a hub id."""
    return str(tiny.materialize(model.path)) if tiny.is_builtin(model.path) else model.path


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def quantization_config(recipe: Recipe) -> BitsAndBytesConfig | None:
    from transformers import BitsAndBytesConfig

    q = recipe.quantization
    if not q.enabled:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
        llm_int8_skip_modules=list(q.skip_modules),
        # FSDP flattens and shards parameters of one dtype: 4-bit codes packed into compute-dtype containers shard
        # like the 16-bit weights beside them (uint8 storage, the default, would not).
        bnb_4bit_quant_storage=torch_dtype(q.compute_dtype if recipe.train.distributed == "fsdp" else "uint8"),
    )


def quantized_weight_names(recipe: Recipe, model_dir) -> frozenset[str]:
    """The weights bitsandbytes stores in 4-bit when the recipe loads this model: every linear layer's weight
    but those of quantization.skip_modules, by transformers' own matching rule. Empty for plain LoRA."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.quantizers_utils import should_convert_module

    if not recipe.quantization.enabled:
        return frozenset()
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=recipe.model.trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    skip = list(recipe.quantization.skip_modules)
    return frozenset(f"{name}.weight" for name, module in skeleton.named_modules()
                     if isinstance(module, torch.nn.Linear) and should_convert_module(name, skip))


def nf4_round_trip(weight, recipe: Recipe):
    """A weight as training saw it: dequant(quant(W)) with the recipe's 4-bit settings."""
    import bitsandbytes.functional as bnbf

    q = recipe.quantization
    packed, state = bnbf.quantize_4bit(weight, quant_type=q.quant_type, compress_statistics=q.double_quant)
    return bnbf.dequantize_4bit(packed, state).to(weight.dtype)


def default_device_map():
    import torch

    return {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"


def load_base(recipe: Recipe, attn_implementation: str | None = None) -> PreTrainedModel:
    """The base model for training: 4-bit (QLoRA) or 16-bit (LoRA), on the GPU when there is one.
    attn_implementation: from qlora_app.attention.resolve (None: transformers' default, sdpa)."""
    from transformers import AutoModelForCausalLM

    spec = recipe.model
    with access.hub_errors(spec.path, spec.revision):
        return AutoModelForCausalLM.from_pretrained(
            model_location(spec),
            revision=spec.revision,
            dtype=torch_dtype(spec.dtype),
            quantization_config=quantization_config(recipe),
            device_map=default_device_map(),
            trust_remote_code=spec.trust_remote_code,
            use_safetensors=True,
            attn_implementation=attn_implementation,
        )


def prepare_for_training(model: PreTrainedModel, recipe: Recipe) -> None:
    """Freeze the base, keep norms in fp32, and turn on gradient checkpointing as the recipe says.

    Unlike peft's prepare_model_for_kbit_training, embeddings and the output head stay in 16-bit: they are
    frozen, and upcasting them costs 2 GiB on Llama 3 8B (128k vocabulary) for no gain in stability.
    """
    import torch

    for param in model.parameters():
        param.requires_grad = False
        if param.ndim == 1 and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    model.config.use_cache = False
    keep_4bit_weights_differentiable_on_cpu(model)
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()


def keep_4bit_weights_differentiable_on_cpu(model: PreTrainedModel) -> None:
    """Stop bitsandbytes (0.50) from repacking 4-bit weights for its CPU inference kernel.

    On a CPU with AVX512-BF16, the first forward in eval mode without gradients (an evaluation) repacks each
    4-bit weight for a fast kernel that has no backward pass; training afterwards silently stops the gradient
    at every quantized layer, so adapters below the last layer stop learning. GPUs are unaffected.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def lora_config(recipe: Recipe) -> LoraConfig:
    from peft import LoraConfig

    lora = recipe.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear" if lora.all_linear else list(lora.target_modules),
        bias=lora.bias,
        use_rslora=lora.use_rslora,
        task_type="CAUSAL_LM",
    )
