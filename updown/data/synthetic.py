"""The embedded synthetic world (docs/design.md, section 4), written in the real file formats.

Real COCO features cannot ship with the code, so every command defaults to a world generated here from a
seed: region features in our HDF5 layout (optionally also the original bottom-up TSV, so the converter path
is exercised), a Karpathy-style ``dataset_coco.json``, VQA v2-format question and annotation files with 10
human answers per question, and per-region object labels (``region_object``, ``region_category`` in the
HDF5 file) for measuring attention grounding. The default runs then use data made from these files by the
real preparation code, exactly as they would with COCO.

The world is generated once into a cache folder (``$UPDOWN_DATA``, else the user cache dir), keyed by its
parameters; concurrent first uses are serialised by a lock, and a half-written world is never visible.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from updown.config import Config, NonNegativeFloat, NonNegativeInt, PositiveInt
from updown.data.synthetic_novel import (
    OUT_DOMAIN_FRACTION,
    add_domains_to_references,
    domains,
    scene_detections,
    write_novel_object_files,
)
from updown.data.synthetic_scenes import (
    CATEGORIES,
    COLOURS,
    SIZES,
    Question,
    Scene,
    SceneObject,
    make_captions,
    make_questions,
    make_scene,
)
from updown.data.vocabulary import tokenize_caption
from updown.data.word_forms import WordForms
from updown.data.writers import RegionFeaturesWriter
from updown.io import atomic_outputs, read_json, write_json

# Bump when the generated content or layout changes, so old caches are not reused.
FORMAT_VERSION = 5
SPLITS = ("train", "val", "test")


FeatureDtype = Literal["float16", "float32"]


@dataclass(frozen=True)
class SyntheticSpec(Config):
    """Parameters of a synthetic world; equal specs give byte-identical worlds.

    Attributes:
        seed: seed of everything drawn.
        num_train, num_val, num_test: images per split.
        feature_size: ``D``; 2048 like real bottom-up features.
        min_boxes, max_boxes: each image has a random number of regions in this range (10-36 like the
            adaptive bottom-up features; ``max_boxes=100`` for the 10-100 variant).
        grid: write grid features instead (a ``grid_size`` x ``grid_size`` tiling; HDF5 attribute ``grid_shape``).
        grid_size: cells per side for ``grid``.
        feature_dtype: ``float16`` halves the cache size; the reader returns float32 either way.
        noise: standard deviation of the feature noise.
        held_out_categories: the novel-object variant (:mod:`updown.data.synthetic_novel`): these categories
            (of :data:`~updown.data.synthetic_scenes.CATEGORIES`) never appear in a training image, half of the
            validation and test images show one as their salient object (nocaps' out-domain), and the world
            also writes detections, a class hierarchy, word forms and word vectors for constrained beam search.
            Empty (default): the default world, unchanged.
    """

    seed: NonNegativeInt = 0
    num_train: PositiveInt = 1500
    num_val: NonNegativeInt = 200
    num_test: NonNegativeInt = 200
    feature_size: PositiveInt = 2048
    min_boxes: PositiveInt = 10
    max_boxes: PositiveInt = 36
    grid: bool = False
    grid_size: PositiveInt = 6
    feature_dtype: FeatureDtype = "float16"
    noise: NonNegativeFloat = 0.5
    held_out_categories: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        # YAML and checkpoints give a list; the spec is hashed and compared, so keep a tuple.
        object.__setattr__(self, "held_out_categories", tuple(self.held_out_categories))
        unknown = [c for c in self.held_out_categories if c not in CATEGORIES]
        if unknown or len(set(self.held_out_categories)) != len(self.held_out_categories):
            raise ValueError(
                f"SyntheticSpec: held_out_categories={list(self.held_out_categories)} must name distinct categories "
                f"of the world ({', '.join(CATEGORIES)}); {unknown or 'one is repeated'}."
            )
        if len(self.held_out_categories) >= len(CATEGORIES) - 1:
            raise ValueError(
                f"SyntheticSpec: held_out_categories holds {len(self.held_out_categories)} of the "
                f"{len(CATEGORIES)} categories; training images need at least two. Hold out fewer."
            )
        if self.held_out_categories and self.grid:
            raise ValueError(
                "SyntheticSpec: held_out_categories (the novel-object world) writes region detections; it needs "
                "region features. Set grid: false."
            )
        if self.min_boxes > self.max_boxes:
            raise ValueError(
                f"SyntheticSpec: min_boxes={self.min_boxes} is above max_boxes={self.max_boxes}. Lower min_boxes "
                "or raise max_boxes."
            )

    def key(self) -> str:
        """A short name that changes whenever any parameter (or the format) changes."""
        fields = dataclasses.asdict(self)
        # Fields added after a world's key was published join the key only when set, so the default world keeps
        # its key (and its files, which name it) byte for byte.
        if not self.held_out_categories:
            del fields["held_out_categories"]
        text = json.dumps({**fields, "format": FORMAT_VERSION}, sort_keys=True)
        return "synthetic-" + hashlib.sha1(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class SyntheticWorld:
    """Where a generated world's files are. Raw files mimic the public releases; ``prepared/`` is tool output."""

    root: Path

    @property
    def features_h5path(self) -> Path:
        return self.root / "features.h5"

    @property
    def dataset_coco_jsonpath(self) -> Path:
        return self.root / "raw" / "dataset_coco.json"

    def vqa_questions_jsonpath(self, split: str) -> Path:
        return self.root / "raw" / f"v2_OpenEnded_mscoco_{split}_questions.json"

    def vqa_annotations_jsonpath(self, split: str) -> Path:
        return self.root / "raw" / f"v2_mscoco_{split}_annotations.json"

    @property
    def objects_jsonpath(self) -> Path:
        return self.root / "raw" / "objects.json"

    @property
    def captions_dir(self) -> Path:
        return self.root / "prepared" / "captions"

    # The novel-object variant's files (SyntheticSpec.held_out_categories; updown.data.synthetic_novel).
    @property
    def detections_jsonpath(self) -> Path:
        return self.root / "raw" / "detections.json"

    @property
    def class_hierarchy_jsonpath(self) -> Path:
        return self.root / "raw" / "class_hierarchy.json"

    @property
    def word_forms_tsvpath(self) -> Path:
        return self.root / "raw" / "constraint_wordforms.tsv"

    @property
    def word_vectors_path(self) -> Path:
        return self.root / "raw" / "word_vectors.txt"


class FeatureSpace:
    """Fixed random embeddings of object attributes; a region's feature is a noisy sum of its object's.

    Category, colour, size and coarse position (3 x 3 cells of the box centre) add up, so one region tells
    all attributes of its object, while the mean over regions mixes the objects of an image.
    """

    def __init__(self, rng: np.random.Generator, feature_size: int, noise: float) -> None:
        d = feature_size
        self.category = rng.standard_normal((len(CATEGORIES), d)).astype(np.float32)
        self.colour = rng.standard_normal((len(COLOURS), d)).astype(np.float32)
        self.size = rng.standard_normal((len(SIZES), d)).astype(np.float32)
        self.position = rng.standard_normal((9, d)).astype(np.float32)
        self.background = rng.standard_normal((12, d)).astype(np.float32)
        self.noise = noise

    def object_embedding(self, obj: SceneObject, width: int, height: int) -> np.ndarray:
        cx, cy = obj.centre
        cell = min(int(3 * cy / height), 2) * 3 + min(int(3 * cx / width), 2)
        return (
            self.category[obj.category] + self.colour[obj.colour] + self.size[obj.size] + self.position[cell]
        )

    def realise(self, rng: np.random.Generator, means: np.ndarray) -> np.ndarray:
        """Non-negative features (like ReLU-pooled CNN features) from mean embeddings ``(n, D)``."""
        noisy = means + self.noise * rng.standard_normal(means.shape).astype(np.float32)
        return 0.5 * np.maximum(noisy, 0.0)


def _part_box(rng: np.random.Generator, box, width: int, height: int) -> tuple[float, ...]:
    """A box overlapping ``box`` with 50-90% of its sides, like a duplicate Faster R-CNN detection."""
    x1, y1, x2, y2 = box
    w, h = (x2 - x1) * rng.uniform(0.5, 0.9), (y2 - y1) * rng.uniform(0.5, 0.9)
    px = np.clip(rng.uniform(x1 - 0.1 * w, x2 - 0.9 * w), 0, width - w)
    py = np.clip(rng.uniform(y1 - 0.1 * h, y2 - 0.9 * h), 0, height - h)
    return (px, py, px + w, py + h)


def region_features(rng: np.random.Generator, space: FeatureSpace, scene: Scene, spec: SyntheticSpec):
    """Regions of one scene: features ``(n, D)``, boxes ``(n, 4)``, owning object and its category ``(n,)``.

    Each object gives one strong region and 1-3 weaker part regions; background regions pad the image to a
    random count in ``[min_boxes, max_boxes]``; the order is shuffled, as detections carry no fixed order.
    """
    if spec.grid:
        return _grid_features(rng, space, scene, spec)
    means, boxes, owners = [], [], []
    for k, obj in enumerate(scene.objects):
        embedding = space.object_embedding(obj, scene.width, scene.height)
        means.append(embedding)
        boxes.append(obj.box)
        owners.append(k)
        for _ in range(int(rng.integers(1, 4))):
            means.append(0.6 * embedding)
            boxes.append(_part_box(rng, obj.box, scene.width, scene.height))
            owners.append(k)
    total = max(len(means), int(rng.integers(spec.min_boxes, spec.max_boxes + 1)))
    total = min(total, spec.max_boxes)
    means, boxes, owners = means[:total], boxes[:total], owners[:total]
    for _ in range(total - len(means)):
        means.append(space.background[int(rng.integers(len(space.background)))])
        w, h = rng.uniform(0.1, 0.5) * scene.width, rng.uniform(0.1, 0.5) * scene.height
        x, y = rng.uniform(0, scene.width - w), rng.uniform(0, scene.height - h)
        boxes.append((x, y, x + w, y + h))
        owners.append(-1)
    order = rng.permutation(total)
    features = space.realise(rng, np.stack(means)[order])
    owners = np.asarray(owners, dtype=np.int32)[order]
    categories = np.array([scene.objects[o].category if o >= 0 else -1 for o in owners], dtype=np.int32)
    return features, np.asarray(boxes, dtype=np.float32)[order], owners, categories


def _grid_features(rng: np.random.Generator, space: FeatureSpace, scene: Scene, spec: SyntheticSpec):
    """Grid variant: cells tile the image row-major; a cell shows the smallest object covering its centre."""
    g = spec.grid_size
    cell_w, cell_h = scene.width / g, scene.height / g
    means, boxes, owners = [], [], []
    by_area = sorted(
        range(len(scene.objects)),
        key=lambda k: (
            (scene.objects[k].box[2] - scene.objects[k].box[0])
            * (scene.objects[k].box[3] - scene.objects[k].box[1])
        ),
    )
    for row in range(g):
        for col in range(g):
            cx, cy = (col + 0.5) * cell_w, (row + 0.5) * cell_h
            owner = next(
                (
                    k
                    for k in by_area
                    if scene.objects[k].box[0] <= cx <= scene.objects[k].box[2]
                    and scene.objects[k].box[1] <= cy <= scene.objects[k].box[3]
                ),
                -1,
            )
            if owner >= 0:
                means.append(space.object_embedding(scene.objects[owner], scene.width, scene.height))
            else:
                means.append(space.background[int(rng.integers(len(space.background)))])
            boxes.append((col * cell_w, row * cell_h, (col + 1) * cell_w, (row + 1) * cell_h))
            owners.append(owner)
    owners = np.asarray(owners, dtype=np.int32)
    categories = np.array([scene.objects[o].category if o >= 0 else -1 for o in owners], dtype=np.int32)
    return space.realise(rng, np.stack(means)), np.asarray(boxes, dtype=np.float32), owners, categories


def vqa_records(question: Question, image_id: int, question_id: int) -> tuple[dict, dict]:
    """One question in VQA v2's formats: its entry of the questions file and of the annotations file.

    The majority answer breaks ties by the answer listed first, not by set order (which changes with
    ``PYTHONHASHSEED``).
    """
    annotation = {
        "question_type": question.question_type,
        "multiple_choice_answer": max(question.answers, key=question.answers.count),
        "answers": [
            {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
            for i, a in enumerate(question.answers)
        ],
        "image_id": image_id,
        "answer_type": question.answer_type,
        "question_id": question_id,
    }
    return {"image_id": image_id, "question": question.question, "question_id": question_id}, annotation


def split_of(index: int, spec: SyntheticSpec) -> str:
    if index < spec.num_train:
        return "train"
    return "val" if index < spec.num_train + spec.num_val else "test"


def write_raw_world(
    spec: SyntheticSpec, world: SyntheticWorld, tsv: bool = False, progress: bool = True
) -> None:
    """Write the raw files of a world (features, Karpathy JSON, VQA JSON, object list) into ``world.root``.

    Args:
        spec: the world's parameters.
        world: destination paths.
        tsv: also write the features as an original-layout bottom-up TSV (``raw/features.tsv``).
        progress: show a rich progress bar.
    """
    from rich.progress import Progress

    rng = np.random.default_rng(spec.seed)
    space = FeatureSpace(rng, spec.feature_size, spec.noise)
    held_out = [CATEGORIES.index(c) for c in spec.held_out_categories]
    seen = [c for c in range(len(CATEGORIES)) if c not in held_out]
    # The detector draws from its own generator, so the scenes do not depend on it.
    detector_rng = np.random.default_rng([spec.seed, 1])
    detections = {}
    num_images = spec.num_train + spec.num_val + spec.num_test
    # Sparse, COCO-like ids so code never confuses an id with a row index.
    image_ids = np.sort(rng.choice(np.arange(1, 600_000), size=num_images, replace=False)).tolist()
    rng.shuffle(image_ids)
    karpathy_images, objects_json = [], {}
    questions = {s: [] for s in SPLITS}
    annotations = {s: [] for s in SPLITS}
    tsv_rows = [] if tsv else None
    max_boxes = spec.grid_size**2 if spec.grid else spec.max_boxes
    grid_shape = (spec.grid_size, spec.grid_size) if spec.grid else None
    world.features_h5path.parent.mkdir(parents=True, exist_ok=True)
    writer = RegionFeaturesWriter(
        world.features_h5path,
        max_boxes,
        spec.feature_size,
        spec.feature_dtype,
        extras=("region_object", "region_category"),
        grid_shape=grid_shape,
        force=True,
        attrs={
            "source": f"updown synthetic world {spec.key()}",
            "region_category_names": json.dumps(CATEGORIES),
        },
    )
    with writer, Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("Generating the synthetic world", total=num_images)
        for index, image_id in enumerate(image_ids):
            split = split_of(index, spec)
            if not held_out:
                scene = make_scene(rng, image_id)
            elif split != "train" and rng.random() < OUT_DOMAIN_FRACTION:
                scene = make_scene(rng, image_id, seen, salient_categories=held_out)
            else:
                scene = make_scene(rng, image_id, seen)
            if held_out:
                detections[image_id] = scene_detections(detector_rng, scene)
            features, boxes, owners, categories = region_features(rng, space, scene, spec)
            # Round once to the stored precision, so the TSV holds exactly what the HDF5 file holds.
            features = features.astype(spec.feature_dtype)
            writer.add(
                image_id,
                features,
                boxes,
                scene.width,
                scene.height,
                region_object=owners,
                region_category=categories,
            )
            if tsv_rows is not None:
                tsv_rows.append((image_id, scene.width, scene.height, boxes, features))
            captions = make_captions(rng, scene)
            karpathy_images.append(
                {
                    "filepath": "synthetic",
                    "filename": f"synthetic_{image_id:012d}.jpg",
                    "imgid": index,
                    "split": split,
                    "cocoid": image_id,
                    "sentences": [
                        {"raw": c, "tokens": tokenize_caption(c), "imgid": index} for c in captions
                    ],
                }
            )
            objects_json[str(image_id)] = [
                {"category": o.noun, "colour": COLOURS[o.colour], "size": SIZES[o.size], "box": list(o.box)}
                for o in scene.objects
            ]
            for q_index, q in enumerate(make_questions(rng, scene)):
                question_record, annotation = vqa_records(q, image_id, image_id * 10 + q_index)
                questions[split].append(question_record)
                annotations[split].append(annotation)
            bar.advance(task)
    sentence_id = 0
    for image in karpathy_images:
        image["sentids"] = []
        for sentence in image["sentences"]:
            sentence["sentid"] = sentence_id
            image["sentids"].append(sentence_id)
            sentence_id += 1
    write_json(world.dataset_coco_jsonpath, {"images": karpathy_images, "dataset": "coco"})
    write_json(world.objects_jsonpath, objects_json)
    info = {"description": f"updown synthetic world {spec.key()}", "version": "2.0"}
    for split in SPLITS:
        write_json(
            world.vqa_questions_jsonpath(split),
            {
                "info": info,
                "task_type": "Open-Ended",
                "data_type": "mscoco",
                "data_subtype": split,
                "questions": questions[split],
            },
        )
        write_json(
            world.vqa_annotations_jsonpath(split),
            {
                "info": info,
                "data_type": "mscoco",
                "data_subtype": split,
                "annotations": annotations[split],
            },
        )
    if tsv_rows is not None:
        _write_tsv(world.root / "raw" / "features.tsv", tsv_rows)
    if held_out:
        words = {
            w for image in karpathy_images for sentence in image["sentences"] for w in sentence["tokens"]
        }
        write_novel_object_files(world.root, detections, words, spec.seed)


def _write_tsv(path: Path, rows) -> None:
    from updown.data.tsv import TSVImage, write_original_tsv

    images = (TSVImage(i, w, h, b, f.astype(np.float32), {}) for i, w, h, b, f in rows)
    write_original_tsv(path, images)


def _write_cider_document_frequencies(images, captions_dir: Path) -> None:
    """What ``tools/build_cider_df.py`` writes for real data: CIDEr-D document frequencies of the training
    references, for the SCST reward, with and without ``<eos>`` as a word."""
    from updown.metrics.cider import CiderD

    references = {image.image_id: image.tokens for image in images if image.split == "train"}
    for eos_as_word, name in ((False, "cider_df.json"), (True, "cider_df_eos.json")):
        CiderD.from_references(references, eos_as_word=eos_as_word, cache_references=False).save(
            captions_dir / name
        )


def default_data_root() -> Path:
    """``$UPDOWN_DATA`` if set, else the user cache folder (e.g. ``~/.cache/updown``)."""
    if os.environ.get("UPDOWN_DATA"):
        return Path(os.environ["UPDOWN_DATA"])
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("updown"))


def ensure_synthetic_world(
    spec: SyntheticSpec | None = None, data_root: str | os.PathLike | None = None, progress: bool = True
) -> SyntheticWorld:
    """Return the cached world of ``spec``, generating and preparing it on first use.

    Safe when several processes start at once: one generates under a lock into a temporary folder and
    renames it into place; the others wait and reuse it.
    """
    from updown.data.caption_preparation import load_karpathy, prepare_captions

    spec = spec or SyntheticSpec()
    root = Path(data_root) if data_root is not None else default_data_root()
    root.mkdir(parents=True, exist_ok=True)
    world = SyntheticWorld(root / spec.key())
    done = world.root / "DONE"
    if done.exists():
        return world
    with open(root / f"{spec.key()}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return world
        # A folder without DONE is what an older, interrupted version left: start again.
        shutil.rmtree(world.root, ignore_errors=True)
        # Written into a staging folder renamed into place when complete: a half-written world is never visible.
        with atomic_outputs(world.root) as staging_root:
            staging = SyntheticWorld(staging_root)
            write_raw_world(spec, staging, progress=progress)
            images = load_karpathy(staging.dataset_coco_jsonpath)
            if spec.held_out_categories:
                # nocaps: the constraint words join the vocabulary whatever their count, or no model could write them.
                form_words = WordForms.from_file(staging.word_forms_tsvpath).vocabulary_words()
                prepare_captions(images, staging.captions_dir, extra_words=form_words)
                image_domains = domains(read_json(staging.objects_jsonpath), spec.held_out_categories)
                add_domains_to_references(staging.captions_dir, image_domains, ("val", "test"))
            else:
                prepare_captions(images, staging.captions_dir)
            _write_cider_document_frequencies(images, staging.captions_dir)
            write_json(staging.root / "DONE", dataclasses.asdict(spec))
    return world
