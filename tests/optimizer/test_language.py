"""Naming a prompt's language, and the guard rule that a rewrite keeps it."""

from __future__ import annotations

import pytest

from optimizer.guard import RULES, check_rewrite
from optimizer.language import is_supported, language_of, same_language

ENGLISH = frozenset({"en"})


@pytest.mark.parametrize(("text", "language"), [
    ("What is the capital of France and how big is it?", "en"),
    ("Écris-moi un poème sur le printemps et la pluie dans la ville", "fr"),
    ("Wie ist das Wetter in Berlin und ist es kalt?", "de"),
    ("请帮我写一首关于春天的诗", "cjk"),
    ("Привет, как дела?", "cyrillic"),
    ("Tell me about llamas", "latin"),  # too few stopwords to name it
    ("1 + 1 = ?", None),
])
def test_language_of(text: str, language: str | None) -> None:
    assert language_of(text) == language


def test_a_translated_rewrite_is_rejected_by_the_guard() -> None:
    language_rule = [rule for rule in RULES if rule.name == "language"]
    chinese, english = "请帮我写一首关于春天的诗", "Please write a poem about spring, with vivid imagery."
    assert check_rewrite(chinese, english, language_rule).rule == "language"
    assert not check_rewrite(chinese, english).accepted  # the whole guard (an earlier rule may name it first)
    french = "Écris-moi un poème sur le printemps et la pluie dans la ville"
    assert check_rewrite(french, "Write me a poem about the spring and the rain in the city, please.",
                         language_rule).rule == "language"
    assert check_rewrite("Tell me about llamas", "Tell me about llamas: their history and care.",
                         language_rule).accepted


def test_same_language_is_lenient_where_the_language_cannot_be_named() -> None:
    assert same_language("Tell me about llamas", "What is the history of the llama, and how are they kept?")
    assert same_language("1 + 1", "What is 1 + 1?")
    assert not same_language("Tell me about llamas", "请介绍一下羊驼")


def test_is_supported() -> None:
    assert is_supported("Tell me about llamas", ENGLISH)
    assert not is_supported("请帮我写一首关于春天的诗", ENGLISH)
    assert is_supported("请帮我写一首关于春天的诗", frozenset({"en", "cjk"}))
    assert not is_supported("Wie ist das Wetter in Berlin und ist es kalt?", ENGLISH)
