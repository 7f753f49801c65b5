"""A world with COCO's shapes (``tools/make_coco_shaped.py``), written in the real file formats.

The synthetic world (:mod:`updown.data.synthetic`) is small and learnable; this one has COCO's and VQA v2's sizes
(123,287 images, Karpathy's split, five captions each, 443,757 + 214,354 questions, a caption vocabulary of
about 9,200 words and 3,500 answer classes) so that preprocessing, loading and training can be timed and
their memory measured at scale. Its images reuse the synthetic scenes, features, captions and questions;
captions are lengthened with Zipf-distributed made-up words and half the questions are open ones with
Zipf-distributed answers, to give the vocabularies COCO's sizes. Each image draws from its own generator
(seeded by the world's seed and the image's index), so images can be made in parallel processes and the world
is the same for any number of them. Everything streams: memory stays constant at any size.
"""

from __future__ import annotations

import json
import multiprocessing
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TextIO

import numpy as np

from updown.data.synthetic import FeatureSpace, SyntheticSpec, region_features, vqa_records
from updown.data.synthetic_scenes import Question, make_captions, make_questions, make_scene
from updown.data.vocabulary import tokenize_caption
from updown.data.writers import RegionFeaturesWriter

# COCO 2014 and Karpathy's split of it; VQA v2's question counts on train2014 and val2014.
COCO_TRAIN2014, COCO_VAL2014 = 82_783, 40_504
COCO_IMAGES = COCO_TRAIN2014 + COCO_VAL2014
KARPATHY_VAL, KARPATHY_TEST = 5_000, 5_000
VQA_TRAIN_QUESTIONS, VQA_VAL_QUESTIONS = 443_757, 214_354

# Caption words: COCO captions average 10.5 tokens; the most frequent words are real function words.
COMMON_WORDS = ("a", "on", "of", "the", "in", "with", "and", "is", "man", "to", "sitting", "an", "two", "at")
LEXICON_SIZE = 30_000
CAPTION_ZIPF = 1.3
# Open VQA questions: their answers follow a Zipf law over this many made-up answers.
OPEN_QUESTION_FRACTION = 0.45
ANSWER_LEXICON_SIZE = 20_000
ANSWER_ZIPF = 1.0


def made_up_words(count: int, offset: int = 0) -> list[str]:
    """``count`` distinct pronounceable non-words (consonant-vowel syllables), none a real caption word."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    syllables = [c + v for c in consonants for v in vowels]
    words = []
    index = offset
    while len(words) < count:
        # Three syllables give 70^3 = 343,000 words; the index is written in base 70.
        digits, n = [], index
        for _ in range(3):
            n, digit = divmod(n, len(syllables))
            digits.append(syllables[digit])
        words.append("".join(digits))
        index += 1
    return words


class ZipfSampler:
    """Draws items with probability proportional to ``1 / rank ** exponent``."""

    def __init__(self, items: list[str], exponent: float) -> None:
        self.items = items
        weights = 1.0 / np.arange(1, len(items) + 1) ** exponent
        self.cumulative = np.cumsum(weights) / weights.sum()

    def draw(self, rng: np.random.Generator, count: int) -> list[str]:
        ranks = np.searchsorted(self.cumulative, rng.random(count), side="right")
        return [self.items[min(int(r), len(self.items) - 1)] for r in ranks]


class JSONArrayWriter:
    """Writes ``{**head, key: [item, item, ...], **tail}`` one item at a time (constant memory)."""

    def __init__(self, stream: TextIO, key: str, head: dict, tail: dict | None = None) -> None:
        self.stream, self.tail, self.count = stream, tail or {}, 0
        opening = json.dumps(head)[:-1]
        stream.write(f"{opening}{', ' if head else ''}{json.dumps(key)}: [")

    def add(self, item: dict) -> None:
        self.stream.write((", " if self.count else "") + json.dumps(item))
        self.count += 1

    def close(self) -> None:
        tail = "".join(f", {json.dumps(k)}: {json.dumps(v)}" for k, v in self.tail.items())
        self.stream.write(f"]{tail}}}")
        self.stream.close()


def scaled(count: int, images: int) -> int:
    return round(count * images / COCO_IMAGES)


def split_sizes(images: int) -> dict[str, int]:
    """Images per Karpathy split, in file order (train = train2014; restval, val, test = val2014)."""
    val = max(1, scaled(KARPATHY_VAL, images))
    test = max(1, scaled(KARPATHY_TEST, images))
    train = max(1, scaled(COCO_TRAIN2014, images))
    restval = images - train - val - test
    if restval < 1:
        raise ValueError(f"--images {images} is too few for Karpathy's four splits; use --images 4 or more.")
    return {"train": train, "restval": restval, "val": val, "test": test}


def questions_per_image(total: int, images: int) -> np.ndarray:
    """``images`` counts summing to ``total``, as even as possible (VQA v2 has 5.36 per train image)."""
    edges = (np.arange(images + 1, dtype=np.int64) * total) // images
    return np.diff(edges)


class CocoShapedWorld:
    """What every image draws from: the feature space and the word and answer laws, fixed by the seed.

    Each image then has its own generator, seeded by (seed, image index), so images can be generated in any
    order or in parallel (``--workers``) and the world stays the same.
    """

    def __init__(self, seed: int, min_boxes: int, max_boxes: int, feature_size: int) -> None:
        self.seed = seed
        rng = np.random.default_rng(seed)
        self.spec = SyntheticSpec(
            seed=seed, min_boxes=min_boxes, max_boxes=max_boxes, feature_size=feature_size
        )
        self.space = FeatureSpace(rng, feature_size, self.spec.noise)
        self.caption_words = ZipfSampler(
            [*COMMON_WORDS, *made_up_words(LEXICON_SIZE - len(COMMON_WORDS))], CAPTION_ZIPF
        )
        self.answers = ZipfSampler(made_up_words(ANSWER_LEXICON_SIZE, offset=LEXICON_SIZE), ANSWER_ZIPF)
        self.open_subjects = made_up_words(500, offset=LEXICON_SIZE + ANSWER_LEXICON_SIZE)

    def image(self, index: int, image_id: int, num_questions: int) -> dict:
        """One image's features ``(n, D)`` float16, boxes ``(n, 4)``, size, raw captions and questions."""
        rng = np.random.default_rng((self.seed, index))
        scene = make_scene(rng, image_id)
        features, boxes, _, _ = region_features(rng, self.space, scene, self.spec)
        return {
            "features": features.astype(np.float16),
            "boxes": boxes,
            "size": (scene.width, scene.height),
            "captions": self.captions(rng, scene),
            "questions": self.questions(rng, scene, num_questions),
        }

    def captions(self, rng: np.random.Generator, scene) -> list[str]:
        """Five raw captions: a synthetic sentence, lengthened with Zipf-drawn words to 8 + Poisson(2.5)."""
        captions = []
        for sentence in make_captions(rng, scene):
            base = sentence.rstrip(".")
            missing = 8 + int(rng.poisson(2.5)) - len(tokenize_caption(base))
            extra = self.caption_words.draw(rng, max(missing, 1))
            captions.append(f"{base} {' '.join(extra)}" + ("." if sentence.endswith(".") else ""))
        return captions

    def questions(self, rng: np.random.Generator, scene, count: int) -> list[Question]:
        """``count`` questions: the scene's own (colour, size, count, ...) and open ones with Zipf answers."""
        scene_questions: list[Question] = []
        chosen = []
        for _ in range(count):
            if rng.random() < OPEN_QUESTION_FRACTION:
                answer = self.answers.draw(rng, 1)[0]
                wrong = self.answers.draw(rng, 3)
                answers = [answer if rng.random() < 0.8 else wrong[int(rng.integers(3))] for _ in range(10)]
                subject = self.open_subjects[int(rng.integers(len(self.open_subjects)))]
                chosen.append(Question(f"What is the {subject} doing?", answers, "other", "what is the"))
                continue
            if not scene_questions:
                scene_questions = make_questions(rng, scene)
            chosen.append(scene_questions.pop(0))
        return chosen


# Worker processes build the world once (the pool's initializer) and then generate chunks of images by index.
_WORLD: CocoShapedWorld | None = None
# Images per job sent to a worker, and jobs in flight per worker: bounds the images held in memory.
CHUNK = 64
IN_FLIGHT_PER_WORKER = 2


def _start_worker(seed: int, min_boxes: int, max_boxes: int, feature_size: int) -> None:
    global _WORLD
    _WORLD = CocoShapedWorld(seed, min_boxes, max_boxes, feature_size)


def _generate_chunk(jobs: list[tuple[int, int, int]]) -> list[dict]:
    assert _WORLD is not None
    return [_WORLD.image(*job) for job in jobs]


def _generated_images(jobs: list[tuple[int, int, int]], world_args: tuple, workers: int):
    """The images of ``jobs`` in order, made here (``workers`` 0) or in ``workers`` processes.

    At most ``IN_FLIGHT_PER_WORKER * workers`` chunks are pending at once, so a writer slower than the workers
    holds a bounded number of images, not the backlog of the whole world.
    """
    if workers == 0:
        world = CocoShapedWorld(*world_args)
        for job in jobs:
            yield world.image(*job)
        return
    chunks = (jobs[i : i + CHUNK] for i in range(0, len(jobs), CHUNK))
    # A worker that dies makes the pool raise (BrokenProcessPool) instead of waiting forever. Spawned, not forked:
    # the caller holds the HDF5 file open, which a forked child would inherit.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, context, initializer=_start_worker, initargs=world_args) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(_generate_chunk, chunk))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def write_world(
    output: Path,
    images: int,
    seed: int,
    min_boxes: int,
    max_boxes: int,
    feature_size: int,
    progress: bool,
    workers: int = 0,
) -> dict[str, int]:
    """Write the world into ``output`` (a fresh staging folder); returns counts of what was written.

    ``workers`` > 0 generates images in that many processes; this process writes them, in order.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    sizes = split_sizes(images)
    # Sparse ids in COCO's range, so code never confuses an id with a row index.
    image_ids = np.random.default_rng(seed).choice(np.arange(1, 600_000), size=images, replace=False).tolist()
    train2014 = sizes["train"]
    per_image = np.concatenate(
        [
            questions_per_image(scaled(VQA_TRAIN_QUESTIONS, images) or 1, train2014),
            questions_per_image(scaled(VQA_VAL_QUESTIONS, images) or 1, images - train2014),
        ]
    )
    karpathy_split = [s for s, n in sizes.items() for _ in range(n)]
    raw = output / "raw"
    raw.mkdir(parents=True)

    def vqa_writers(subset: str) -> tuple[JSONArrayWriter, JSONArrayWriter]:
        info = {"description": "updown COCO-shaped world (synthetic)", "version": "2.0"}
        questions = JSONArrayWriter(
            open(raw / f"v2_OpenEnded_mscoco_{subset}_questions.json", "w"),
            "questions",
            {"info": info, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": subset},
        )
        annotations = JSONArrayWriter(
            open(raw / f"v2_mscoco_{subset}_annotations.json", "w"),
            "annotations",
            {"info": info, "data_type": "mscoco", "data_subtype": subset},
        )
        return questions, annotations

    karpathy = JSONArrayWriter(open(raw / "dataset_coco.json", "w"), "images", {}, {"dataset": "coco"})
    vqa = {"train2014": vqa_writers("train2014"), "val2014": vqa_writers("val2014")}
    writer = RegionFeaturesWriter(
        output / "features.h5",
        max_boxes,
        feature_size,
        "float16",
        force=True,
        attrs={
            "source": f"updown COCO-shaped world, seed {seed}, {images} images, {min_boxes}-{max_boxes} boxes"
        },
    )
    jobs = [(index, image_id, int(per_image[index])) for index, image_id in enumerate(image_ids)]
    generated = _generated_images(jobs, (seed, min_boxes, max_boxes, feature_size), workers)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    sentence_id = 0
    with writer, Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("COCO-shaped world", total=images)
        for index, (image_id, image) in enumerate(zip(image_ids, generated)):
            subset = "train2014" if index < train2014 else "val2014"
            writer.add(image_id, image["features"], image["boxes"], *image["size"])
            sentences = []
            for caption in image["captions"]:
                sentences.append(
                    {
                        "tokens": tokenize_caption(caption),
                        "raw": caption,
                        "imgid": index,
                        "sentid": sentence_id,
                    }
                )
                sentence_id += 1
            karpathy.add(
                {
                    "filepath": subset,
                    "sentids": [s["sentid"] for s in sentences],
                    "filename": f"COCO_{subset}_{image_id:012d}.jpg",
                    "imgid": index,
                    "split": karpathy_split[index],
                    "sentences": sentences,
                    "cocoid": image_id,
                }
            )
            questions, annotations = vqa[subset]
            for q_index, q in enumerate(image["questions"]):
                question_record, annotation = vqa_records(q, image_id, image_id * 1000 + q_index)
                questions.add(question_record)
                annotations.add(annotation)
            bar.advance(task)
    counts = {"images": images, **{f"karpathy_{s}": n for s, n in sizes.items()}, "captions": sentence_id}
    for subset, (questions, annotations) in vqa.items():
        counts[f"questions_{subset}"] = questions.count
        questions.close()
        annotations.close()
    karpathy.close()
    return counts
