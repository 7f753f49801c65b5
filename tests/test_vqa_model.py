"""UpDownVQA: masks, question lengths, GloVe loading, the paper's parameter count, gradients, learning."""

from __future__ import annotations

import gzip

import pytest
import torch
import torch.nn.functional as F

from updown.data.glove import load_glove
from updown.models.vqa import UpDownVQA, VQAConfig

V, A, D, E, HIDDEN, B, R, T = 30, 6, 10, 8, 16, 4, 5, 6


def _model(seed: int = 0, **kwargs) -> UpDownVQA:
    torch.manual_seed(seed)
    model_arguments = {
        k: kwargs.pop(k)
        for k in ("question_only", "word_vectors", "feature_encoder", "grid_shape")
        if k in kwargs
    }
    config = VQAConfig(**{**dict(embedding_size=E, hidden_size=HIDDEN, num_heads=4), **kwargs})
    return UpDownVQA(V, A, D, config, **model_arguments)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool
    )
    lengths = torch.tensor([6, 3, 1, 4])
    tokens = torch.randint(1, V, (B, T), generator=generator)
    tokens[torch.arange(T) >= lengths[:, None]] = 0
    features = torch.rand(B, R, D, generator=generator) * mask.unsqueeze(-1)
    return {
        "image_features": features,
        "image_features_mask": mask,
        "question_tokens": tokens,
        "question_lengths": lengths,
    }


VARIANTS = [
    {"fusion": "product"},
    {"fusion": "cross_attention"},
    {"attention": "product"},
    {"activation": "relu", "attention": "product", "feature_norm": "layer"},
    {"fusion": "cross_attention", "feature_norm": "layer"},
]


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_padded_boxes_get_zero_attention_and_garbage_in_them_changes_nothing(options):
    model = _model(**options).eval()
    batch = _batch()
    mask = batch["image_features_mask"]
    with torch.no_grad():
        output = model(**batch)
        garbage = batch["image_features"].clone()
        garbage[~mask] = 100 * torch.randn(int((~mask).sum()), D)
        garbage[1, 4, 0] = float("nan")
        output_garbage = model(**{**batch, "image_features": garbage})
    assert output["logits"].shape == (B, A) and output["attention"].shape == (B, R)
    assert torch.all(output["attention"][~mask] == 0)
    assert torch.allclose(output["attention"].sum(dim=1), torch.ones(B), atol=1e-6)
    assert torch.equal(output["logits"], output_garbage["logits"])


def _question_alone(model: UpDownVQA, batch: dict, b: int) -> torch.Tensor:
    """The GRU's last state for question ``b`` run on its own, unpadded: the reference ``q``."""
    length = int(batch["question_lengths"][b])
    states, _ = model.gru(model.embedding(batch["question_tokens"][b : b + 1, :length]))
    return states[0, -1]


def test_attention_is_the_softmax_of_gated_tanh_scores_over_real_boxes():
    """a_i = softmax_i(w^T GT([v_i; q])) over real boxes, each score computed on its own concatenation."""
    model = _model().eval()
    batch = _batch()
    with torch.no_grad():
        attention = model(**batch)["attention"]
        for b in range(B):
            question, num_boxes = _question_alone(model, batch, b), int(batch["image_features_mask"][b].sum())
            scores = torch.stack(
                [
                    model.attention.score(
                        model.attention.scorer(torch.cat([batch["image_features"][b, r], question]))
                    )
                    for r in range(num_boxes)
                ]
            ).squeeze(-1)
            assert torch.allclose(attention[b, :num_boxes], torch.softmax(scores, dim=0), atol=1e-6)


def test_product_attention_is_the_softmax_of_projected_products_over_real_boxes():
    """a_i = softmax_i(w^T (f_v(v_i) * f_q(q))) over real boxes (the reproduction's NewAttention), with f the
    ReLU layer and LayerNorm'd features when asked."""
    model = _model(attention="product", activation="relu", feature_norm="layer").eval()
    batch = _batch()
    with torch.no_grad():
        attention = model(**batch)["attention"]
        for b in range(B):
            question, num_boxes = _question_alone(model, batch, b), int(batch["image_features_mask"][b].sum())
            regions = F.layer_norm(
                batch["image_features"][b, :num_boxes],
                (D,),
                model.feature_norm.weight,
                model.feature_norm.bias,
            )
            projected_v = F.relu(
                regions @ model.attention.image_scorer.linear.weight.T
                + model.attention.image_scorer.linear.bias
            )
            projected_q = F.relu(model.attention.question_scorer.linear(question))
            scores = model.attention.score(projected_v * projected_q).squeeze(-1)
            assert torch.allclose(attention[b, :num_boxes], torch.softmax(scores, dim=0), atol=1e-6)


def test_relu_activation_replaces_every_gated_tanh():
    from updown.modules.gated_tanh import GatedTanh, ReLULayer

    for options in (
        {"activation": "relu"},
        {"activation": "relu", "attention": "product"},
        {"activation": "relu", "fusion": "cross_attention"},
    ):
        model = _model(**options)
        assert not any(isinstance(m, GatedTanh) for m in model.modules())
        assert sum(isinstance(m, ReLULayer) for m in model.modules()) >= 3
    # ReLU layers have one matrix where gated tanh has two: fewer parameters, same interface.
    relu, gated = _model(activation="relu"), _model()
    assert sum(p.numel() for p in relu.parameters()) < sum(p.numel() for p in gated.parameters())


@pytest.mark.parametrize("fusion", ["product", "cross_attention"])
def test_tokens_after_the_length_change_nothing_and_equal_unpadded_questions(fusion):
    model = _model(fusion=fusion).eval()
    batch = _batch()
    lengths = batch["question_lengths"]
    with torch.no_grad():
        logits = model(**batch)["logits"]
        garbage = batch["question_tokens"].clone()
        padding = torch.arange(T) >= lengths[:, None]
        garbage[padding] = torch.randint(1, V, (int(padding.sum()),))
        logits_garbage = model(**{**batch, "question_tokens": garbage})["logits"]
        # Each question alone, cut to its length: no padding anywhere.
        alone = torch.cat(
            [
                model(
                    batch["image_features"][b : b + 1],
                    batch["image_features_mask"][b : b + 1],
                    batch["question_tokens"][b : b + 1, : int(lengths[b])],
                    lengths[b : b + 1],
                )["logits"]
                for b in range(B)
            ]
        )
    assert torch.allclose(logits, logits_garbage, atol=1e-6)
    assert torch.allclose(logits, alone, atol=1e-5)


def test_question_only_ignores_the_image_and_has_no_image_parameters():
    model = _model(question_only=True).eval()
    batch = _batch()
    with torch.no_grad():
        output = model(**batch)
        other = model(**{**batch, "image_features": torch.rand(B, R, D)})
    assert torch.equal(output["logits"], other["logits"])
    assert torch.all(output["attention"] == 0)
    assert not any(
        name.startswith(("attention", "image_projection", "fusion")) for name, _ in model.named_parameters()
    )


def test_feature_encoder_sees_zeroed_padding_and_the_mask():
    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(D, D)

        def forward(self, features, mask):
            self.seen = (features.clone(), mask.clone())
            return self.linear(features)

    recorder = Recorder()
    model = _model(feature_encoder=recorder)
    batch = _batch()
    batch["image_features"][~batch["image_features_mask"]] = 7.0
    model(**batch)["logits"].sum().backward()
    features, mask = recorder.seen
    assert torch.equal(mask, batch["image_features_mask"])
    assert torch.all(features[~mask] == 0)
    assert recorder.linear.weight.grad is not None and recorder.linear.weight.grad.abs().sum() > 0


def _gated_tanh(i: int, o: int, weight_norm: bool) -> int:
    # W, W' (i x o each), b, b' (o each), plus one scalar norm g per matrix under weight norm.
    return 2 * (i * o + o) + (2 if weight_norm else 0)


def _linear(i: int, o: int, weight_norm: bool) -> int:
    return i * o + o + (1 if weight_norm else 0)


@pytest.mark.parametrize("weight_norm", [True, False])
def test_parameter_count_of_the_paper_configuration(weight_norm):
    """Embedding 300, GRU 512, 2048-d features, 3129 answers: counted by hand from the equations."""
    vocabulary, answers, d, e, h = 1000, 3129, 2048, 300, 512
    expected = (
        vocabulary * e  # word embedding
        + 3 * (e * h + h * h + 2 * h)  # GRU: reset, update, new gates; input and hidden biases
        + _gated_tanh(d + h, h, weight_norm)
        + _linear(h, 1, weight_norm)  # attention scorer on [v_i; q], then w_a
        + _gated_tanh(h, h, weight_norm)  # f_q
        + _gated_tanh(d, h, weight_norm)  # f_v
        + _gated_tanh(h, 2 * h, weight_norm)
        + _linear(2 * h, answers, weight_norm)  # classifier
    )
    model = UpDownVQA(vocabulary, answers, config=VQAConfig(weight_norm=weight_norm))
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"fusion": "cross_attention"},
        {"question_only": True},
        {"weight_norm": False},
        {"activation": "relu", "attention": "product", "feature_norm": "layer"},
    ],
)
def test_gradients_reach_every_parameter(options):
    model = _model(**options).train()
    batch = _batch()
    logits = model(**batch)["logits"]
    target = torch.rand(B, A)
    (F.binary_cross_entropy_with_logits(logits, target) * A).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        if name == "embedding.weight":
            # Only the rows of tokens in the batch move; <pad> never does. (With ReLU layers a question whose
            # joint embedding is all zero passes no gradient at all, so not every used row need move.)
            used = batch["question_tokens"][batch["question_tokens"] != 0].unique()
            moved = parameter.grad[used].abs().sum(dim=1).gt(0)
            assert moved.all() if options.get("activation") != "relu" else moved.any()
            assert torch.all(parameter.grad[0] == 0)
        else:
            assert parameter.grad.abs().sum() > 0, name


def _colour_world(n: int, boxes: int = 4, colours: int = 4):
    """'What colour is the <category>?': only the region of that category holds the answer.

    Each image has one region per category (random order), each with a random colour; a region's feature is
    its one-hot category and colour plus noise. Tokens: 1 = "what colour", 2 + c = category c.
    """
    categories = torch.stack([torch.randperm(boxes) for _ in range(n)])
    colour = torch.randint(0, colours, (n, boxes))
    features = torch.cat([F.one_hot(categories, boxes), F.one_hot(colour, colours)], -1).float()
    features = features + 0.1 * torch.rand_like(features)
    asked = torch.randint(0, boxes, (n,))
    where = categories == asked[:, None]
    answer = colour[torch.arange(n), where.int().argmax(1)]
    tokens = torch.stack([torch.full((n,), 1), asked + 2], dim=1)
    return features, tokens, answer, where


def _train_and_score(question_only: bool, max_epochs: int) -> tuple[float, float]:
    """Adamax and soft-score BCE on 512 questions; accuracy and attention on the asked object, on 256 new ones."""
    torch.manual_seed(0)
    n, colours = 512, 4
    features, tokens, answer, _ = _colour_world(n)
    mask, lengths = torch.ones(n, 4, dtype=torch.bool), torch.full((n,), 2)
    model = UpDownVQA(
        8,
        colours,
        image_feature_size=8,
        config=VQAConfig(embedding_size=8, hidden_size=32, dropout=0.0, classifier_dropout=0.0),
        question_only=question_only,
    )
    optimizer = torch.optim.Adamax(model.parameters(), lr=0.01)
    target = F.one_hot(answer, colours).float()
    for epoch in range(max_epochs):
        for start in range(0, n, 128):
            part = slice(start, start + 128)
            logits = model(features[part], mask[part], tokens[part], lengths[part])["logits"]
            loss = F.binary_cross_entropy_with_logits(logits, target[part]) * colours
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch >= 20 and loss.item() < 0.05:
            break
    features, tokens, answer, where = _colour_world(256)
    model.eval()
    with torch.no_grad():
        output = model(features, torch.ones(256, 4, dtype=torch.bool), tokens, torch.full((256,), 2))
    accuracy = (output["logits"].argmax(1) == answer).float().mean().item()
    return accuracy, output["attention"][where].mean().item()


def test_learns_a_task_that_needs_attention():
    # Tiny matrices: one thread avoids thread hand-offs that make this slow on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        accuracy, attention_on_the_object = _train_and_score(question_only=False, max_epochs=150)
        accuracy_question_only, _ = _train_and_score(question_only=True, max_epochs=40)
    finally:
        torch.set_num_threads(threads)
    assert accuracy > 0.9, accuracy
    assert attention_on_the_object > 0.5, attention_on_the_object  # chance is 1/4
    # The question alone cannot answer it: the baseline stays near chance (1/4).
    assert accuracy_question_only < 0.4, accuracy_question_only


def test_load_glove_reads_vectors_and_keeps_initial_rows(tmp_path):
    path = tmp_path / "glove.txt"
    path.write_text(
        "the 0.1 0.2 0.3\ndog -1 2.5 3e-1\n. . . 9 9 9\nunused x y z\ncat 1 1 1\n", encoding="utf-8"
    )
    initial = torch.full((5, 3), 7.0)
    vectors, found = load_glove(path, ["<pad>", "dog", "bird", "the", "."], initial)
    assert found == 2
    assert torch.allclose(vectors[1], torch.tensor([-1.0, 2.5, 0.3]))
    assert torch.allclose(vectors[3], torch.tensor([0.1, 0.2, 0.3]))
    # ". . ." is one three-word token, not "." followed by bad numbers; "<pad>", "bird", "." stay as given.
    assert torch.all(vectors[[0, 2, 4]] == 7.0)
    assert torch.all(initial == 7.0)


def test_load_glove_reads_gzip_and_skips_a_word2vec_header(tmp_path):
    path = tmp_path / "vectors.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as file:
        file.write("2 2\ncat 0.5 -0.5\nsat 1 2\n")
    vectors, found = load_glove(path, ["cat", "mat"])
    assert found == 1
    assert torch.equal(vectors, torch.tensor([[0.5, -0.5], [0.0, 0.0]]))


def test_load_glove_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="glove_path"):
        load_glove(tmp_path / "missing.txt", ["a"])
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_glove(empty, ["a"])
    bad_number = tmp_path / "bad_number.txt"
    bad_number.write_text("a 1 2\nb 1 oops\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2.*non-number"):
        load_glove(bad_number, ["b"])
    truncated = tmp_path / "truncated.txt"
    truncated.write_text("a 1 2 3\nb 1 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2.*truncated"):
        load_glove(truncated, ["b"])
    good = tmp_path / "good.txt"
    good.write_text("a 1 2 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match="embedding_size=3"):
        load_glove(good, ["a", "b"], torch.zeros(2, 4))


def test_model_initialises_the_embedding_from_glove(tmp_path):
    path = tmp_path / "glove.txt"
    path.write_text(
        "dog " + " ".join(["0.5"] * E) + "\n<pad> " + " ".join(["9"] * E) + "\n", encoding="utf-8"
    )
    tokens = ["<pad>", "<unk>", "dog"] + [f"w{i}" for i in range(V - 3)]
    random_init = _model(seed=3).embedding.weight
    vectors, found = load_glove(path, tokens, random_init)
    model = _model(seed=3, word_vectors=vectors)
    assert found == 2
    assert torch.all(model.embedding.weight[2] == 0.5)
    assert torch.all(model.embedding.weight[0] == 0)  # padding stays zero even if the file has "<pad>"
    assert torch.equal(model.embedding.weight[[1, *range(3, V)]], random_init[[1, *range(3, V)]])
    with pytest.raises(ValueError, match="embedding_size"):
        _model(word_vectors=vectors, embedding_size=E + 1)


def test_invalid_inputs_are_rejected():
    model = _model()
    batch = _batch()
    with pytest.raises(ValueError, match="question_lengths"):
        model(**{**batch, "question_lengths": torch.tensor([6, 3, 0, 4])})
    with pytest.raises(ValueError, match="question_lengths"):
        model(**{**batch, "question_lengths": torch.tensor([7, 3, 1, 4])})
    with pytest.raises(ValueError, match="image_features_mask"):
        model(**{**batch, "image_features_mask": batch["image_features_mask"].float()})
    with pytest.raises(ValueError, match="fusion"):
        _model(fusion="concat")
    with pytest.raises(ValueError, match="attention"):
        _model(attention="additive")
    with pytest.raises(ValueError, match="activation"):
        _model(activation="gelu")
    with pytest.raises(ValueError, match="feature_norm"):
        _model(feature_norm="batch")
    with pytest.raises(ValueError, match="feature_encoder"):
        _model(question_only=True, feature_encoder=torch.nn.Identity())
