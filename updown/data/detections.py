"""Object detections -> the object classes that constrain a caption (nocaps' constrained beam search).

The nocaps baseline (Agrawal et al., "nocaps: novel object captioning at scale", ICCV 2019, section 4) decodes
with constrained beam search whose constraints are objects an Open Images detector found in the image. Which
detections become constraints is decided by :class:`ConstraintFilter`, following the updown-baseline rules:

1. drop padding detections (confidence <= 0) and classes on a blacklist (too rare, rarely said, or well covered
   by COCO: ``person``, ``human face``, ``tree``, ...);
2. of two detections whose boxes overlap with IoU above 0.85, drop the one whose class is more generic in the
   Open Images class hierarchy (a ``dog`` box suppresses an ``animal`` box on the same dog); classes of equal
   generality never suppress each other;
3. keep the top-k (3) remaining detections by confidence, rename a few classes to words people say
   (``kitchen & dining room table`` -> ``table``), and drop repeated classes.

"More generic" is the height of the class in the hierarchy: 0 for a leaf, 1 + the largest height of its
subcategories otherwise. Box overlap uses the inclusive pixel convention of the reference
(width = x2 - x1 + 1), so a zero-area box still has a defined IoU.

Deliberate differences from the reference implementation (same results otherwise): a class is looked up by
its exact (case-insensitive) name first; the reference takes the first class in pre-order whose name is a
*substring* of the detected name (so ``carnivore`` could resolve to ``car``), which this module only falls
back to when no class has the exact name. The chosen classes come back ordered by confidence (the reference
returns them in arbitrary set order), and ties in confidence keep detection order.

Files (the nocaps / updown-baseline formats):

- class hierarchy JSON: nested ``{"LabelName": "Entity", "Subcategory": [{"LabelName": "Animal",
  "Subcategory": [...]}, ...]}`` with readable class names (nocaps' ``class_hierarchy.json``); other keys
  (``Part``) are ignored.
- detections JSON (``nocaps_val_oi_detector_boxes.json``): ``{"categories": [{"id", "name"}], "images":
  [{"id"}], "annotations": [{"image_id", "category_id", "bbox": [x1, y1, x2, y2] in pixels, "score"}]}``.
  ``bbox`` is corner format here, not COCO's ``[x, y, w, h]``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from updown.io import read_json

# Classes that never become constraints (updown-baseline's ConstraintFilter.BLACKLIST).
BLACKLIST: frozenset[str] = frozenset(
    {
        "auto part", "bathroom accessory", "bicycle wheel", "boy", "building", "clothing", "door handle",
        "fashion accessory", "footwear", "girl", "hiking equipment", "human arm", "human beard", "human body",
        "human ear", "human eye", "human face", "human foot", "human hair", "human hand", "human head",
        "human leg", "human mouth", "human nose", "land vehicle", "mammal", "man", "person", "personal care",
        "plant", "plumbing fixture", "seat belt", "skull", "sports equipment", "tire", "tree",
        "vehicle registration plate", "wheel", "woman",
    }
)  # fmt: skip

# Class names replaced by what a caption would say (updown-baseline's ConstraintFilter.REPLACEMENTS).
REPLACEMENTS: Mapping[str, str] = {
    "band-aid": "bandaid",
    "wood-burning stove": "wood burning stove",
    "kitchen & dining room table": "table",
    "salt and pepper shakers": "salt and pepper",
    "power plugs and sockets": "power plugs",
    "luggage and bags": "luggage",
}


@dataclass(frozen=True)
class Detections:
    """The detector's output for one image.

    Attributes:
        boxes: (N, 4) float, x1, y1, x2, y2 in pixels.
        class_names: N class names.
        scores: (N,) float confidences; 0 marks a padding row.
    """

    boxes: np.ndarray
    class_names: tuple[str, ...]
    scores: np.ndarray


class ClassHierarchy:
    """Heights of the classes of an Open Images class hierarchy (0 for a leaf).

    Args:
        names: lower-cased class names in pre-order (a class listed under two parents appears twice).
        heights: the height of each entry of ``names``.
        source: where the hierarchy came from, for messages.
    """

    def __init__(self, names: Sequence[str], heights: Sequence[int], source: str = "class hierarchy") -> None:
        self.names, self.heights, self.source = list(names), list(heights), source
        self._height: dict[str, int] = {}
        for name, height in zip(self.names, self.heights):
            self._height.setdefault(name, height)  # first occurrence in pre-order, as the reference

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ClassHierarchy:
        """Read nocaps' readable hierarchy JSON (``{"LabelName", "Subcategory": [...]}``, nested)."""
        root = read_json(path, "class hierarchy JSON")
        names: list[str] = []
        heights: list[int] = []

        def visit(node: object, trail: str) -> int:
            if not isinstance(node, dict) or not isinstance(node.get("LabelName"), str):
                raise ValueError(
                    f'{path}: {trail} is not a class: expected {{"LabelName": str, "Subcategory": [...]}}. '
                    "Use nocaps' class_hierarchy.json (readable names)."
                )
            name = node["LabelName"]
            if name.startswith("/m/"):
                raise ValueError(
                    f"{path}: {trail} names the class by its Open Images id {name!r}; the detections name classes "
                    "in words. Use nocaps' class_hierarchy.json, which has readable names."
                )
            children = node.get("Subcategory", [])
            if not isinstance(children, list):
                raise ValueError(f'{path}: "Subcategory" of {name!r} must be a list of classes.')
            position = len(names)
            names.append(name.lower())
            heights.append(0)
            height = 0
            for index, child in enumerate(children):
                height = max(height, 1 + visit(child, f"{trail} > {name} [{index}]"))
            heights[position] = height
            return height

        visit(root, "the root")
        return cls(names, heights, str(path))

    def height(self, class_name: str) -> int:
        """Height of ``class_name`` (exact name, else the reference's first class whose name it contains).

        Raises:
            KeyError: no class matches.
        """
        name = class_name.lower()
        if name in self._height:
            return self._height[name]
        for candidate, height in zip(self.names, self.heights):
            if candidate in name:
                return height
        raise KeyError(
            f"{self.source}: the detected class {class_name!r} is not in the class hierarchy. Use the hierarchy "
            "of the detector's classes (nocaps: class_hierarchy.json with the Open Images detector), or "
            "blacklist the class."
        )


def box_iou_inclusive(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of ``box`` (4,) with ``others`` (M, 4), corners in pixels counted inclusively (+1), as the reference."""
    width = np.maximum(0.0, np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]) + 1)
    height = np.maximum(0.0, np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]) + 1)
    intersection = width * height
    area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    areas = (others[:, 2] - others[:, 0] + 1) * (others[:, 3] - others[:, 1] + 1)
    return intersection / (area + areas - intersection)


class ConstraintFilter:
    """Chooses the object classes that constrain an image's caption (module docstring, rules 1-3).

    Args:
        hierarchy: class heights (:meth:`ClassHierarchy.from_file`).
        nms_threshold: a box is suppressed by a more specific class's box overlapping it with IoU strictly above
            this (reference: 0.85).
        max_constraints: top-k detections kept by confidence (reference: 3).
        blacklist: classes that never become constraints (lower case).
        replacements: class name -> the name used as a constraint (lower case).
    """

    def __init__(
        self,
        hierarchy: ClassHierarchy,
        nms_threshold: float = 0.85,
        max_constraints: int = 3,
        blacklist: frozenset[str] | set[str] = BLACKLIST,
        replacements: Mapping[str, str] = REPLACEMENTS,
    ) -> None:
        if not 0.0 <= nms_threshold <= 1.0:
            raise ValueError(f"nms_threshold={nms_threshold} must lie in [0, 1] (reference: 0.85).")
        if max_constraints < 0:
            raise ValueError(f"max_constraints={max_constraints} must be >= 0 (reference: 3).")
        self.hierarchy = hierarchy
        self.nms_threshold = nms_threshold
        self.max_constraints = max_constraints
        self.blacklist = frozenset(name.lower() for name in blacklist)
        self.replacements = {key.lower(): value.lower() for key, value in replacements.items()}

    @classmethod
    def from_file(cls, hierarchy_path: str | os.PathLike, **options) -> ConstraintFilter:
        return cls(ClassHierarchy.from_file(hierarchy_path), **options)

    def __call__(self, boxes: np.ndarray, class_names: Sequence[str], scores: np.ndarray) -> list[str]:
        """The constraint class names of one image, most confident first (at most ``max_constraints``).

        Args:
            boxes: (N, 4) x1, y1, x2, y2 in pixels.
            class_names: N detected class names (any case; compared lower-cased).
            scores: (N,) confidences; rows with confidence <= 0 are padding.
        """
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if len(class_names) else np.zeros((0, 4))
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if not len(boxes) == len(class_names) == len(scores):
            raise ValueError(
                f"detections: {len(boxes)} boxes, {len(class_names)} class names and {len(scores)} scores; "
                "give one of each per detection."
            )
        names = [name.lower() for name in class_names]
        candidates = [i for i, name in enumerate(names) if scores[i] > 0 and name not in self.blacklist]
        kept = self._suppress_generic(boxes, names, candidates)
        kept.sort(key=lambda i: (-scores[i], i))
        chosen: list[str] = []
        for i in kept[: self.max_constraints]:
            name = self.replacements.get(names[i], names[i])
            if name not in chosen:  # two boxes of one class are one constraint (so fewer than k may remain)
                chosen.append(name)
        return chosen

    def choose(self, detections: Detections) -> list[str]:
        """:meth:`__call__` on a :class:`Detections`."""
        return self(detections.boxes, detections.class_names, detections.scores)

    def _suppress_generic(self, boxes: np.ndarray, names: list[str], candidates: list[int]) -> list[int]:
        """Indices of ``candidates`` not suppressed by an overlapping box of a strictly more specific class.

        Boxes are visited from the most specific class up; a suppressed box suppresses nothing, so the result
        does not depend on the order among classes of equal height.
        """
        heights = {i: self.hierarchy.height(names[i]) for i in candidates}
        order = sorted(candidates, key=lambda i: heights[i])
        kept: list[int] = []
        suppressed: set[int] = set()
        for position, i in enumerate(order):
            if i in suppressed:
                continue
            kept.append(i)
            later = [j for j in order[position + 1 :] if j not in suppressed and heights[j] > heights[i]]
            if later:
                overlaps = box_iou_inclusive(boxes[i], boxes[later])
                suppressed.update(j for j, iou in zip(later, overlaps) if iou > self.nms_threshold)
        return kept


def read_detections(path: str | os.PathLike) -> dict[int, Detections]:
    """Image id -> :class:`Detections` from a nocaps detections JSON (module docstring).

    Images listed under ``images`` without any detection map to empty detections.
    """
    data = read_json(path, "detections JSON")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(
            f'{path}: expected a JSON object with "categories" and "annotations" (nocaps\' '
            "nocaps_<split>_oi_detector_boxes.json)."
        )
    categories = data.get("categories")
    if not isinstance(categories, list) or not all(
        isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str)
        for c in categories
    ):
        raise ValueError(f'{path}: "categories" must be a list of {{"id": int, "name": str}}.')
    category_names = {category["id"]: category["name"] for category in categories}
    rows: dict[int, list[tuple[list[float], str, float]]] = {}
    for image in data.get("images", []):
        if isinstance(image, dict) and isinstance(image.get("id"), int):
            rows.setdefault(image["id"], [])
    for index, annotation in enumerate(data["annotations"]):
        box = annotation.get("bbox") if isinstance(annotation, dict) else None
        if (
            not isinstance(annotation, dict)
            or not isinstance(annotation.get("image_id"), int)
            or annotation.get("category_id") not in category_names
            or not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box))
            or not isinstance(annotation.get("score", 1.0), (int, float))
        ):
            raise ValueError(
                f'{path}: annotations[{index}] needs an integer "image_id", a "category_id" listed in "categories", '
                'a "bbox" of 4 numbers (x1, y1, x2, y2) and a numeric "score".'
            )
        name = category_names[annotation["category_id"]]
        # A detection without a score counts as certain, as in the reference reader.
        rows.setdefault(annotation["image_id"], []).append(
            ([float(v) for v in box], name, float(annotation.get("score", 1.0)))
        )
    return {
        image_id: Detections(
            boxes=np.array([r[0] for r in image_rows], dtype=np.float64).reshape(-1, 4),
            class_names=tuple(r[1] for r in image_rows),
            scores=np.array([r[2] for r in image_rows], dtype=np.float64),
        )
        for image_id, image_rows in rows.items()
    }
