"""The skip policy: requests the optimizer should not rewrite, by a small table of named rules.

Each rule's name is also its ``X-BPO-Reason``. ``--skip-rules`` sets the rules for every model, a
``model_list`` entry's ``bpo_skip_rules`` for its model, and a client key's ``skip_rules`` for its requests
(passed as ``first_match(..., key_rules=...)``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import orjson

from optimizer.language import is_supported
from proxy.settings import Settings, skip_rule_names

# A turn whose non-blank lines are at least this share code or data (and at least MIN_LINES of them), or
# that is one JSON document, is material for the model, not a request to improve: the optimizer would only
# paraphrase around it, and the guard would reject most edits anyway.
CODE_OR_DATA_SHARE = 0.6
MIN_LINES = 3
SAMPLE_LINES = 400  # the start of a long turn says enough; the cost stays bounded
MAX_REMEMBERED_DECISIONS = 4096
_CODE_LINE = re.compile(
    r"^\s*(?:[{}\[\]<#]|//|/\*|\*|(?:def|class|import|from|function|const|let|var|public|private|return|if|for|"
    r"while|SELECT|INSERT|UPDATE|CREATE)\b)|[;{}(),]\s*$|=>|:=|==|(?<!\w)\w+\([^)]*\)\s*$"
    r"|^(?:[^,\t|]*[,\t|]){2,}[^ ]*$")


class Candidate(NamedTuple):
    """What the rules look at: the turn's prompt and whether the request asked for schema-bound output (a
    tuple: one is built per rewritten request, and a frozen dataclass costs several times as much)."""

    prompt: str
    json_schema: bool


@dataclass(frozen=True)
class SkipRule:
    """One row of the table: its name (the X-BPO-Reason), what it skips, and the check."""

    name: str
    skips: str
    check: Callable[[Candidate, frozenset[str]], bool]  # (candidate, optimizer languages) -> skip?


def mostly_code_or_data(text: str) -> bool:
    stripped = text.strip()
    if stripped[:1] in ("{", "[") and stripped[-1:] in ("}", "]"):
        try:
            orjson.loads(stripped)
            return True
        except orjson.JSONDecodeError:
            pass
    lines = [line for line in stripped.split("\n", SAMPLE_LINES)[:SAMPLE_LINES] if line.strip()]
    if len(lines) < MIN_LINES:
        return False
    fenced, code = False, 0
    for line in lines:
        if line.lstrip().startswith("```"):
            fenced = not fenced
            code += 1
        elif fenced or _CODE_LINE.search(line):
            code += 1
    return code >= CODE_OR_DATA_SHARE * len(lines)


RULES: tuple[SkipRule, ...] = (
    SkipRule("json-schema", "requests whose output must fit a JSON schema (chat response_format, Responses "
             "text.format, Messages output_format): the schema, not the prompt, shapes the answer",
             lambda candidate, languages: candidate.json_schema),
    SkipRule("code-or-data", f"turns whose lines are {CODE_OR_DATA_SHARE:.0%}+ code or data, or one JSON document",
             lambda candidate, languages: mostly_code_or_data(candidate.prompt)),
    SkipRule("unsupported-language", "prompts clearly in a language outside --optimizer-languages",
             lambda candidate, languages: not is_supported(candidate.prompt, languages)),
)
RULES_BY_NAME: Mapping[str, SkipRule] = {rule.name: rule for rule in RULES}


class SkipPolicy:
    """Which rules apply to a request (the model's, else the gateway's), and the first that matches."""

    def __init__(self, settings: Settings) -> None:
        self.default = self._rules(skip_rule_names(settings.skip_rules))
        self.per_model = {route.model_name: self._rules(route.skip_rules) for route in settings.model_list
                          if route.skip_rules is not None}
        self.languages = frozenset(skip_rule_names(settings.optimizer_languages))
        # Decisions by (key rules, model, prompt, schema): the rules are pure, and the language and code checks
        # cost ~100 µs a prompt, as much as the rest of a cache hit (bench/README.md). Bounded: prompts are
        # client input.
        self._decided: dict[tuple[tuple[str, ...] | None, str, Candidate], str | None] = {}

    @staticmethod
    def _rules(names: tuple[str, ...]) -> tuple[SkipRule, ...]:
        return tuple(RULES_BY_NAME[name] for name in names if name in RULES_BY_NAME)

    def first_match(self, candidate: Candidate, model: str, key_rules: tuple[str, ...] | None = None) -> str | None:
        """The name of the first rule that skips ``candidate``; ``key_rules`` (a client key's own list, when
        it carries one: its ``skip_rules``) beats the model's, which beats ``--skip-rules``."""
        memo = (key_rules, model, candidate)
        if memo in self._decided:
            return self._decided[memo]
        rules = self._rules(key_rules) if key_rules is not None else self.per_model.get(model, self.default)
        decided = next((rule.name for rule in rules if rule.check(candidate, self.languages)), None)
        if len(self._decided) >= MAX_REMEMBERED_DECISIONS:
            self._decided.clear()
        self._decided[memo] = decided
        return decided
