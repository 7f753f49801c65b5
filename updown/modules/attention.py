"""Top-down soft attention over image regions (Anderson et al. 2018, equations 3-5).

For a query ``h`` (the attention LSTM's hidden state) and region features ``v_1 .. v_R``::

    a_i     = w_a^T tanh(W_v v_i + W_h h)
    alpha   = softmax(a) over the REAL regions only
    v_hat   = sum_i alpha_i v_i

The paper's equations have no bias terms, so neither do these layers.
"""

from __future__ import annotations

import torch
from torch import nn


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
                :meth:`project_features` for these features, to skip recomputing it.

        Returns:
            A pair ``(weights, attended)``: ``weights`` ``(batch_size, num_boxes)`` sums to one over the
            real boxes and is exactly zero on padded ones (all zero for an image without real boxes);
            ``attended`` ``(batch_size, image_feature_size)`` is the weighted sum of the features.
        """
        if image_features_mask.dtype != torch.bool:
            raise ValueError(
                f"TopDownAttention: image_features_mask must be a bool tensor (True = real box), got "
                f"{image_features_mask.dtype}; convert it with `.bool()`."
            )
        if image_features_mask.shape != image_features.shape[:2]:
            raise ValueError(
                f"TopDownAttention: image_features_mask has shape {tuple(image_features_mask.shape)} but "
                f"image_features has shape {tuple(image_features.shape)}; the mask must be (batch_size, num_boxes)."
            )
        if projected_features is None:
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
