"""``bpo train``: supervised fine-tuning of the optimizer on (prompt, optimized prompt) pairs with TRL's
``SFTTrainer``; writes a model dir + ``bpo_manifest.json`` that ``--optimizer hf:DIR`` loads.

Each pair becomes ``ids(build_prompt(prompt)) + ids(optimized) + [eos]`` with the loss on the rewrite only.
The prompt is tokenized exactly as the ``hf:`` backend tokenizes it at inference, and the rewrite on its
own, so the model learns the very token ids it must generate after the prompt. Pairs longer than
``--max-length`` are dropped and counted, never truncated: the reference code cut long inputs from the
start and trained on prompts whose beginning was gone.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from training.errors import ConfigError, DataError
from training.records import Record, read_records, sha256_file, write_json, write_jsonl
from training.run_config import saved_config

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from trl.trainer.sft_trainer import SFTTrainer

    from optimizer.base import Mode

Loaded = TypeVar("Loaded")
CONFIG_NAME = "bpo_train_config.json"
HELD_OUT_NAME = "held_out.jsonl"  # the pairs --eval-fraction kept out of training
IGNORE_INDEX = -100  # the label value the loss skips (the prompt's tokens)


@dataclass
class TrainConfig:
    base: str = field(metadata={
        "help": "base model: a transformers model dir, a hub id, or a llama.cpp GGUF file (dequantized)"})
    data: str = field(metadata={
        "help": "pairs: JSONL of prompt/optimized_prompt (bpo data build), or the BPO release's processed "
                "pairs (final_input/final_output, its pairs.json)"})
    output: str = field(metadata={"help": "model dir to write; loads with --optimizer hf:DIR"})
    max_steps: int = field(default=-1, metadata={
        "help": "stop after N optimizer steps (smoke runs); -1: use --epochs"})
    lora: bool = field(default=False, metadata={
        "help": "train LoRA adapters (peft) and merge them into the saved model"})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    epochs: float = field(default=3.0, metadata={"help": "training epochs (the paper: 3)"})
    learning_rate: float = field(default=2e-5, metadata={
        "help": "AdamW peak learning rate (the paper: 2e-5, full fine-tune)"})
    warmup_ratio: float = field(default=0.1, metadata={
        "help": "share of steps for linear warm-up, then linear decay"})
    batch_size: int = field(default=4, metadata={
        "help": "pairs per device per step (the paper: 4 per GPU x 8 GPUs)"})
    gradient_accumulation: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_length: int = field(default=2048, metadata={
        "help": "drop pairs longer than this many tokens (never truncate)"})
    eval_fraction: float = field(default=0.0, metadata={
        "help": "hold out this share of pairs for eval loss and offline metrics"})
    eval_generate: int = field(default=16, metadata={
        "help": "rewrite up to N held-out prompts after training, decoded as the hf: backend serves them "
                "(stable mode, --seed), for offline metrics"})
    bf16: bool | None = field(default=None, metadata={
        "help": "train in bf16 (default: on when the GPU supports it)"})
    gradient_checkpointing: bool | None = field(default=None, metadata={
        "help": "trade compute for memory (default: on GPU)"})
    deepspeed: str | None = field(default=None, metadata={
        "help": "DeepSpeed config: a JSON path or a shipped name (zero2, zero3)"})
    logging_steps: int = field(default=10, metadata={"help": "log the loss every N steps"})
    save_steps: int = field(default=0, metadata={
        "help": "checkpoint every N steps (0: only the final model)"})
    resume: bool = field(default=False, metadata={
        "help": "continue from the last checkpoint in OUTPUT/checkpoints"})
    keep_checkpoints: bool = field(default=False, metadata={"help": "keep OUTPUT/checkpoints after training"})
    seed: int = field(default=42, metadata={"help": "random seed (data order, LoRA init, held-out split)"})
    name: str | None = field(default=None, metadata={
        "help": "optimizer name in the manifest (default: the output dir's name)"})

    def check(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError("--eval-fraction must be in [0, 1)")
        if self.max_steps == 0 or self.epochs <= 0:
            raise ConfigError("--max-steps must be -1 or positive, and --epochs positive")


@dataclass
class Prepared:
    """Tokenized pairs ready for the trainer, and what was left out."""

    tokenizer: PreTrainedTokenizerBase
    train: list[dict[str, list[int]]]
    held_out: list[Record]
    held_out_encoded: list[dict[str, list[int]]]
    dropped_too_long: int
    data_sha256: str


# (prompt field, rewrite field): ours first, then the BPO release's processed pairs (its pairs.json).
PAIR_FIELDS = (("prompt", "optimized_prompt"), ("final_input", "final_output"))


def as_pair(record: Record) -> Record | None:
    """The record as a ``prompt``/``optimized_prompt`` pair, or None when it carries neither layout."""
    for prompt, rewrite in PAIR_FIELDS:
        if isinstance(record.get(prompt), str) and isinstance(record.get(rewrite), str):
            return {**record, "prompt": record[prompt], "optimized_prompt": record[rewrite]}
    return None


def load_pairs(path: str) -> list[Record]:
    pairs = []
    for number, record in enumerate(read_records(path), start=1):
        pair = as_pair(record)
        if pair is None:
            raise DataError(f"{path}: pair {number} needs string prompt and optimized_prompt fields "
                            "(or final_input and final_output, as in the BPO release)")
        pairs.append(pair)
    pairs = [p for p in pairs if p["prompt"].strip() and p["optimized_prompt"].strip()]
    if not pairs:
        raise DataError(f"{path}: no pairs to train on")
    return pairs


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The optimizer input's token ids, as the ``hf:`` backend builds them (template, special tokens)."""
    from optimizer.template import build_prompt

    return list(tokenizer(build_prompt(text))["input_ids"])


def encode_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, optimized: str) -> dict[str, list[int]]:
    """input_ids = prompt ids + rewrite ids + eos; labels mask the prompt with -100."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    rewrite_ids = list(tokenizer(optimized.strip(), add_special_tokens=False)["input_ids"])
    rewrite_ids.append(int(tokenizer.eos_token_id))
    return {"input_ids": prompt_ids + rewrite_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + rewrite_ids}


def context_limit(base: str, requested: int) -> int:
    """``--max-length``, capped by the base model's position limit."""
    from transformers import AutoConfig

    positions = getattr(from_base(base, AutoConfig.from_pretrained, "config"), "max_position_embeddings", None)
    return min(requested, positions) if isinstance(positions, int) else requested


def from_base(base: str, load: Callable[..., Loaded], what: str, **kwargs: Any) -> Loaded:
    """``load(base)``; transformers' errors for a base that holds no usable model name the flag."""
    from optimizer.hf import ModelLoadError, model_source  # the hf: backend's reading of a path: a dir,
    # a GGUF file, a hub id

    try:
        source, gguf_file = model_source(base)
    except ModelLoadError as exc:  # a path that does not exist
        raise ConfigError(f"--base {base}: cannot load its {what}: {exc}") from exc
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return load(source, **extra, **kwargs)
    except (OSError, ValueError) as exc:  # transformers raises either for a wrong path or an empty dir
        raise ConfigError(f"--base {base}: cannot load its {what}: {exc}") from exc
    except ImportError as exc:  # a GGUF base without the gguf package
        raise ConfigError(f"--base {base}: {exc}; install the train extra: pip install 'bpo-proxy[train]'") from exc


def load_base_model(base: str, dtype: Any) -> Any:
    """The base as a plain, trainable and saveable causal LM (a GGUF file is dequantized on load)."""
    from transformers import AutoModelForCausalLM

    model: Any = from_base(base, AutoModelForCausalLM.from_pretrained, "model", dtype=dtype)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and base.endswith(".gguf"):
        # transformers keeps its GGUF quantizer on the dense weights it unpacked, and then refuses to train
        # or save the model: the weights are plain tensors, so the model is made a plain one.
        quantizer.remove_quantization_config(model)
    return model


def prepare(config: TrainConfig, pairs: list[Record] | None = None) -> Prepared:
    """Tokenize ``pairs`` (default: read from ``config.data``) as the trainer and the ``hf:`` backend need."""
    from transformers import AutoTokenizer

    pairs = load_pairs(config.data) if pairs is None else pairs
    tokenizer = from_base(config.base, AutoTokenizer.from_pretrained, "tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of the loss and attention anyway
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{config.base}: the tokenizer has no EOS token, so a rewrite could never end")
    random.Random(config.seed).shuffle(pairs)
    held_count = int(len(pairs) * config.eval_fraction)
    held_out, train_pairs = pairs[:held_count], pairs[held_count:]
    limit = context_limit(config.base, config.max_length)
    encoded = [encode_pair(tokenizer, p["prompt"], p["optimized_prompt"]) for p in train_pairs]
    train = [e for e in encoded if len(e["input_ids"]) <= limit]
    held_encoded = [encode_pair(tokenizer, p["prompt"], p["optimized_prompt"]) for p in held_out]
    held_encoded = [e for e in held_encoded if len(e["input_ids"]) <= limit]
    if not train:
        raise DataError(f"every pair is longer than {limit} tokens")
    return Prepared(tokenizer, train, held_out, held_encoded, len(encoded) - len(train), sha256_file(config.data))


def deepspeed_config(value: str | None) -> str | None:
    if value is None or Path(value).is_file():
        return value
    from training.configs import config_path

    return str(config_path(f"deepspeed_{value}"))


def build_trainer(config: TrainConfig, prepared: Prepared) -> SFTTrainer:
    """TRL's SFTTrainer on the pre-tokenized pairs (it skips its own tokenization when ids are given)."""
    import torch
    from datasets import Dataset
    from trl.trainer.sft_config import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    on_gpu = torch.cuda.is_available()
    bf16 = config.bf16 if config.bf16 is not None else on_gpu and torch.cuda.is_bf16_supported()
    checkpointing = config.gradient_checkpointing if config.gradient_checkpointing is not None else on_gpu
    # A full fine-tune keeps fp32 master weights and runs bf16 under autocast: updates of lr 2e-5 would
    # vanish in bf16 weights. LoRA trains fp32 adapters on a frozen base, so the base may sit in bf16.
    dtype = torch.bfloat16 if bf16 and config.lora else torch.float32
    model = load_base_model(config.base, dtype)
    args = SFTConfig(
        output_dir=str(Path(config.output) / "checkpoints"), max_length=None, packing=False,
        num_train_epochs=config.epochs, max_steps=config.max_steps, learning_rate=config.learning_rate,
        lr_scheduler_type="linear", warmup_steps=config.warmup_ratio, optim="adamw_torch",
        per_device_train_batch_size=config.batch_size, per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation, bf16=bf16, use_cpu=bf16 and not on_gpu,
        activation_checkpointing=checkpointing, dataloader_pin_memory=on_gpu,
        logging_steps=config.logging_steps, logging_first_step=True,
        save_strategy="steps" if config.save_steps else "no", save_steps=config.save_steps or 500,
        eval_strategy="no", report_to="none", seed=config.seed, data_seed=config.seed,
        deepspeed=deepspeed_config(config.deepspeed), disable_tqdm=True,
    )
    return SFTTrainer(
        model=model, args=args, processing_class=prepared.tokenizer,
        train_dataset=Dataset.from_list(prepared.train),
        eval_dataset=Dataset.from_list(prepared.held_out_encoded) if prepared.held_out_encoded else None,
        peft_config=lora_config(config) if config.lora else None,
    )


def lora_config(config: TrainConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=config.lora_rank, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules="all-linear")


def loss_curve(trainer: SFTTrainer) -> list[float]:
    return [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


def served_rewrites(model: Any, tokenizer: PreTrainedTokenizerBase, prompts: list[str], seed: int,
                    mode: Mode = "stable") -> list[str | None]:
    """Rewrites of ``prompts`` decoded as the ``hf:`` backend serves them (template, mode, sampling, stops,
    token budget, seeded per prompt); None where the backend fails (a truncated rewrite, say)."""
    from optimizer.base import OptimizerOptions
    from optimizer.hf import GenerationRequest, generate_batch, prepare_loaded

    options = OptimizerOptions(seed=seed)
    loaded = prepare_loaded("bpo-train-eval", model, tokenizer, str(model.device), str(model.dtype))
    model.eval()
    rewrites: list[str | None] = []
    rows = max(options.max_batch_size, 1)
    for start in range(0, len(prompts), rows):
        batch = [GenerationRequest(text, mode) for text in prompts[start:start + rows]]
        results = generate_batch(loaded, options, batch, lambda row: False)
        rewrites += [None if isinstance(result, BaseException) or result.truncated else result.text
                     for result in results]
    return rewrites


def offline_metrics(model: Any, prepared: Prepared, count: int, seed: int) -> dict[str, Any]:
    """Offline metrics of served rewrites of up to ``count`` held-out prompts; a failed rewrite counts as the
    original prompt, which is what the gateway would forward."""
    from training.metrics import rewrite_metrics

    sample = prepared.held_out[:count]
    if not sample:
        return {}
    prompts = [p["prompt"] for p in sample]
    rewrites = served_rewrites(model, prepared.tokenizer, prompts, seed)
    forwarded = [rewrite if rewrite is not None else prompt for prompt, rewrite in zip(prompts, rewrites, strict=True)]
    metrics = rewrite_metrics(prompts, forwarded, [p["optimized_prompt"] for p in sample]).as_dict()
    metrics["failed"] = sum(rewrite is None for rewrite in rewrites)
    return {f"heldout_{name}": value for name, value in metrics.items()}


def smoothed(curve: list[float], at_end: bool) -> float:
    """The mean of the first or last quarter of the logged losses: one noisy batch is not a trend."""
    if not curve:
        return float("nan")
    window = max(1, len(curve) // 4)
    part = curve[-window:] if at_end else curve[:window]
    return sum(part) / len(part)


def summary_line(output: Path, identity: str, metrics: dict[str, Any]) -> str:
    line = (f"wrote {output} as {identity}: {metrics['steps']} steps, train loss {metrics['train_loss_start']:.3f}"
            f" -> {metrics['train_loss_end']:.3f} (mean of the first / last quarter of logged steps)")
    if "eval_loss" in metrics:
        line += (f", held-out loss {metrics['base_eval_loss']:.3f} (base) -> {metrics['eval_loss']:.3f} "
                 f"on {metrics['held_out_pairs']} pairs")
    return line


def hyperparameters(config: TrainConfig) -> dict[str, Any]:
    """The config fields that shape the weights (paths and bookkeeping flags left out)."""
    skip = {"data", "output", "logging_steps", "save_steps", "resume", "keep_checkpoints", "name", "eval_generate"}
    return {key: value for key, value in saved_config(config).items() if key not in skip}


def save(trainer: SFTTrainer, config: TrainConfig, prepared: Prepared, metrics: dict[str, Any]) -> None:
    """Write the model (LoRA merged in), the tokenizer, the run config and the manifest."""
    from optimizer.manifest import build_manifest, write_manifest

    output = Path(config.output)
    model: Any = trainer.model
    if config.lora:
        model = model.merge_and_unload()  # the hf: backend loads plain causal-LM dirs
        if trainer.is_world_process_zero():
            model.save_pretrained(output)
    else:
        trainer.save_model(str(output))
    if not trainer.is_world_process_zero():
        return
    (output / "training_args.bin").unlink(missing_ok=True)  # a pickle; the run's config is saved as JSON
    prepared.tokenizer.save_pretrained(output)
    if prepared.held_out:
        # The pairs this run never trained on, for bench/rewrite_quality.py and bpo eval.
        write_jsonl(output / HELD_OUT_NAME, [{"prompt": p["prompt"], "optimized_prompt": p["optimized_prompt"]}
                                             for p in prepared.held_out])
    if config.eval_generate and prepared.held_out:
        metrics.update(offline_metrics(model, prepared, config.eval_generate, config.seed))
    readable_by_all(output)
    write_json(output / CONFIG_NAME, {"stage": "train", "config": saved_config(config), "metrics": metrics,
                                      "finished": datetime.now(UTC).isoformat()})
    name = config.name or output.resolve().name
    manifest = build_manifest(output, name, config.base, prepared.data_sha256, hyperparameters(config), metrics)
    write_manifest(output, manifest)
    print(summary_line(output, manifest.identity, metrics))


def readable_by_all(output: Path) -> None:
    """The saved files get the usual 0644 (less the umask): the weights were written 0600, so a server
    running as another user (a container, a shared model dir) could not read them."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    for path in output.iterdir():
        if path.is_file():
            path.chmod(0o644 & ~umask)


def main(config: TrainConfig) -> dict[str, Any]:
    config.check()
    pairs = load_pairs(config.data)  # before the seconds of importing transformers: a bad file fails fast
    from transformers import set_seed

    set_seed(config.seed)
    prepared = prepare(config, pairs)
    trainer = build_trainer(config, prepared)
    checkpoints = Path(config.output) / "checkpoints"
    # The base model's held-out loss, before any step: the yardstick for the trained model's.
    base_eval_loss = float(trainer.evaluate()["eval_loss"]) if prepared.held_out_encoded else None
    result = trainer.train(resume_from_checkpoint=config.resume and any(checkpoints.glob("checkpoint-*")))
    curve = loss_curve(trainer)
    metrics: dict[str, Any] = {
        "train_loss": float(result.training_loss), "first_loss": curve[0] if curve else float("nan"),
        "last_loss": curve[-1] if curve else float("nan"), "train_loss_start": smoothed(curve, at_end=False),
        "train_loss_end": smoothed(curve, at_end=True), "steps": int(result.global_step),
        "train_pairs": len(prepared.train), "held_out_pairs": len(prepared.held_out),
        "dropped_too_long": prepared.dropped_too_long,
    }
    if prepared.held_out_encoded:
        metrics["base_eval_loss"] = base_eval_loss
        metrics["eval_loss"] = float(trainer.evaluate()["eval_loss"])
    save(trainer, config, prepared, metrics)
    if not config.keep_checkpoints and trainer.is_world_process_zero():
        shutil.rmtree(checkpoints, ignore_errors=True)
    return metrics
