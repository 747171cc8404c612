"""A tiny random-weight Llama and a tokenizer trained on the fixture prompts: a real model dir in < 2 s.

``build_tiny_model(path)`` writes a directory that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load like any
hub checkpoint (``--optimizer hf:DIR``, ``bpo train --base DIR``). The weights are random, so generations
are gibberish, but every code path — template, padding, decoding settings, batching — runs for real.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

FIXTURE_PAIRS = Path(__file__).resolve().parents[1] / "fixtures" / "prompt_pairs.jsonl"

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
# Llama-2 chat markers: whole tokens, as in the real vocabulary, so the template tokenizes stably.
CHAT_TOKENS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")
VOCAB_SIZE = 512
# A Llama-2 style chat template, so chat-formatted training data works with this tokenizer too.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ '<<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}{% endif %}"
    "{% endfor %}"
)


def fixture_pairs(path: Path = FIXTURE_PAIRS) -> list[dict[str, str]]:
    """The hand-written (prompt, optimized_prompt) pairs under tests/fixtures/."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _training_text() -> Iterator[str]:
    from optimizer.template import build_prompt

    for pair in fixture_pairs():
        yield build_prompt(pair["prompt"]) + " " + pair["optimized_prompt"]
        yield pair["optimized_prompt"] + "\n"


def build_tokenizer(path: Path) -> None:
    """Train a byte-level BPE on the fixture text and save it as a fast tokenizer with Llama-like tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[UNK, BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_text(), trainer=trainer)
    tokenizer.add_tokens([AddedToken(token, normalized=False) for token in CHAT_TOKENS])
    bos_id = tokenizer.token_to_id(BOS)
    # Like Llama: every encoded prompt starts with BOS, nothing is appended.
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]),
    ])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )
    fast.save_pretrained(path)


def build_tiny_model(path: Path | str, *, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """Write a random-weight Llama (about 100k parameters) and its tokenizer to ``path``; return the path."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path)
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the tiny test model to a directory.")
    parser.add_argument("path", type=Path, help="output directory")
    print(build_tiny_model(parser.parse_args().path))
