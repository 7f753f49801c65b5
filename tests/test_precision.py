"""The captioner's speed paths keep its numbers: packed training equals the padded forward pass, and bf16
autocast (Lightning's "bf16-mixed") and torch.compile stay within stated tolerances of float32 on the CPU.

:meth:`UpDownCaptioner.forward_packed` sorts captions by length, shrinks the batch step by step and runs the
output layer on real tokens only; the reference it is checked against is :meth:`UpDownCaptioner.forward`,
which runs every caption over every step and keeps the logits of padding too.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_captioning_args

from updown.losses import sequence_cross_entropy
from updown.models.captioner import CaptionerConfig, UpDownCaptioner
from updown.tasks.compile import CompileSteps

V, D, B, R = 60, 24, 8, 6
CONFIG = CaptionerConfig(embedding_size=32, hidden_size=32, attention_size=16)
LENGTHS = [8, 3, 5, 1, 4, 2, 7, 6]  # words + <eos> of each caption

# bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2 %); these bounds are 8-60x the errors measured on
# this model over three seeds (logits <= 1.9e-3 absolute, loss <= 1.5e-5 relative, whole gradient <= 0.36 %
# relative, decoding log-probabilities <= 1.4e-3 absolute).
BF16_LOGITS = 2e-2  # absolute (the logits are within +-1 here)
BF16_LOSS = 1e-3  # relative
BF16_GRADIENT = 3e-2  # relative L2 error of all gradients together
BF16_LOGPROBS = 2e-2  # absolute


def _model(seed: int = 0) -> UpDownCaptioner:
    torch.manual_seed(seed)
    return UpDownCaptioner(V, D, CONFIG)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """4 images (one with 2 padded boxes), 2 captions each, of unsorted lengths, padded to the longest."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(B // 2, R, dtype=torch.bool)
    mask[3, 4:] = False
    tokens = torch.randint(4, V, (B, max(LENGTHS) + 1), generator=generator)
    tokens[:, 0] = 2
    for row, length in enumerate(LENGTHS):
        tokens[row, length] = 3
        tokens[row, length + 1 :] = 0
    return {
        "image_features": torch.rand(B // 2, R, D, generator=generator),
        "image_features_mask": mask,
        "caption_tokens": tokens,
        "image_index": torch.arange(B // 2).repeat_interleave(2),
    }


def _packed_loss(model: UpDownCaptioner, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    output = model.forward_packed(**batch)
    return sequence_cross_entropy(
        output["logits"].float().unsqueeze(0), output["targets"].unsqueeze(0)
    ), output


def _gradients(model: UpDownCaptioner, loss: torch.Tensor) -> torch.Tensor:
    parameters = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, parameters)])


def test_packed_training_equals_the_padded_forward_pass():
    model, batch = _model().eval(), _batch()
    padded = model(**batch)
    targets = batch["caption_tokens"][:, 1:]
    loss, packed = _packed_loss(model, batch)
    # One row per real target token, each token exactly once.
    real = targets != 0
    assert packed["logits"].shape == (int(real.sum()), V)
    positions = set(zip(packed["caption_index"].tolist(), packed["time_index"].tolist()))
    assert positions == set(zip(*(index.tolist() for index in real.nonzero(as_tuple=True))))
    rows = (packed["caption_index"], packed["time_index"])
    assert torch.equal(packed["targets"], targets[rows])
    torch.testing.assert_close(packed["logits"], padded["logits"][rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed["attention"], padded["attention"][rows], rtol=1e-5, atol=1e-6)
    padded_loss = sequence_cross_entropy(padded["logits"], targets)
    torch.testing.assert_close(loss, padded_loss)
    torch.testing.assert_close(_gradients(model, loss), _gradients(model, padded_loss), rtol=1e-4, atol=1e-7)


def test_packed_training_equals_the_padded_pass_without_image_index_and_with_a_feature_encoder():
    """One image per caption, and features that need a gradient (an SE block before the captioner)."""
    torch.manual_seed(0)
    model = UpDownCaptioner(V, D, dataclasses.replace(CONFIG, feature_encoder="se")).eval()
    batch = _batch()
    batch["image_features"] = batch["image_features"][batch["image_index"]]
    batch["image_features_mask"] = batch["image_features_mask"][batch["image_index"]]
    del batch["image_index"]
    padded = model(**batch)
    loss, packed = _packed_loss(model, batch)
    torch.testing.assert_close(
        packed["logits"], padded["logits"][packed["caption_index"], packed["time_index"]]
    )
    padded_loss = sequence_cross_entropy(padded["logits"], batch["caption_tokens"][:, 1:])
    torch.testing.assert_close(_gradients(model, loss), _gradients(model, padded_loss), rtol=1e-4, atol=1e-7)


def test_packed_training_draws_the_dropout_of_the_padded_pass():
    """Same seed, same dropout masks on the real tokens, same random state after: packing does not change a run."""
    torch.manual_seed(0)
    model, batch = UpDownCaptioner(V, D, dataclasses.replace(CONFIG, dropout=0.3)).train(), _batch()
    torch.manual_seed(5)
    padded = model(**batch)
    after_padded = torch.rand(3)
    torch.manual_seed(5)
    packed = model.forward_packed(**batch)
    assert torch.equal(torch.rand(3), after_padded)
    rows = (packed["caption_index"], packed["time_index"])
    torch.testing.assert_close(packed["logits"], padded["logits"][rows], rtol=1e-5, atol=1e-6)


def test_packed_training_takes_the_padded_path_for_inner_padding_and_scheduled_sampling():
    model, batch = _model(), _batch()
    batch["caption_tokens"][0, 2] = 0  # <pad> inside a caption: no packing possible
    output = model.eval().forward_packed(**batch)
    real = batch["caption_tokens"][:, 1:] != 0
    assert output["logits"].shape == (int(real.sum()), V)
    torch.manual_seed(1)
    sampled = model.train().forward_packed(**_batch(), scheduled_sampling_probability=0.5)
    assert sampled["logits"].shape == (sum(LENGTHS), V)


def test_a_batch_of_only_padding_gives_empty_results_with_a_graph():
    model, batch = _model(), _batch()
    batch["caption_tokens"][:, 1:] = 0
    loss, output = _packed_loss(model, batch)
    assert output["logits"].shape == (0, V) and output["attention"].shape == (0, R)
    assert loss.item() == 0.0
    loss.backward()


def test_bf16_autocast_training_stays_within_the_stated_tolerances_of_float32():
    model, batch = _model().eval(), _batch()
    loss, output = _packed_loss(model, batch)
    gradients = _gradients(model, loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_loss, bf16_output = _packed_loss(model, batch)
    # The matrix products really ran in bf16 (otherwise this test would compare float32 with itself).
    assert bf16_output["logits"].dtype == torch.bfloat16
    bf16_gradients = _gradients(model, bf16_loss)
    assert torch.equal(bf16_output["targets"], output["targets"])
    assert (bf16_output["logits"].float() - output["logits"]).abs().max() <= BF16_LOGITS
    assert abs(bf16_loss.item() - loss.item()) <= BF16_LOSS * loss.item()
    assert (bf16_gradients - gradients).norm() <= BF16_GRADIENT * gradients.norm()


def test_bf16_autocast_decoding_returns_float32_log_probabilities_near_float32():
    model, batch = _model().eval(), _batch()
    features, mask = batch["image_features"], batch["image_features_mask"]
    tokens = torch.full((B // 2,), 2)
    with torch.no_grad():
        state = model.init_state(features, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_state = model.init_state(features, mask)
        for word in (2, 17, 5):
            logprobs, state, _ = model.step(tokens.fill_(word), state)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16_logprobs, bf16_state, _ = model.step(tokens, bf16_state)
            # Beam search sums these over many steps: float32 whatever the autocast.
            assert bf16_logprobs.dtype == torch.float32
            assert (bf16_logprobs - logprobs).abs().max() <= BF16_LOGPROBS


def test_compile_callback_compiles_each_model_once_and_names_a_model_it_cannot_compile():
    calls = []

    class Compilable(torch.nn.Module):
        def compile_steps(self, dynamic, mode):
            calls.append((dynamic, mode))

    task = torch.nn.Module()
    task.model = Compilable()
    callback = CompileSteps(mode="max-autotune")
    callback.on_fit_start(None, task)
    callback.on_validation_start(None, task)
    assert calls == [(True, "max-autotune")]
    task.model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="Linear.*has no compile_steps"):
        callback.on_predict_start(None, task)


@pytest.mark.slow
def test_bf16_mixed_trains_and_validates_end_to_end(tmp_path, tiny_world):
    """Lightning's precision "bf16-mixed": the packed training step, beam-search validation and scoring run."""
    from updown.fit import main

    args = tiny_captioning_args(tmp_path, tiny_world.root.parent, "--trainer.precision", "bf16-mixed")
    assert main(args) == 0


@pytest.mark.slow
def test_compiled_steps_equal_eager_float32():
    """compile_steps (Inductor, a C++ compiler on the CPU; minutes to compile) gives the eager results."""
    model, batch = _model().eval(), _batch()
    loss, output = _packed_loss(model, batch)
    gradients = _gradients(model, loss)
    names = [name for name, _ in model.named_parameters()]
    model.compile_steps()
    assert [name for name, _ in model.named_parameters()] == names  # checkpoints keep their keys
    compiled_loss, compiled = _packed_loss(model, batch)
    torch.testing.assert_close(compiled["logits"], output["logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_gradients(model, compiled_loss), gradients, rtol=1e-4, atol=1e-6)
