"""The constraints of each image for constrained beam search, from object detections (the nocaps baseline).

:class:`ConstraintConfig` is the captioning task's ``constraints`` argument; :class:`ImageConstraints` turns it
into, per image id, the :class:`~updown.constraints.Constraint` list that
:func:`updown.decoding.constrained_beam_search` takes: the image's detections
(:func:`~updown.data.detections.read_detections`) go through the reference's filter
(:class:`~updown.data.detections.ConstraintFilter`: blacklist, hierarchy suppression, top-k by confidence), each
chosen class becomes its word forms (:class:`~updown.data.word_forms.WordForms`), and the words become token ids
of the captioner's vocabulary.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from updown.config import ClosedUnitInterval, Config, NonNegativeInt
from updown.constraints import MAX_CONSTRAINTS, Constraint
from updown.data.detections import BLACKLIST, ConstraintFilter, Detections, read_detections
from updown.data.vocabulary import Vocabulary
from updown.data.word_forms import WordForms, constraint_token_ids


@dataclasses.dataclass(frozen=True)
class ConstraintConfig(Config):
    """Constrained beam search from object detections, as the nocaps baseline decodes (its values by default).

    Args:
        enabled: decode validation, test and prediction with constrained beam search (False: plain beam search).
        detections_jsonpath: the detector's boxes of the decoded images (nocaps
            ``nocaps_<split>_oi_detector_boxes.json``; ``bbox`` as x1, y1, x2, y2). None: the synthetic world's.
        class_hierarchy_jsonpath: the detector's class hierarchy with readable names (nocaps
            ``class_hierarchy.json``). None: the synthetic world's.
        word_forms_tsvpath: the forms of each constraint word (nocaps ``constraint_wordforms.tsv``). None: the
            synthetic world's. Its words must be in the vocabulary (``tools/prepare_captions.py
            --constraint-words``).
        blacklist: classes never used as constraints; None: the reference's list
            (:data:`updown.data.detections.BLACKLIST`).
        nms_threshold: a box overlapping a box of a more specific class with IoU above this is dropped.
        max_constraints: the most confident remaining classes kept (top-k, at most 3).
        min_constraints_to_satisfy: constraints a caption must satisfy (all of them when an image has fewer).
    """

    enabled: bool = False
    detections_jsonpath: str | None = None
    class_hierarchy_jsonpath: str | None = None
    word_forms_tsvpath: str | None = None
    blacklist: tuple[str, ...] | None = None
    nms_threshold: ClosedUnitInterval = 0.85
    max_constraints: NonNegativeInt = 3
    min_constraints_to_satisfy: NonNegativeInt = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blacklist is not None:
            object.__setattr__(self, "blacklist", tuple(self.blacklist))
        if self.max_constraints > MAX_CONSTRAINTS:
            raise ValueError(
                f"constraints.max_constraints={self.max_constraints}: constrained beam search tracks at most "
                f"{MAX_CONSTRAINTS} constraints per image (the nocaps baseline's 3). Lower it."
            )


@dataclasses.dataclass(frozen=True)
class ConstraintFiles:
    """Where the detections, class hierarchy and word forms are."""

    detections_jsonpath: Path
    class_hierarchy_jsonpath: Path
    word_forms_tsvpath: Path


def resolve_files(config: ConstraintConfig, defaults: ConstraintFiles | None) -> ConstraintFiles:
    """``config``'s paths, each None replaced by the data's own file (``defaults``: the synthetic world's).

    Raises:
        ValueError: a path is None and the data has no such file (real data), naming the option to set.
        FileNotFoundError: a file does not exist.
    """
    paths = {}
    for field in dataclasses.fields(ConstraintFiles):
        given = getattr(config, field.name)
        if given is None and defaults is None:
            raise ValueError(
                f"model.init_args.constraints.{field.name} is not set: constrained beam search on real data needs "
                "the detector's boxes, its class hierarchy and the constraint word forms (nocaps: "
                "nocaps_<split>_oi_detector_boxes.json, class_hierarchy.json, constraint_wordforms.tsv). Set all "
                "three, or constraints.enabled false."
            )
        path = Path(given) if given is not None else getattr(defaults, field.name)
        if not path.is_file():
            raise FileNotFoundError(
                f"model.init_args.constraints.{field.name} {path}: file not found. Check the path."
            )
        paths[field.name] = path
    return ConstraintFiles(**paths)


class ImageConstraints:
    """Image id -> its constraints, read once from the files and cached per image.

    Args:
        config: the filter's settings.
        files: the detections, hierarchy and word forms (:func:`resolve_files`).
        vocabulary: the captioner's vocabulary (constraint words must be in it).
        vocabulary_source: where the vocabulary came from, for messages.
    """

    def __init__(
        self,
        config: ConstraintConfig,
        files: ConstraintFiles,
        vocabulary: Vocabulary,
        vocabulary_source: str = "the checkpoint's vocabulary",
    ) -> None:
        self.files = files
        self.detections: dict[int, Detections] = read_detections(files.detections_jsonpath)
        self.filter = ConstraintFilter.from_file(
            files.class_hierarchy_jsonpath,
            nms_threshold=config.nms_threshold,
            max_constraints=config.max_constraints,
            blacklist=BLACKLIST if config.blacklist is None else frozenset(config.blacklist),
        )
        self.word_forms = WordForms.from_file(files.word_forms_tsvpath)
        self.vocabulary, self.vocabulary_source = vocabulary, vocabulary_source
        self._classes: dict[int, list[str]] = {}
        self._constraints: dict[int, list[Constraint]] = {}

    def class_names(self, image_id: int) -> list[str]:
        """The classes that constrain ``image_id``'s caption, most confident first."""
        if image_id not in self._classes:
            if image_id not in self.detections:
                raise ValueError(
                    f"{self.files.detections_jsonpath}: no detections of image {image_id}. Pass the detections "
                    "file of the decoded split (model.init_args.constraints.detections_jsonpath, or "
                    "--detections for updown.predict)."
                )
            self._classes[image_id] = self.filter.choose(self.detections[image_id])
        return self._classes[image_id]

    def __call__(self, image_ids: list[int]) -> list[list[Constraint]]:
        """The constraints of each image (0 to ``max_constraints`` each), as token ids of the vocabulary."""
        result = []
        for image_id in image_ids:
            if image_id not in self._constraints:
                words = self.word_forms.image_constraints(self.class_names(image_id))
                token_ids = constraint_token_ids(words, self.vocabulary, self.vocabulary_source)
                self._constraints[image_id] = [Constraint(forms) for forms in token_ids]
            result.append(self._constraints[image_id])
        return result
