"""The synthetic novel-object world (SyntheticSpec.held_out_categories) and constrained beam search in the
captioning task and `updown.predict` (docs/novel_objects.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ROOT, synthetic_world_args

from updown.data.detections import ConstraintFilter, read_detections
from updown.data.readers import RegionFeatures
from updown.data.synthetic import SyntheticSpec, ensure_synthetic_world
from updown.data.synthetic_scenes import CATEGORIES, SUPERCATEGORIES
from updown.data.vocabulary import Vocabulary
from updown.data.word_forms import WordForms
from updown.io import read_json

HELD_OUT = ("sheep", "bicycle")
NOVEL_SPEC = SyntheticSpec(
    num_train=60, num_val=16, num_test=16, feature_size=16, held_out_categories=HELD_OUT
)


@pytest.fixture(scope="session")
def novel_world(tmp_path_factory):
    return ensure_synthetic_world(
        NOVEL_SPEC, data_root=tmp_path_factory.mktemp("novel_worlds"), progress=False
    )


def karpathy_images(world) -> list[dict]:
    return read_json(world.dataset_coco_jsonpath)["images"]


def test_held_out_words_never_appear_in_training_captions_or_images(novel_world):
    objects = read_json(novel_world.objects_jsonpath)
    train = [image for image in karpathy_images(novel_world) if image["split"] == "train"]
    assert len(train) == NOVEL_SPEC.num_train
    words = {word for image in train for sentence in image["sentences"] for word in sentence["tokens"]}
    assert not words & {"sheep", "bicycle", "bicycles"}
    assert all(o["category"] not in HELD_OUT for image in train for o in objects[str(image["cocoid"])])
    # ... yet they are in the vocabulary (nocaps: constraint words join it whatever their count).
    vocabulary = Vocabulary.from_file(novel_world.captions_dir / "vocabulary.json")
    assert all(vocabulary.index(word) != vocabulary.unk_index for word in ("sheep", "bicycle", "bicycles"))


def test_out_domain_images_show_a_held_out_object_in_features_labels_and_references(novel_world):
    objects = read_json(novel_world.objects_jsonpath)
    features = RegionFeatures(novel_world.features_h5path)
    names = features.region_category_names
    assert set(HELD_OUT) <= set(names)
    held_out_ids = {names.index(c) for c in HELD_OUT}
    seen_domains = set()
    for split in ("val", "test"):
        references = read_json(novel_world.captions_dir / f"references_{split}.json")
        assert len(references["images"]) == getattr(NOVEL_SPEC, f"num_{split}")
        captions = {}
        for annotation in references["annotations"]:
            captions.setdefault(annotation["image_id"], []).append(annotation["caption"].lower())
        for image in references["images"]:
            scene = objects[str(image["id"])]
            regions = features.extra(image["id"], "region_category")
            shows = {int(c) for c in regions if c >= 0}
            seen_domains.add(image["domain"])
            if image["domain"] == "out-domain":
                # The salient object is held out; its regions carry its label; people name it.
                assert scene[0]["category"] in HELD_OUT
                assert shows & held_out_ids
                assert all(scene[0]["category"] in caption for caption in captions[image["id"]])
            else:
                assert image["domain"] == "in-domain"
                assert not any(o["category"] in HELD_OUT for o in scene)
                assert not shows & held_out_ids
    assert seen_domains == {"in-domain", "out-domain"}


def test_detections_hierarchy_and_word_forms_make_the_salient_object_the_constraint(novel_world):
    """Read by the reference's filter: the coarse 'animal' / 'vehicle' box is suppressed by the hierarchy, 'tree'
    by the blacklist, so the top-1 constraint is the salient object's category."""
    detections = read_detections(novel_world.detections_jsonpath)
    objects = read_json(novel_world.objects_jsonpath)
    assert set(detections) == {int(i) for i in objects}
    classes = {name for d in detections.values() for name in d.class_names}
    assert classes == {*CATEGORIES, *SUPERCATEGORIES, "tree"}
    top1 = ConstraintFilter.from_file(novel_world.class_hierarchy_jsonpath, max_constraints=1)
    coarse_would_win = 0
    for image_id, found in detections.items():
        salient = objects[str(image_id)][0]["category"]
        assert top1.choose(found) == [salient]
        best = found.class_names[int(np.argmax(found.scores))]
        coarse_would_win += best in SUPERCATEGORIES or best == "tree"
    assert coarse_would_win > len(detections) / 4  # the filter's rules matter, not just the confidences
    forms = WordForms.from_file(novel_world.word_forms_tsvpath)
    assert forms.constraint("sheep") == (("sheep",),) and forms.constraint("bicycle") == (
        ("bicycle",),
        ("bicycles",),
    )


def test_word_vectors_cover_the_vocabulary_and_put_held_out_nouns_near_their_relatives(novel_world):
    lines = novel_world.word_vectors_path.read_text().splitlines()
    vectors = {line.split(" ")[0]: np.array([float(v) for v in line.split(" ")[1:]]) for line in lines}
    assert {len(v) for v in vectors.values()} == {50}
    vocabulary = Vocabulary.from_file(novel_world.captions_dir / "vocabulary.json")
    assert set(vocabulary.tokens[4:]) <= set(vectors)

    def cosine(a: str, b: str) -> float:
        return float(vectors[a] @ vectors[b] / np.linalg.norm(vectors[a]) / np.linalg.norm(vectors[b]))

    for noun in HELD_OUT:
        group = next(members for members in SUPERCATEGORIES.values() if noun in members)
        relatives = [c for c in group if c != noun]
        strangers = [c for c in CATEGORIES if c not in group]
        assert min(cosine(noun, r) for r in relatives) > max(cosine(noun, s) for s in strangers)


def test_the_default_world_is_unchanged_and_bad_held_out_categories_are_refused():
    assert SyntheticSpec().key() == "synthetic-19be6814891e"  # the README's world: no new field in its key
    assert SyntheticSpec(held_out_categories=["sheep"]).held_out_categories == ("sheep",)
    with pytest.raises(ValueError, match="held_out_categories=\\['zebra'\\] must name distinct categories"):
        SyntheticSpec(held_out_categories=("zebra",))
    with pytest.raises(ValueError, match="at least two"):
        SyntheticSpec(held_out_categories=CATEGORIES[:11])


def tiny_novel_args(root, data_root, *extra: str) -> list[str]:
    return [
        "--config", str(ROOT / "configs" / "captioning" / "synthetic_novel.yaml"),
        "--trainer.default_root_dir", str(root),
        "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false",
        "--model.init_args.net.hidden_size", "32",
        "--model.init_args.net.attention_size", "16",
        *synthetic_world_args(data_root, NOVEL_SPEC),
        *extra,
    ]  # fmt: skip


def test_fit_and_predict_with_constraints_name_every_detected_object(tmp_path, novel_world):
    """A tiny run of configs/captioning/synthetic_novel.yaml; with constraints on, every caption names its
    image's top detection (also when the model never saw the object), with them off it is plain beam search."""
    from updown.fit import main as fit
    from updown.predict import main as predict
    from updown.tasks.captioning import CaptioningTask

    assert fit(tiny_novel_args(tmp_path / "run", novel_world.root.parent)) == 0
    run = tmp_path / "run" / "lightning_logs" / "version_0"
    checkpoint = run / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    vectors = saved["state_dict"]["model.embedding.weight"]
    assert vectors.shape[1] == 50 and not any("word_vectors" in str(v) for v in saved["state_dict"])
    results = {}
    for switch in ("on", "off"):
        output = tmp_path / f"captions_{switch}.json"
        args = ["captions", "--checkpoint", str(checkpoint), "--split", "val", "--output", str(output)]
        assert predict([*args, "--device", "cpu", "--constraints", switch]) == 0
        results[switch] = json.loads(output.read_text())
    objects = read_json(novel_world.objects_jsonpath)
    references = read_json(novel_world.captions_dir / "references_val.json")
    assert [r["image_id"] for r in results["on"]] == [image["id"] for image in references["images"]]
    assert all(set(r) == {"image_id", "caption"} for r in results["on"])
    forms = WordForms.from_file(novel_world.word_forms_tsvpath)
    for result in results["on"]:
        salient = objects[str(result["image_id"])][0]["category"]
        words = result["caption"].split()
        assert any(form[0] in words for form in forms.constraint(salient)), result
    assert results["on"] != results["off"]

    # The checkpoint decodes the same without the world's word-vector file: the vectors are in its weights.
    novel_world.word_vectors_path.rename(novel_world.word_vectors_path.with_suffix(".moved"))
    try:
        task = CaptioningTask.load_from_checkpoint(checkpoint, map_location="cpu")
        assert torch.equal(task.model.embedding.weight, vectors)
        assert task.constraints.enabled and task.constraints.max_constraints == 1
    finally:
        novel_world.word_vectors_path.with_suffix(".moved").rename(novel_world.word_vectors_path)


def test_constraints_on_the_default_world_are_one_clear_error(tmp_path, tiny_world, capsys):
    from conftest import tiny_captioning_args

    from updown.fit import main as fit

    args = tiny_captioning_args(
        tmp_path,
        tiny_world.root.parent,
        "--trainer.max_epochs",
        "1",
        "--model.init_args.constraints.enabled",
        "true",
    )
    assert fit(args) == 2
    assert "the synthetic world has no detections" in capsys.readouterr().err


def test_constraint_settings_and_files_are_checked_with_clear_errors(tmp_path, novel_world):
    from updown.data.image_constraints import (
        ConstraintConfig,
        ConstraintFiles,
        ImageConstraints,
        resolve_files,
    )

    files = ConstraintFiles(
        novel_world.detections_jsonpath, novel_world.class_hierarchy_jsonpath, novel_world.word_forms_tsvpath
    )
    with pytest.raises(ValueError, match="tracks at most 3 constraints"):
        ConstraintConfig(max_constraints=4)
    with pytest.raises(
        ValueError, match="constraints.detections_jsonpath is not set: constrained beam search on real"
    ):
        resolve_files(ConstraintConfig(enabled=True), None)
    with pytest.raises(
        FileNotFoundError, match="constraints.word_forms_tsvpath .*absent.tsv: file not found"
    ):
        resolve_files(ConstraintConfig(word_forms_tsvpath=str(tmp_path / "absent.tsv")), files)
    assert resolve_files(ConstraintConfig(), files) == files
    vocabulary = Vocabulary.from_file(novel_world.captions_dir / "vocabulary.json")
    constraints = ImageConstraints(ConstraintConfig(max_constraints=3), files, vocabulary)
    objects = read_json(novel_world.objects_jsonpath)
    image_id = next(int(i) for i, scene in objects.items() if scene[0]["category"] == "bicycle")
    chosen = constraints([image_id])[0]
    assert constraints.class_names(image_id)[0] == "bicycle"
    assert chosen[0].word_forms == ((vocabulary.index("bicycle"),), (vocabulary.index("bicycles"),))
    assert len(chosen) == min(3, len({o["category"] for o in objects[str(image_id)]}))
    with pytest.raises(
        ValueError, match="no detections of image 7. Pass the detections file of the decoded split"
    ):
        constraints([7])
    # A vocabulary without the constraint words cannot write them: one error that says how to rebuild it.
    small = Vocabulary(vocabulary.tokens[: vocabulary.index("bicycle")])
    with pytest.raises(KeyError, match="constraint words are not in the vocabulary"):
        ImageConstraints(ConstraintConfig(), files, small)([image_id])
