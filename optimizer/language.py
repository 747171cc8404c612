"""Which language a prompt is written in, roughly: its writing system, and for Latin script a stopword vote.

Used twice: the gateway does not send prompts in languages the optimizer was not trained on (the published
BPO model rewrites Chinese into English: thu-coai/BPO #8, #13), and the guard rejects a rewrite that changed
the language. Cheap on purpose (one regex pass for the script, one for the words): it only has to tell
"clearly Chinese" or "clearly French" from "English or too short to say", never to label every text.
"""

from __future__ import annotations

import re
from collections import Counter

LATIN = "latin"  # Latin script whose language the stopword vote could not name
# Writing systems by code point range; kana and han together are "cjk" (Japanese mixes both).
_SCRIPTS = {
    LATIN: "A-Za-z\u00c0-\u024f\u1e00-\u1eff",
    "cyrillic": "\u0400-\u052f",
    "greek": "\u0370-\u03ff",
    "arabic": "\u0600-\u06ff\u0750-\u077f",
    "hebrew": "\u0590-\u05ff",
    "devanagari": "\u0900-\u097f",
    "thai": "\u0e00-\u0e7f",
    "hangul": "\u1100-\u11ff\uac00-\ud7af",
    "cjk": "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff",
}
_SCRIPT_RUNS = re.compile("|".join(f"(?P<{name}>[{chars}]+)" for name, chars in _SCRIPTS.items()))
_WORD = re.compile(r"[^\W\d_]+")
# Frequent words distinctive enough to vote; a word in two lists votes for both.
_STOPWORDS = {
    "en": "the and is are of to in what how with for this that you please about which",
    "fr": "le la les des est et une pour dans que qui avec vous pas sur ce je",
    "de": "der die das und ist nicht ein eine mit für ich sie auf wie zu bitte",
    "es": "el los las es y una por para con que qué cómo del se está",
    "it": "il gli della che è e una per con non sono come del questo di",
    "pt": "o os as é e uma para com não que do da em como você",
    "nl": "de het een en is van niet dat met voor op zijn wat hoe ik",
}
_VOTES: dict[str, tuple[str, ...]] = {}
for _language, _words in _STOPWORDS.items():
    for _word in _words.split():
        _VOTES[_word] = (*_VOTES.get(_word, ()), _language)
MIN_VOTES = 3  # fewer stopwords than this: too short to name the language
SAMPLE_CHARS = 4000  # the start of a long prompt says enough; the cost stays bounded


def script_of(text: str) -> str | None:
    """The writing system most of the letters belong to; None without letters of a known script."""
    counts: Counter[str] = Counter()
    for match in _SCRIPT_RUNS.finditer(text[:SAMPLE_CHARS]):
        counts[match.lastgroup or ""] += match.end() - match.start()
    return counts.most_common(1)[0][0] if counts else None


def language_of(text: str) -> str | None:
    """``en``/``fr``/``de``/``es``/``it``/``pt``/``nl`` for Latin script the stopwords name clearly, ``latin``
    when they do not, else the script's name (``cjk``, ``cyrillic``, ...); None for text without letters."""
    script = script_of(text)
    if script != LATIN:
        return script
    votes: Counter[str] = Counter()
    for word in _WORD.findall(text[:SAMPLE_CHARS].lower()):
        votes.update(_VOTES.get(word, ()))
    ranked = votes.most_common(2)
    if not ranked or ranked[0][1] < MIN_VOTES or (len(ranked) > 1 and ranked[1][1] * 3 > ranked[0][1] * 2):
        return LATIN  # no clear winner: a runner-up within two thirds of the top is too close to call
    return ranked[0][0]


def same_language(original: str, rewrite: str) -> bool:
    """False only when both texts have a language that can be named and the two differ (``latin`` is
    compatible with any Latin-script language: a short English rewrite of a short prompt names none)."""
    before, after = language_of(original), language_of(rewrite)
    if before is None or after is None or before == after:
        return True
    if LATIN in (before, after):
        other = after if before == LATIN else before
        return other in _STOPWORDS
    return False


def is_supported(text: str, languages: frozenset[str]) -> bool:
    """Whether ``text`` is in one of ``languages`` (or cannot be named: text without letters, or Latin script
    whose language is unclear, counts as supported when any Latin-script language is)."""
    language = language_of(text)
    if language is None or language in languages:
        return True
    return language == LATIN and bool(languages & {*_STOPWORDS, LATIN})
