"""Top-down soft attention over image regions (Anderson et al. 2018, equations 3-5).

For a query ``h`` (the attention LSTM's hidden state) and region features ``v_1 .. v_R``::

    a_i     = w_a^T tanh(W_v v_i + W_h h)
    alpha   = softmax(a) over the REAL regions only
    v_hat   = sum_i alpha_i v_i

The paper's equations have no bias terms, so neither do these layers.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from updown.modules.dropout import Dropout
from updown.modules.gated_tanh import GatedTanh, linear_layer

# The two forms of the VQA model's attention scorer (GatedTanhAttention).
AttentionForm = Literal["concat", "product"]


def check_mask(image_features: torch.Tensor, image_features_mask: torch.Tensor, owner: str) -> None:
    """Refuse a mask that is not a bool ``(batch_size, num_boxes)`` tensor for ``image_features``."""
    if image_features_mask.dtype != torch.bool:
        raise ValueError(
            f"{owner}: image_features_mask must be a bool tensor (True = real box), got "
            f"{image_features_mask.dtype}; convert it with `.bool()`."
        )
    if image_features_mask.shape != image_features.shape[:2]:
        raise ValueError(
            f"{owner}: image_features_mask has shape {tuple(image_features_mask.shape)} but image_features has "
            f"shape {tuple(image_features.shape)}; the mask must be (batch_size, num_boxes)."
        )


class TopDownAttention(nn.Module):
    """Additive attention whose weights sum to one over the real boxes of each image.

    Padded boxes get a weight of exactly zero (not merely a tiny one), so whatever sits in a padded row
    cannot leak into the attended feature or into plots of the attention.

    ``W_v v_i`` does not depend on the query, so a decoder computes it once per image with
    :meth:`project_features` and passes it to every step as ``projected_features``.

    Args:
        image_feature_size: ``D``, size of one region feature.
        query_size: size of the query vector ``h``.
        attention_size: size of the joint projection space (512 in the paper).
    """

    def __init__(self, image_feature_size: int, query_size: int, attention_size: int) -> None:
        super().__init__()
        for name, value in (
            ("image_feature_size", image_feature_size),
            ("query_size", query_size),
            ("attention_size", attention_size),
        ):
            if value <= 0:
                raise ValueError(f"TopDownAttention: {name} must be a positive integer, got {value}.")
        self.image_feature_size = image_feature_size
        self.query_size = query_size
        self.attention_size = attention_size
        self.image_projection = nn.Linear(image_feature_size, attention_size, bias=False)
        self.query_projection = nn.Linear(query_size, attention_size, bias=False)
        self.score = nn.Linear(attention_size, 1, bias=False)

    def project_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """Compute ``W_v v_i`` for every region; reuse the result across decoding steps.

        Args:
            image_features: ``(batch_size, num_boxes, image_feature_size)``.

        Returns:
            ``(batch_size, num_boxes, attention_size)``.
        """
        return self.image_projection(image_features)

    def forward(
        self,
        query: torch.Tensor,
        image_features: torch.Tensor,
        image_features_mask: torch.Tensor,
        projected_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend over the regions of each image with one query per image.

        Args:
            query: ``(batch_size, query_size)``.
            image_features: ``(batch_size, num_boxes, image_feature_size)``. Padded rows must hold finite
                numbers (they are multiplied by an exact zero weight); the captioner zeroes them once.
            image_features_mask: ``(batch_size, num_boxes)`` bool, True for a real box.
            projected_features: optional ``(batch_size, num_boxes, attention_size)`` output of
                :meth:`project_features` for these features, to skip recomputing it. A decoder passes it at
                every step after checking the features and mask once, so the check is skipped then.

        Returns:
            A pair ``(weights, attended)``: ``weights`` ``(batch_size, num_boxes)`` sums to one over the
            real boxes and is exactly zero on padded ones (all zero for an image without real boxes);
            ``attended`` ``(batch_size, image_feature_size)`` is the weighted sum of the features.
        """
        if projected_features is None:
            check_mask(image_features, image_features_mask, "TopDownAttention")
            projected_features = self.project_features(image_features)

        # shape: (batch_size, 1, attention_size)
        projected_query = self.query_projection(query).unsqueeze(1)
        # shape: (batch_size, num_boxes)
        scores = self.score(torch.tanh(projected_features + projected_query)).squeeze(-1)

        # The most negative finite number (rather than -inf) keeps an image without any real box from
        # producing NaN; the second masked_fill then makes padded weights exactly zero either way.
        scores = scores.masked_fill(~image_features_mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1).masked_fill(~image_features_mask, 0.0)

        # shape: (batch_size, image_feature_size)
        attended = torch.bmm(weights.unsqueeze(1), image_features).squeeze(1)
        return weights, attended


class GatedTanhAttention(nn.Module):
    """Top-down attention over regions with a gated-tanh scorer, in one of two forms.

    - ``"concat"`` (the paper, after Teney et al. 2018): ``a_i = w^T GT([v_i; q])``. The question enters the
      scorer only additively, inside the non-linearity.
    - ``"product"`` (hengyuan-hu/bottom-up-attention-vqa's ``NewAttention``, with gated tanh for its ReLU):
      ``a_i = w^T (GT_v(v_i) * GT_q(q))``. The element-wise product makes each region's score a bilinear
      function of region and question, so "which region answers *this* question" is learned in far fewer
      updates; on the synthetic world the concat form had not learned to look at the named object after
      8 epochs (see configs/vqa/synthetic.yaml).

    Args:
        image_feature_size: ``D``.
        question_size: size of ``q``.
        hidden_size: width of the gated-tanh layers.
        dropout: dropout before the scalar projection ``w`` (0.2 in the reproduction).
        weight_norm: weight-normalise every layer.
        form: ``"concat"`` or ``"product"``.
        layer: the non-linear layer class (:class:`GatedTanh`, the paper's, or ``ReLULayer``).
    """

    def __init__(
        self,
        image_feature_size: int,
        question_size: int,
        hidden_size: int,
        dropout: float,
        weight_norm: bool,
        form: AttentionForm = "concat",
        layer: type[nn.Module] = GatedTanh,
    ):
        super().__init__()
        self.form = form
        if form == "concat":
            self.scorer = layer(image_feature_size + question_size, hidden_size, weight_norm=weight_norm)
        else:
            self.image_scorer = layer(image_feature_size, hidden_size, weight_norm=weight_norm)
            self.question_scorer = layer(question_size, hidden_size, weight_norm=weight_norm)
        # The (B, R, hidden) dropout mask is the largest random draw of a VQA step: drawn with torch.rand.
        self.dropout = Dropout(dropout)
        self.score = linear_layer(hidden_size, 1, weight_norm)

    def forward(
        self, image_features: torch.Tensor, image_features_mask: torch.Tensor, question: torch.Tensor
    ) -> torch.Tensor:
        """Attention weights ``(B, R)`` over real boxes from features ``(B, R, D)``, mask ``(B, R)`` and
        question ``(B, question_size)``. Padded boxes get exactly zero; an image with no real box gets
        all zeros (no NaN)."""
        if self.form == "concat":
            # shape: (B, R, hidden_size)
            joint = self.scorer(image_features, context=question)
            # shape: (B, R)
            scores = self.score(self.dropout(joint)).squeeze(-1)
        else:
            # w^T dropout(GT_v(v_i) * GT_q(q)) = dropout(GT_v(v_i))^T (w * GT_q(q)): the mask is elementwise,
            # so it may act on the image factor alone. Folding w into the question factor (B x hidden) skips
            # the (B, R, hidden) product and its two backward products, a few percent of a training step.
            # shape: (B, hidden_size, 1)
            question_weights = (self.question_scorer(question) * self.score.weight).unsqueeze(-1)
            # shape: (B, R)
            scores = torch.bmm(self.dropout(self.image_scorer(image_features)), question_weights).squeeze(-1)
            scores = scores + self.score.bias
        scores = scores.masked_fill(~image_features_mask, float("-inf"))
        return torch.softmax(scores, dim=1).masked_fill(~image_features_mask, 0.0)
