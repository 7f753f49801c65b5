"""nocaps constraints: the detection filter, word forms, token ids and constraint words in the vocabulary.

The expected answers are worked out by hand from updown-baseline's ConstraintFilter rules (nocaps-org/
updown-baseline, updown/utils/constraints.py): blacklist and padding removed; a box suppressed by a box of a
strictly lower class in the hierarchy when their inclusive-pixel IoU exceeds 0.85; top-3 by confidence; renames;
duplicates dropped after the top-3 cut.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from updown.data.detections import (
    ClassHierarchy,
    ConstraintFilter,
    box_iou_inclusive,
    read_detections,
)
from updown.data.vocabulary import SPECIAL_TOKENS, Vocabulary
from updown.data.word_forms import WordForms, constraint_token_ids


def _node(name: str, *children: dict) -> dict:
    return {"LabelName": name, "Subcategory": list(children)} if children else {"LabelName": name}


# Heights (0 = leaf): Entity 4; Vehicle 3, Land vehicle 2, Car 1, Limousine 0; Animal 3, Carnivore 2, Dog 0,
# Cat 0, Bear 1, Brown bear 0, Bird 0; Food 1, Hot dog 0; Kitchen & dining room table 0; Person 1, Man 0;
# Fire hydrant 0; Tree 0. Vehicle comes first so that "Car" precedes "Carnivore" in pre-order.
HIERARCHY = _node(
    "Entity",
    _node("Vehicle", _node("Land vehicle", _node("Car", _node("Limousine")))),
    _node(
        "Animal",
        _node("Carnivore", _node("Dog"), _node("Cat"), _node("Bear", _node("Brown bear"))),
        _node("Bird"),
    ),
    _node("Food", _node("Hot dog")),
    _node("Kitchen & dining room table"),
    _node("Person", _node("Man")),
    _node("Fire hydrant"),
    _node("Tree"),
)


@pytest.fixture
def hierarchy_path(tmp_path: Path) -> Path:
    # Parts are not subcategories: the reader must ignore them as the reference does.
    tree = {**HIERARCHY, "Part": [{"LabelName": "Wheel"}]}
    path = tmp_path / "class_hierarchy.json"
    path.write_text(json.dumps(tree))
    return path


@pytest.fixture
def choose(hierarchy_path: Path):
    constraint_filter = ConstraintFilter.from_file(hierarchy_path)

    def run(*detections: tuple[str, list[float], float]) -> list[str]:
        names = [name for name, _, _ in detections]
        boxes = np.array([box for _, box, _ in detections], dtype=np.float64).reshape(-1, 4)
        scores = np.array([score for _, _, score in detections])
        return constraint_filter(boxes, names, scores)

    return run


def test_hierarchy_heights(hierarchy_path: Path) -> None:
    hierarchy = ClassHierarchy.from_file(hierarchy_path)
    expected = {"entity": 4, "vehicle": 3, "land vehicle": 2, "car": 1, "limousine": 0, "animal": 3}
    expected |= {"carnivore": 2, "dog": 0, "bear": 1, "brown bear": 0, "food": 1, "person": 1, "tree": 0}
    assert {name: hierarchy.height(name) for name in expected} == expected
    assert hierarchy.height("DOG") == 0  # case-insensitive
    assert "wheel" not in hierarchy.names  # a Part, not a subcategory
    # No class has this exact name: the reference's rule, the first class in pre-order whose name it
    # contains ("bear", height 1, precedes "brown bear").
    assert hierarchy.height("brown bear cub") == 1
    with pytest.raises(KeyError, match=r"class_hierarchy.json.*'unicorn' is not in the class hierarchy"):
        hierarchy.height("unicorn")


def test_iou_counts_pixels_inclusively() -> None:
    # [0, 0, 99, 99] covers 100 x 100 pixels; [0, 0, 84, 99] covers 85 x 100 inside it: IoU 8500 / 10000.
    assert box_iou_inclusive(np.array([0, 0, 99, 99.0]), np.array([[0, 0, 84, 99.0]]))[0] == 0.85
    # A zero-area box (x1 == x2) is one pixel wide, so its IoU with itself is 1, not 0 / 0.
    assert box_iou_inclusive(np.array([5, 5, 5, 5.0]), np.array([[5, 5, 5, 5.0]]))[0] == 1.0


def test_specific_class_suppresses_generic_overlapping_ones(choose) -> None:
    # dog (height 0) vs animal (3): 98 x 98 = 9604 shared pixels of 2 x 10000, IoU 9604 / 10396 = 0.924 > 0.85,
    # so animal goes although it is the most confident; carnivore (2) has dog's box (IoU 1) and goes too.
    chosen = choose(
        ("dog", [10, 10, 109, 109], 0.6),
        ("animal", [12, 12, 111, 111], 0.9),
        ("carnivore", [10, 10, 109, 109], 0.8),
    )
    assert chosen == ["dog"]


def test_equal_heights_never_suppress_each_other(choose) -> None:
    # dog and cat are both leaves: identical boxes, both kept, most confident first.
    assert choose(("dog", [0, 0, 50, 50], 0.4), ("cat", [0, 0, 50, 50], 0.7)) == ["cat", "dog"]
    # A more generic box never suppresses a more specific one, whatever the confidences.
    assert choose(("animal", [0, 0, 50, 50], 0.99), ("bird", [0, 0, 50, 50], 0.1)) == ["bird"]


def test_suppression_needs_iou_strictly_above_the_threshold(choose) -> None:
    # IoU exactly 0.85 (85 x 100 inside 100 x 100): the reference keeps boxes with IoU <= threshold.
    assert choose(("animal", [0, 0, 99, 99], 0.9), ("dog", [0, 0, 84, 99], 0.5)) == ["animal", "dog"]
    # One pixel column more: IoU 8600 / 10000 = 0.86 > 0.85, animal is suppressed.
    assert choose(("animal", [0, 0, 99, 99], 0.9), ("dog", [0, 0, 85, 99], 0.5)) == ["dog"]


def test_a_suppressed_box_suppresses_nothing(choose) -> None:
    # carnivore [0,0,109,99] (110 x 100) vs dog [0,0,99,99]: IoU 10000 / 11000 = 0.909 -> suppressed by dog.
    # animal [5,0,114,99] vs carnivore: 10500 / 11500 = 0.913, but carnivore is gone; vs dog: 9500 / 11500 =
    # 0.826 <= 0.85, so animal stays.
    chosen = choose(
        ("dog", [0, 0, 99, 99], 0.5),
        ("carnivore", [0, 0, 109, 99], 0.9),
        ("animal", [5, 0, 114, 99], 0.7),
    )
    assert chosen == ["animal", "dog"]


def test_blacklist_padding_top_k_renames_and_duplicates(choose) -> None:
    far = lambda x: [x, 0, x + 40, 40]  # noqa: E731 - disjoint boxes: no suppression here
    chosen = choose(
        ("person", far(0), 0.99),  # blacklisted
        ("Tree", far(100), 0.98),  # blacklisted (names compare lower-cased)
        ("fire hydrant", far(200), 0.0),  # padding row: confidence 0
        ("kitchen & dining room table", far(300), 0.9),  # renamed "table"
        ("Dog", far(400), 0.8),
        ("dog", far(500), 0.7),  # second dog, inside the top 3 ...
        ("cat", far(600), 0.6),  # ... so the 4th-best cat is cut and only 2 constraints remain
        ("bird", far(700), 0.5),
    )
    assert chosen == ["table", "dog"]
    assert choose() == []
    assert choose(("man", far(0), 0.9), ("fire hydrant", far(50), 0.0)) == []


def test_max_constraints_and_threshold_options(hierarchy_path: Path) -> None:
    boxes = np.array([[0, 0, 99, 99], [0, 0, 89, 99], [200, 0, 260, 60]], dtype=float)
    names, scores = ["animal", "bird", "hot dog"], np.array([0.9, 0.2, 0.5])
    # animal/bird IoU 9000 / 10000 = 0.9: suppressed at 0.85, kept at 0.95.
    assert ConstraintFilter.from_file(hierarchy_path)(boxes, names, scores) == ["hot dog", "bird"]
    loose = ConstraintFilter.from_file(hierarchy_path, nms_threshold=0.95, max_constraints=2)
    assert loose(boxes, names, scores) == ["animal", "hot dog"]
    with pytest.raises(ValueError, match="one of each per detection"):
        loose(boxes, names[:2], scores)


def test_exact_class_name_before_the_references_substring_match(choose) -> None:
    # The reference finds "carnivore" by substring and hits "car" (height 1) first, so bear (1) would not
    # suppress it; by its exact name carnivore has height 2 and the overlapping bear suppresses it.
    assert choose(("carnivore", [0, 0, 99, 99], 0.9), ("bear", [0, 0, 99, 99], 0.3)) == ["bear"]


def test_unknown_class_is_a_clear_error(choose) -> None:
    with pytest.raises(KeyError, match="'unicorn' is not in the class hierarchy"):
        choose(("unicorn", [0, 0, 9, 9], 0.9))
    # A blacklisted class is dropped before the hierarchy is consulted (the reference does the same).
    assert choose(("person", [0, 0, 9, 9], 0.9)) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"Subcategory": []}, r"the root is not a class"),
        ({"LabelName": "/m/0bl9f", "Subcategory": []}, r"Open Images id '/m/0bl9f'"),
        (
            {"LabelName": "Entity", "Subcategory": {"LabelName": "Dog"}},
            r'"Subcategory" of \'Entity\' must be a list',
        ),
        (
            {"LabelName": "Entity", "Subcategory": [{"Name": "Dog"}]},
            r"the root > Entity \[0\] is not a class",
        ),
    ],
)
def test_malformed_hierarchy_files(tmp_path: Path, content: dict, message: str) -> None:
    path = tmp_path / "hierarchy.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message) as error:
        ClassHierarchy.from_file(path)
    assert str(path) in str(error.value)
    path.write_text("{")
    with pytest.raises(ValueError, match="hierarchy.json: class hierarchy JSON is not valid JSON"):
        ClassHierarchy.from_file(path)


def test_read_detections(tmp_path: Path, hierarchy_path: Path) -> None:
    data = {
        "categories": [
            {"id": 0, "name": "__background__"},
            {"id": 7, "name": "dog"},
            {"id": 9, "name": "animal"},
        ],
        "images": [{"id": 1}, {"id": 2}],
        "annotations": [
            {"image_id": 1, "category_id": 9, "bbox": [12, 12, 111, 111], "score": 0.9},
            {"image_id": 1, "category_id": 7, "bbox": [10, 10, 109, 109], "score": 0.6},
            {"image_id": 3, "category_id": 7, "bbox": [0, 0, 5, 5]},  # no score: certain
        ],
    }
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(data))
    detections = read_detections(path)
    assert sorted(detections) == [1, 2, 3]
    assert detections[1].class_names == ("animal", "dog")
    np.testing.assert_array_equal(detections[1].boxes, [[12, 12, 111, 111], [10, 10, 109, 109]])
    np.testing.assert_array_equal(detections[1].scores, [0.9, 0.6])
    assert detections[2].boxes.shape == (0, 4) and detections[2].class_names == ()
    assert detections[3].scores.tolist() == [1.0]
    constraint_filter = ConstraintFilter.from_file(hierarchy_path)
    assert [constraint_filter.choose(detections[i]) for i in (1, 2, 3)] == [["dog"], [], ["dog"]]
    data["annotations"][0]["category_id"] = 5
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"boxes.json: annotations\[0\] needs .*\"category_id\" listed"):
        read_detections(path)
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match='"categories" must be a list'):
        read_detections(path)


WORD_FORMS = "dog\tdog,dogs\nfire\tfire\nhydrant\thydrant,hydrants\n\ntable\ttable,tables,\nhot\thot\n"


@pytest.fixture
def word_forms(tmp_path: Path) -> WordForms:
    path = tmp_path / "constraint_wordforms.tsv"
    path.write_text(WORD_FORMS + "Bear\tBear,bears,teddy bear\n")
    return WordForms.from_file(path)


def test_word_forms_of_single_and_multi_word_constraints(word_forms: WordForms) -> None:
    assert word_forms.constraint("dog") == (("dog",), ("dogs",))
    # One form per word, in order: the sequences the reference FSM accepts.
    assert word_forms.constraint("fire hydrant") == (("fire", "hydrant"), ("fire", "hydrants"))
    assert word_forms.constraint("table") == (("table",), ("tables",))  # trailing comma ignored
    # Lower-cased; a form may have several words.
    assert word_forms.constraint("BEAR") == (("bear",), ("bears",), ("teddy", "bear"))
    assert word_forms.image_constraints(["table", "dog"]) == [
        (("table",), ("tables",)),
        (("dog",), ("dogs",)),
    ]
    assert word_forms.vocabulary_words() == sorted(
        {"dog", "dogs", "fire", "hydrant", "hydrants", "table", "tables", "hot", "bear", "bears", "teddy"}
    )
    with pytest.raises(KeyError, match=r"constraint_wordforms.tsv: no word forms for \['dog2'\]"):
        word_forms.constraint("hot dog2")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("dog dog,dogs\n", r"line 1: expected a word, a tab and comma-separated forms"),
        ("dog\tdog\tdogs\n", r"line 1: expected a word, a tab"),
        ("cat\tcat\ndog\t ,\n", r"line 2: the word 'dog' has no forms"),
        ("dog\tdog\ncat\tcat\ndog\tdogs\n", r"lines 1 and 3: the word 'dog' has two different rows"),
        ("\n\n", r"has no rows"),
    ],
)
def test_malformed_word_forms_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "forms.tsv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        WordForms.from_file(path)
    assert str(path) in str(error.value)
    with pytest.raises(FileNotFoundError, match="nope.tsv: word-forms TSV not found"):
        WordForms.from_file(tmp_path / "nope.tsv")


def test_identical_repeated_rows_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "forms.tsv"
    path.write_text("dog\tdog,dogs\r\ndog\tdog,dogs\r\n")
    assert WordForms.from_file(path).constraint("dog") == (("dog",), ("dogs",))


def test_constraint_token_ids(word_forms: WordForms) -> None:
    vocabulary = Vocabulary([*SPECIAL_TOKENS, "a", "dog", "fire", "hydrant", "dogs", "hydrants"])
    constraints = word_forms.image_constraints(["fire hydrant", "dog"])
    assert constraint_token_ids(constraints, vocabulary) == [((6, 7), (6, 9)), ((5,), (8,))]
    with pytest.raises(
        KeyError, match=r"vocab.json: 2 constraint words .*'table', 'tables'.*--constraint-words"
    ):
        constraint_token_ids(word_forms.image_constraints(["table"]), vocabulary, "vocab.json")


def test_vocabulary_with_constraint_words_keeps_counted_indices() -> None:
    counts = Counter({"a": 9, "dog": 6, "on": 6, "rare": 1})
    plain = Vocabulary.from_counts(counts, min_count=5)
    extended = Vocabulary.from_counts(
        counts, min_count=5, extra_words=["hydrant", "dog", "fire", "rare", "<unk>"]
    )
    assert plain.tokens == [*SPECIAL_TOKENS, "a", "dog", "on"]
    # Counted words keep their indices; the others follow sorted, each once (a rare word joins too).
    assert extended.tokens == [*plain.tokens, "fire", "hydrant", "rare"]


def test_prepare_captions_tool_adds_constraint_words(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import prepare_captions

    sentences = [{"raw": "A dog on a sofa."}, {"raw": "a dog near a sofa"}]
    karpathy = {
        "images": [
            {"cocoid": 1, "split": "train", "sentences": sentences},
            {"cocoid": 2, "split": "val", "sentences": [{"raw": "A fire hydrant."}]},
        ]
    }
    (tmp_path / "dataset.json").write_text(json.dumps(karpathy))
    (tmp_path / "forms.tsv").write_text(WORD_FORMS)
    argv = ["--karpathy", str(tmp_path / "dataset.json"), "--min-count", "2", "--output"]
    assert prepare_captions.main([*argv, str(tmp_path / "plain")]) == 0
    assert (
        prepare_captions.main(
            [*argv, str(tmp_path / "nocaps"), "--constraint-words", str(tmp_path / "forms.tsv")]
        )
        == 0
    )
    plain = Vocabulary.from_file(tmp_path / "plain" / "vocabulary.json")
    nocaps = Vocabulary.from_file(tmp_path / "nocaps" / "vocabulary.json")
    assert plain.tokens == [*SPECIAL_TOKENS, "a", "dog", "sofa"]
    assert nocaps.tokens == [*plain.tokens, "dogs", "fire", "hot", "hydrant", "hydrants", "table", "tables"]
    assert (
        prepare_captions.main([*argv, str(tmp_path / "x"), "--constraint-words", str(tmp_path / "no.tsv")])
        == 2
    )
    assert not (tmp_path / "x").exists()
