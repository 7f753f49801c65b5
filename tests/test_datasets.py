from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from updown.data.caption_preparation import read_prepared_captions
from updown.data.datasets import CaptionEvaluationDataset, CaptionTrainingDataset, pad_sequences
from updown.data.readers import RegionFeatures
from updown.data.vocabulary import Vocabulary


def test_training_batches_hold_every_caption_and_each_image_once(tiny_world):
    features = RegionFeatures(tiny_world.features_h5path)
    images = read_prepared_captions(tiny_world.captions_dir / "captions.json", ["train"])
    vocabulary = Vocabulary.from_file(tiny_world.captions_dir / "vocabulary.json")
    dataset = CaptionTrainingDataset(features, images, vocabulary)
    loader = DataLoader(dataset, batch_size=7, collate_fn=dataset.collate, num_workers=0)
    seen_captions = 0
    for batch in loader:
        b = batch["image_features"].shape[0]
        n = batch["caption_tokens"].shape[0]
        assert batch["image_index"].shape == (n,) and int(batch["image_index"].max()) == b - 1
        assert torch.all(batch["caption_tokens"][:, 0] == vocabulary.bos_index)
        lengths = batch["caption_lengths"]
        rows = torch.arange(n)
        assert torch.all(batch["caption_tokens"][rows, lengths - 1] == vocabulary.eos_index)
        for row in range(n):
            assert torch.all(batch["caption_tokens"][row, lengths[row] :] == vocabulary.pad_index)
        seen_captions += n
    assert seen_captions == 5 * len(images)
    # Caption i of an image decodes back to its tokens (known words) in order.
    first = images[0]
    _, captions = dataset[0]
    assert vocabulary.decode(captions[0]) == [
        w if vocabulary.index(w) != 1 else "<unk>" for w in first.tokens[0]
    ]


def test_evaluation_items_carry_raw_references(tiny_world):
    features = RegionFeatures(tiny_world.features_h5path)
    images = read_prepared_captions(tiny_world.captions_dir / "captions.json", ["val"])
    dataset = CaptionEvaluationDataset(features, images)
    batch = dataset.collate([dataset[0], dataset[1]])
    assert batch["references"] == [images[0].captions, images[1].captions]
    assert batch["image_id"].tolist() == [images[0].image_id, images[1].image_id]


def test_pad_sequences():
    tokens, lengths = pad_sequences([[2, 5, 3], [2, 3]], pad_index=0)
    assert tokens.tolist() == [[2, 5, 3], [2, 3, 0]] and lengths.tolist() == [3, 2]


def test_training_captions_come_back_exactly_from_the_flat_token_array(tiny_world):
    # The dataset keeps every caption's tokens in one array with offsets (no per-caption Python lists, which
    # workers would copy): each image's captions must come back as encoding its tokens would give them.
    features = RegionFeatures(tiny_world.features_h5path)
    images = read_prepared_captions(tiny_world.captions_dir / "captions.json", ["train"])
    vocabulary = Vocabulary.from_file(tiny_world.captions_dir / "vocabulary.json")
    dataset = CaptionTrainingDataset(features, images, vocabulary, max_caption_length=6)
    for index, image in enumerate(images):
        regions, captions = dataset[index]
        assert regions.image_id == image.image_id
        assert captions == [vocabulary.encode(tokens[:6]) for tokens in image.tokens]
