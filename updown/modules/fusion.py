"""Cross-attention fusion: every question token attends over the image regions.

An alternative to the single top-down attention of Anderson et al. (2018), where one question vector
scores every region once. Here each question token is a query of multi-head attention over the regions
(Transformer-style cross attention, as in LXMERT or ViLBERT's co-attention, reduced to one direction), so
"colour" and "dog" can look at different boxes. Each token's attended vector is fused with the token
itself by the same product of gated-tanh projections as the UpDown joint embedding, and the fused tokens
are averaged over the real (non-padding) tokens into one joint vector per question::

    a_t      = MultiHead(query=q_t, keys=values=v_1..v_R)            padded boxes masked out
    z_t      = f_q(q_t) * f_a(a_t)                                    gated tanh, hidden_size
    joint    = sum_t m_t z_t / sum_t m_t                              m_t = 1 for real tokens
"""

from __future__ import annotations

import torch
from torch import nn

from updown.modules.attention import check_mask
from updown.modules.gated_tanh import GatedTanh


class CrossAttentionFusion(nn.Module):
    """Question tokens as queries of multi-head attention over regions, pooled to one joint vector.

    Args:
        question_size: size of each question token's state (the GRU's hidden size in UpDownVQA); it is also
            the attention's width and must be divisible by ``num_heads``.
        image_feature_size: size ``D`` of a region feature (keys and values are projected from it).
        hidden_size: size of the joint vector.
        num_heads: attention heads.
        dropout: dropout on the attention weights and on the inputs of the gated-tanh projections.
        weight_norm: weight-normalise the gated-tanh projections (see :class:`GatedTanh`).
        layer: the class of the two projections: :class:`GatedTanh` (the paper's non-linearity) or
            :class:`~updown.modules.gated_tanh.ReLULayer`, as the rest of the model.
    """

    def __init__(
        self,
        question_size: int,
        image_feature_size: int,
        hidden_size: int,
        num_heads: int = 8,
        dropout: float = 0.2,
        weight_norm: bool = True,
        layer: type[nn.Module] = GatedTanh,
    ):
        super().__init__()
        if num_heads < 1 or question_size % num_heads != 0:
            raise ValueError(
                f"CrossAttentionFusion: question_size={question_size} must be divisible by "
                f"num_heads={num_heads}; choose a head count that divides it (8 divides 512 and 1024)."
            )
        self.attention = nn.MultiheadAttention(
            question_size,
            num_heads,
            dropout=dropout,
            kdim=image_feature_size,
            vdim=image_feature_size,
            batch_first=True,
        )
        self.question_projection = layer(question_size, hidden_size, dropout, weight_norm)
        self.attended_projection = layer(question_size, hidden_size, dropout, weight_norm)

    def forward(
        self,
        question_states: torch.Tensor,
        question_mask: torch.Tensor,
        image_features: torch.Tensor,
        image_features_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse a batch of questions with their images.

        Args:
            question_states: ``(B, T, question_size)`` one state per question token.
            question_mask: ``(B, T)`` bool, True for a real token; padding tokens are left out of the pooling
                (each token attends on its own, so padding queries cannot change real tokens' outputs).
            image_features: ``(B, R, image_feature_size)``.
            image_features_mask: ``(B, R)`` bool, True for a real box; padded boxes get exactly zero weight.

        Returns:
            ``joint`` ``(B, hidden_size)`` and ``attention`` ``(B, R)``: each region's weight averaged over
            heads and real tokens (sums to one over real boxes; dropped-out weights while training). An image
            without any real box gets a zero attended vector and zero attention instead of NaN.
        """
        if question_mask.shape != question_states.shape[:2]:
            raise ValueError(
                f"CrossAttentionFusion: question_mask shape {tuple(question_mask.shape)} must be (B, T) = "
                f"{tuple(question_states.shape[:2])}."
            )
        check_mask(image_features, image_features_mask, "CrossAttentionFusion")
        # shape: (B, 1)
        has_box = image_features_mask.any(dim=1, keepdim=True)
        # A row of keys that are all masked would make softmax NaN; let such an image attend over its
        # (zero) padding and zero the result below instead.
        key_padding_mask = ~image_features_mask & has_box
        # shape: (B, T, question_size), (B, T, R)
        attended, weights = self.attention(
            question_states,
            image_features,
            image_features,
            key_padding_mask=key_padding_mask,
            need_weights=True,
            average_attn_weights=True,
        )
        attended = attended * has_box.unsqueeze(-1).to(attended.dtype)
        weights = weights * has_box.unsqueeze(-1).to(weights.dtype)

        # shape: (B, T, hidden_size)
        fused = self.question_projection(question_states) * self.attended_projection(attended)
        # shape: (B, T, 1)
        token_weight = question_mask.unsqueeze(-1).to(fused.dtype)
        # shape: (B, 1)
        num_tokens = token_weight.sum(dim=1).clamp_min(1.0)
        # shape: (B, hidden_size)
        joint = (fused * token_weight).sum(dim=1) / num_tokens
        # shape: (B, R)
        attention = (weights * token_weight).sum(dim=1) / num_tokens
        return joint, attention
