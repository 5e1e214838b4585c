"""Pre-generation prompt safety: a versioned, data-driven policy that judges the prompt text before any GPU time.

Plain functions, no Kafka. consumers/prompt_encoder.py calls ``evaluate_prompt(request["prompt"])``, and for an
image-to-video job also ``evaluate_input_image(image)`` (see "The input image" below).

What it decides
    ``evaluate_prompt(prompt)`` returns a PromptDecision: ALLOW, REVIEW or BLOCK, the sorted unique reason codes, a
    human-readable ``evidence`` string, the ``policy_version`` that judged it, and ``matches`` (one PolicyMatch per rule
    that fired: category, reason, action, rule id, matched text of the original prompt and its offsets). The most severe
    match wins: BLOCK > REVIEW > ALLOW. Rules, terms, regex patterns and the protected-person list are data, in
    compliance/prompt_policy.toml (its header documents the format); its ``version`` is stamped on every decision so a
    flagged job can be traced to the exact policy text that judged it.

Only the prompt is judged, never the negative prompt
    A negative prompt lists what the model must steer AWAY from: "nude, child, gore, watermark" there is the
    responsible use of the feature, and judging it with the same word lists would block exactly the careful users.
    ``negative_prompt`` is accepted so callers can pass the whole request, and is deliberately ignored. (Known gap: a
    negative prompt can steer towards content by negating its opposite, e.g. "clothing"; no word list sees that — it
    is what the post-generation check is for.)

How the text is normalised, and why it is not squashed into one letter string
    Squashing a prompt into one string of letters defeats spacing tricks but creates the Scunthorpe problem: "therapist"
    contains "rapist" and "Lincoln Park" contains "lincoln". So terms are matched on WORD BOUNDARIES in a normalised
    token stream, and only the evasions are undone:

    * each character is folded: NFKC (full-width "ｎｕｄｅ", math letters, ligatures, circled letters), casefold, NFKD
      with combining marks dropped (accents, "zalgo" strike-throughs), then a small hand-written table of Cyrillic,
      Greek and Latin look-alikes ("а" U+0430 → "a"). No confusables library is installed in this project's
      environment, so the table covers the common Latin look-alikes only — it is not the full Unicode confusables set;
    * format characters (zero-width space/joiner, soft hyphen, BOM, bidi marks) are dropped, so "nu\\u200bde" is "nude";
    * a run of three or more single characters separated by spaces or punctuation ("n u d e", "n.u.d.e", "k-i-l-l")
      is collapsed into one token; a real word is never glued to its neighbour;
    * the prompt is read several ways and a rule fires if any reading matches. The readings differ in three choices,
      each of which is ambiguous on its own:
        - leetspeak: off (digits stay digits, so "12yo" and "1488" are seen as written), or on with "1"/"|" read as
          "i", or on with them read as "l" ("k1ll" and "1olita" both decode). Digits are decoded only inside a word
          that has letters: "a 4 year old" keeps its "4";
        - punctuation inside a word ("nu.de", "self-harm", "Obama's") is either a word break or removed;
        - a spelled-out run that starts with "a" or "i" ("a n u d e") keeps that article as its own word, or not.
      Every reading keeps, for each character, the offset of the original character it came from, so evidence quotes
      the ORIGINAL prompt ("n.u.d.e" at 10-17), plus the normalised form that matched.

    Terms in the policy are normalised the same way and match whole words; words of a multi-word term may also be
    written together ("self harm" matches "self-harm" and "selfharm"); a term also matches its plural (s/es); a term
    ending in "*" matches any word starting with it. Regex patterns run on each reading as is (lowercase ASCII-ish
    text, one space between words) and must supply their own boundaries.

Protected persons (fuzzy, with rapidfuzz)
    Every name and alias is compared with the windows of the same number of words in each reading. A window matches
    when EVERY word is within the policy's ``person_word_similarity`` (80 by default) of the name's word, measured as
    rapidfuzz's optimal-string-alignment similarity (a swap of two letters is one edit): a word of five or more letters
    may carry one slip per five letters, a word of four or fewer letters must be exact. Per word, not over the whole
    string, because a whole-string score cannot separate the slips we want from the near-misses we must not have:
    fuzz.ratio gives "tayler swfit" 83 but also "taylors wife" 83 and "honest ape" 90 against "honest abe".
    Names run together or split differently ("taylorswift", "tay lor swift") match when the letters are identical.
    A single word is never matched fuzzily: a one-word alias must be distinctive (a mononym) and is matched exactly,
    and a surname alone ("Lincoln", "Swift", "Obama") is not a name — list the forms that identify the person
    ("President Lincoln") as aliases instead.

    A protected person is BLOCKed (REAL_PERSON) unless the request carries a valid consent reference for that person:
    a record in the consent registry (``load_consents``) for the same person id that has not expired. A consent covers
    depiction only; rules that combine a person with sexual content (NCII) are not lifted by it.

The input image (image-to-video)
    A photo of a real face is the main road to a deepfake: the model animates whoever is in it, whatever the prompt
    says. ``evaluate_input_image`` runs the post-generation stage's face detector (compliance/detectors.py, an LBP
    cascade for frontal faces) on the upright image, downscaled to ``INPUT_FACE_MAX_SIDE`` pixels; a face found gives
    reason INPUT_FACE with the policy's ``[input_image] face_action`` (REVIEW unless the policy says BLOCK). A
    consent reference does not lift it: nothing tells whose face it is. Profile, occluded and cartoon faces are not
    seen (the detector's limits); the post-generation checks look at the video's faces again. An image that cannot be
    read is not judged here: ``compliance.input_image.read_input_image`` refuses it before (the prompt encoder fails
    such a request as invalid).
"""
from __future__ import annotations

import json
import re
import tomllib
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from rapidfuzz import fuzz, process
from rapidfuzz.distance import OSA

from .detectors import FaceDetector
from .input_image import InputImage

__all__ = [
    "Consent", "Person", "Policy", "PolicyError", "PolicyMatch", "PromptDecision", "Reading", "Rule",
    "combine_decisions", "evaluate_input_image", "evaluate_prompt", "load_consents", "load_policy", "readings",
]

DEFAULT_POLICY_FILE = "prompt_policy.toml"
SEVERITY = {"ALLOW": 0, "REVIEW": 1, "BLOCK": 2}
RULE_ACTIONS = ("BLOCK", "REVIEW")  # a rule exists to stop or hold a request; ALLOW is what no match means
PROTECTED_PERSON_GROUP = "protected_person"  # a group name `requires` may use: "a protected person is named"
INPUT_FACE_REASON = "INPUT_FACE"
# The input image is downscaled to this before the face search: twice the detector's default for video frames, so
# a face down to ~6 % of an image's side is found (~0.1 s for any image up to 4096×4096).
INPUT_FACE_MAX_SIDE = 384


class PolicyError(ValueError):
    """A policy or consent file is malformed. The message names the file, the line where known, and the key."""


# --------------------------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------------------------

# Look-alikes of Latin letters that NFKC/NFKD leave alone (applied after casefold, so lowercase only). Hand-written and
# deliberately small: the Cyrillic, Greek and Armenian letters that are commonly swapped in, and the Latin letters with
# a built-in stroke that have no decomposition. Not the full Unicode confusables table (no library for it is installed).
_HOMOGLYPHS = {
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "ё": "e", "һ": "h", "н": "h", "і": "i", "ӏ": "l", "ј": "j", "к": "k", "м": "m",
    "о": "o", "р": "p", "ԛ": "q", "с": "c", "ѕ": "s", "т": "t", "у": "y", "ү": "y", "х": "x", "ԝ": "w", "ԁ": "d",
    "ь": "b", "п": "n", "г": "r",
    # Greek
    "α": "a", "β": "b", "γ": "y", "ε": "e", "η": "n", "ι": "i", "κ": "k", "μ": "u", "ν": "v", "ο": "o", "ρ": "p",
    "τ": "t", "υ": "u", "χ": "x", "ω": "w",
    # Armenian
    "օ": "o", "ս": "u", "ո": "n", "հ": "h", "ց": "g",
    # Latin letters with a stroke or otherwise undecomposable
    "ı": "i", "ł": "l", "ø": "o", "đ": "d", "ħ": "h", "ŧ": "t", "ƀ": "b", "ɨ": "i", "ɑ": "a", "ɡ": "g", "æ": "ae",
    "œ": "oe", "þ": "th",
}

# Leetspeak, decoded only in the "leet" readings and only inside a word that has letters. "1" and "|" are ambiguous
# (i or l): each leet reading picks one. "2" and "6" are left out: their letters (z, b/g) are too uncertain to help.
_LEET = {"0": "o", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g", "@": "a", "$": "s", "!": "i", "+": "t",
         "€": "e"}
_AMBIGUOUS_LEET = frozenset("1|")
_LEET_SYMBOLS = frozenset("@$!|+€")
# At a word's edge these are punctuation ("kill!", "+1"), inside a word letters ("k!ll").
# "$" and "@" are not here: they do lead words ("$ex", "@ss").
_EDGE_PUNCTUATION = frozenset("!|+")
# Punctuation people insert inside words to break filters; either a word break or removed, depending on the reading.
_JOINERS = frozenset(".-_*'’‘`~^·•")
_ARTICLES = frozenset("ai")  # the one-letter English words, which may start a spelled-out run: "a n u d e"
_MIN_SPELLED_OUT = 3  # single characters in a row before they are read as one spelled-out word


@lru_cache(maxsize=4096)
def _fold_char(ch: str) -> str:
    """One character → zero or more plain lowercase characters (see the module docstring)."""
    if unicodedata.category(ch) == "Cf":  # zero-width space/joiner, soft hyphen, BOM, bidi controls
        return ""
    decomposed = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", ch).casefold())
    return "".join(_HOMOGLYPHS.get(c, c) for c in decomposed if unicodedata.category(c) not in ("Mn", "Me"))


def _fold(text: str) -> list[tuple[str, int]]:
    """Folded characters, each with the offset of the original character it came from."""
    return [(c, offset) for offset, ch in enumerate(text) for c in _fold_char(ch)]


_Piece = list[tuple[str, int]]  # characters of one word-in-progress with their original offsets


@dataclass(frozen=True)
class Reading:
    """One normalised reading of a prompt: lowercase words separated by single spaces.

    ``origins[i]`` is the offset in the original prompt of ``text[i]`` (-1 for the spaces between words), so a match
    in the reading maps back to the original text. ``words`` holds each word's (start, end) in ``text``.
    """
    text: str
    origins: tuple[int, ...]
    words: tuple[tuple[int, int], ...]

    def original_span(self, start: int, end: int) -> tuple[int, int] | None:
        offsets = [o for o in self.origins[start:end] if o >= 0]
        return (min(offsets), max(offsets) + 1) if offsets else None


def _split_pieces(folded: list[tuple[str, int]], remove_joiners: bool) -> list[_Piece]:
    pieces: list[_Piece] = []
    current: _Piece = []
    for c, origin in folded:
        if c.isalnum() or c in _LEET_SYMBOLS:
            current.append((c, origin))
        elif c in _JOINERS and remove_joiners:
            continue
        elif current:
            pieces.append(current)
            current = []
    if current:
        pieces.append(current)
    return pieces


def _collapse_spelled_out(pieces: list[_Piece], keep_article: bool) -> list[_Piece]:
    """Join runs of >= 3 one-character pieces ("n", "u", "d", "e") into one piece; other pieces are left alone."""
    out: list[_Piece] = []
    i = 0
    while i < len(pieces):
        end = i
        while end < len(pieces) and len(pieces[end]) == 1:
            end += 1
        run = pieces[i:end]
        if len(run) >= _MIN_SPELLED_OUT:
            if keep_article and run[0][0][0] in _ARTICLES and len(run) > _MIN_SPELLED_OUT:
                out.append(run[0])
                run = run[1:]
            out.append([c for piece in run for c in piece])
            i = end
        elif run:
            out.extend(run)
            i = end
        else:
            out.append(pieces[i])
            i += 1
    return out


def _split_at_symbols(piece: _Piece) -> list[_Piece]:
    words, current = [], []
    for c, origin in piece:
        if c in _LEET_SYMBOLS:
            if current:
                words.append(current)
            current = []
        else:
            current.append((c, origin))
    return words + ([current] if current else [])


def _decode_leet(piece: _Piece, one_as: str | None) -> list[_Piece]:
    """Decode leetspeak in one piece; ``one_as`` None means leet is off (symbols are then word breaks)."""
    if one_as is None:
        return _split_at_symbols(piece)
    while piece and piece[0][0] in _EDGE_PUNCTUATION:
        piece = piece[1:]
    while piece and piece[-1][0] in _EDGE_PUNCTUATION:
        piece = piece[:-1]
    if not any(c.isalpha() for c, _ in piece):  # a number stays a number: "a 4 year old", "1488"
        return _split_at_symbols(piece)
    decoded = [(one_as if c in _AMBIGUOUS_LEET else _LEET.get(c, c), origin) for c, origin in piece]
    return [decoded] if decoded else []


def _reading(folded: list[tuple[str, int]], one_as: str | None, remove_joiners: bool, keep_article: bool) -> Reading:
    pieces = _collapse_spelled_out(_split_pieces(folded, remove_joiners), keep_article)
    text: list[str] = []
    origins: list[int] = []
    words: list[tuple[int, int]] = []
    for piece in pieces:
        for word in _decode_leet(piece, one_as):
            if text:
                text.append(" ")
                origins.append(-1)
            start = len(text)
            text.extend(c for c, _ in word)
            origins.extend(o for _, o in word)
            words.append((start, len(text)))
    return Reading("".join(text), tuple(origins), tuple(words))


def readings(prompt: str) -> list[Reading]:
    """The distinct normalised readings of ``prompt`` (usually one or two; at most twelve)."""
    folded = _fold(prompt)
    distinct: dict[str, Reading] = {}
    for one_as in (None, "i", "l"):
        for remove_joiners in (False, True):
            for keep_article in (False, True):
                reading = _reading(folded, one_as, remove_joiners, keep_article)
                distinct.setdefault(reading.text, reading)
    return list(distinct.values())


def _phrase_words(phrase: str) -> list[str]:
    """A policy term or name in the words of a reading: folded, punctuation as word breaks, no leet decoding."""
    return "".join(c if c.isalnum() else " " for c, _ in _fold(phrase)).split()


# --------------------------------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Matcher:
    """One term or regex pattern, compiled to run on a reading."""
    source: str  # for evidence: "term 'nude'" or "pattern '...'"
    regex: re.Pattern[str]


@dataclass(frozen=True)
class Group:
    """A named vocabulary that rules combine (`requires`) or use as an exception (`unless`)."""
    name: str
    matchers: tuple[Matcher, ...]


@dataclass(frozen=True)
class Rule:
    id: str
    category: str
    reason: str
    action: str  # BLOCK | REVIEW
    matchers: tuple[Matcher, ...] = ()  # the rule's own terms and patterns: any one of them
    requires: tuple[str, ...] = ()  # groups that must all match somewhere in the prompt
    unless: tuple[str, ...] = ()  # groups any of which, when matched, stop the rule
    protected_persons: bool = False  # fires once per protected person named; a valid consent lifts it
    description: str = ""


@dataclass(frozen=True)
class Person:
    id: str
    name: str
    aliases: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


@dataclass(frozen=True)
class Policy:
    version: str
    rules: tuple[Rule, ...]
    groups: Mapping[str, Group]
    persons: tuple[Person, ...]
    person_word_similarity: float = 80.0
    source: str = ""
    input_face_action: str = "REVIEW"  # what a face in the input image of an image-to-video job leads to

    @property
    def uses_persons(self) -> bool:
        return any(r.protected_persons or PROTECTED_PERSON_GROUP in (*r.requires, *r.unless) for r in self.rules)


class _PolicySource:
    """The policy file's text, to point errors at a line: tomllib reports lines only for syntax errors."""

    def __init__(self, name: str, text: str):
        self.name = name
        self.lines = text.splitlines()

    def headers(self, header: str) -> list[int]:
        return [n for n, line in enumerate(self.lines, 1) if line.strip().startswith(header)]

    def key_line(self, key: str, after: int | None) -> int | None:
        """The first line at or after ``after`` that assigns ``key`` (the table's own header when not found)."""
        if after is None:
            return None
        pattern = re.compile(rf"\s*\"?{re.escape(key)}\"?\s*=")
        for n in range(after, len(self.lines) + 1):
            if n > after and self.lines[n - 1].lstrip().startswith("["):
                break  # the next table: the key is not in this one
            if pattern.match(self.lines[n - 1]):
                return n
        return after

    def value_line(self, value: str, after: int | None) -> int | None:
        for n in range(after or 1, len(self.lines) + 1):
            if value in self.lines[n - 1]:
                return n
        return after

    def error(self, message: str, line: int | None = None) -> PolicyError:
        return PolicyError(f"{self.name}:{line}: {message}" if line else f"{self.name}: {message}")


_RULE_KEYS = {"id", "category", "reason", "action", "description", "terms", "patterns", "requires", "unless",
              "protected_persons"}
_GROUP_KEYS = {"description", "terms", "patterns"}
_PERSON_KEYS = {"id", "name", "aliases", "note"}
_TOP_KEYS = {"version", "description", "settings", "groups", "rules", "persons", "input_image"}
_INPUT_IMAGE_KEYS = {"description", "face_action"}
_SETTINGS_KEYS = {"person_word_similarity"}
_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")
_RULE_ID = re.compile(r"[a-z0-9][a-z0-9._-]*\Z")
_REASON = re.compile(r"[A-Z][A-Z0-9_]*\Z")


def _check_keys(src: _PolicySource, table: Mapping, allowed: set[str], where: str, line: int | None) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise src.error(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})",
                        src.key_line(unknown[0], line) if line else None)


def _string_list(src: _PolicySource, table: Mapping, key: str, where: str, line: int | None) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise src.error(f"{where}: {key!r} must be a list of non-empty strings", src.key_line(key, line))
    return value


def _term_matcher(src: _PolicySource, term: str, where: str, line: int | None, label: str) -> Matcher:
    prefix = term.endswith("*")
    words = _phrase_words(term[:-1] if prefix else term)
    if not words or "*" in term[:-1]:
        raise src.error(f"{where}: term {term!r} has no letters or digits, or a '*' that is not at its end",
                        src.value_line(term, line))
    body = " ?".join(re.escape(w) for w in words)  # " ?": "self harm" also matches "selfharm"
    tail = r"\w*" if prefix else r"(?:e?s)?"  # "*": any ending; otherwise an optional plural
    return Matcher(f"{label}term {term!r}", re.compile(rf"(?<!\w){body}{tail}(?!\w)"))


def _pattern_matcher(src: _PolicySource, pattern: str, where: str, line: int | None, label: str) -> Matcher:
    try:
        return Matcher(f"{label}pattern {pattern!r}", re.compile(pattern))
    except re.error as exc:
        raise src.error(f"{where}: bad regex {pattern!r}: {exc}",
                        src.value_line(pattern, line) or src.key_line("patterns", line)) from exc


def _matchers(src: _PolicySource, table: Mapping, where: str, line: int | None,
              label: str = "") -> tuple[Matcher, ...]:
    """Compile a table's terms and patterns; ``label`` prefixes their evidence (a group's name)."""
    terms = _string_list(src, table, "terms", where, line)
    patterns = _string_list(src, table, "patterns", where, line)
    return (*(_term_matcher(src, t, where, line, label) for t in terms),
            *(_pattern_matcher(src, p, where, line, label) for p in patterns))


def _parse_groups(src: _PolicySource, raw: Any) -> dict[str, Group]:
    if not isinstance(raw, dict):
        raise src.error("'groups' must be a table of [groups.NAME] tables", src.key_line("groups", 1))
    groups = {}
    for name, table in raw.items():
        line = next(iter(src.headers(f"[groups.{name}]")), None)
        where = f"groups.{name}"
        if not isinstance(table, dict):
            raise src.error(f"{where} must be a table", line)
        if not _NAME.match(name) or name == PROTECTED_PERSON_GROUP:
            raise src.error(f"{where}: a group name is lowercase letters, digits and '_', and not "
                            f"{PROTECTED_PERSON_GROUP!r} (reserved)", line)
        _check_keys(src, table, _GROUP_KEYS, where, line)
        matchers = _matchers(src, table, where, line, label=f"{name}: ")
        if not matchers:
            raise src.error(f"{where}: a group needs at least one of 'terms' or 'patterns'", line)
        groups[name] = Group(name, matchers)
    return groups


def _array_of_tables(src: _PolicySource, raw: Any, name: str,
                     allow_empty: bool) -> Iterator[tuple[dict, str, int | None]]:
    """(table, "name[i]", its header line) for each [[name]] table, after checking the array's shape."""
    if not isinstance(raw, list) or (not raw and not allow_empty):
        kind = "an array" if allow_empty else "a non-empty array"
        raise src.error(f"'{name}' must be {kind} of [[{name}]] tables", src.key_line(name, 1))
    header_lines = src.headers(f"[[{name}]]")
    for index, table in enumerate(raw):
        line = header_lines[index] if index < len(header_lines) else None
        where = f"{name}[{index}]"
        if not isinstance(table, dict):
            raise src.error(f"{where} must be a table", line)
        yield table, where, line


def _parse_rules(src: _PolicySource, raw: Any, groups: Mapping[str, Group]) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    for table, where, line in _array_of_tables(src, raw, "rules", allow_empty=False):
        if isinstance(table.get("id"), str):
            where += f" (id {table['id']!r})"
        _check_keys(src, table, _RULE_KEYS, where, line)
        for key in ("id", "category", "reason", "action"):
            if not isinstance(table.get(key), str) or not table[key].strip():
                raise src.error(f"{where}: missing or empty {key!r}", src.key_line(key, line))
        if not _RULE_ID.match(table["id"]):
            raise src.error(f"{where}: a rule id is lowercase letters, digits, '.', '-' and '_'",
                            src.key_line("id", line))
        if any(rule.id == table["id"] for rule in rules):
            raise src.error(f"{where}: duplicate rule id {table['id']!r}", src.key_line("id", line))
        if table["action"] not in RULE_ACTIONS:
            raise src.error(f"{where}: unknown action {table['action']!r}; a rule's action is one of "
                            f"{', '.join(RULE_ACTIONS)}", src.key_line("action", line))
        if not _REASON.match(table["reason"]):
            raise src.error(f"{where}: a reason code is UPPER_SNAKE_CASE, got {table['reason']!r}",
                            src.key_line("reason", line))
        references = {}
        for key in ("requires", "unless"):
            references[key] = tuple(_string_list(src, table, key, where, line))
            for name in references[key]:
                if name not in groups and name != PROTECTED_PERSON_GROUP:
                    raise src.error(f"{where}: {key!r} names unknown group {name!r} (known: "
                                    f"{', '.join(sorted([*groups, PROTECTED_PERSON_GROUP]))})", src.key_line(key, line))
        persons = table.get("protected_persons", False)
        if not isinstance(persons, bool):
            raise src.error(f"{where}: 'protected_persons' must be true or false",
                            src.key_line("protected_persons", line))
        matchers = _matchers(src, table, where, line)
        if persons and (matchers or references["requires"]):
            raise src.error(f"{where}: a protected_persons rule takes no 'terms', 'patterns' or 'requires' (combine "
                            f"persons with other content through requires = [{PROTECTED_PERSON_GROUP!r}, ...])",
                            src.key_line("protected_persons", line))
        if not (persons or matchers or references["requires"]):
            raise src.error(f"{where}: the rule matches nothing: give 'terms', 'patterns', 'requires' or "
                            f"'protected_persons = true'", line)
        rules.append(Rule(id=table["id"], category=table["category"], reason=table["reason"], action=table["action"],
                          matchers=matchers, requires=references["requires"], unless=references["unless"],
                          protected_persons=persons, description=table.get("description", "")))
    return tuple(rules)


def _parse_persons(src: _PolicySource, raw: Any) -> tuple[Person, ...]:
    persons: list[Person] = []
    for table, where, line in _array_of_tables(src, raw, "persons", allow_empty=True):
        _check_keys(src, table, _PERSON_KEYS, where, line)
        for key in ("id", "name"):
            if not isinstance(table.get(key), str) or not _phrase_words(table[key]):
                raise src.error(f"{where}: missing or empty {key!r}", src.key_line(key, line))
        if any(p.id == table["id"] for p in persons):
            raise src.error(f"{where}: duplicate person id {table['id']!r}", src.key_line("id", line))
        aliases = _string_list(src, table, "aliases", where, line)
        persons.append(Person(table["id"], table["name"], tuple(aliases)))
    return tuple(persons)


def _parse_policy(text: str, name: str) -> Policy:
    src = _PolicySource(name, text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise src.error(f"not valid TOML: {exc}") from exc
    _check_keys(src, data, _TOP_KEYS, "top level", 1)
    version = data.get("version")
    if not isinstance(version, str) or not version.strip():
        raise src.error("missing required top-level key 'version' (a non-empty string, e.g. version = \"1.0.0\")",
                        src.key_line("version", 1) if "version" in data else None)
    settings = data.get("settings", {})
    settings_line = next(iter(src.headers("[settings]")), None)
    if not isinstance(settings, dict):
        raise src.error("'settings' must be a table", settings_line)
    _check_keys(src, settings, _SETTINGS_KEYS, "settings", settings_line)
    similarity = settings.get("person_word_similarity", 80)
    if isinstance(similarity, bool) or not isinstance(similarity, (int, float)) or not 50 <= similarity <= 100:
        raise src.error("settings: 'person_word_similarity' must be a number within 50..100",
                        src.key_line("person_word_similarity", settings_line))
    groups = _parse_groups(src, data.get("groups", {}))
    rules = _parse_rules(src, data.get("rules"), groups)
    persons = _parse_persons(src, data.get("persons", []))
    policy = Policy(version=version, rules=rules, groups=groups, persons=persons,
                    person_word_similarity=float(similarity), source=name,
                    input_face_action=_parse_input_image(src, data.get("input_image", {})))
    if policy.uses_persons and not persons:
        raise src.error("rules match protected persons but the policy lists no [[persons]]")
    return policy


def _parse_input_image(src: _PolicySource, table: Any) -> str:
    """The [input_image] table: face_action (REVIEW when the table or the key is absent)."""
    line = next(iter(src.headers("[input_image]")), None)
    if not isinstance(table, dict):
        raise src.error("'input_image' must be a table", line)
    _check_keys(src, table, _INPUT_IMAGE_KEYS, "input_image", line)
    action = table.get("face_action", "REVIEW")
    if action not in RULE_ACTIONS:
        raise src.error(f"input_image: unknown face_action {action!r}; one of {', '.join(RULE_ACTIONS)}",
                        src.key_line("face_action", line))
    return action


def load_policy(path: str | Path | None = None) -> Policy:
    """Load and validate a policy file; None loads the packaged compliance/prompt_policy.toml.

    Raises PolicyError naming the file, the line where it can be found, and the bad key.
    """
    if path is None:
        text = resources.files(__package__ or "compliance").joinpath(DEFAULT_POLICY_FILE).read_text(encoding="utf-8")
        return _parse_policy(text, DEFAULT_POLICY_FILE)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy: {exc}") from exc
    return _parse_policy(text, str(path))


@lru_cache(maxsize=1)
def _packaged_policy() -> Policy:
    return load_policy()


# --------------------------------------------------------------------------------------------------------------------
# Consents
# --------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Consent:
    """A person's recorded consent to be depicted, for one person id; valid through ``expires`` (inclusive, UTC)."""
    ref: str
    person_id: str
    expires: date | None = None


_CONSENT_KEYS = {"person", "expires", "note"}


def load_consents(path: str | Path) -> dict[str, Consent]:
    """Load a consent registry: a ``.toml`` or ``.json`` file whose ``consents`` table maps consent_ref → record.

    TOML::

        [consents."cr-2025-0042"]
        person = "taylor-swift"      # a person id from the policy
        expires = 2026-12-31         # optional; a TOML date or an ISO date string; valid through that day

    JSON: ``{"consents": {"cr-2025-0042": {"person": "taylor-swift", "expires": "2026-12-31"}}}``.
    Unknown record keys are errors (a misspelt "expiry" must not make a consent permanent).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise PolicyError(f"{path}: cannot read the consent registry: {exc}") from exc
    table = data.get("consents") if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise PolicyError(f"{path}: expected a 'consents' table mapping consent_ref to a record")
    consents = {}
    for ref, record in table.items():
        where = f"{path}: consents.{ref}"
        if not isinstance(record, dict):
            raise PolicyError(f"{where}: a record is a table with 'person' and optional 'expires'")
        unknown = sorted(set(record) - _CONSENT_KEYS)
        if unknown:
            raise PolicyError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_CONSENT_KEYS))})")
        if not isinstance(record.get("person"), str) or not record["person"].strip():
            raise PolicyError(f"{where}: missing or empty 'person' (a person id from the policy)")
        expires = record.get("expires")
        if isinstance(expires, datetime):
            expires = expires.date()
        elif isinstance(expires, str):
            try:
                expires = date.fromisoformat(expires)
            except ValueError as exc:
                raise PolicyError(f"{where}: 'expires' is not an ISO date: {expires!r}") from exc
        elif expires is not None and not isinstance(expires, date):
            raise PolicyError(f"{where}: 'expires' must be a date, e.g. 2026-12-31")
        consents[ref] = Consent(ref, record["person"], expires)
    return consents


def _consent_check(ref: str | None, person: Person, consents: Mapping[str, Consent] | None,
                   today: date) -> tuple[bool, str]:
    """Whether ``ref`` is a valid consent for ``person``, and why (for the evidence)."""
    if ref is None:
        return False, "no consent reference"
    record = (consents or {}).get(ref)
    if record is None:
        return False, f"consent {ref!r} is not in the consent registry"
    if record.person_id != person.id:
        return False, f"consent {ref!r} is for {record.person_id!r}, not {person.id!r}"
    if record.expires is not None and today > record.expires:
        return False, f"consent {ref!r} expired on {record.expires.isoformat()}"
    until = f" until {record.expires.isoformat()}" if record.expires else ""
    return True, f"consent {ref!r} for {person.id!r} is valid{until}"


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PolicyMatch:
    """One rule that fired, with what it matched."""
    category: str
    reason: str
    action: str  # BLOCK | REVIEW; ALLOW for a protected-person match a valid consent lifted
    rule_id: str
    text: str  # the matched text of the ORIGINAL prompt; the parts of a combination are joined with " + "
    spans: tuple[tuple[int, int], ...]  # [start, end) offsets of those parts in the original prompt
    normalised: str = ""  # the normalised form(s) that matched, same order
    detail: str = ""  # which term/pattern/name matched, and the consent outcome for persons


@dataclass
class PromptDecision:
    action: str  # ALLOW | REVIEW | BLOCK
    reasons: list[str] = field(default_factory=list)  # sorted unique reason codes of the REVIEW/BLOCK matches
    evidence: str = ""  # human-readable: what matched, where, and why
    policy_version: str = ""
    matches: list[PolicyMatch] = field(default_factory=list)


@dataclass(frozen=True)
class _Hit:
    span: tuple[int, int]
    normalised: str
    source: str


def _find(matchers: tuple[Matcher, ...], prompt_readings: list[Reading]) -> list[_Hit]:
    """Every distinct original span any matcher finds in any reading, in prompt order."""
    hits: dict[tuple[tuple[int, int], str], _Hit] = {}
    for reading in prompt_readings:
        for matcher in matchers:
            for m in matcher.regex.finditer(reading.text):
                span = reading.original_span(m.start(), m.end())
                if span is not None:
                    hits.setdefault((span, matcher.source), _Hit(span, m.group(), matcher.source))
    return sorted(hits.values(), key=lambda h: (h.span, h.source))


@dataclass(frozen=True)
class _PersonHit:
    person: Person
    hit: _Hit


def _find_persons(policy: Policy, prompt_readings: list[Reading]) -> list[_PersonHit]:
    """Protected persons named in the prompt, fuzzily (see the module docstring for the matching rule)."""
    fuzzy: dict[int, list[tuple[Person, str, list[str]]]] = {}  # word count → (person, label, words)
    exact: dict[str, list[tuple[Person, str]]] = {}  # letters without spaces → (person, label)
    for person in policy.persons:
        for label in person.names:
            words = _phrase_words(label)
            exact.setdefault("".join(words), []).append((person, label))
            if len(words) > 1:
                fuzzy.setdefault(len(words), []).append((person, label, words))
    floor = policy.person_word_similarity
    longest = max((len(_phrase_words(label)) for p in policy.persons for label in p.names), default=0)
    found: dict[tuple[str, tuple[int, int]], _PersonHit] = {}

    def record(person: Person, label: str, reading: Reading, first: int, last: int, how: str) -> None:
        start, end = reading.words[first][0], reading.words[last][1]
        span = reading.original_span(start, end)
        if span is not None:
            found.setdefault((person.id, span), _PersonHit(
                person, _Hit(span, reading.text[start:end], f"name {label!r} ({how})")))

    for reading in prompt_readings:
        words = [reading.text[s:e] for s, e in reading.words]
        for size in range(1, longest + 3):  # a name's words may be run together or split further
            for first in range(len(words) - size + 1):
                for person, label in exact.get("".join(words[first:first + size]), ()):
                    record(person, label, reading, first, first + size - 1, "exact")
        for size, names in fuzzy.items():
            choices = [" ".join(name_words) for _, _, name_words in names]
            for first in range(len(words) - size + 1):
                window = words[first:first + size]
                # A cheap whole-string prefilter; the per-word check below decides.
                for _, score, index in process.extract(" ".join(window), choices, scorer=fuzz.ratio,
                                                       score_cutoff=floor - 15, limit=None):
                    person, label, name_words = names[index]
                    similarities = [OSA.normalized_similarity(w, n) * 100 for w, n in zip(window, name_words)]
                    if min(similarities) + 1e-9 >= floor:  # 1 - 1/5 must count as 80, whatever the float rounding
                        record(person, label, reading, first, first + size - 1,
                               f"word similarity {min(similarities):.0f} >= {floor:.0f}")
    # One naming, one hit: a one-word alias inside a longer name of the same person ("Obama" in "Barack Obama").
    hits = list(found.values())
    return sorted((h for h in hits if not any(
        o.person.id == h.person.id and o.hit.span != h.hit.span and o.hit.span[0] <= h.hit.span[0]
        and h.hit.span[1] <= o.hit.span[1] for o in hits)), key=lambda h: h.hit.span)


def _match(rule: Rule, hits: list[_Hit], prompt: str, action: str | None = None, detail: str = "") -> PolicyMatch:
    sources = "; ".join(dict.fromkeys(h.source for h in hits))
    return PolicyMatch(
        category=rule.category, reason=rule.reason, action=action or rule.action, rule_id=rule.id,
        text=" + ".join(prompt[s:e] for s, e in (h.span for h in hits)),
        spans=tuple(h.span for h in hits),
        normalised=" + ".join(h.normalised for h in hits),
        detail=f"{sources}; {detail}" if detail else sources,
    )


_EVIDENCE_SPANS = 5  # per match in the evidence string; PromptDecision.matches keeps them all


def _evidence(matches: list[PolicyMatch], version: str, prompt: str) -> str:
    if not matches:
        return ""
    lines = []
    for m in matches:
        where = ", ".join(f"{s}-{e}" for s, e in m.spans[:_EVIDENCE_SPANS])
        if len(m.spans) > _EVIDENCE_SPANS:
            where += f" and {len(m.spans) - _EVIDENCE_SPANS} more"
        text = " + ".join(prompt[s:e] for s, e in m.spans[:_EVIDENCE_SPANS])
        normalised = " + ".join(m.normalised.split(" + ")[:_EVIDENCE_SPANS])  # readings never contain "+"
        lines.append(f"{m.action} {m.reason} [{m.rule_id}]: {text!r} at {where} (normalised {normalised!r}; "
                     f"{m.detail})")
    return f"policy {version}: " + " | ".join(lines)


def evaluate_prompt(prompt: str, *, negative_prompt: str = "", consent_ref: str | None = None,
                    policy: Policy | None = None, consents: Mapping[str, Consent] | None = None,
                    today: date | None = None) -> PromptDecision:
    """Judge ``prompt`` against ``policy`` (default: the packaged policy). See the module docstring.

    ``negative_prompt`` is accepted and deliberately not judged. ``consent_ref`` names a record in ``consents``
    (from ``load_consents``) that lifts the protected-person rule for that one person. ``today`` (default: the UTC
    date) decides whether a consent has expired.
    """
    del negative_prompt  # never judged: it lists what the model must avoid (see the module docstring)
    policy = policy or _packaged_policy()
    today = today or datetime.now(timezone.utc).date()
    prompt_readings = readings(prompt)

    group_hits: dict[str, list[_Hit]] = {}
    person_hits = _find_persons(policy, prompt_readings) if policy.uses_persons else []
    group_hits[PROTECTED_PERSON_GROUP] = [p.hit for p in person_hits]

    def hits_of(group: str) -> list[_Hit]:
        if group not in group_hits:
            group_hits[group] = _find(policy.groups[group].matchers, prompt_readings)
        return group_hits[group]

    matches: list[PolicyMatch] = []
    for rule in policy.rules:
        if any(hits_of(group) for group in rule.unless):
            continue
        if rule.protected_persons:
            by_person: dict[str, list[_PersonHit]] = {}
            for person_hit in person_hits:
                by_person.setdefault(person_hit.person.id, []).append(person_hit)
            for person_id, hits in by_person.items():
                person = hits[0].person
                allowed, why = _consent_check(consent_ref, person, consents, today)
                matches.append(_match(rule, [h.hit for h in hits], prompt, "ALLOW" if allowed else None,
                                      f"person {person_id!r} ({person.name}); {why}"))
            continue
        own = _find(rule.matchers, prompt_readings) if rule.matchers else []
        if rule.matchers and not own:
            continue
        required = [hits_of(group) for group in rule.requires]
        if not all(required):
            continue
        # Evidence: every hit of the rule's own terms, and the first hit of each group it combines.
        parts = own + [group[0] for group in required]
        matches.append(_match(rule, sorted(set(parts), key=lambda h: h.span), prompt))

    matches.sort(key=lambda m: (-SEVERITY[m.action], m.rule_id, m.spans))
    action = max((m.action for m in matches), key=SEVERITY.__getitem__, default="ALLOW")
    reasons = sorted({m.reason for m in matches if m.action != "ALLOW"})
    return PromptDecision(action=action, reasons=reasons, evidence=_evidence(matches, policy.version, prompt),
                          policy_version=policy.version, matches=matches)


def evaluate_input_image(image: InputImage, *, policy: Policy | None = None) -> PromptDecision:
    """Judge the input image of an image-to-video job: ALLOW, or INPUT_FACE with the policy's face_action.

    ``image`` is one ``read_input_image`` accepted. See "The input image" in the module docstring.
    """
    policy = policy or _packaged_policy()
    faces = FaceDetector(max_side=INPUT_FACE_MAX_SIDE).detect(image.rgb()).evidence
    if not faces["count"]:
        return PromptDecision(action="ALLOW", policy_version=policy.version)
    detail = (f"a frontal face in the {image.width}×{image.height} input image; the largest covers "
              f"{faces['largest_face_fraction']:.1%} of it")
    match = PolicyMatch(category="deepfake", reason=INPUT_FACE_REASON, action=policy.input_face_action,
                        rule_id="input_image.face", text="", spans=(), detail=detail)
    return PromptDecision(action=match.action, reasons=[match.reason], policy_version=policy.version,
                          evidence=f"policy {policy.version}: {match.action} {match.reason} [{match.rule_id}]: "
                                   f"{detail}", matches=[match])


def combine_decisions(*decisions: PromptDecision) -> PromptDecision:
    """One decision for a request judged in parts (its prompt, its input image): the most severe action wins."""
    matches = sorted((m for d in decisions for m in d.matches), key=lambda m: (-SEVERITY[m.action], m.rule_id))
    return PromptDecision(
        action=max((d.action for d in decisions), key=SEVERITY.__getitem__, default="ALLOW"),
        reasons=sorted({reason for d in decisions for reason in d.reasons}),
        evidence=" | ".join(d.evidence for d in decisions if d.evidence),
        policy_version=decisions[0].policy_version if decisions else "",
        matches=matches,
    )
