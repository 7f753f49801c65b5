"""Caption scores exactly as the official COCO caption toolkit computes them (pycocoevalcap).

The protocol of ``pycocoevalcap.eval.COCOEvalCap``: raw reference and predicted strings are tokenised by
Stanford's PTBTokenizer (lower-cased, punctuation removed), then scored by BLEU-1..4, METEOR, ROUGE-L,
CIDEr (coco-caption's CIDEr is CIDEr-D, with document frequencies from the references being scored) and
SPICE. Scores are returned under pycocoevalcap's names (``Bleu_1``..``Bleu_4``, ``METEOR``, ``ROUGE_L``,
``CIDEr``, ``SPICE``), unscaled (CIDEr ~0.6-1.2, not x100).

External requirements: ``java`` on the PATH (METEOR and the tokenizer; Java 17 works). SPICE also needs
the Stanford CoreNLP 3.6.0 jars in pycocoevalcap's ``spice/lib`` folder, which pycocoevalcap would
download on first use; this module never triggers that download (see ``spice`` below).
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path

METRICS = ("Bleu", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
SPICE_MODES = ("auto", "on", "off")
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
# nocaps: the domain of each image (``images[i]["domain"]`` of its annotation files), and all images together.
NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")
OVERALL = "overall"


class MissingDependencyError(RuntimeError):
    """A program or file outside Python that a metric needs (Java, the SPICE jars) is missing."""


def spice_lib_dir() -> Path:
    """The folder where pycocoevalcap's SPICE looks for the Stanford CoreNLP jars."""
    import pycocoevalcap

    # pycocoevalcap 1.2 is a namespace package (no __init__.py), so it has __path__ but no __file__.
    return Path(next(iter(pycocoevalcap.__path__))) / "spice" / "lib"


def spice_available() -> bool:
    """Whether both Stanford CoreNLP 3.6.0 jars SPICE needs are already in place."""
    lib = spice_lib_dir()
    return all((lib / jar).is_file() for jar in SPICE_JARS)


def require_java() -> None:
    """Raise :class:`MissingDependencyError` unless a ``java`` executable is on the PATH."""
    if shutil.which("java") is None:
        raise MissingDependencyError(
            "java was not found on the PATH; the PTB tokenizer, METEOR and SPICE of pycocoevalcap need it. "
            "Install Java 17 (e.g. `apt-get install openjdk-17-jre-headless`) and retry."
        )


def _select_metrics(metrics: Sequence[str] | None, spice: str) -> tuple[str, ...]:
    """Resolve ``metrics`` and the SPICE policy into the metric families to run (warns at most once)."""
    if spice not in SPICE_MODES:
        raise ValueError(f"spice={spice!r} is not known; use one of {SPICE_MODES}.")
    selected = METRICS if metrics is None else tuple(metrics)
    unknown = [name for name in selected if name not in METRICS]
    if unknown:
        raise ValueError(f"metrics: unknown names {unknown}; choose from {METRICS}.")
    if "SPICE" in selected and (spice == "off" or not spice_available()):
        if spice == "on":
            raise MissingDependencyError(
                f"SPICE was requested but its Stanford CoreNLP 3.6.0 jars ({', '.join(SPICE_JARS)}) are not in "
                f"{spice_lib_dir()}. Copy them there from stanford-corenlp-full-2015-12-09.zip "
                "(https://nlp.stanford.edu/software/), or pass spice='auto' / --spice auto to skip SPICE."
            )
        if spice == "auto":
            warnings.warn(
                f"SPICE skipped: the Stanford CoreNLP 3.6.0 jars are not in {spice_lib_dir()} and will not be "
                "downloaded. Copy them there to get SPICE, or pass spice='off' to silence this warning.",
                stacklevel=3,
            )
        selected = tuple(name for name in selected if name != "SPICE")
    return selected


def _tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """PTB-tokenise raw strings with pycocoevalcap's tokenizer (one Java call for everything)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenized = PTBTokenizer().tokenize(
        {key: [{"caption": text} for text in texts] for key, texts in captions.items()}
    )
    # The tokenizer drops keys whose list is empty; restore them so lookups never fail.
    return {key: tokenized.get(key, []) for key in captions}


@contextlib.contextmanager
def _scorers(selected: tuple[str, ...]) -> Iterator[list]:
    """Build the pycocoevalcap scorers once; stop METEOR's Java process when done."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    factories = {"Bleu": lambda: Bleu(4), "METEOR": Meteor, "ROUGE_L": Rouge, "CIDEr": Cider}
    if "SPICE" in selected:
        from pycocoevalcap.spice.spice import Spice

        factories["SPICE"] = Spice
    scorers = [(name, factories[name]()) for name in METRICS if name in selected]
    try:
        yield scorers
    finally:
        for name, scorer in scorers:
            if name == "METEOR":
                process = scorer.meteor_p
                process.kill()
                process.wait()
                for pipe in (process.stdin, process.stdout, process.stderr):
                    pipe.close()


def _run(
    scorers: list, gts: dict[Hashable, list[str]], res: dict[Hashable, list[str]]
) -> tuple[dict[str, float], dict[Hashable, dict[str, float]]]:
    overall: dict[str, float] = {}
    per_image: dict[Hashable, dict[str, float]] = {key: {} for key in gts}
    for name, scorer in scorers:
        if name == "Bleu":
            score, scores = scorer.compute_score(gts, res, verbose=0)
            for order in range(4):
                overall[f"Bleu_{order + 1}"] = float(score[order])
                for key, value in zip(gts, scores[order]):
                    per_image[key][f"Bleu_{order + 1}"] = float(value)
            continue
        score, scores = scorer.compute_score(gts, res)
        overall[name] = float(score)
        if name == "SPICE":
            # SPICE returns per-image dictionaries of sub-scores; its headline number is the "All" F-score.
            scores = [value["All"]["f"] for value in scores]
            keys = sorted(gts)  # SPICE orders its per-image output by sorted image id
        else:
            keys = list(gts)
        for key, value in zip(keys, scores):
            per_image[key][name] = float(value)
    return overall, per_image


def _ids(ids: set) -> str:
    return ", ".join(repr(i) for i in sorted(ids, key=str)[:5]) + (" ..." if len(ids) > 5 else "")


def _check_references(references: Mapping[Hashable, Sequence[str]]) -> None:
    if not references:
        raise ValueError("references: no images to score.")
    for key, refs in references.items():
        if isinstance(refs, str) or not refs or not all(isinstance(ref, str) for ref in refs):
            raise ValueError(
                f"references[{key!r}]: expected a non-empty list of caption strings, got {refs!r}."
            )


def _check_pairs(references: Mapping[Hashable, Sequence[str]], predictions: Mapping[Hashable, str]) -> None:
    """Refuse empty references, ids that differ between references and predictions, non-string captions."""
    _check_references(references)
    missing, extra = set(references) - set(predictions), set(predictions) - set(references)
    if missing or extra:
        found = ((missing, "images have no prediction"), (extra, "predictions have no references"))
        problems = [f"{len(ids)} {what} ({_ids(ids)})" for ids, what in found if ids]
        raise ValueError(f"predictions: {'; '.join(problems)}. Predict exactly the images of the references.")
    wrong = [key for key, text in predictions.items() if not isinstance(text, str)]
    if wrong:
        raise ValueError(f"predictions: captions must be strings; images {_ids(set(wrong))} are not.")


def _tokenized_pairs(
    references: Mapping[Hashable, Sequence[str]], predictions: Mapping[Hashable, str]
) -> tuple[dict[Hashable, list[str]], dict[Hashable, list[str]]]:
    """PTB-tokenise references and predictions in one Java call: ``(gts, res)``, in the references' order."""
    keys = list(references)
    tokenized = _tokenize(
        {**{("ref", k): references[k] for k in keys}, **{("hyp", k): [predictions[k]] for k in keys}}
    )
    gts = {key: tokenized[("ref", key)] for key in keys}
    res = {key: tokenized[("hyp", key)] for key in keys}
    return gts, res


def score_captions(
    references: Mapping[Hashable, Sequence[str]],
    predictions: Mapping[Hashable, str],
    spice: str = "auto",
    metrics: Sequence[str] | None = None,
) -> tuple[dict[str, float], dict[Hashable, dict[str, float]]]:
    """Score one predicted caption per image against raw reference captions, as COCOEvalCap does.

    Args:
        references: image id -> raw reference strings (untokenised, as in COCO ``captions_*.json``).
        predictions: image id -> one raw predicted string (may be empty); the ids must equal those of
            ``references``.
        spice: ``"auto"`` runs SPICE if its jars are present, else warns once and leaves it out; ``"on"``
            requires it (:class:`MissingDependencyError` without the jars); ``"off"`` skips it silently.
        metrics: a subset of :data:`METRICS` to compute (default: all).

    Returns:
        ``(overall, per_image)``: overall scores keyed like pycocoevalcap, and per image id the same keys.
        Image order (which fixes float summation order) follows ``references``.

    Raises:
        ValueError: ids not matching, empty references, non-string captions, unknown options.
        MissingDependencyError: no ``java``, or SPICE required and unavailable.
    """
    _check_pairs(references, predictions)
    selected = _select_metrics(metrics, spice)
    require_java()
    gts, res = _tokenized_pairs(references, predictions)
    with _scorers(selected) as scorers:
        return _run(scorers, gts, res)


def domain_order(domains: Mapping[Hashable, str]) -> list[str]:
    """The distinct domains of ``domains``: nocaps' three in their usual order, then any others sorted."""
    present = set(domains.values())
    return [d for d in NOCAPS_DOMAINS if d in present] + sorted(present - set(NOCAPS_DOMAINS))


def score_captions_by_domain(
    references: Mapping[Hashable, Sequence[str]],
    predictions: Mapping[Hashable, str],
    domains: Mapping[Hashable, str],
    spice: str = "auto",
    metrics: Sequence[str] | None = None,
) -> tuple[dict[str, dict[str, float]], dict[Hashable, dict[str, float]]]:
    """Score every domain on its own and all images together: the nocaps protocol.

    nocaps reports each metric on the in-domain, near-domain and out-domain images separately and on all of
    them ("overall"; the evaluation server calls it "entire"). Each domain is scored as if its images were the
    whole ground truth, so CIDEr's document frequencies come from that domain's references: the result equals
    :func:`score_captions` on the domain's subset. Tokenisation (one Java call) and the METEOR process are
    shared.

    Args:
        references, predictions, spice, metrics: as in :func:`score_captions`.
        domains: image id -> its domain; every image of ``references`` needs one.

    Returns:
        ``(scores, per_image)``: domain -> scores (in :func:`domain_order`), then ``"overall"`` -> scores;
        per-image scores are those of the overall run.
    """
    unassigned = set(references) - set(domains)
    if unassigned:
        raise ValueError(f"domains: {len(unassigned)} images ({_ids(unassigned)}) have no domain.")
    _check_pairs(references, predictions)
    selected = _select_metrics(metrics, spice)
    require_java()
    gts, res = _tokenized_pairs(references, predictions)
    scores: dict[str, dict[str, float]] = {}
    with _scorers(selected) as scorers:
        for domain in domain_order({key: domains[key] for key in references}):
            keys = [key for key in gts if domains[key] == domain]  # references' order, as the subset file
            scores[domain], _ = _run(scorers, {k: gts[k] for k in keys}, {k: res[k] for k in keys})
        scores[OVERALL], per_image = _run(scorers, gts, res)
    return scores, per_image


def human_consensus(
    references: Mapping[Hashable, Sequence[str]], spice: str = "auto", metrics: Sequence[str] | None = None
) -> dict[str, float]:
    """How well humans score against each other: each reference in turn is the "prediction".

    For each j in ``0 .. min(number of references) - 1``, reference j of every image is scored against
    the other references of that image; the overall scores are averaged over j. This gives context for
    model scores (a model scored against all 5 references has one more reference than a human here).

    Args:
        references: image id -> raw reference strings, at least 2 per image.
        spice, metrics: as in :func:`score_captions`.

    Returns:
        Overall scores keyed like pycocoevalcap.
    """
    _check_references(references)
    fewest = min(len(refs) for refs in references.values())
    if fewest < 2:
        short = {key for key, refs in references.items() if len(refs) < 2}
        raise ValueError(
            f"references: images {_ids(short)} have a single reference; human consensus needs >= 2."
        )
    selected = _select_metrics(metrics, spice)
    require_java()
    tokenized = _tokenize(references)
    totals: dict[str, float] = {}
    with _scorers(selected) as scorers:
        for held_out in range(fewest):
            gts = {key: refs[:held_out] + refs[held_out + 1 :] for key, refs in tokenized.items()}
            res = {key: [refs[held_out]] for key, refs in tokenized.items()}
            overall, _ = _run(scorers, gts, res)
            for name, value in overall.items():
                totals[name] = totals.get(name, 0.0) + value
    return {name: total / fewest for name, total in totals.items()}
