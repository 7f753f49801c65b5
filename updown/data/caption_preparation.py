"""Prepare caption data from the public releases (docs/design.md, section 2.2).

``tools/prepare_captions.py`` is its CLI.

Inputs: Karpathy's ``dataset_coco.json`` (splits train, restval, val, test), or COCO ``captions_*.json``
files plus image-id split lists. Outputs, in one folder:

- ``captions.json``: ``{"images": [{"image_id", "split", "captions": [raw str], "tokens": [[str]]}]}``;
- ``vocabulary.json``: words with count >= ``min_count`` over the vocabulary splits (train + restval);
- ``references_<split>.json`` per evaluation split: COCO-format ground truth with the RAW strings, which
  is what the official scorer tokenises and scores against.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from updown.data.vocabulary import Vocabulary, tokenize_caption
from updown.io import atomic_outputs, read_json, write_json


@dataclass
class ImageCaptions:
    """The captions of one image: raw strings and their tokens, in the same order."""

    image_id: int
    split: str
    captions: list[str]
    tokens: list[list[str]]


def load_karpathy(dataset_jsonpath: str | os.PathLike) -> list[ImageCaptions]:
    """Read Karpathy's ``dataset_coco.json`` (uses its ``tokens``; tokenises ``raw`` where tokens are absent)."""
    data = read_json(dataset_jsonpath, "Karpathy dataset JSON")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(
            f"{dataset_jsonpath}: expected an object with an 'images' list (Karpathy's dataset_coco.json)."
        )
    images = []
    position_of: dict[int, int] = {}
    for position, image in enumerate(data["images"]):
        try:
            image_id, split, raws, tokens = _karpathy_image(image)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{dataset_jsonpath}: images[{position}] lacks a valid field ({error!r}); each image needs an integer "
                "'cocoid', a string 'split' and 'sentences' with a string 'raw' (and 'tokens', a list of strings). "
                "Use the original dataset_coco.json."
            ) from None
        # A repeated image would be trained on twice and scored twice (in two splits, a train/test leak).
        if image_id in position_of:
            raise ValueError(
                f"{dataset_jsonpath}: image {image_id} appears more than once (images[{position_of[image_id]}] and "
                f"images[{position}]). Keep one entry per image."
            )
        position_of[image_id] = position
        _check_captions(image_id, raws, tokens, f"{dataset_jsonpath}: image {image_id} (images[{position}])")
        images.append(ImageCaptions(image_id, split, raws, tokens))
    return images


def _karpathy_image(image) -> tuple[int, str, list[str], list[list[str]]]:
    """The id, split, raw captions and tokens of one entry of Karpathy's ``images``; a wrong type is an error
    (a float id or a number as a caption would silently become another image or another caption)."""
    image_id, split, sentences = image["cocoid"], image["split"], image["sentences"]
    if not isinstance(image_id, int) or isinstance(image_id, bool):
        raise TypeError(f"cocoid {image_id!r} is not an integer")
    if not isinstance(split, str) or not isinstance(sentences, list):
        raise TypeError("'split' must be a string and 'sentences' a list")
    raws, tokens = [], []
    for sentence in sentences:
        raw, words = sentence["raw"], sentence.get("tokens")
        if not isinstance(raw, str):
            raise TypeError(f"raw caption {raw!r} is not a string")
        if words and not (isinstance(words, list) and all(isinstance(w, str) for w in words)):
            raise TypeError(f"tokens {words!r} are not a list of strings")
        raws.append(raw)
        # Karpathy's tokens where the file has them; the same tokenisation of the raw string otherwise.
        tokens.append(list(words) if words else tokenize_caption(raw))
    return image_id, split, raws, tokens


def _check_captions(image_id: int, raws: list[str], tokens: list[list[str]], where: str) -> None:
    """Refuse an image without captions or with a caption that has no words, naming ``where`` it is."""
    if not raws:
        raise ValueError(f"{where} has no captions. Remove the image or add its captions.")
    for raw, words in zip(raws, tokens):
        if not words:
            raise ValueError(f"{where} has a caption with no words ({raw!r}). Remove or fix that caption.")


def read_split_list(path: str | os.PathLike) -> list[int]:
    """Image ids from a split list: one image a line, as an id or a COCO file name (``..._000000011169.jpg``).

    A line may hold several fields (``val2014/COCO_val2014_000000011169.jpg 11169``); the last integer wins.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split list not found. Check the path.")
    ids = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        found = re.findall(r"\d+", line.split()[-1])
        if not found:
            raise ValueError(
                f"{path}: line {number} ({line!r}) holds no image id. Use one id or COCO file name a line."
            )
        ids.append(int(found[-1]))
    return ids


def load_coco_captions(
    captions_jsonpaths: Sequence[str | os.PathLike], split_lists: dict[str, str | os.PathLike]
) -> list[ImageCaptions]:
    """Read COCO ``captions_*.json`` files and assign images to splits from id lists.

    Args:
        captions_jsonpaths: COCO caption annotation files (e.g. train2014 and val2014).
        split_lists: split name -> split list file; images in no list are dropped.
    """
    captions: dict[int, list[str]] = {}
    source: dict[int, str | os.PathLike] = {}  # the file of an image's first caption, for messages
    for path in captions_jsonpaths:
        data = read_json(path, "COCO captions JSON")
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise ValueError(
                f"{path}: expected COCO caption annotations (an object with an 'annotations' list)."
            )
        for annotation in data["annotations"]:
            image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
            caption = annotation.get("caption") if isinstance(annotation, dict) else None
            if not isinstance(image_id, int) or isinstance(image_id, bool) or not isinstance(caption, str):
                raise ValueError(
                    f"{path}: an annotation lacks an integer 'image_id' or a string 'caption': {annotation!r}. "
                    "Use the official COCO captions file."
                )
            captions.setdefault(image_id, []).append(caption)
            source.setdefault(image_id, path)
    images = []
    listed_in: dict[int, str] = {}
    for split, list_path in split_lists.items():
        ids = read_split_list(list_path)
        missing = [i for i in ids if i not in captions]
        if missing:
            raise ValueError(
                f"{list_path}: {len(missing)} image id(s) of split '{split}' have no captions in the given files, "
                f"e.g. {missing[:5]}. Pass the captions file that holds them."
            )
        for i in ids:
            # An image in two splits (or twice in one) would leak training images into evaluation.
            if i in listed_in:
                raise ValueError(
                    f"{list_path}: image {i} is listed again (already in {listed_in[i]}). Put each image in one "
                    "split only, once."
                )
            listed_in[i] = f"{list_path}, split '{split}'"
            tokens = [tokenize_caption(c) for c in captions[i]]
            _check_captions(i, captions[i], tokens, f"{source[i]}: image {i}")
            images.append(ImageCaptions(i, split, captions[i], tokens))
    return images


def coco_references(images: Iterable[ImageCaptions]) -> dict:
    """COCO-format ground truth (raw strings) for the official scorer."""
    images = list(images)
    annotations, next_id = [], 1
    for image in images:
        for caption in image.captions:
            annotations.append({"image_id": image.image_id, "id": next_id, "caption": caption})
            next_id += 1
    return {
        "info": {"description": "references written by updown"},
        "images": [{"id": image.image_id} for image in images],
        "annotations": annotations,
        "type": "captions",
        "licenses": [],
    }


def prepare_captions(
    images: list[ImageCaptions],
    output_dir: str | os.PathLike,
    min_count: int = 5,
    vocabulary_splits: Sequence[str] = ("train", "restval"),
    evaluation_splits: Sequence[str] = ("val", "test"),
    force: bool = True,
    extra_words: Sequence[str] = (),
) -> Vocabulary:
    """Write ``captions.json``, ``vocabulary.json`` and ``references_<split>.json`` into ``output_dir``.

    ``extra_words`` join the vocabulary whatever their count (after the counted words): nocaps' constraint words.

    Raises:
        ValueError: no images, an image with no captions or a caption with no tokens, or no vocabulary split.
    """
    output_dir = Path(output_dir)
    if not images:
        raise ValueError("No images to prepare: the input holds no captions for the requested splits.")
    for image in images:
        if not image.captions:
            raise ValueError(f"Image {image.image_id} has no captions. Remove it or fix the captions file.")
        for raw, tokens in zip(image.captions, image.tokens):
            if not tokens:
                raise ValueError(
                    f"Image {image.image_id} has a caption with no words ({raw!r}). Remove or fix that caption."
                )
    counts = Counter(
        w for image in images if image.split in vocabulary_splits for t in image.tokens for w in t
    )
    if not counts:
        raise ValueError(
            f"No captions in the vocabulary splits {list(vocabulary_splits)}; cannot build a vocabulary."
        )
    vocabulary = Vocabulary.from_counts(counts, min_count, extra_words)
    by_split = {s: [i for i in images if i.split == s] for s in evaluation_splits}
    # All or nothing: the files go to a staging folder and move into output_dir together.
    with atomic_outputs(output_dir, force=force) as staging:
        write_json(
            staging / "captions.json",
            {
                "images": [
                    {"image_id": i.image_id, "split": i.split, "captions": i.captions, "tokens": i.tokens}
                    for i in images
                ]
            },
        )
        vocabulary.save(staging / "vocabulary.json")
        for split, split_images in by_split.items():
            if split_images:
                write_json(staging / f"references_{split}.json", coco_references(split_images))
    return vocabulary


# Karpathy's extra training images: absent from files prepared from COCO split lists (and from the synthetic
# world), so asking for it beside other splits (the default training splits, train + restval) is no error.
OPTIONAL_SPLITS = ("restval",)


def read_prepared_captions(
    captions_jsonpath: str | os.PathLike, splits: Sequence[str]
) -> list[ImageCaptions]:
    """The images of ``splits`` from a prepared ``captions.json``, checked.

    Every split asked for must be in the file (``restval`` may be missing when other splits are asked for too),
    every image must appear once in the whole file, and each image needs as many token lists as captions, none
    empty.

    Raises:
        ValueError: malformed file, an unknown split, an image listed twice, captions and tokens of different
            lengths, or a caption without tokens.
    """
    hint = "Write the file with tools/prepare_captions.py."
    data = read_json(captions_jsonpath, "prepared captions JSON")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(
            f"{captions_jsonpath}: expected an object with an 'images' list. Write it with tools/prepare_captions.py."
        )
    images, position_of, present = [], {}, {}
    for position, item in enumerate(data["images"]):
        image = _prepared_image(item)
        if image is None:
            raise ValueError(
                f"{captions_jsonpath}: images[{position}] lacks 'image_id', 'split', 'captions' or 'tokens' (an "
                f"integer, a string, a list of strings and a list of lists of strings). {hint}"
            )
        if image.image_id in position_of:
            raise ValueError(
                f"{captions_jsonpath}: image {image.image_id} is listed twice (images[{position_of[image.image_id]}] "
                f"and images[{position}]); each image must appear once, in one split. Prepare the captions again."
            )
        position_of[image.image_id] = position
        present[image.split] = present.get(image.split, 0) + 1
        if image.split not in splits:
            continue
        if len(image.tokens) != len(image.captions):
            raise ValueError(
                f"{captions_jsonpath}: image {image.image_id} has {len(image.captions)} captions but "
                f"{len(image.tokens)} token lists; they must correspond one to one. Prepare the captions again."
            )
        if not image.tokens or any(not t for t in image.tokens):
            raise ValueError(
                f"{captions_jsonpath}: image {image.image_id} has a caption with no tokens. "
                "Fix or drop that caption and prepare again."
            )
        images.append(image)
    unknown = [s for s in dict.fromkeys(splits) if s not in present]
    optional = [s for s in unknown if s in OPTIONAL_SPLITS and len(unknown) < len(set(splits))]
    unknown = [s for s in unknown if s not in optional]
    if unknown:
        have = ", ".join(f"{s} ({n} image{'s' if n != 1 else ''})" for s, n in present.items()) or "none"
        raise ValueError(
            f"{captions_jsonpath}: no split {', '.join(repr(s) for s in unknown)}; the file has the splits {have}. "
            "Check the split name (--data.init_args.val_split, test_split, train_splits, or --split)."
        )
    return images


def _prepared_image(item) -> ImageCaptions | None:
    """One entry of a prepared ``captions.json``, or None when a field is missing or of the wrong type."""
    if not isinstance(item, dict):
        return None
    image_id, split, captions, tokens = (item.get(k) for k in ("image_id", "split", "captions", "tokens"))
    if not isinstance(image_id, int) or isinstance(image_id, bool) or not isinstance(split, str):
        return None
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        return None
    if not isinstance(tokens, list) or not all(
        isinstance(t, list) and all(isinstance(w, str) for w in t) for t in tokens
    ):
        return None
    return ImageCaptions(image_id, split, list(captions), [list(t) for t in tokens])
