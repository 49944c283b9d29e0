"""A recipe's data as each method reads it: the records training uses (SFT records, or preference pairs for
dpo/orpo), and the same splits as conversations for code that asks questions or measures loss on them (eval,
the merge check, the demo): a preference pair is its prompt with the chosen answer."""

from __future__ import annotations

from qlora_app.data.preference import chosen_chats, load_pairs
from qlora_app.data.sources import Records, load_splits
from qlora_app.recipe.schema import Recipe


def training_splits(recipe: Recipe) -> tuple[Records, Records]:
    """(train, held-out) as training reads them; their fingerprints say whether a run is current."""
    if recipe.train.method == "sft":
        return load_splits(recipe.data)
    return load_pairs(recipe.data)


def chat_splits(recipe: Recipe) -> tuple[Records, Records]:
    """(train, held-out) as SFT-style records, for any method."""
    train, held_out = training_splits(recipe)
    if recipe.train.method == "sft":
        return train, held_out
    return chosen_chats(train), chosen_chats(held_out)


def heldout_chats(recipe: Recipe) -> Records:
    return chat_splits(recipe)[1]
