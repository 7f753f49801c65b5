"""The bottom-up / top-down VQA model of Anderson et al. (2018), after Teney et al. (2018).

::

    question tokens --embedding 300--> GRU 512 --state after the last real token--> q
    regions v_1..v_R (padded boxes zeroed) --optional feature encoder--> v_1..v_R
    a = softmax over real boxes of  w^T GatedTanh([v_i; q])      padded boxes: exactly 0
    v_hat = sum_i a_i v_i
    h = GatedTanh_q(q) * GatedTanh_v(v_hat)                      joint embedding, 512
    logits = W_o GatedTanh_c(h)                                  (B, num_answers); sigmoid lives in the loss

Paper sizes are the defaults (embedding 300, hidden 512); the widely used reproduction
hengyuan-hu/bottom-up-attention-vqa trains with hidden 1024, weight normalisation on every linear layer
(one scalar norm per matrix), dropout 0.2 before the attention's last linear and 0.5 in the classifier,
Adamax and soft-score binary cross-entropy; those are the defaults here too. It uses ReLU where the paper
uses gated tanh; this model follows the paper. ``fusion="cross_attention"`` swaps the single top-down
attention and product for :class:`~updown.modules.fusion.CrossAttentionFusion`; ``question_only=True``
drops the image path altogether (the language-prior baseline).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from updown.config import Config, FeatureEncoderName, HalfOpenUnitInterval, PositiveInt
from updown.modules.attention import AttentionForm, GatedTanhAttention
from updown.modules.blocks import build_feature_encoder
from updown.modules.fusion import CrossAttentionFusion
from updown.modules.gated_tanh import ACTIVATIONS, linear_layer
from updown.modules.packed_gru import run_gru

Fusion = Literal["product", "cross_attention"]
FeatureNorm = Literal["none", "layer"]
Activation = Literal["gated_tanh", "relu"]


@dataclasses.dataclass(frozen=True)
class VQAConfig(Config):
    """The VQA model's hyper-parameters (the paper's choices by default).

    Args:
        embedding_size: word embedding size (300, GloVe's).
        hidden_size: GRU size and joint embedding size (512 in the paper, 1024 in the reproduction).
        dropout: dropout in the attention scorer and the cross-attention fusion (0.2 in the reproduction).
        classifier_dropout: dropout between the classifier's two layers (0.5 in the reproduction).
        weight_norm: weight-normalise every linear layer, one scalar norm per matrix (as the reproduction).
        fusion: ``"product"`` (the paper's top-down attention and product) or ``"cross_attention"``.
        attention: the top-down attention's scorer with ``fusion="product"``: ``"concat"`` (the paper's
            ``w^T GT([v_i; q])``) or ``"product"`` (the reproduction's ``w^T (GT(v_i) * GT(q))``).
        activation: ``"gated_tanh"`` (the paper) or ``"relu"`` (the reproduction's ``FCNet``), for every
            non-linear layer of the attention, the projections, the fusion and the classifier.
        feature_norm: ``"none"`` (the paper) or ``"layer"``: LayerNorm on each region feature before anything
            reads it. Bottom-up features are non-negative (ReLU-pooled), so every region shares a large
            positive mean; under Adam(ax) the first updates move all weights of a layer coherently along
            that mean, which pushes the bounded gated-tanh units of the image path into saturation, and the
            model falls back on the language prior. Centring each feature avoids it (measured on the
            synthetic world: see configs/vqa/synthetic.yaml).
        num_heads: attention heads of the cross-attention fusion.
        feature_encoder: optional attention block applied to the region features first.
    """

    embedding_size: PositiveInt = 300
    hidden_size: PositiveInt = 512
    dropout: HalfOpenUnitInterval = 0.2
    classifier_dropout: HalfOpenUnitInterval = 0.5
    weight_norm: bool = True
    fusion: Fusion = "product"
    attention: AttentionForm = "concat"
    activation: Activation = "gated_tanh"
    feature_norm: FeatureNorm = "none"
    num_heads: PositiveInt = 8
    feature_encoder: FeatureEncoderName | None = None


class UpDownVQA(nn.Module):
    """Gated-tanh VQA model with top-down attention over region features (see the module docstring).

    Args:
        vocabulary_size: number of question tokens, ``<pad>`` included.
        num_answers: size of the answer vocabulary (3129 on VQA v2).
        image_feature_size: size ``D`` of a region feature (2048 for bottom-up features).
        config: the hyper-parameters (:class:`VQAConfig`).
        question_only: no image path at all: ``logits = classifier(GatedTanh_q(q))`` (the language prior).
        word_vectors: optional ``(vocabulary_size, embedding_size)`` initial word embedding (e.g. GloVe rows
            from :func:`updown.data.glove.load_glove`); the ``<pad>`` row is zeroed.
        pad_index: index of ``<pad>``; its embedding stays zero.
        grid_shape: ``(H, W)`` of grid features, for a 2-D ``config.feature_encoder``.
        feature_encoder: a module ``forward(features (B, R, D), mask (B, R)) -> (B, R, D)`` used instead of
            the one ``config.feature_encoder`` names.
    """

    def __init__(
        self,
        vocabulary_size: int,
        num_answers: int,
        image_feature_size: int = 2048,
        config: VQAConfig = VQAConfig(),
        *,
        question_only: bool = False,
        word_vectors: torch.Tensor | None = None,
        pad_index: int = 0,
        grid_shape: tuple[int, int] | None = None,
        feature_encoder: nn.Module | None = None,
    ):
        super().__init__()
        if question_only and (feature_encoder is not None or config.feature_encoder is not None):
            raise ValueError("UpDownVQA: question_only=True reads no image, so it takes no feature_encoder.")
        if not 0 <= pad_index < vocabulary_size:
            raise ValueError(
                f"UpDownVQA: pad_index={pad_index} must lie in [0, vocabulary_size={vocabulary_size})."
            )
        self.config = config
        self.fusion_name = config.fusion
        self.question_only = question_only
        self.pad_index = pad_index
        layer = ACTIVATIONS[config.activation]
        embedding_size, hidden_size, weight_norm = (
            config.embedding_size,
            config.hidden_size,
            config.weight_norm,
        )
        dropout = config.dropout

        self.embedding = nn.Embedding(vocabulary_size, embedding_size, padding_idx=pad_index)
        if word_vectors is not None:
            if word_vectors.shape != self.embedding.weight.shape:
                raise ValueError(
                    f"UpDownVQA: word_vectors are {tuple(word_vectors.shape)}, the embedding is "
                    f"{tuple(self.embedding.weight.shape)}; set embedding_size to the vectors' size."
                )
            with torch.no_grad():
                self.embedding.weight.copy_(word_vectors)
                self.embedding.weight[pad_index].zero_()
        self.gru = nn.GRU(embedding_size, hidden_size, num_layers=1, batch_first=True)

        self.feature_norm = (
            nn.LayerNorm(image_feature_size) if config.feature_norm == "layer" and not question_only else None
        )
        self.feature_encoder = feature_encoder
        if self.feature_encoder is None and not question_only:
            self.feature_encoder = build_feature_encoder(
                config.feature_encoder, image_feature_size, grid_shape=grid_shape
            )
        if question_only or config.fusion == "product":
            self.question_projection = layer(hidden_size, hidden_size, weight_norm=weight_norm)
        if not question_only and config.fusion == "product":
            self.attention = GatedTanhAttention(
                image_feature_size,
                hidden_size,
                hidden_size,
                dropout,
                weight_norm,
                form=config.attention,
                layer=layer,
            )
            self.image_projection = layer(image_feature_size, hidden_size, weight_norm=weight_norm)
        elif not question_only:
            # The fusion projects the question tokens itself.
            self.fusion = CrossAttentionFusion(
                hidden_size,
                image_feature_size,
                hidden_size,
                config.num_heads,
                dropout,
                weight_norm,
                layer=layer,
            )
        self.classifier = nn.Sequential(
            layer(hidden_size, 2 * hidden_size, weight_norm=weight_norm),
            nn.Dropout(config.classifier_dropout),
            linear_layer(2 * hidden_size, num_answers, weight_norm),
        )

    def encode_question(
        self, question_tokens: torch.Tensor, question_lengths: torch.Tensor, all_states: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The GRU over the real tokens of each question only (:func:`~updown.modules.packed_gru.run_gru`).

        The GRU never steps over padding: on VQA v2 (14-token padding, about 6 real tokens on average) that
        skips more than half of its arithmetic, and each question's final state is the state after its last
        real token, exactly as if it had been run alone.

        Args:
            question_tokens: ``(B, T)`` int64, right-padded.
            question_lengths: ``(B,)`` int64, each in ``1..T`` (checked by :meth:`forward`).
            all_states: also return the state after every token (zero after a question's end).

        Returns:
            ``question`` ``(B, hidden_size)`` and ``states`` ``(B, T, hidden_size)`` (``None`` unless
            ``all_states``).
        """
        return run_gru(self.gru, self.embedding(question_tokens), question_lengths, all_states)

    def forward(
        self,
        image_features: torch.Tensor,
        image_features_mask: torch.Tensor,
        question_tokens: torch.Tensor,
        question_lengths: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Answer logits for a batch of questions.

        Args:
            image_features: ``(B, R, D)``; rows of padded boxes are ignored whatever they hold.
            image_features_mask: ``(B, R)`` bool, True for a real box.
            question_tokens: ``(B, T)`` int64, right-padded; tokens after a question's length are ignored.
            question_lengths: ``(B,)`` int64, each in ``1..T``.

        Returns:
            ``logits`` ``(B, num_answers)`` (apply a sigmoid for per-answer probabilities) and ``attention``
            ``(B, R)``: weights over regions, zero on padded boxes (all zero with ``question_only``).
        """
        batch_size, max_length = question_tokens.shape
        if question_lengths.shape != (batch_size,):
            raise ValueError(
                f"UpDownVQA: question_lengths shape {tuple(question_lengths.shape)} must be (B,) = ({batch_size},)."
            )
        if bool(((question_lengths < 1) | (question_lengths > max_length)).any()):
            raise ValueError(
                f"UpDownVQA: question_lengths must lie in 1..{max_length} (the padded length); got "
                f"min {int(question_lengths.min())}, max {int(question_lengths.max())}. Empty questions "
                "must be dropped or given one <unk> token."
            )
        if image_features_mask.dtype != torch.bool or image_features_mask.shape != image_features.shape[:2]:
            raise ValueError(
                f"UpDownVQA: image_features_mask must be a bool (B, R) = {tuple(image_features.shape[:2])} tensor, "
                f"got {image_features_mask.dtype} {tuple(image_features_mask.shape)}."
            )

        # shape: (B, hidden_size), and (B, T, hidden_size) for the cross-attention fusion
        question, states = self.encode_question(
            question_tokens, question_lengths, all_states=self.fusion_name == "cross_attention"
        )

        if self.question_only:
            joint = self.question_projection(question)
            # shape: (B, R)
            attention = image_features_mask.new_zeros(image_features_mask.shape, dtype=question.dtype)
        else:
            # Zero padded rows so that whatever they hold (even NaN) cannot reach real outputs. Fixed-36 features
            # have none, and then the copy (B x R x D, 150 MB at batch 512) is skipped.
            features = (
                image_features
                if bool(image_features_mask.all())
                else image_features.masked_fill(~image_features_mask.unsqueeze(-1), 0.0)
            )
            if self.feature_norm is not None:
                # LayerNorm maps a zero row to its bias: zero the padded rows again.
                features = self.feature_norm(features).masked_fill(~image_features_mask.unsqueeze(-1), 0.0)
            if self.feature_encoder is not None:
                features = self.feature_encoder(features, image_features_mask)
            if self.fusion_name == "product":
                device_type = features.device.type
                if torch.is_autocast_enabled(device_type):
                    # Under autocast each product casts its inputs: the attention scorer and the weighted sum
                    # would each copy the (B, R, D) features to bf16 / fp16 (5 % of a bf16 step at batch 512).
                    # Only products read them on this path, so one cast gives them the same values.
                    features = features.to(torch.get_autocast_dtype(device_type))
                # shape: (B, R)
                attention = self.attention(features, image_features_mask, question)
                # shape: (B, D)
                attended = torch.bmm(attention.unsqueeze(1), features).squeeze(1)
                # shape: (B, hidden_size)
                joint = self.question_projection(question) * self.image_projection(attended)
            else:
                # shape: (B, T)
                question_mask = (
                    torch.arange(max_length, device=question_tokens.device) < question_lengths[:, None]
                )
                joint, attention = self.fusion(states, question_mask, features, image_features_mask)
        # shape: (B, num_answers)
        logits = self.classifier(joint)
        return {"logits": logits, "attention": attention}
