"""The tiny test model loads like a hub checkpoint and tokenizes the BPO template sensibly."""

from __future__ import annotations

from pathlib import Path

from optimizer.template import build_prompt
from tests.fakes.tiny_model import fixture_pairs


def test_tiny_model_loads_with_auto_classes(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.vocab_size == len(tokenizer)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert tokenizer.padding_side == "left"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_template_round_trips_and_chat_markers_are_whole_tokens(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = build_prompt("Tell me about black holes.")
    ids = tokenizer(prompt).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:2] == ["<s>", "[INST]"] and tokens[-1] == "[/INST]"
    assert tokenizer.decode(ids, skip_special_tokens=True) == prompt
    # Trained on the fixture text, the template costs far fewer tokens than its bytes.
    assert len(ids) < len(prompt) // 3


def test_fixture_pairs_are_prompt_and_optimized_prompt() -> None:
    pairs = fixture_pairs()
    assert len(pairs) >= 30
    assert all(pair["prompt"] and pair["optimized_prompt"] != pair["prompt"] for pair in pairs)
