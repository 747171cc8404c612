"""``hf:`` backend: a transformers causal LM loaded in-process, with dynamic batching on one worker thread."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from optimizer.base import (
    Mode,
    OptimizerBusy,
    OptimizerError,
    OptimizerOptions,
    OptimizerStatus,
    OptimizerUnavailable,
    Rewrite,
    State,
)
from optimizer.batching import DynamicBatcher
from optimizer.budget import min_new_tokens, token_budget
from optimizer.capacity import DeviceSpeed, measure_speed
from optimizer.identity import hf_identity
from optimizer.template import (
    BANNED_STRINGS,
    DECODING,
    build_prompt,
    clean_output,
)

log = logging.getLogger("bpo.optimizer.hf")

INSTALL_HINT = "install the GPU extra: pip install 'bpo-proxy[gpu]' (or use --optimizer remote:URL, llm:MODEL or none)"


class ModelLoadError(OptimizerError):
    """The model cannot be loaded; the message says what to do about it."""


@dataclass(frozen=True)
class GenerationRequest:
    text: str
    mode: Mode


@dataclass(frozen=True)
class Generated:
    """One row's cleaned text, whether it was cut short (budget spent or abandoned), and the size of its batch."""

    text: str
    truncated: bool
    batch_size: int = 1


@dataclass
class LoadedModel:
    """A model ready to generate, with the token ids the decoding modes need."""

    model: Any
    tokenizer: Any
    device: str
    dtype: str
    identity: str
    eos_ids: list[int]
    newline_ids: list[int]
    bad_words_ids: list[list[int]]


Loader = Callable[[str, OptimizerOptions], LoadedModel]


def pick_device(requested: str | None) -> str:
    import torch

    if requested:
        return requested
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


# Measured (bench/README.md, issue 14): on CPU one padded batch of real prompts keeps every caller waiting for the
# longest row and saves no compute, so rewrites go one at a time; a GPU runs a batch's rows in parallel.
CPU_BATCH_SIZE, ACCELERATOR_BATCH_SIZE = 1, 8


def default_batch_size(device: str) -> int:
    return CPU_BATCH_SIZE if device.startswith("cpu") else ACCELERATOR_BATCH_SIZE


def pick_dtype(device: str) -> Any:
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device.startswith("mps") else torch.float32


def load_model(target: str, options: OptimizerOptions) -> LoadedModel:
    """Load ``target`` (a local dir, a hub id, or a GGUF file); every failure becomes a :class:`ModelLoadError`."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise ModelLoadError(f"hf:{target} needs torch and transformers ({exc.name} is missing): "
                             f"{INSTALL_HINT}") from exc
    device = options.device or "?"
    source, gguf_file = model_source(target)
    try:
        device = pick_device(options.device)
        dtype = pick_dtype(device)
        extra: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **extra)
        model: Any = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
        model = model.to(device).eval()
    except torch.cuda.OutOfMemoryError as exc:
        raise ModelLoadError(_out_of_memory(target, device, exc)) from exc
    except ImportError as exc:  # a GGUF file without the gguf package
        raise ModelLoadError(f"cannot load hf:{target}: {_first_line(exc)}; {INSTALL_HINT}") from exc
    except OSError as exc:
        raise ModelLoadError(f"cannot load hf:{target}: {_first_line(exc)}. {_hub_hint(target)}") from exc
    except (RuntimeError, ValueError, KeyError) as exc:
        if "out of memory" in str(exc).lower():
            raise ModelLoadError(_out_of_memory(target, device, exc)) from exc
        raise ModelLoadError(f"cannot load hf:{target} on {device}: {_first_line(exc)}") from exc
    return prepare_loaded(target, model, tokenizer, device, str(dtype).removeprefix("torch."))


def model_source(target: str) -> tuple[str, str | None]:
    """``(directory or hub id, GGUF file name or None)`` for ``from_pretrained``.

    ``~/models/bpo`` is a directory; ``~/models/smollm2.Q4_1.gguf`` a llama.cpp file (transformers
    dequantizes it); ``owner/repo/file.gguf`` a GGUF file on the hub; a hub id is ``NAME`` or ``ORG/NAME``;
    any other path must exist.
    """
    expanded = os.path.expanduser(target)
    if os.path.isdir(expanded):
        return expanded, None
    if expanded.endswith(".gguf") and os.path.isfile(expanded):
        return os.path.dirname(os.path.abspath(expanded)), os.path.basename(expanded)
    local = target.startswith(("/", ".", "~")) or "\\" in target
    if target.endswith(".gguf") and not local and target.count("/") >= 2:
        owner, repo, file = target.split("/", 2)
        return f"{owner}/{repo}", file
    if local or target.count("/") > 1:
        raise ModelLoadError(f"cannot load hf:{target}: no such directory or GGUF file (a hub id is ORG/NAME)")
    return target, None


def _hub_hint(target: str) -> str:
    """What to do when a hub id could not be read; true to whether the hub was asked at all."""
    from huggingface_hub import constants

    if getattr(constants, "HF_HUB_OFFLINE", False):
        return (f"HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so only the local cache was read: download "
                f"the model once with the hub reachable (hf download {target}), or point --optimizer hf: at a "
                "local model directory or GGUF file")
    return ("Point --optimizer hf: at a local model directory or GGUF file, or make the Hugging Face hub reachable "
            "(HF_TOKEN for gated models; HF_HUB_OFFLINE=1 reads the local cache only, without retrying the hub)")


def _out_of_memory(target: str, device: str, exc: BaseException) -> str:
    return (f"not enough memory to load hf:{target} on {device} ({_first_line(exc)}): free memory, use a "
            "smaller model, or choose another device with --optimizer-device")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300].rstrip(".")


def prepare_loaded(target: str, model: Any, tokenizer: Any, device: str, dtype: str) -> LoadedModel:
    """Wrap a loaded model and tokenizer for generation (custom loaders build on this too)."""
    tokenizer.padding_side = "left"  # decoder-only batches grow to the right
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    eos = model.generation_config.eos_token_id
    eos_ids = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                      *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})
    return LoadedModel(
        model=model, tokenizer=tokenizer, device=device, dtype=dtype,
        identity=hf_identity(target, getattr(model.config, "_commit_hash", None)),
        eos_ids=eos_ids, newline_ids=newline_token_ids(tokenizer), bad_words_ids=banned_word_ids(tokenizer))


def newline_token_ids(tokenizer: Any) -> list[int]:
    """Every token whose text holds a line break: aggressive mode stops on any of them, as on EOS."""
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return [i for i, piece in enumerate(pieces) if "\n" in piece]


def banned_word_ids(tokenizer: Any) -> list[list[int]]:
    """Token sequences of the banned markers, at a word start and mid-text (tokenizers differ there)."""
    variants = [*BANNED_STRINGS, *(" " + s for s in BANNED_STRINGS)]
    encoded = tokenizer(variants, add_special_tokens=False).input_ids
    return [list(ids) for ids in dict.fromkeys(tuple(ids) for ids in encoded) if ids]


def generate_batch(loaded: LoadedModel, options: OptimizerOptions, requests: Sequence[GenerationRequest],
                   abandoned: Callable[[int], bool]) -> list[Generated | BaseException]:
    """One ``generate`` call for requests of one mode; runs on the batcher's worker thread."""
    import torch

    try:
        with torch.inference_mode():
            return _generate(loaded, options, requests, abandoned)
    except torch.cuda.OutOfMemoryError as exc:
        error = OptimizerError(f"out of memory generating {len(requests)} rewrites: lower "
                               "--optimizer-max-batch-size or --optimizer-max-new-tokens")
        error.__cause__ = exc
        return [error] * len(requests)


@dataclass(frozen=True)
class RowPlan:
    """One row's limits: its token budget and, in aggressive mode, the tokens it must produce first."""

    budget: int
    minimum: int | None

    @property
    def hopeless(self) -> bool:
        """The minimum does not fit the budget: the rewrite could only end cut, so it is not generated."""
        return self.minimum is not None and self.minimum >= self.budget


def plan_rows(loaded: LoadedModel, options: OptimizerOptions, requests: Sequence[GenerationRequest]) -> list[RowPlan]:
    # Counted with special tokens (BOS), as the reference counts the prompt for the aggressive minimum.
    counts = [len(ids) for ids in loaded.tokenizer([r.text for r in requests]).input_ids]
    return [RowPlan(token_budget(count, options.max_new_tokens), min_new_tokens(count, r.mode))
            for count, r in zip(counts, requests, strict=True)]


def _generate(loaded: LoadedModel, options: OptimizerOptions, requests: Sequence[GenerationRequest],
              abandoned: Callable[[int], bool]) -> list[Generated | BaseException]:
    plans = plan_rows(loaded, options, requests)
    size = len(requests)  # the batch the batcher formed, hopeless rows included: they waited for it too
    outcomes: list[Generated | BaseException] = [Generated("", True, size)] * size
    rows = [row for row, plan in enumerate(plans) if not plan.hopeless]
    if rows:
        texts = _generate_rows(loaded, options, [requests[r] for r in rows], [plans[r] for r in rows],
                               lambda index: abandoned(rows[index]))
        for row, generated in zip(rows, texts, strict=True):
            outcomes[row] = Generated(generated.text, generated.truncated, size)
    return outcomes


def _generate_rows(loaded: LoadedModel, options: OptimizerOptions, requests: Sequence[GenerationRequest],
                   plans: Sequence[RowPlan], abandoned: Callable[[int], bool]) -> list[Generated]:
    from transformers import LogitsProcessorList, StoppingCriteriaList

    from optimizer.hf_decoding import RowStops

    mode = requests[0].mode
    tokenizer = loaded.tokenizer
    inputs = tokenizer([build_prompt(r.text) for r in requests], return_tensors="pt", padding=True)
    inputs = inputs.to(loaded.model.device)
    prompt_length = int(inputs["input_ids"].shape[1])
    kwargs = generation_kwargs(loaded, options, requests, plans, prompt_length)
    stops = RowStops(prompt_length, [plan.budget for plan in plans], kwargs["eos_token_id"], abandoned)
    kwargs["logits_processor"] = LogitsProcessorList(kwargs.pop("logits_processor"))
    kwargs["stopping_criteria"] = StoppingCriteriaList([stops])
    output = loaded.model.generate(**inputs, **kwargs)
    results = []
    for row in range(len(requests)):
        ended = stops.lengths[row]
        length = ended if ended is not None else plans[row].budget
        text = tokenizer.decode(output[row, prompt_length:prompt_length + length], skip_special_tokens=True)
        results.append(Generated(clean_output(text, mode), stops.truncated[row]))
    return results


def generation_kwargs(loaded: LoadedModel, options: OptimizerOptions, requests: Sequence[GenerationRequest],
                      plans: Sequence[RowPlan], prompt_length: int) -> dict[str, Any]:
    """The ``generate`` arguments of one batch: the mode's sampling settings and its stop rules."""
    from optimizer.hf_decoding import RowMinNewTokens, SeededRowSampler, effective_top_k, row_seed

    mode = requests[0].mode
    decoding = DECODING[mode]
    stop_ids = loaded.eos_ids + (loaded.newline_ids if decoding.stop_at_newline else [])
    processors: list[Any] = []
    kwargs: dict[str, Any] = {
        "do_sample": True, "temperature": decoding.temperature, "top_p": decoding.top_p,
        # The longest row's budget; RowStops ends every other row at its own.
        "max_new_tokens": max(plan.budget for plan in plans), "eos_token_id": stop_ids,
        "pad_token_id": loaded.tokenizer.pad_token_id,
    }
    minimums = [plan.minimum for plan in plans if plan.minimum is not None]
    if len(minimums) == len(plans):
        kwargs["bad_words_ids"] = loaded.bad_words_ids
        processors.append(RowMinNewTokens(prompt_length, minimums, stop_ids))
    if options.seed is not None:
        seeds = [row_seed(options.seed, mode, r.text) for r in requests]
        # top_k is what unseeded generate() would use (the model's, else 50), as in the reference.
        top_k = effective_top_k(loaded.model.generation_config)
        processors.append(SeededRowSampler(seeds, decoding.temperature, decoding.top_p, top_k, loaded.model.device))
    kwargs["logits_processor"] = processors
    return kwargs


class HFOptimizer:
    """The BPO model in-process. ``start()`` loads it on a thread; requests meanwhile are unavailable."""

    def __init__(self, target: str, options: OptimizerOptions, *, loader: Loader = load_model) -> None:
        self.target = target
        self.options = options
        self._loader = loader
        self._identity = f"hf:{target}@pending"
        self._state: State = "loading"
        self._detail = f"loading {target}"
        self._loaded: LoadedModel | None = None
        self._batcher: DynamicBatcher[GenerationRequest, Generated] | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._speed: DeviceSpeed | None = None

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    @property
    def speed(self) -> DeviceSpeed | None:
        """The start-up measurement of this model on this device (None until loaded, or when not measured)."""
        return self._speed

    def status(self) -> OptimizerStatus:
        speed = None if self._speed is None else self._speed.as_dict(self.options.request_timeout)
        return OptimizerStatus(self._state, self._identity, self._detail, speed)

    async def start(self) -> None:
        if self._load_task is None:
            self._load_task = asyncio.create_task(self._load(), name=f"bpo-load-{self.target}")

    async def wait_loaded(self) -> OptimizerStatus:
        """Wait for the background load to end (ready or failed); ``start()`` first."""
        if self._load_task is not None:
            await asyncio.shield(self._load_task)
        return self.status()

    async def optimize(self, text: str, mode: Mode) -> Rewrite:
        batcher = self._batcher
        if batcher is None:
            raise OptimizerUnavailable(f"hf optimizer is {self._state}: {self._detail}")
        cost = 0.0
        if self._speed is not None:
            cost = self._speed.least_seconds(text, mode)
            ahead = batcher.least_seconds_until_done(cost)
            if ahead > self.options.request_timeout:
                raise OptimizerBusy(f"the queue needs at least {ahead:.1f} s, over the "
                                    f"{self.options.request_timeout:g} s deadline")
        generated = await batcher.submit(GenerationRequest(text, mode), cost)
        return Rewrite(generated.text, self._identity, generated.truncated, generated.batch_size)

    async def close(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._load_task
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            await asyncio.to_thread(batcher.close)
        if self._loaded is not None:
            self._loaded = None
            _release_device_memory()
        if self._state != "failed":
            self._state, self._detail = "failed", "closed"

    async def _load(self) -> None:
        try:
            loaded = await asyncio.to_thread(self._loader, self.target, self.options)
        except ModelLoadError as exc:
            self._fail(str(exc))
            return
        except Exception as exc:  # an unforeseen loader fault still leaves the proxy passing through
            log.exception("loading hf:%s failed", self.target)
            self._fail(f"cannot load hf:{self.target}: {type(exc).__name__}: {exc}")
            return
        self._loaded = loaded
        if self.options.measure_speed:
            self._speed = await asyncio.to_thread(self._measure, loaded)
        self._batcher = DynamicBatcher(
            functools.partial(generate_batch, loaded, self.options),
            max_batch_size=self.options.max_batch_size or default_batch_size(loaded.device),
            max_wait_ms=self.options.max_wait_ms,
            key=lambda request: request.mode, on_batch=self.options.on_batch,
            name=f"bpo-generate-{loaded.identity}")
        self._identity = loaded.identity
        self._state, self._detail = "ready", f"{self.target} on {loaded.device} ({loaded.dtype})"
        if self._speed is not None:
            self._detail += f"; {self._speed.describe(self.options.request_timeout)}"
        log.info("optimizer %s ready on %s", self._identity, loaded.device)

    def _measure(self, loaded: LoadedModel) -> DeviceSpeed | None:
        """Time generation once; a failure only costs the measurement (no busy shedding, no warning)."""
        try:
            speed = measure_speed(loaded.model, loaded.tokenizer)
        except Exception:  # fail open: the model still serves unmeasured
            log.exception("could not measure the optimizer's speed")
            return None
        deadline = self.options.request_timeout
        if speed.rewrite_seconds() > deadline:
            log.warning("optimizer deadline %g s is below what %s can do: a typical rewrite takes ~%.1f s "
                        "(%.1f tokens/s); first-time prompts will mostly fail open (busy or timeout). Raise "
                        "--optimizer-timeout, or serve the model on a faster device", deadline, loaded.device,
                        speed.rewrite_seconds(), speed.tokens_per_second)
        return speed

    def _fail(self, detail: str) -> None:
        self._identity = f"hf:{self.target}@failed"  # not "pending": nothing is on its way
        self._state, self._detail = "failed", detail
        log.warning("optimizer hf:%s failed to load: %s", self.target, detail)


def _release_device_memory() -> None:
    with contextlib.suppress(ImportError):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
