"""The fidelity guard: a rewrite must keep what the user wrote that must not change."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from optimizer.junk import check_answer, check_repetition, check_template_echo, check_topic
from optimizer.language import language_of, same_language

# A rule returns None when the rewrite passes, else a short detail naming what went missing.
Check = Callable[[str, str], "str | None"]

# Length bounds in words. The BPO reference rewrites sit between 0.5x and 6x the original, except that
# very short prompts ("hello world", "What is rabies?") legitimately grow to a few dozen words.
MIN_LENGTH_RATIO = 0.5
MAX_LENGTH_RATIO = 6.0
MAX_LENGTH_FLOOR_WORDS = 64
# A later paragraph this long is material to work on (an article to summarise, a note to polish):
# it must reach the target unchanged.
PASSAGE_MIN_WORDS = 20
# Strings the optimizer must never emit unless the user wrote them (any case): the template's and the
# chat format's markers, the protection markers aggressive decoding bans, and the scaffolding of the critic
# answers the training pairs are cut from. training/filters.py drops pairs by this same list.
LEAK_MARKERS = ("[INST]", "[/INST]", "<<SYS>>", "[PROTECT]", "[/PROTECT]", "[KEEP", "[INSTRUCTION]",
                "[/INSTRUCTION]", "[CONTEXT]", "[GOOD RESPONSE]", "[BAD RESPONSE]", "[END]",
                "Optimized Instruction:", "Detailed Comparison Result")

# Every pattern here runs on the event loop over whatever the user sent, so each is built to take time
# linear in the text: a match can only start where no earlier start would have scanned the same run
# (a lookbehind, or an opener the body may not contain), and no two adjacent pieces can match the same
# characters, so a failed attempt never re-scans a run. bench/guard_acceptance.py times the worst cases.
# The fence's info string ("python") is only one when a newline ends it; "```x = 1```" is all code.
_CODE_BLOCK = re.compile(r"```(?:[^\n`]*\n)?(.*?)```", re.DOTALL)
_INLINE_CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
_URL = re.compile(r"\b(?:https?|ftp)://[^\s<>\"'`]+|\bwww\.[^\s<>\"'`]+", re.IGNORECASE)
# An address starts only at the start of a run of address characters; leading dots and signs are
# skipped, so "--bob@x.org" still yields "bob@x.org".
_EMAIL = re.compile(r"(?<![\w.+-])[.+-]*(\w[\w.+-]*@[\w-]+(?:\.[\w-]+)+)\b")
# Commas group thousands only ("1,000"); "1,2,3" is a list of three numbers.
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:,\d{3})*(?:[.:/]\d+)*(?:[eE][-+]?\d+)?")
_NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
    "twenty",
)
# A body may not contain its own opener, so "““““" costs one step per character, not 300.
_QUOTED = re.compile(r"\"([^\"\n]{1,300})\"|“([^“”\n]{1,300})”|«([^«»\n]{1,300})»")
# {x}, {{x}}, {0}, <x> and [NAME] / [Your Name] (not a markdown link's text: "[docs](https://...)").
_PLACEHOLDER = re.compile(r"\{\{?\s*[A-Za-z_][\w.\-]{0,40}\s*\}?\}|\{\d{1,2}\}|<[A-Za-z_][\w.\-]{0,40}>"
                          r"|\[[A-Za-z_][\w .\-]{0,40}\](?!\()")
_URL_TRAILING = ".,;:!?)]}'\""
_SPAN_TRAILING = " .,;:!?"
# Quote style is not content: a rewrite may turn "inner" quotes into 'inner' ones.
_QUOTE_FOLD = str.maketrans({q: '"' for q in "“”„«»‘’'`"})
# "Memory: ..." / "Text: ..." labels in front of a passage may be reworded around it.
_LABEL = re.compile(r"^\s*\w[\w ]{0,29}:\s+")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class GuardVerdict:
    """Whether a rewrite may be used; when not, the rule that failed and what it missed."""

    accepted: bool
    rule: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class GuardRule:
    """One row of the guard table: a name (reported in metrics and logs), what it keeps, its check."""

    name: str
    keeps: str
    check: Check


def _normalize(text: str) -> str:
    """Compare text the way a reader would: curly and straight quotes alike, any run of spaces alike."""
    return _SPACE.sub(" ", text.translate(_QUOTE_FOLD)).strip()


def _first_missing(needles: Iterable[str], haystack: str) -> str | None:
    normalized = _normalize(haystack)
    for needle in needles:
        if needle and _normalize(needle) not in normalized:
            return needle
    return None


def _missing_detail(kind: str, needle: str | None) -> str | None:
    if needle is None:
        return None
    shown = needle if len(needle) <= 60 else needle[:57] + "..."
    return f"{kind} {shown!r} is missing"


def _check_nonempty(original: str, rewrite: str) -> str | None:
    return "the rewrite is empty" if not rewrite.strip() else None


def _check_markers(original: str, rewrite: str) -> str | None:
    before, after = original.lower(), rewrite.lower()
    leaked = next((m for m in LEAK_MARKERS if m.lower() in after and m.lower() not in before), None)
    return f"template marker {leaked!r} leaked into the rewrite" if leaked else None


def _check_length(original: str, rewrite: str) -> str | None:
    before, after = len(original.split()), len(rewrite.split())
    low = MIN_LENGTH_RATIO * before
    high = max(MAX_LENGTH_RATIO * before, MAX_LENGTH_FLOOR_WORDS)
    if after < low:
        return f"{after} words is under {MIN_LENGTH_RATIO}x the original's {before}"
    if after > high:
        return f"{after} words is over the bound of {high:.0f} for an original of {before}"
    return None


def _check_code_blocks(original: str, rewrite: str) -> str | None:
    blocks = [_strip_trailing_space(block) for block in _CODE_BLOCK.findall(original)]
    # Code compares line by line: indentation matters, trailing spaces and blank edges do not.
    rewritten = _strip_trailing_space(rewrite)
    missing = next((block for block in blocks if block.strip("\n") not in rewritten), None)
    return _missing_detail("code block", missing)


def _strip_trailing_space(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.splitlines())


def _check_inline_code(original: str, rewrite: str) -> str | None:
    without_blocks = _CODE_BLOCK.sub(" ", original)
    spans = [span for span in _INLINE_CODE.findall(without_blocks) if span.strip()]
    missing = next((span for span in spans if span not in rewrite), None)
    return _missing_detail("inline code", missing)


def _check_urls(original: str, rewrite: str) -> str | None:
    urls = [url.rstrip(_URL_TRAILING) for url in _URL.findall(original)]
    return _missing_detail("URL", next((url for url in urls if url not in rewrite), None))


def _check_emails(original: str, rewrite: str) -> str | None:
    emails = _EMAIL.findall(original)
    lowered = rewrite.lower()
    return _missing_detail("e-mail", next((e for e in emails if e.lower() not in lowered), None))


def _numbers(text: str) -> set[str]:
    # "1,000" and "1000" are the same number; a sign is punctuation to a rewrite ("-3" in a list).
    return {match.lstrip("+-").replace(",", "") for match in _NUMBER.findall(text)}


def _check_numbers(original: str, rewrite: str) -> str | None:
    kept = _numbers(rewrite)
    words = set(re.findall(r"[a-z]+", rewrite.lower()))
    # "3 examples" may become "three examples"; only small whole numbers have a word worth accepting.
    missing = [number for number in _numbers(original) - kept
               if not (number.isdigit() and int(number) < len(_NUMBER_WORDS)
                       and _NUMBER_WORDS[int(number)] in words)]
    missing.sort(key=len, reverse=True)
    return _missing_detail("number", missing[0] if missing else None)


def _check_quoted(original: str, rewrite: str) -> str | None:
    spans = []
    for match in _QUOTED.finditer(original):
        span = next(group for group in match.groups() if group is not None)
        # A closing full stop or comma inside the quotes is punctuation, not part of the quote.
        span = span.strip().rstrip(_SPAN_TRAILING)
        if span:
            spans.append(span)
    return _missing_detail("quoted span", _first_missing(spans, rewrite))


def _check_placeholders(original: str, rewrite: str) -> str | None:
    placeholders = [_SPACE.sub("", p) for p in _PLACEHOLDER.findall(original)]
    squeezed = _SPACE.sub("", rewrite)
    return _missing_detail("placeholder", next((p for p in placeholders if p not in squeezed), None))


def _check_passages(original: str, rewrite: str) -> str | None:
    paragraphs = [p for p in re.split(r"\n\s*\n|\n", original.strip()) if p.strip()]
    # The first paragraph is the instruction the optimizer is there to improve; the rest is material.
    passages = [_LABEL.sub("", p) for p in paragraphs[1:] if len(p.split()) >= PASSAGE_MIN_WORDS]
    return _missing_detail("passage", _first_missing(passages, rewrite))


def _check_language(original: str, rewrite: str) -> str | None:
    if same_language(original, rewrite):
        return None
    return f"the rewrite is in {language_of(rewrite)}, the original in {language_of(original)}"


RULES: tuple[GuardRule, ...] = (
    GuardRule("empty", "a non-empty rewrite", _check_nonempty),
    GuardRule("leaked-marker", "no template/critic marker ([INST], [PROTECT], [KEEP ...)", _check_markers),
    GuardRule("template-echo", "no echo of the optimizer's own template", check_template_echo),
    GuardRule("length", "0.5x-6x the original's words (at least 64 words allowed)", _check_length),
    GuardRule("repetition", "no loop: half its word 3-grams distinct, none 8+ times", check_repetition),
    GuardRule("code-block", "every ``` fenced block, line for line", _check_code_blocks),
    GuardRule("inline-code", "every `inline code` span", _check_inline_code),
    GuardRule("url", "every URL", _check_urls),
    GuardRule("email", "every e-mail address", _check_emails),
    GuardRule("number", "every number (1,000 = 1000)", _check_numbers),
    GuardRule("quoted", "every \"quoted\" / “quoted” / «quoted» span", _check_quoted),
    GuardRule("placeholder", "every {x}, {{x}}, {0}, <x> and [NAME] placeholder", _check_placeholders),
    GuardRule("passage", f"every later paragraph of {PASSAGE_MIN_WORDS}+ words, verbatim", _check_passages),
    GuardRule("answer", "a request, not a reply: asks for something when the original did", check_answer),
    GuardRule("off-topic", "a fifth of the original's content words (3+ of them)", check_topic),
    GuardRule("language", "the original's language (optimizer/language.py): no translating", _check_language),
)


RULES_BY_NAME = {rule.name: rule for rule in RULES}


def check_rewrite(original: str, rewrite: str, rules: Iterable[GuardRule] = RULES) -> GuardVerdict:
    """Accept ``rewrite`` only if every rule passes; report the first rule that fails."""
    for rule in rules:
        detail = rule.check(original, rewrite)
        if detail is not None:
            return GuardVerdict(False, rule.name, detail)
    return GuardVerdict(True)
