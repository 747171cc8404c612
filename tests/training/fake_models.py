"""Scripted chat models on the fake upstream: a critic, a judge and a router that picks by model name.

The critic answers in the BPO format from the instruction it finds in the critic prompt; the judge reads
the two answers it is shown and prefers the one that carries a cue phrase. Both are deterministic, so
tests (and examples/pipeline.sh) can assert exact outcomes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from tests.fakes.upstream import Recorded, Reply, Responder, chat_reply, last_user_text

_INSTRUCTION = re.compile(r"\[INSTRUCTION\]\n(.*?)\n\[/INSTRUCTION\]", re.S)
_ANSWER = re.compile(r"\[ANSWER ([AB])\]\n(.*?)\n\[/ANSWER \1\]", re.S)
CUE = "step by step"  # what the fake optimizer's default rewrite adds (tests/fakes/upstream.py)


def critic_instruction(body: dict[str, Any]) -> str:
    """The instruction a critic request asks about (as our critic prompt frames it)."""
    match = _INSTRUCTION.search(last_user_text(body))
    return match.group(1) if match else ""


def default_critique(instruction: str) -> str:
    return ("Detailed Comparison Result: The good response is accurate and specific; the bad response is "
            "vague and incomplete.\nOptimized Instruction: " + instruction
            + " Answer accurately and in detail, with a clear structure. [END]")


def critic(overrides: Mapping[str, str] | None = None,
           rewrite: Callable[[str], str] = default_critique) -> Responder:
    """A critic whose answer is ``overrides[s]`` for the first substring ``s`` of the instruction, else
    ``rewrite(instruction)``."""

    def answer(recorded: Recorded) -> Reply:
        body = recorded.json
        instruction = critic_instruction(body)
        text = next((reply for key, reply in (overrides or {}).items() if key in instruction), None)
        return chat_reply(body, text if text is not None else rewrite(instruction))

    return answer


def judge_answers(body: dict[str, Any]) -> dict[str, str]:
    return {letter: text for letter, text in _ANSWER.findall(last_user_text(body))}


def cue_judge(cue: str = CUE) -> Responder:
    """Prefers the answer that contains ``cue``; a tie when both or neither do."""

    def answer(recorded: Recorded) -> Reply:
        answers = judge_answers(recorded.json)
        has = {letter: cue in text for letter, text in answers.items()}
        verdict = "C" if has.get("A") == has.get("B") else ("A" if has.get("A") else "B")
        return chat_reply(recorded.json, f"Answer {verdict} follows the request more closely.\n[[{verdict}]]")

    return answer


def fixed_judge(text: str) -> Responder:
    """Always answers ``text`` (position bias, garbage, ...)."""
    return lambda recorded: chat_reply(recorded.json, text)


def by_model(routes: Mapping[str, Responder]) -> Responder:
    """Route chat completions by the request's model name; other models echo (the default target)."""

    def answer(recorded: Recorded) -> Reply:
        responder = routes.get(str(recorded.json.get("model")))
        return responder(recorded) if responder else chat_reply(recorded.json)

    return answer
