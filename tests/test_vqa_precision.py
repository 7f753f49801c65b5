"""UpDownVQA's speed paths keep its numbers: float32/float64 results equal a direct implementation of the
equations, and bf16 autocast (Lightning's "bf16-mixed") and torch.compile stay within stated tolerances of
float32 on the CPU.

The direct implementation runs ``torch.nn.GRU`` over the padded questions and reads the state at each
question's last token, zeroes padded boxes, and materialises the attention's ``(B, R, hidden)`` product before
its scalar projection: the model instead packs the questions (:func:`updown.modules.packed_gru.run_gru`),
skips the zeroing when every box is real, and folds the projection into the question factor.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from updown.models.vqa import UpDownVQA, VQAConfig
from updown.modules.dropout import Dropout
from updown.modules.packed_gru import run_gru

V, A, D, HIDDEN, B, R, T = 40, 12, 16, 24, 6, 5, 7
REPRODUCTION = VQAConfig(embedding_size=8, hidden_size=HIDDEN, attention="product", activation="relu")
PAPER = VQAConfig(embedding_size=8, hidden_size=HIDDEN)
CONFIGS = {"reproduction": REPRODUCTION, "paper": PAPER}

# bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2 %); these bounds are 3-10x the errors measured on
# these models (logits <= 0.6 % of their largest magnitude, attention weights <= 2.1e-3, loss <= 2e-5 relative,
# whole gradient <= 5 % relative).
BF16_LOGITS = 2e-2  # times the largest |float32 logit|
BF16_ATTENTION = 1e-2  # absolute, weights in [0, 1]
BF16_LOSS = 1e-3  # relative
BF16_GRADIENT = 0.15  # relative L2 error of all gradients together


def _batch(seed: int = 0, all_real: bool = False) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, 3, 1, 5, T, 2])
    tokens = torch.randint(1, V, (B, T), generator=generator)
    tokens[torch.arange(T) >= lengths[:, None]] = 0
    boxes = torch.full((B,), R) if all_real else torch.tensor([R, 2, 1, R, 3, 4])
    mask = torch.arange(R)[None, :] < boxes[:, None]
    return {
        "image_features": torch.rand(B, R, D, generator=generator),
        "image_features_mask": mask,
        "question_tokens": tokens,
        "question_lengths": lengths,
    }


def _targets(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    targets = torch.zeros(B, A)
    targets.scatter_(1, torch.randint(0, A, (B, 3), generator=generator), 0.9)
    return targets


def _model(config: VQAConfig, seed: int = 0) -> UpDownVQA:
    torch.manual_seed(seed)
    return UpDownVQA(V, A, D, config)


def _direct_logits(model: UpDownVQA, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's equations written out plainly (no packing, no shortcut), on the model's parameters."""
    mask, lengths = batch["image_features_mask"], batch["question_lengths"]
    states, _ = model.gru(model.embedding(batch["question_tokens"]))
    question = states[torch.arange(B), lengths - 1]
    features = batch["image_features"].masked_fill(~mask.unsqueeze(-1), 0.0)
    attention_module = model.attention
    if attention_module.form == "product":
        joint = attention_module.image_scorer(features) * attention_module.question_scorer(
            question
        ).unsqueeze(1)
        scores = attention_module.score(attention_module.dropout(joint)).squeeze(-1)
        scores = scores.masked_fill(~mask, float("-inf"))
        attention = torch.softmax(scores, dim=1).masked_fill(~mask, 0.0)
    else:
        attention = attention_module(features, mask, question)
    attended = (attention.unsqueeze(-1) * features).sum(dim=1)
    return model.classifier(model.question_projection(question) * model.image_projection(attended))


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), targets.to(torch.float32)) * targets.shape[1]


def _gradients(model: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    gradients = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return [
        torch.zeros_like(p) if g is None else g.to(p.dtype) for p, g in zip(model.parameters(), gradients)
    ]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("all_real", [False, True], ids=["padded_boxes", "all_boxes_real"])
def test_model_equals_the_direct_equations_in_float64_with_gradients(name, all_real):
    model = _model(CONFIGS[name]).double().eval()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in _batch(all_real=all_real).items()}
    targets = _targets().double()
    logits = model(**batch)["logits"]
    direct = _direct_logits(model, batch)
    torch.testing.assert_close(logits, direct, rtol=1e-12, atol=1e-12)
    loss = F.binary_cross_entropy_with_logits(logits, targets) * A
    direct_loss = F.binary_cross_entropy_with_logits(direct, targets) * A
    for ours, reference in zip(_gradients(model, loss), _gradients(model, direct_loss)):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)


class _FixedMaskDropout(nn.Module):
    """Dropout with a given keep mask, so two computations can share one draw."""

    def __init__(self, keep: torch.Tensor, p: float):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep / (1 - self.p)


def test_attention_dropout_on_the_image_factor_equals_dropout_on_the_product():
    """The product attention drops elements of GT_v(v_i) before the product with w * GT_q(q): with the same
    keep mask that is dropout on the product GT_v(v_i) * GT_q(q), as written in the reproduction."""
    model = _model(REPRODUCTION).double().train()
    # No other dropout, so the forward is deterministic apart from the attention's mask.
    model.classifier[1].p = 0.0
    keep = torch.rand(B, R, HIDDEN, generator=torch.Generator().manual_seed(3)) > 0.2
    model.attention.dropout = _FixedMaskDropout(keep, 0.2)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in _batch().items()}
    torch.testing.assert_close(model(**batch)["logits"], _direct_logits(model, batch), rtol=1e-12, atol=1e-12)


def test_packed_gru_equals_torch_gru_states_final_states_and_gradients():
    torch.manual_seed(0)
    gru = nn.GRU(5, 9, batch_first=True).double()
    inputs = torch.randn(B, T, 5, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3, T, 1, T, 4, 2])
    final, states = run_gru(gru, inputs, lengths, all_states=True)
    reference_states, _ = gru(inputs)
    real = (torch.arange(T)[None, :] < lengths[:, None]).unsqueeze(-1)
    torch.testing.assert_close(final, reference_states[torch.arange(B), lengths - 1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(states, reference_states * real, rtol=1e-12, atol=1e-12)
    # A loss reading every state and the final ones: all gradients equal nn.GRU's.
    weights = torch.randn(B, T, 9, dtype=torch.float64)
    ours = torch.autograd.grad((final.sum() + (states * weights).sum()), [inputs, *gru.parameters()])
    reference_final = reference_states[torch.arange(B), lengths - 1]
    reference = torch.autograd.grad(
        reference_final.sum() + (reference_states * real * weights).sum(), [inputs, *gru.parameters()]
    )
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_packed_gru_of_one_token_questions_still_gives_every_parameter_a_gradient():
    """With one step only, W_hh (zero state) takes part anyway: DDP refuses parameters without gradients."""
    torch.manual_seed(0)
    gru = nn.GRU(5, 9, batch_first=True).double()
    inputs = torch.randn(3, 4, 5, dtype=torch.float64)
    final, _ = run_gru(gru, inputs, torch.ones(3, dtype=torch.int64))
    reference, _ = gru(inputs[:, :1])
    torch.testing.assert_close(final, reference[:, 0], rtol=1e-12, atol=1e-12)
    final.sum().backward()
    assert all(p.grad is not None for p in gru.parameters())


def test_packed_gru_refuses_a_gru_it_cannot_run():
    with pytest.raises(ValueError, match="one-layer, unidirectional, batch_first"):
        run_gru(nn.GRU(5, 9, num_layers=2, batch_first=True), torch.randn(2, 3, 5), torch.tensor([3, 1]))


@pytest.mark.parametrize("name", CONFIGS)
def test_bf16_autocast_stays_within_the_stated_tolerances_of_float32(name):
    model = _model(CONFIGS[name]).eval()
    batch, targets = _batch(), _targets()
    output = model(**batch)
    loss = _loss(output["logits"], targets)
    gradients = _gradients(model, loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_output = model(**batch)
        bf16_loss = _loss(bf16_output["logits"], targets)
    # The matrix products really ran in bf16 (otherwise this test would compare float32 with itself).
    assert bf16_output["logits"].dtype == torch.bfloat16
    bf16_gradients = _gradients(model, bf16_loss)
    logits, bf16_logits = output["logits"], bf16_output["logits"].float()
    assert (logits - bf16_logits).abs().max() <= BF16_LOGITS * logits.abs().max()
    mask = batch["image_features_mask"]
    assert torch.all(bf16_output["attention"][~mask] == 0)
    assert (output["attention"] - bf16_output["attention"].float()).abs().max() <= BF16_ATTENTION
    assert abs(bf16_loss.item() - loss.item()) <= BF16_LOSS * loss.item()
    flat, bf16_flat = (
        torch.cat([g.flatten() for g in gradients]),
        torch.cat([g.flatten() for g in bf16_gradients]),
    )
    assert (flat - bf16_flat).norm() <= BF16_GRADIENT * flat.norm()


@pytest.mark.slow
def test_torch_compile_equals_eager_float32():
    """torch.compile (Inductor, a C++ compiler on the CPU) gives the eager float32 logits and gradients."""
    model = _model(REPRODUCTION).eval()
    batch, targets = _batch(all_real=True), _targets()
    compiled = torch.compile(model)
    logits = model(**batch)["logits"]
    compiled_logits = compiled(**batch)["logits"]
    torch.testing.assert_close(compiled_logits, logits, rtol=1e-5, atol=1e-6)
    gradients = _gradients(model, _loss(logits, targets))
    compiled_gradients = _gradients(model, _loss(compiled_logits, targets))
    for a, b in zip(compiled_gradients, gradients):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_cpu_dropout_keeps_with_probability_one_minus_p_and_keeps_the_expectation():
    torch.manual_seed(0)
    dropout = Dropout(0.2)
    x = torch.ones(400_000)
    y = dropout(x)
    kept = y != 0
    # Binomial(400k, 0.8): standard deviation 0.00063 of the kept fraction; 5 deviations.
    assert abs(kept.float().mean().item() - 0.8) < 0.0032
    assert torch.all(y[kept] == 1 / 0.8)
    # The gradient is the mask: kept elements get 1 / (1 - p), dropped ones 0.
    x.requires_grad_(True)
    torch.manual_seed(1)
    y = dropout(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dropout(x.detach().bfloat16()).dtype == torch.bfloat16
    dropout.eval()
    assert dropout(x) is x
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\)"):
        Dropout(1.0)
