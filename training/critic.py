"""The critic step: the prompt that asks an LLM to compare two answers and improve the instruction, and
the parser that reads its verdict back."""

from __future__ import annotations

import re
from dataclasses import dataclass

from training.records import Record

# Bump when the critic's wording changes: it is stored with every pair it produced.
CRITIC_PROMPT_VERSION = "1"

CRITIC_SYSTEM = (
    "You are an expert prompt engineer. You study why an AI assistant answered one request well and "
    "another time badly, and you rewrite the user's instruction so that an assistant answering it gives "
    "the good kind of answer."
)

_TASK = """Below is a user instruction{context_note}, a GOOD response and a BAD response to it.

{blocks}

Step 1. Compare the two responses in detail. Judge correctness first (does it follow the instruction and \
is it accurate?), then helpfulness (depth, clarity, structure, creativity where it fits), then \
harmlessness (is it safe, honest and respectful?). Explain what made the good response better.

Step 2. Write an optimized instruction that would lead an assistant to the qualities of the good \
response and away from the failures of the bad one. Rules:
- Keep every piece of information and the full intent of the original instruction; drop nothing.
- Do not add content taken from the good response (no facts, names, numbers or conclusions it \
contains); only ask for the qualities that made it good (accuracy, detail, structure, tone).
- Never answer the instruction yourself; write only the improved instruction, in the user's language.
- Copy every protected span listed below character for character.
- If the instruction asks for something unsafe, rewrite it into a safe request on the same topic.
- Do not repeat the bracketed markers of this message (such as [INSTRUCTION] or [PROTECT]).{context_rule}

Answer in exactly this format:
Detailed Comparison Result: <your comparison>
Optimized Instruction: <the improved instruction> [END]"""

_CONTEXT_RULE = (
    "\n- Improve the instruction only. The context passage is attached to it again unchanged afterwards, "
    "so do not copy or summarise the context."
)


def protected_spans(text: str) -> list[str]:
    """Spans a rewrite must keep verbatim: code blocks, inline code and quoted passages."""
    spans: list[str] = []
    for pattern in (r"```.*?```", r"`[^`\n]+`", r"\"[^\"\n]{1,200}\"", r"“[^”\n]{1,200}”"):
        for match in re.finditer(pattern, text, flags=re.S):
            if not any(match.group(0) in span for span in spans):
                spans.append(match.group(0))
    return spans


def build_critic_messages(record: Record) -> list[dict[str, str]]:
    """The chat messages that ask the critic about one preference record."""
    instruction = str(record["instruction"]).strip()
    context = str(record.get("context") or "").strip()
    blocks = [f"[INSTRUCTION]\n{instruction}\n[/INSTRUCTION]"]
    if context:
        blocks.append(f"[CONTEXT]\n{context}\n[/CONTEXT]")
    blocks.append(f"[GOOD RESPONSE]\n{str(record['good_res']).strip()}\n[/GOOD RESPONSE]")
    blocks.append(f"[BAD RESPONSE]\n{str(record['bad_res']).strip()}\n[/BAD RESPONSE]")
    spans = protected_spans(instruction)
    if spans:
        blocks.append("Protected spans:\n" + "\n".join(f"[PROTECT] {span} [/PROTECT]" for span in spans))
    task = _TASK.format(
        context_note=" with a context passage" if context else "",
        blocks="\n\n".join(blocks),
        context_rule=_CONTEXT_RULE if context else "",
    )
    return [{"role": "system", "content": CRITIC_SYSTEM}, {"role": "user", "content": task}]


class CriticParseError(ValueError):
    """The critic's output does not carry a usable optimized instruction; ``reason`` names why."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class CriticVerdict:
    comparison: str
    optimized_instruction: str


_OPTIMIZED = re.compile(r"optimi[sz]ed\s+instruction\s*[:：]", re.I)
_COMPARISON = re.compile(r"detailed\s+comparison\s+results?\s*[:：]", re.I)
_END = re.compile(r"\[\s*end\s*\]", re.I)
_MARKDOWN_EDGE = re.compile(r"^[\s*_#>]+|[\s*_]+$")
_QUOTE_PAIRS = {'"': '"', "“": "”", "'": "'"}


def parse_critic_output(text: str, finish_reason: str | None = None) -> CriticVerdict:
    """Read ``Detailed Comparison Result: ... Optimized Instruction: ... [END]``.

    Tolerates markdown emphasis around the labels, a missing comparison header and quotes around the
    instruction; rejects outputs cut off before ``[END]`` (a truncated rewrite may have lost its end).
    """
    if finish_reason == "length":
        raise CriticParseError("truncated", "the critic hit its token limit")
    labels = list(_OPTIMIZED.finditer(text))
    if not labels:
        raise CriticParseError("no-optimized-instruction")
    label = labels[-1]
    end = _END.search(text, label.end())
    if end is None:
        raise CriticParseError("truncated", "no [END] after the optimized instruction")
    instruction = _unquote(_MARKDOWN_EDGE.sub("", text[label.end():end.start()]))
    if not instruction:
        raise CriticParseError("empty", "the optimized instruction is empty")
    head = text[: label.start()]
    header = _COMPARISON.search(head)
    comparison = head[header.end():] if header else head
    return CriticVerdict(_MARKDOWN_EDGE.sub("", comparison).strip(), instruction)


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) < 2 or _QUOTE_PAIRS.get(text[0]) != text[-1]:
        return text
    opening, closing = text[0], text[-1]
    marks = text.count(opening) if opening == closing else text.count(opening) + text.count(closing)
    # Only a quote pair around the whole instruction is decoration; inner quotes are the user's.
    return text[1:-1].strip() if marks == 2 else text
