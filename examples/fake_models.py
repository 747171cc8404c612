"""Fake critic, target and judge for the example pipeline: the fake upstream run as a process with
scripted chat models, so the whole pipeline runs offline and deterministically.

- ``fake-critic`` replays the BPO authors' own critic output for each record of ``pairs.json`` (matched
  by the instruction in our critic prompt): data construction then runs our prompt, parser and filters
  on real critic answers.
- ``fake-judge`` is a transparent heuristic, not a quality judge: it prefers the answer that keeps more
  of the request's words; when both keep as much, the one that adds more (>15% more distinct words); else
  it answers A (a position bias, which the both-order rule turns into a tie).
- every other model (``fake-model``) is the fake upstream's echo target: its answer is the prompt itself,
  so the judge effectively compares the original and the optimized prompt.

    python -m examples.fake_models --port 9011 --replay ../shared/data/bpo/pairs.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import uvicorn

from tests.fakes.upstream import FakeUpstream, Recorded, Reply, Responder, chat_reply, last_user_text
from tests.training.fake_models import by_model, critic, critic_instruction, judge_answers

_REQUEST = re.compile(r"\[REQUEST\]\n(.*?)\n\[/REQUEST\]", re.S)


def replay_critic(pairs_path: Path) -> Responder:
    """Answers each critic request with the reference comparison and optimized prompt of its record."""
    answers: dict[str, str] = {}
    for record in json.loads(pairs_path.read_text()):
        comparison = record["comparison"].strip()
        if not comparison.lower().startswith("detailed comparison result"):
            comparison = "Detailed Comparison Result: " + comparison
        answers[" ".join(record["instruction"].split())] = (
            f"{comparison}\nOptimized Instruction: {record['optimized_prompt'].strip()} [END]")
    fallback = critic()

    def answer(recorded: Recorded) -> Reply:
        text = answers.get(" ".join(critic_instruction(recorded.json).split()))
        return chat_reply(recorded.json, text) if text is not None else fallback(recorded)

    return answer


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def heuristic_judge(recorded: Recorded) -> Reply:
    body = recorded.json
    request = _REQUEST.search(last_user_text(body))
    asked = _words(request.group(1)) if request else set()
    answers = judge_answers(body)
    kept = {k: len(asked & _words(v)) / max(len(asked), 1) for k, v in answers.items()}
    size = {k: len(_words(v)) for k, v in answers.items()}
    if abs(kept["A"] - kept["B"]) > 0.1:
        verdict, why = ("A" if kept["A"] > kept["B"] else "B"), "keeps more of the request"
    elif max(size.values()) > 1.15 * min(size.values()):
        verdict, why = ("A" if size["A"] > size["B"] else "B"), "covers the request in more depth"
    else:
        verdict, why = "A", "is about as good; the first one is chosen"
    return chat_reply(body, f"Answer {verdict} {why}.\n[[{verdict}]]")


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the fake critic / target / judge server.")
    parser.add_argument("--port", type=int, default=9011, help="port on 127.0.0.1")
    parser.add_argument("--replay", type=Path, required=True, help="pairs.json whose critic answers to replay")
    args = parser.parse_args()
    upstream = FakeUpstream(port=args.port)
    upstream.responders["/v1/chat/completions"] = by_model(
        {"fake-critic": replay_critic(args.replay), "fake-judge": heuristic_judge})
    uvicorn.run(upstream.app(), host="127.0.0.1", port=args.port, log_level="warning", lifespan="off",
                access_log=False)


if __name__ == "__main__":
    main()
