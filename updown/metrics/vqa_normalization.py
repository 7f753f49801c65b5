"""Answer normalisation of the official VQA evaluation, quirks included.

A line-by-line port of ``processPunctuation`` and ``processDigitArticle`` from GT-Vision-Lab/VQA
``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (master, commit a013f00). The tables below are copied
from that file; the behaviour is kept exactly, including what looks like bugs, because published VQA
numbers were computed with it:

- ``PERIOD_STRIP`` is ``(?!<=\\d)(\\.)(?!\\d)``: the author meant a look-*behind* for a digit, but wrote a
  look-ahead for the literal text ``<=`` followed by a digit, so any period not followed by a digit goes
  ("3.5" keeps its period, "5." and "a.b" lose theirs).
- The period substitution is called as ``sub("", text, re.UNICODE)``; the third positional argument of
  ``Pattern.sub`` is ``count``, so at most ``re.UNICODE`` (= 32) periods are removed.
- Whether a punctuation mark is deleted or replaced by a space is decided on the *original* text: deleted
  if it touches a space anywhere in the text, or if the text contains a digit-comma-digit pattern anywhere;
  otherwise replaced by a space. Apostrophes, colons and periods are not in the list.
- Number words are mapped *before* articles are dropped, and only whole words; ``none`` maps to ``0``.
- Contractions are looked up after lower-casing, so the table's capitalised keys (``Im``, ``Ive``,
  ``Id've``, ``I'dve``) can never match.
"""

from __future__ import annotations

import functools
import re

# Copied verbatim from the official vqaEval.py (keys and values as published).
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip

MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip

ARTICLES: tuple[str, ...] = ("a", "an", "the")

# The order matters: each mark's delete-or-space decision is made in this order on the original text.
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")

# The official code passes re.UNICODE where Pattern.sub expects `count`; keep the resulting limit.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: drop or space out punctuation, then strip periods.

    Args:
        text: one answer string.

    Returns:
        The answer with the marks of :data:`PUNCTUATION` deleted (if the mark touches a space anywhere in
        ``text``, or ``text`` contains digit-comma-digit) or replaced by a space (otherwise), and then up to
        32 periods not followed by a digit deleted.
    """
    out_text = text
    has_digit_comma = COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or has_digit_comma:
            out_text = out_text.replace(mark, "")
        else:
            out_text = out_text.replace(mark, " ")
    return PERIOD_STRIP.sub("", out_text, _PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words to digits, drop articles, contractions.

    Args:
        text: one answer string (normally already through :func:`process_punctuation`).

    Returns:
        The lower-cased words joined by single spaces, with ``zero``..``ten`` and ``none`` as digits,
        ``a``/``an``/``the`` removed, and apostrophe-less contractions restored (``dont`` -> ``don't``).
    """
    words = [MANUAL_MAP.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def strip_whitespace(text: str) -> str:
    """Newlines and tabs to spaces, then strip: what the official code does to every answer first."""
    return text.replace("\n", " ").replace("\t", " ").strip()


# Cached: a pure function of the string, and the same answers recur across VQA's millions of human answers, so
# preparing and scoring a split normalise each distinct answer once (data preparation: several times faster).
@functools.lru_cache(maxsize=1 << 20)
def normalize_answer(answer: str) -> str:
    """Normalise one answer exactly as the official evaluation normalises a prediction.

    Whitespace clean-up (:func:`strip_whitespace`), then :func:`process_punctuation`, then
    :func:`process_digit_article`. Data preparation uses this for answer vocabularies and soft targets so
    that training labels and evaluation agree.

    Args:
        answer: a raw answer string.

    Returns:
        The normalised answer, e.g. ``"The Two dogs."`` -> ``"2 dogs"``.
    """
    return process_digit_article(process_punctuation(strip_whitespace(answer)))
