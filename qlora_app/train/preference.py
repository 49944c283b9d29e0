"""Preference tuning (train.method dpo / orpo) on the same 4-bit base as SFT, into the same kind of run directory.

The pairs come pre-tokenized from qlora_app.data.preference, rendered exactly as SFT renders a turn and as vLLM
will serve it; the trainers take those ids as they are (their own tokenization is skipped).

DPO's reference: a run that starts a new adapter compares against the base with the adapter switched off (peft's
disable_adapter; no second model). A run that continues an SFT run (train.init_adapter) compares against that SFT
policy, as the DPO paper does (pi_ref = pi_SFT): trl 1.16 keeps a frozen copy of the loaded adapter under the name
"ref" for that (one adapter's weights more, no second model), and the run's checkpoints and adapter hold the
trained adapter alone. With the base as the reference instead, everything SFT taught would count as reward from
the first step, and the loss would start near zero on exactly the pairs SFT already got right.

ORPO (trl.experimental.orpo, the only ORPO trl 1.16 has) needs no reference: one forward, NLL on chosen plus
beta x the odds-ratio term.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from qlora_app.errors import UserError
from qlora_app.recipe.schema import Recipe
from qlora_app.run.directory import RunDir, runs_of

REFERENCE_ADAPTER = "ref"  # the name trl 1.16's DPOTrainer gives its frozen copy of a loaded adapter
CHECKED_SECTIONS = ("model", "quantization", "lora")


def resolve_init_run(recipe: Recipe, root: Path) -> RunDir | None:
    """The finished run train.init_adapter names (a run directory, or a recipe: its newest finished run), checked
    to have trained the same model, quantization and LoRA shape as this recipe."""
    name = recipe.train.init_adapter
    if name is None:
        return None
    where = f"train.init_adapter={name}"
    if Path(name).is_dir():
        run = RunDir(Path(name).resolve())
        if not run.recipe_file.is_file():
            raise UserError(f"{where}: {run.path} is not a run directory (no recipe.yaml)")
        if not run.finished:
            raise UserError(f"{where}: run {run.path} has not finished; finish it first (qlora-app train "
                            f"{run.path.parent.name} --resume {run.path})")
    elif "/" in name or name.startswith("."):
        raise UserError(f"{where}: no such run directory")
    else:
        run = next((r for r in runs_of(name, root) if r.finished), None)
        if run is None:
            raise UserError(f"{where}: no finished run of recipe '{name}' under {root}; train it first with: "
                            f"qlora-app train {name}")
    check_same_base(recipe, run, where)
    return run


def check_same_base(recipe: Recipe, init: RunDir, where: str) -> None:
    before = init.recipe()
    differ = [s for s in CHECKED_SECTIONS if getattr(before, s) != getattr(recipe, s)]
    if differ:
        raise UserError(f"{where}: run {init.path} trained a different {' and '.join(differ)} section "
                        f"({', '.join(differ)} must match to continue its adapter)")


def init_run_of(recipe: Recipe, run: RunDir) -> RunDir | None:
    """The init run this run continues: the one its manifest recorded (a resumed run keeps it), else resolved
    now (every rank of a first session resolves the same one the launcher checked)."""
    recorded = run.read_manifest().get("chain", {}).get("init_run")
    if recorded:
        init = RunDir(Path(recorded))
        if not (init.adapter / "adapter_config.json").is_file():
            raise UserError(f"run {run.path} continues the adapter of {init.path}, which is gone: put that run "
                            "back to resume, or start a new run")
        return init
    return resolve_init_run(recipe, run.path.parent.parent)


def chain(init: RunDir | None) -> dict:
    """What the manifest and the model card say about the run this one continued."""
    if init is None:
        return {"init_run": None}
    manifest = init.read_manifest()
    return {"init_run": str(init.path), "init_recipe": manifest.get("recipe"), "init_run_id": init.path.name,
            "init_data_fingerprint": manifest.get("data", {}).get("fingerprint"),
            "init_method": init.recipe().train.method}


def policy_model(recipe: Recipe, base, init: RunDir | None):
    """(model, peft_config) for the trainer. Continuing a run: its adapter loaded trainable (trl then keeps the
    frozen copy that DPO compares with). A new adapter: the base and the LoRA config, which trl wraps itself and
    compares against with the adapter off; a peft model handed over instead would get a frozen copy of a freshly
    initialized adapter, the same reference at the memory of one more adapter."""
    from peft import PeftModel, get_peft_model

    from qlora_app.model.loading import lora_config

    if init is not None:
        return PeftModel.from_pretrained(base, str(init.adapter), is_trainable=True), None
    if recipe.train.method == "dpo":
        return base, lora_config(recipe)
    return get_peft_model(base, lora_config(recipe)), None


def config(recipe: Recipe, common: dict):
    """trl's DPOConfig or ORPOConfig: the shared Trainer arguments and the method's own."""
    t = recipe.train
    if t.method == "dpo":
        from trl import DPOConfig

        return DPOConfig(**common, beta=t.preference_beta, loss_type=[t.preference_loss],
                         max_length=recipe.data.max_length)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # chosen knowingly: trl 1.16 has no other ORPO
    from trl.experimental.orpo import ORPOConfig

    # Its collator passes the prompt, chosen and rejected columns on by name: none may be dropped.
    return ORPOConfig(**common, beta=t.preference_beta, max_length=recipe.data.max_length,
                      remove_unused_columns=False)


def build(recipe: Recipe, base, init: RunDir | None, args, data, tokenizer, callbacks: list):
    """The DPO or ORPO trainer over the pre-tokenized pairs."""
    cls = pairs_dpo_trainer() if recipe.train.method == "dpo" else pairs_orpo_trainer()
    model, peft_config = policy_model(recipe, base, init)
    return cls(model=model, args=args, train_dataset=data.train.to_dataset(), eval_dataset=data.eval.to_dataset(),
               processing_class=tokenizer, callbacks=callbacks, peft_config=peft_config)


@functools.cache
def pairs_dpo_trainer():
    from trl import DPOTrainer

    class PairsDPOTrainer(DPOTrainer):
        """trl's DPOTrainer on our pre-tokenized pairs, saving checkpoints without the frozen reference copy."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already prompt_ids / chosen_ids / rejected_ids, the columns trl's collator takes

        def _save(self, output_dir=None, state_dict=None):
            # A resumed run rebuilds the reference copy from the init run: a checkpoint holds the trained adapter.
            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            model.save_pretrained = functools.partial(model.save_pretrained, selected_adapters=["default"])
            try:
                super()._save(output_dir, state_dict)
            finally:
                del model.save_pretrained

    return PairsDPOTrainer


@functools.cache
def pairs_orpo_trainer():
    from trl.experimental.orpo import ORPOTrainer

    class PairsORPOTrainer(ORPOTrainer):
        """trl's experimental ORPOTrainer on our pre-tokenized pairs: each row becomes the prompt, chosen and
        rejected sequences it builds, labels on the answers only."""

        def tokenize_row(self, feature, model=None):
            prompt = feature["prompt_ids"]
            row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for side in ("chosen", "rejected"):
                answer = feature[f"{side}_ids"]
                row[f"{side}_input_ids"] = prompt + answer
                row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
                row[f"{side}_labels"] = [-100] * len(prompt) + answer
            return row

    return PairsORPOTrainer


def held_out_scores(trainer, pairs) -> dict:
    """Preference accuracy and mean margin on the held-out pairs: the starting point (the reference: the init
    adapter, or the base with the adapter off) and the tuned adapter."""
    from trl.trainer.utils import use_adapter

    from qlora_app.data.preference import score_pairs

    model = trainer.accelerator.unwrap_model(trainer.model)
    start = REFERENCE_ADAPTER if REFERENCE_ADAPTER in model.peft_config else None
    with use_adapter(model, start):
        base = score_pairs(model, pairs)
    tuned = score_pairs(model, pairs)
    label = "init adapter" if start else "base (adapter off)"
    return {"base": {**_figures(base), "what": label}, "tuned": _figures(tuned)}


def _figures(scores) -> dict:
    return {"accuracy": scores.accuracy, "margin": scores.margin, "pairs": scores.pairs}


def drop_reference_adapter(model) -> None:
    """The frozen reference copy is no part of what the run leaves: merge and serve see one adapter."""
    if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REFERENCE_ADAPTER)
