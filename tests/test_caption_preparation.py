from __future__ import annotations

import json

import pytest
from conftest import REALDATA

from updown.data.caption_preparation import (
    ImageCaptions,
    load_coco_captions,
    load_karpathy,
    prepare_captions,
    read_prepared_captions,
    read_split_list,
)
from updown.data.vocabulary import Vocabulary


def test_karpathy_to_prepared_files(tiny_world, tmp_path):
    images = load_karpathy(tiny_world.dataset_coco_jsonpath)
    vocabulary = prepare_captions(images, tmp_path, min_count=5)
    train = read_prepared_captions(tmp_path / "captions.json", ["train"])
    assert len(train) == 60 and all(len(i.captions) == 5 for i in train)
    # The vocabulary counts train(+restval) only: a word is in it iff it occurs >= 5 times there.
    counts = {}
    for image in train:
        for tokens in image.tokens:
            for w in tokens:
                counts[w] = counts.get(w, 0) + 1
    assert set(vocabulary.tokens[4:]) == {w for w, c in counts.items() if c >= 5}
    assert Vocabulary.from_file(tmp_path / "vocabulary.json") == vocabulary
    # The references keep the RAW strings for the official scorer.
    references = json.loads((tmp_path / "references_val.json").read_text())
    val = read_prepared_captions(tmp_path / "captions.json", ["val"])
    assert {a["caption"] for a in references["annotations"]} == {c for i in val for c in i.captions}
    assert {i["id"] for i in references["images"]} == {i.image_id for i in val}


def test_coco_captions_with_real_karpathy_split_lists(tmp_path):
    """The real first-100 COCO val annotations with a split list in the Karpathy list format."""
    captions = REALDATA / "coco-caption" / "samples" / "captions_val2014.first100.json"
    # The sample holds the first 100 caption annotations: 57 images, 1-2+ captions each.
    real_ids = sorted({a["image_id"] for a in json.loads(captions.read_text())["annotations"]})
    karpathy_val = read_split_list(REALDATA / "karpathy" / "karpathy_val_images.txt")
    assert len(karpathy_val) == 5000 and karpathy_val[0] == 11169
    (tmp_path / "train.txt").write_text(
        "\n".join(f"val2014/COCO_val2014_{i:012d}.jpg {i}" for i in real_ids[:45])
    )
    (tmp_path / "val.txt").write_text("\n".join(str(i) for i in real_ids[45:]))
    images = load_coco_captions([captions], {"train": tmp_path / "train.txt", "val": tmp_path / "val.txt"})
    assert len(images) == 57 and sum(len(i.captions) for i in images) == 100
    vocabulary = prepare_captions(images, tmp_path / "out", min_count=2)
    assert vocabulary.index("a") > 3 and len(vocabulary) > 20
    assert (tmp_path / "out" / "references_val.json").exists()
    assert not (tmp_path / "out" / "references_test.json").exists()


def test_bad_inputs_leave_no_output(tmp_path):
    with pytest.raises(ValueError, match="caption with no words"):
        prepare_captions([ImageCaptions(1, "train", ["..."], [[]])], tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    (tmp_path / "d.json").write_text('{"images": [{"split": "train"}]}')
    with pytest.raises(ValueError, match=r"d.json: images\[0\] lacks a valid field"):
        load_karpathy(tmp_path / "d.json")
    (tmp_path / "ids.txt").write_text("1\n999999\n")
    (tmp_path / "c.json").write_text('{"annotations": [{"image_id": 1, "caption": "a dog"}]}')
    with pytest.raises(ValueError, match=r"ids.txt: 1 image id\(s\) of split 'val' have no captions"):
        load_coco_captions([tmp_path / "c.json"], {"val": tmp_path / "ids.txt"})
    with pytest.raises(ValueError, match="no split 'val'; the file has the splits train"):
        prepare_captions([ImageCaptions(1, "train", ["a dog"], [["a", "dog"]])], tmp_path / "p")
        read_prepared_captions(tmp_path / "p" / "captions.json", ["val"])
