"""Signs that a rewrite is no prompt for the user's request: the template echoed, a loop, another topic,
an answer. Cheap word statistics, each explainable in one line, calibrated in bench/guard_acceptance.py."""

from __future__ import annotations

import functools
import re
from collections import Counter

# Words, with "you're" read as "you are": an echo may write the template either way.
_WORD = re.compile(r"[^\W_]+")
_CONTRACTION = re.compile(r"(?<=\w)['’](re|ll|ve|m|d)\b", re.IGNORECASE)
_EXPANSION = {"re": " are", "ll": " will", "ve": " have", "m": " am", "d": " would"}
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")

# Template echo: this many 4-word runs of the template's own instruction that the original lacks. Three
# runs is a 6-word stretch ("an expert prompt engineer" alone is 1; "You're an expert prompt engineer" 3),
# so a rewrite that merely says "please help me improve this essay" (2) passes.
ECHO_SHINGLE_WORDS = 4
ECHO_MIN_SHINGLES = 3

# Repetition, on word 3-grams of rewrites of 12+ words: under half of them distinct (the reference
# rewrites' lowest is 0.57), or one 3-gram 8+ times and more than twice (+2) as often as in the original.
REPEAT_MIN_WORDS = 12
REPEAT_MIN_DISTINCT = 0.5
REPEAT_MAX_COUNT = 8

# Topic: content words compared on their first 5 letters ("planes" = "plane"); an original with 3+ of
# them must find at least a fifth of them in the rewrite (the reference rewrites' lowest is 0.25;
# another prompt's reference rewrite shares none with 98% of originals).
TOPIC_MIN_CONTENT_WORDS = 3
TOPIC_MIN_SHARED = 0.2
_STEM_LETTERS = 5
_STOP_WORDS_TEXT = """
a an the and or but if then else of to in on at by for with from as is are was were be been being am this that
these those it its i you your yours we our ours they them their he she his her him my me mine do does did done
can could would should will shall may might must not no yes so than too very just also into about over under up
down out more most some any each every all both few many much such own same other only what which who whom whose
when where why how there here want need know like please provide give make write create generate explain describe
list tell help detailed specific clear including include ensure response answer using use based following given one two
"""
STOP_WORDS = frozenset(_STOP_WORDS_TEXT.split())

# An answer, not a prompt: it opens like a reply, or it asks for nothing while the original asked.
_ANSWER_OPENER = re.compile(
    r"^\W*(?:(?:sure|certainly|of course|absolutely|here is|here's|here are|as an ai|great question)\b|title:)",
    re.IGNORECASE)
_REQUEST = re.compile(
    r"[?？]|\b(?:please|can you|could you|would you|will you|i want|i need|i would like|i'd like|"
    r"i'm looking for|i am looking for|help me|let's|let us|your task|you are|you're|you should|you will|"
    r"how (?:to|do|does|can|should|would)|what (?:is|are|would|should)|tell me|show me)\b", re.IGNORECASE)
# The first word of a sentence, clause, list item or quote: where an imperative request begins.
_CLAUSE_START = re.compile(r"(?:^|[.!?:;,\n]\s*|\d[.)]\s+|[-*•]\s+)[\"'“(]*([A-Za-z]+)")
_REQUEST_VERBS_TEXT = """
write create generate explain describe list give tell help suggest summarize summarise compose draft design
identify discuss compare analyze analyse translate convert rewrite classify find calculate determine make include
ensure develop offer share recommend outline name edit correct answer respond evaluate assess imagine pretend act
provide show brainstorm plan propose construct build implement solve fix debug complete fill continue add remove
sort rank rate predict estimate define clarify elaborate detail paraphrase rephrase simplify improve check verify
consider focus use select choose pick come think research investigate present prepare produce craft formulate
output return read review organize arrange categorize group extract highlight mention specify state note be do
let keep avoid remember try count convince persuade argue teach guide walk
"""
REQUEST_VERBS = frozenset(_REQUEST_VERBS_TEXT.split())


# The guard runs these rules one after another on the same two texts: each text is split once.
@functools.lru_cache(maxsize=8)
def words(text: str) -> tuple[str, ...]:
    """Lower-cased words, contractions spelled out."""
    expanded = _CONTRACTION.sub(lambda m: _EXPANSION[m.group(1).lower()], text)
    return tuple(_WORD.findall(expanded.lower()))


@functools.cache
def _template_shingles() -> frozenset[tuple[str, ...]]:
    """The 4-word runs of the template's instruction (imported late: the template module reads the guard's
    length bounds, and the guard reads this module)."""
    from optimizer.template import TEMPLATE

    template = words(TEMPLATE.split("{prompt}")[0].replace("[INST]", ""))
    return frozenset(template[i:i + ECHO_SHINGLE_WORDS] for i in range(len(template) - ECHO_SHINGLE_WORDS + 1))


def _template_shingles_in(tokens: tuple[str, ...]) -> set[tuple[str, ...]]:
    shingles = _template_shingles()
    openers = {gram[0] for gram in shingles}
    starts = (i for i, token in enumerate(tokens) if token in openers)
    return {gram for i in starts if (gram := tokens[i:i + ECHO_SHINGLE_WORDS]) in shingles}


def check_template_echo(original: str, rewrite: str) -> str | None:
    echoed = _template_shingles_in(words(rewrite))
    if len(echoed) >= ECHO_MIN_SHINGLES:
        echoed -= _template_shingles_in(words(original))
    if len(echoed) < ECHO_MIN_SHINGLES:
        return None
    return f"the rewrite repeats the optimizer's template ({len(echoed)} of its 4-word runs)"


def _trigram_counts(tokens: tuple[str, ...]) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i:i + 3]) for i in range(len(tokens) - 2))


def check_repetition(original: str, rewrite: str) -> str | None:
    tokens = words(rewrite)
    if len(tokens) < REPEAT_MIN_WORDS:
        return None
    counts, before = _trigram_counts(tokens), _trigram_counts(words(original))
    distinct = len(counts) / sum(counts.values())
    before_distinct = len(before) / sum(before.values()) if before else 1.0
    if distinct < REPEAT_MIN_DISTINCT and distinct < before_distinct - 0.1:
        return f"only {distinct:.0%} of its word 3-grams are distinct (a loop)"
    gram, count = counts.most_common(1)[0]
    if count >= REPEAT_MAX_COUNT and count > 2 * before[gram] + 2:
        return f"{' '.join(gram)!r} comes {count} times (the original: {before[gram]})"
    return None


@functools.lru_cache(maxsize=8)
def content_words(text: str) -> frozenset[str]:
    """The words that carry a topic, by their first letters; CJK text as character pairs."""
    found: set[str] = set()
    for word in words(text):
        if _CJK.search(word):
            found.update(word[i:i + 2] for i in range(max(len(word) - 1, 1)))
        elif len(word) >= 3 and word not in STOP_WORDS and not word.isdigit():
            found.add(word[:_STEM_LETTERS])
    return frozenset(found)


def check_topic(original: str, rewrite: str) -> str | None:
    topic = content_words(original)
    if len(topic) < TOPIC_MIN_CONTENT_WORDS:
        return None  # too little to judge: "hello world" may become anything polite
    shared = len(topic & content_words(rewrite))
    if shared >= TOPIC_MIN_SHARED * len(topic):
        return None
    return f"shares {shared} of the original's {len(topic)} content words (needs {TOPIC_MIN_SHARED:.0%})"


@functools.lru_cache(maxsize=8)
def asks_for_something(text: str) -> bool:
    """A question, a request phrase, or a sentence that starts with an imperative verb."""
    if _REQUEST.search(text):
        return True
    return any(match.group(1).lower() in REQUEST_VERBS for match in _CLAUSE_START.finditer(text))


def check_answer(original: str, rewrite: str) -> str | None:
    opener = _ANSWER_OPENER.match(rewrite)
    if opener and not _ANSWER_OPENER.match(original):
        return f"it opens like a reply ({opener.group(0).strip()!r}), not a request"
    if asks_for_something(original) and not asks_for_something(rewrite):
        return "the original asks for something and the rewrite asks for nothing"
    return None
