"""The novel-object variant of the synthetic world: the files nocaps-style constrained beam search reads.

With ``SyntheticSpec.held_out_categories`` set, the held-out categories never appear in a training image (so
never in a training caption, as nocaps' out-domain classes are absent from COCO), while half of the validation
and test images show one as their salient object. Beside the usual files the world then writes, in the nocaps /
updown-baseline formats (read by :mod:`updown.data.detections` and :mod:`updown.data.word_forms`):

- ``raw/detections.json``: an "object detector"'s output for every image (COCO-style, ``bbox`` as x1, y1, x2, y2):
  each object with its category, its box and a confidence (the salient object 0.75-0.98, the others 0.35-0.70),
  a coarse-class box (``animal`` / ``vehicle``) overlapping the salient object with IoU > 0.9 and a confidence
  often above the object's own (the class hierarchy must suppress it), and on 30% of the images a ``tree``
  (blacklisted by the reference's filter);
- ``raw/class_hierarchy.json``: ``Entity > Animal / Vehicle > categories``, ``Entity > Plant > Tree``;
- ``raw/constraint_wordforms.tsv``: every class word with its singular and plural;
- ``raw/word_vectors.txt``: GloVe-format vectors (:data:`WORD_VECTOR_SIZE`-d) of every caption and word-form word
  (:func:`word_vectors`), so a held-out noun has a vector close to those of its seen relatives;
- ``references_<split>.json`` (prepared) whose images carry nocaps' ``domain``: ``in-domain`` (no held-out
  object) or ``out-domain`` (a held-out object is the salient one).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from updown.data.synthetic_scenes import CATEGORIES, COLOURS, SIZE_SYNONYMS, SUPERCATEGORIES, Scene, plural
from updown.io import read_json, write_json

#: Fraction of validation / test images whose salient object is a held-out category.
OUT_DOMAIN_FRACTION = 0.5
#: Dimension of the world's word vectors (like glove.6B.50d).
WORD_VECTOR_SIZE = 50
#: A class the detector finds that the reference's filter blacklists.
BLACKLISTED_CLASS = "tree"
IN_DOMAIN, OUT_DOMAIN = "in-domain", "out-domain"


def supercategory(noun: str) -> str:
    return next(name for name, members in SUPERCATEGORIES.items() if noun in members)


def _jitter(
    rng: np.random.Generator, box: Sequence[float], fraction: float, width: int, height: int
) -> list[float]:
    """``box`` with each side moved by up to ``fraction`` of the box size, clipped to the image."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    moved = np.array([x1, y1, x2, y2]) + rng.uniform(-fraction, fraction, 4) * np.array([w, h, w, h])
    return [
        float(np.clip(moved[0], 0, width)),
        float(np.clip(moved[1], 0, height)),
        float(np.clip(moved[2], 0, width)),
        float(np.clip(moved[3], 0, height)),
    ]


def scene_detections(rng: np.random.Generator, scene: Scene) -> list[tuple[str, list[float], float]]:
    """What the world's object detector reports for ``scene``: ``(class name, box x1 y1 x2 y2, confidence)``."""
    detections = []
    for k, obj in enumerate(scene.objects):
        confidence = rng.uniform(0.75, 0.98) if k == 0 else rng.uniform(0.35, 0.70)
        detections.append(
            (obj.noun, _jitter(rng, obj.box, 0.02, scene.width, scene.height), float(confidence))
        )
    salient = scene.objects[0]
    # A coarse-class box on the salient object, often more confident than the fine one; IoU > 0.9 with it.
    detections.append(
        (
            supercategory(salient.noun),
            _jitter(rng, salient.box, 0.01, scene.width, scene.height),
            float(rng.uniform(0.80, 0.99)),
        )
    )
    if rng.random() < 0.3:
        w, h = rng.uniform(0.1, 0.4) * scene.width, rng.uniform(0.2, 0.6) * scene.height
        x, y = rng.uniform(0, scene.width - w), rng.uniform(0, scene.height - h)
        detections.append(
            (
                BLACKLISTED_CLASS,
                [float(x), float(y), float(x + w), float(y + h)],
                float(rng.uniform(0.5, 0.95)),
            )
        )
    return detections


def detection_classes() -> list[str]:
    """Every class the world's detector knows, in category-id order (id 0 is ``__background__``)."""
    return ["__background__", *CATEGORIES, *SUPERCATEGORIES, BLACKLISTED_CLASS]


def write_detections(path: Path, detections: dict[int, list[tuple[str, list[float], float]]]) -> None:
    """The nocaps detections JSON (``categories``, ``images``, ``annotations`` with corner ``bbox`` and ``score``)."""
    classes = detection_classes()
    ids = {name: i for i, name in enumerate(classes)}
    annotations = []
    for image_id, rows in detections.items():
        for name, box, score in rows:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": ids[name],
                    "bbox": [round(v, 2) for v in box],
                    "score": round(score, 4),
                }
            )
    write_json(
        path,
        {
            "categories": [{"id": i, "name": name} for i, name in enumerate(classes)],
            "images": [{"id": image_id} for image_id in detections],
            "annotations": annotations,
        },
    )


def class_hierarchy() -> dict:
    """The Open Images-style hierarchy of the detector's classes, with readable names as in nocaps."""
    return {
        "LabelName": "Entity",
        "Subcategory": [
            *(
                {
                    "LabelName": name.capitalize(),
                    "Subcategory": [{"LabelName": m.capitalize()} for m in members],
                }
                for name, members in SUPERCATEGORIES.items()
            ),
            {"LabelName": "Plant", "Subcategory": [{"LabelName": BLACKLISTED_CLASS.capitalize()}]},
        ],
    }


def word_form_rows() -> list[tuple[str, list[str]]]:
    """nocaps' ``constraint_wordforms.tsv`` rows: every class word with its singular and plural."""
    words = [*CATEGORIES, *SUPERCATEGORIES, BLACKLISTED_CLASS]
    return [(word, list(dict.fromkeys([word, plural(word)]))) for word in words]


def write_word_forms(path: Path) -> None:
    path.write_text(
        "".join(f"{word}\t{','.join(forms)}\n" for word, forms in word_form_rows()), encoding="utf-8"
    )


def word_vectors(rng: np.random.Generator, words: Iterable[str]) -> dict[str, np.ndarray]:
    """GloVe-like vectors (norm 5) built from the world's structure, for every word in ``words``.

    A word's vector is a sum of unit-variance random directions it shares with related words: a category noun
    has half of its variance in its coarse class's direction (animal / vehicle) and half its own, so any two
    animals have cosine ~0.5 and a held-out animal lies as close to the seen animals as they lie to each
    other; a plural is its singular plus a small shared "plural" direction; a colour shares a "colour"
    direction; size synonyms (small / little, large / big) share most of their vector. Other words are random.
    """

    def direction() -> np.ndarray:
        return rng.standard_normal(WORD_VECTOR_SIZE) / np.sqrt(WORD_VECTOR_SIZE)

    shared = {name: direction() for name in ("plural", "colour", *SUPERCATEGORIES, *SIZE_SYNONYMS)}
    base: dict[str, np.ndarray] = {}
    for noun in CATEGORIES:
        base[noun] = np.sqrt(0.5) * shared[supercategory(noun)] + np.sqrt(0.5) * direction()
    for name in SUPERCATEGORIES:
        base[name] = np.sqrt(0.7) * shared[name] + np.sqrt(0.3) * direction()
    for colour in COLOURS:
        base[colour] = np.sqrt(0.5) * shared["colour"] + np.sqrt(0.5) * direction()
    for size, synonyms in SIZE_SYNONYMS.items():
        for synonym in synonyms:
            base[synonym] = np.sqrt(0.8) * shared[size] + np.sqrt(0.2) * direction()
    for noun in [*CATEGORIES, *SUPERCATEGORIES, BLACKLISTED_CLASS]:
        base.setdefault(noun, direction())
        if plural(noun) != noun:
            base[plural(noun)] = np.sqrt(0.85) * base[noun] + np.sqrt(0.15) * shared["plural"]
    vectors = {}
    for word in sorted(set(words)):
        vector = base[word] if word in base else direction()
        vectors[word] = (5.0 * vector / np.linalg.norm(vector)).astype(np.float32)
    return vectors


def write_word_vectors(path: Path, vectors: dict[str, np.ndarray]) -> None:
    """A GloVe text file: ``word v_1 ... v_N`` a line."""
    lines = (f"{word} {' '.join(f'{v:.5f}' for v in vector)}\n" for word, vector in vectors.items())
    path.write_text("".join(lines), encoding="utf-8")


def domains(objects_json: dict, held_out: Sequence[str]) -> dict[int, str]:
    """nocaps domain of every image of a world's ``objects.json``: out-domain iff it shows a held-out category."""
    return {
        int(image_id): OUT_DOMAIN if any(o["category"] in held_out for o in objects) else IN_DOMAIN
        for image_id, objects in objects_json.items()
    }


def add_domains_to_references(
    captions_dir: Path, image_domains: dict[int, str], splits: Sequence[str]
) -> None:
    """Give every image of the prepared ``references_<split>.json`` its nocaps ``domain`` (in place)."""
    for split in splits:
        path = captions_dir / f"references_{split}.json"
        if not path.exists():
            continue
        references = read_json(path, "references JSON")
        for image in references["images"]:
            image["domain"] = image_domains[image["id"]]
        write_json(path, references)


def write_novel_object_files(
    root: Path, detections: dict, vocabulary_words: Iterable[str], seed: int
) -> None:
    """Write the detections, class hierarchy, word forms and word vectors of a novel-object world under ``root``."""
    raw = root / "raw"
    write_detections(raw / "detections.json", detections)
    (raw / "class_hierarchy.json").write_text(json.dumps(class_hierarchy(), indent=1), encoding="utf-8")
    write_word_forms(raw / "constraint_wordforms.tsv")
    form_words = {word for _, forms in word_form_rows() for form in forms for word in form.split()}
    vectors = word_vectors(np.random.default_rng([seed, 2]), {*vocabulary_words, *form_words})
    write_word_vectors(raw / "word_vectors.txt", vectors)
