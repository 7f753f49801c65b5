"""Frozen word vectors with a tied output layer (CaptionerConfig.word_vectors), as the nocaps baseline's CBS model."""

from __future__ import annotations

import pytest
import torch

from updown.data.base import DataSpec
from updown.data.vocabulary import SPECIAL_TOKENS, Vocabulary
from updown.data.word_vectors import load_caption_word_vectors, missing_word_vector
from updown.models.captioner import CaptionerConfig, UpDownCaptioner
from updown.tasks.captioning import CaptioningTask

WORDS = ["a", "dog", "cat", "horse", "zebra", "red"]
VOCABULARY = Vocabulary([*SPECIAL_TOKENS, *WORDS])
DIM = 6
FEATURES = 5


def write_vectors(path, vectors: dict[str, list[float]]) -> None:
    path.write_text(
        "".join(f"{word} {' '.join(f'{v:.6f}' for v in vector)}\n" for word, vector in vectors.items())
    )


def file_vectors() -> dict[str, list[float]]:
    generator = torch.Generator().manual_seed(3)
    vectors = {word: torch.randn(DIM, generator=generator).tolist() for word in WORDS if word != "red"}
    # A novel word with the same vector as a seen one must score exactly like it.
    vectors["zebra"] = vectors["horse"]
    vectors["unused"] = [1.0] * DIM  # not in the vocabulary: ignored
    return vectors


def config(path) -> CaptionerConfig:
    return CaptionerConfig(embedding_size=DIM, hidden_size=12, attention_size=8, word_vectors=str(path))


def inputs(num_images: int = 3, num_boxes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    features = torch.rand(num_images, num_boxes, FEATURES, generator=generator)
    mask = torch.ones(num_images, num_boxes, dtype=torch.bool)
    mask[0, -1] = False
    return features, mask


def test_vectors_come_from_the_file_and_missing_words_get_the_reference_random_vector(tmp_path):
    path = tmp_path / "vectors.txt"
    write_vectors(path, file_vectors())
    vectors, missing = load_caption_word_vectors(path, VOCABULARY.tokens, DIM)
    assert vectors.shape == (len(VOCABULARY), DIM)
    assert missing == [*SPECIAL_TOKENS, "red"]
    expected = file_vectors()
    for word in ("dog", "zebra"):
        assert torch.allclose(vectors[VOCABULARY.index(word)], torch.tensor(expected[word]), atol=1e-6)
    # 2 * N(0, 1) - 1, seeded by the word: the same whatever the vocabulary's order or size.
    red = vectors[VOCABULARY.index("red")]
    assert torch.equal(red, missing_word_vector("red", DIM))
    other, _ = load_caption_word_vectors(path, [*SPECIAL_TOKENS, "red", "dog"], DIM)
    assert torch.equal(other[4], red)
    assert not torch.equal(missing_word_vector("red", DIM), missing_word_vector("blue", DIM))
    many = torch.stack([missing_word_vector(f"w{i}", 64) for i in range(200)])
    assert abs(many.mean().item() + 1) < 0.05 and abs(many.std().item() - 2) < 0.05


def test_a_file_of_another_dimension_is_refused_naming_the_fix(tmp_path):
    path = tmp_path / "vectors.txt"
    write_vectors(path, file_vectors())
    with pytest.raises(ValueError, match=f"set embedding_size={DIM}"):
        load_caption_word_vectors(path, VOCABULARY.tokens, DIM + 2)


def test_output_layer_is_the_frozen_vectors_times_a_tanh_projection(tmp_path):
    path = tmp_path / "vectors.txt"
    write_vectors(path, file_vectors())
    torch.manual_seed(0)
    model = UpDownCaptioner(len(VOCABULARY), FEATURES, config(path)).eval()
    vectors, _ = load_caption_word_vectors(path, VOCABULARY.tokens, DIM)
    model.set_word_vectors(vectors)
    assert model.output[2].weight is model.embedding.weight
    assert not model.embedding.weight.requires_grad
    features, mask = inputs()
    state = model.init_state(features, mask)
    tokens = torch.full((3,), VOCABULARY.bos_index)
    logprobs, _, _ = model.step(tokens, state)
    # Independent computation of p(y) = softmax(E tanh(W h2 + b)) from the cell's output.
    h2, _, _ = model.cell(vectors[tokens], state, state)
    projection = model.output[0]
    expected = torch.log_softmax(torch.tanh(h2 @ projection.weight.T + projection.bias) @ vectors.T, dim=-1)
    assert torch.allclose(logprobs, expected, atol=1e-5)
    # A word never trained on scores exactly like the seen word whose vector it shares.
    zebra, horse = VOCABULARY.index("zebra"), VOCABULARY.index("horse")
    # (Equal up to the matrix product's rounding, which may differ between rows.)
    assert torch.allclose(logprobs[:, zebra], logprobs[:, horse], rtol=0, atol=1e-6)
    assert not torch.allclose(logprobs[:, zebra], logprobs[:, VOCABULARY.index("dog")], rtol=0, atol=1e-3)
    # Teacher forcing gives the same logits as step.
    captions = torch.tensor([[VOCABULARY.bos_index, VOCABULARY.index("dog"), VOCABULARY.eos_index]] * 3)
    logits = model(features, mask, captions)["logits"]
    assert torch.allclose(torch.log_softmax(logits[:, 0], dim=-1), logprobs, atol=1e-5)


def test_training_moves_the_projection_and_never_the_vectors(tmp_path):
    path = tmp_path / "vectors.txt"
    write_vectors(path, file_vectors())
    torch.manual_seed(0)
    model = UpDownCaptioner(len(VOCABULARY), FEATURES, config(path))
    model.set_word_vectors(load_caption_word_vectors(path, VOCABULARY.tokens, DIM)[0])
    before = model.embedding.weight.detach().clone()
    projection = model.output[0].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.1, momentum=0.9)
    features, mask = inputs()
    captions = torch.tensor([[VOCABULARY.bos_index, VOCABULARY.index("dog"), VOCABULARY.eos_index]] * 3)
    for _ in range(3):
        logits = model(features, mask, captions)["logits"]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), captions[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(model.embedding.weight, before)
    assert not torch.equal(model.output[0].weight, projection)


def test_the_default_captioner_keeps_the_papers_learned_output(tmp_path):
    model = UpDownCaptioner(len(VOCABULARY), FEATURES, CaptionerConfig(embedding_size=DIM, hidden_size=12))
    assert isinstance(model.output, torch.nn.Linear) and model.output.out_features == len(VOCABULARY)
    assert model.embedding.weight.requires_grad
    with pytest.raises(ValueError, match="built without word_vectors"):
        model.set_word_vectors(torch.zeros(len(VOCABULARY), DIM))


def test_a_checkpoint_rebuilds_the_vectors_without_the_file(tmp_path):
    path = tmp_path / "vectors.txt"
    write_vectors(path, file_vectors())
    spec = DataSpec(FEATURES, None, {"caption": VOCABULARY.tokens})
    torch.manual_seed(0)
    task = CaptioningTask(net=config(path))
    task.setup_model(spec)
    task.initialize_from_data()
    expected, _ = load_caption_word_vectors(path, VOCABULARY.tokens, DIM)
    assert torch.equal(task.model.embedding.weight, expected)
    checkpoint = {"state_dict": task.state_dict(), "data_spec": spec.to_checkpoint()}
    path.unlink()  # loading must not need the file

    torch.manual_seed(1)
    restored = CaptioningTask(net=config(path))
    restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(restored.model.embedding.weight, expected)
    assert restored.model.output[2].weight is restored.model.embedding.weight
    features, mask = inputs()
    task.model.eval(), restored.model.eval()
    tokens = torch.full((3,), VOCABULARY.bos_index)
    first = task.model.step(tokens, task.model.init_state(features, mask))[0]
    second = restored.model.step(tokens, restored.model.init_state(features, mask))[0]
    assert torch.equal(first, second)


def test_a_missing_file_is_one_clear_error(tmp_path):
    task = CaptioningTask(net=config(tmp_path / "absent.txt"))
    task.setup_model(DataSpec(FEATURES, None, {"caption": VOCABULARY.tokens}))
    with pytest.raises(
        FileNotFoundError, match="model.init_args.net.word_vectors .*absent.txt: word-vector file"
    ):
        task.initialize_from_data()
