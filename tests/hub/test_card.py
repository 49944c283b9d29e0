"""The model card says which chat-template arguments (thinking on or off) the model was trained with."""

from __future__ import annotations

import pytest

from qlora_app.errors import UserError
from qlora_app.hub.card import CardFacts, template_line, usage
from qlora_app.recipe.loader import load_recipe


def test_card_tells_how_to_serve_with_the_trained_thinking_choice():
    recipe = load_recipe("tiny", ["model.enable_thinking=false"])
    assert '`{"enable_thinking": false}` (thinking off)' in template_line(recipe)
    served = usage(recipe, CardFacts("merged", "someone/tiny-merged"))
    assert "--served-model-name tiny --default-chat-template-kwargs '{\"enable_thinking\": false}'" in served
    plain = load_recipe("tiny")
    assert template_line(plain) == "" and "--default-chat-template-kwargs" not in usage(plain, CardFacts("merged", "x"))


def test_thinking_is_set_by_its_own_field_not_among_the_template_kwargs():
    with pytest.raises(UserError, match="enable_thinking cannot be set here.*use model.enable_thinking"):
        load_recipe("tiny", ["model.chat_template_kwargs={enable_thinking: true}"])
