"""Scenes, captions and questions of the synthetic world (docs/design.md, section 4), as plain objects.

This module decides *what* is in each synthetic image and what people say about it; :mod:`updown.data.synthetic`
turns scenes into region features and writes them in the real file formats. Everything is drawn from one
``numpy.random.Generator``, so a seed fixes the whole world.

The world is built so that it can only be solved by looking at the right regions: every image has 2-5
objects, exactly one of them large (the salient object the captions talk about), and the category, colour,
size and position of each object live in *different* additive parts of its region features. The mean of an
image's regions mixes all objects together, so which colour belongs to which animal (the binding) is only
recoverable from individual regions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CATEGORIES = (
    "dog",
    "cat",
    "horse",
    "bus",
    "car",
    "bird",
    "cow",
    "sheep",
    "elephant",
    "train",
    "boat",
    "bicycle",
)
PLURALS = {"bus": "buses", "sheep": "sheep"}
# The coarse class above each category (the novel-object variant's class hierarchy and word vectors).
SUPERCATEGORIES = {
    "animal": ("dog", "cat", "horse", "bird", "cow", "sheep", "elephant"),
    "vehicle": ("bus", "car", "train", "boat", "bicycle"),
}
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "orange")
SIZES = ("small", "large")
SIZE_SYNONYMS = {"small": ("small", "little"), "large": ("large", "big")}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
IMAGE_SIZES = ((640, 480), (480, 640), (640, 427), (500, 375), (612, 612))


@dataclass
class SceneObject:
    """One object: category, colour, size word, and box (x1, y1, x2, y2) in pixels."""

    category: int
    colour: int
    size: int
    box: tuple[float, float, float, float]

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    @property
    def noun(self) -> str:
        return CATEGORIES[self.category]


@dataclass
class Scene:
    """An image: its size and objects; ``objects[0]`` is the salient (only large) object."""

    image_id: int
    width: int
    height: int
    objects: list[SceneObject]


def plural(noun: str) -> str:
    return PLURALS.get(noun, noun + "s")


def make_scene(
    rng: np.random.Generator,
    image_id: int,
    categories: Sequence[int] | None = None,
    salient_categories: Sequence[int] | None = None,
) -> Scene:
    """Draw an image with 2-5 objects; the first is large, the others small.

    Args:
        rng: the world's generator.
        image_id: the image's id.
        categories: indices into :data:`CATEGORIES` the objects are drawn from (default: all).
        salient_categories: those the large object is drawn from (default: ``categories``); the other objects
            repeat its category or come from ``categories``. The default world passes neither (same draws).
    """
    pool = range(len(CATEGORIES)) if categories is None else categories
    salient_pool = pool if salient_categories is None else salient_categories
    width, height = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
    num_objects = int(rng.integers(2, 6))
    objects = []
    for k in range(num_objects):
        large = k == 0
        # Repeated categories make counting questions non-trivial.
        if k == 0:
            category = int(salient_pool[int(rng.integers(len(salient_pool)))])
        elif rng.random() < 0.2:
            category = objects[0].category
        else:
            category = int(pool[int(rng.integers(len(pool)))])
        scale = rng.uniform(0.4, 0.6) if large else rng.uniform(0.12, 0.25)
        w, h = scale * width * rng.uniform(0.8, 1.2), scale * height * rng.uniform(0.8, 1.2)
        w, h = min(w, width - 1), min(h, height - 1)
        x1, y1 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        objects.append(
            SceneObject(category, int(rng.integers(len(COLOURS))), int(large), (x1, y1, x1 + w, y1 + h))
        )
    return Scene(image_id, int(width), int(height), objects)


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is relative to ``b``, along the axis where their centres differ most."""
    (ax, ay), (bx, by) = a.centre, b.centre
    if abs(ax - bx) >= abs(ay - by):
        return "to the left of" if ax < bx else "to the right of"
    return "above" if ay < by else "below"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _with_article(*words: str) -> str:
    phrase = " ".join(words)
    return f"{_article(phrase)} {phrase}"


def make_captions(rng: np.random.Generator, scene: Scene, count: int = 5) -> list[str]:
    """``count`` raw captions (capitalised, some with a period, as people write them) from varied templates."""
    main = scene.objects[0]
    other = scene.objects[1 + int(rng.integers(len(scene.objects) - 1))]
    colour, noun = COLOURS[main.colour], main.noun
    other_colour = COLOURS[other.colour]
    rel = relation(main, other)

    def size() -> str:
        return str(rng.choice(SIZE_SYNONYMS[SIZES[main.size]]))

    templates = [
        lambda: _with_article(size(), colour, noun),
        lambda: f"{_with_article(colour, noun)} in the picture",
        lambda: f"a photo of {_with_article(colour, noun)}",
        lambda: f"there is {_with_article(size(), colour, noun)} here",
        lambda: f"{_with_article(colour, noun)} {rel} {_with_article(other_colour, other.noun)}",
        lambda: f"{_with_article(size(), noun)} that is {colour}",
        lambda: f"{_with_article(colour, noun)} next to {_with_article(other.noun)}",
        lambda: f"an image of {_with_article(size(), colour, noun)}",
        lambda: f"{_with_article(size(), colour, noun)} {rel} {_with_article(other.noun)}",
    ]
    chosen = rng.choice(len(templates), size=count, replace=False)
    captions = []
    for index in chosen:
        text = templates[index]()
        text = text[0].upper() + text[1:]
        captions.append(text + "." if rng.random() < 0.5 else text)
    return captions


@dataclass
class Question:
    """A VQA question with its 10 human answers and the official question / answer types."""

    question: str
    answers: list[str]
    answer_type: str
    question_type: str


def _noisy_answers(
    rng: np.random.Generator, correct: str, variants: list[str], wrong: list[str]
) -> list[str]:
    """10 human answers: mostly the correct one, some spelled another way, a few wrong."""
    answers = []
    for _ in range(10):
        draw = rng.random()
        if draw < 0.8 or not (variants or wrong):
            answers.append(correct)
        elif draw < 0.92 and variants:
            answers.append(str(rng.choice(variants)))
        else:
            answers.append(str(rng.choice(wrong)) if wrong else correct)
    return answers


def make_questions(rng: np.random.Generator, scene: Scene) -> list[Question]:
    """One question of each kind the scene supports: colour, size, count, existence, relation."""
    counts = {}
    for obj in scene.objects:
        counts[obj.category] = counts.get(obj.category, 0) + 1
    unique = [o for o in scene.objects if counts[o.category] == 1]
    questions = []
    if unique:
        obj = unique[int(rng.integers(len(unique)))]
        colour = COLOURS[obj.colour]
        wrong = [c for c in COLOURS if c != colour]
        questions.append(
            Question(
                f"What color is the {obj.noun}?",
                _noisy_answers(rng, colour, [], wrong),
                "other",
                "what color is the",
            )
        )
        obj = unique[int(rng.integers(len(unique)))]
        size = SIZES[obj.size]
        questions.append(
            Question(
                f"Is the {obj.noun} small or large?",
                _noisy_answers(rng, size, [SIZE_SYNONYMS[size][1]], [s for s in SIZES if s != size]),
                "other",
                "is the",
            )
        )
        a = unique[int(rng.integers(len(unique)))]
        others = [o for o in scene.objects if o is not a]
        b = others[int(rng.integers(len(others)))]
        rel = relation(b, a)
        questions.append(
            Question(
                f"What is {rel} the {a.noun}?",
                _noisy_answers(rng, b.noun, [], [c for c in CATEGORIES if c != b.noun]),
                "other",
                "what is",
            )
        )
    category = scene.objects[int(rng.integers(len(scene.objects)))].category
    n = counts[category]
    noun = plural(CATEGORIES[category])
    questions.append(
        Question(
            f"How many {noun} are there?",
            _noisy_answers(rng, str(n), [NUMBER_WORDS[n]], [str(k) for k in range(1, 6) if k != n]),
            "number",
            "how many",
        )
    )
    # Existence: half the time ask about a category that is absent.
    present = rng.random() < 0.5
    pool = list(counts) if present else [c for c in range(len(CATEGORIES)) if c not in counts]
    category = pool[int(rng.integers(len(pool)))]
    answer = "yes" if present else "no"
    questions.append(
        Question(
            f"Is there {_with_article(CATEGORIES[category])} in the picture?",
            _noisy_answers(rng, answer, [], ["no" if present else "yes"]),
            "yes/no",
            "is there a",
        )
    )
    return questions
