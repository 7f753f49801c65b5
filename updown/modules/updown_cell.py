"""One time step of the two-LSTM top-down captioner (Anderson et al. 2018, section 3.2)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from updown.modules.attention import TopDownAttention, check_mask

#: Keys of the recurrent state, each ``(batch_size, hidden_size)``.
HIDDEN_KEYS = ("attention_h", "attention_c", "language_h", "language_c")


class UpDownCell(nn.Module):
    r"""The attention LSTM, top-down attention and language LSTM of one decoding step.

    ::

                                             h2_t  (to W_p and the next step)
                                               ^
                                       +---------------+
                  h2_{t-1}, c2_{t-1} ->| Language LSTM |-> c2_t
                                       +---------------+
                                               ^
                                        [v_hat_t ; h1_t]
                                          ^        |
                     +-----------------------+     |
           v_1..v_R->|  Top-down attention   |<----+ h1_t
                     +-----------------------+     |
                                       +---------------+
                  h1_{t-1}, c1_{t-1} ->| Attention LSTM|-> c1_t
                                       +---------------+
                                               ^
                               [h2_{t-1} ; mean(v) ; W_e y_{t-1}]

    ``mean(v)`` averages the REAL boxes only. The attention LSTM's input weights are stored in one
    :class:`torch.nn.LSTMCell` over the concatenated input (the layout of the equations), but the part
    that multiplies ``mean(v)`` is constant over a caption, so :meth:`precompute` applies it once per
    image and each step only multiplies ``h2_{t-1}`` and the word embedding.

    Args:
        image_feature_size: ``D``, size of one region feature.
        embedding_size: ``E``, size of the word embedding ``W_e y``.
        hidden_size: ``H``, size of both LSTMs.
        attention_size: size of the attention's joint projection space.
    """

    def __init__(
        self, image_feature_size: int, embedding_size: int, hidden_size: int, attention_size: int
    ) -> None:
        super().__init__()
        self.image_feature_size = image_feature_size
        self.embedding_size = embedding_size
        self.hidden_size = hidden_size
        self.attention_lstm = nn.LSTMCell(hidden_size + image_feature_size + embedding_size, hidden_size)
        self.attention = TopDownAttention(image_feature_size, hidden_size, attention_size)
        self.language_lstm = nn.LSTMCell(image_feature_size + hidden_size, hidden_size)

    def input_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Column blocks of the attention LSTM's input weight for ``h2``, ``mean(v)`` and the word."""
        weight = self.attention_lstm.weight_ih
        hidden_end = self.hidden_size
        image_end = hidden_end + self.image_feature_size
        return weight[:, :hidden_end], weight[:, hidden_end:image_end], weight[:, image_end:]

    def precompute(
        self, image_features: torch.Tensor, image_features_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Everything a step needs from the image that does not change over time.

        Args:
            image_features: ``(batch_size, num_boxes, image_feature_size)``.
            image_features_mask: ``(batch_size, num_boxes)`` bool, True for a real box.

        Returns:
            A dict with ``image_features`` (padded rows set to zero, so non-finite padding cannot turn
            into NaN), ``image_features_mask``, ``projected_features`` ``(batch_size, num_boxes,
            attention_size)`` (``W_v v``) and ``mean_feature_gates`` ``(batch_size, 4 * hidden_size)``
            (the attention LSTM's input weights applied to the mean of the real boxes).
        """
        check_mask(image_features, image_features_mask, "UpDownCell")
        # shape: (batch_size, num_boxes, 1)
        mask = image_features_mask.unsqueeze(-1)
        image_features = image_features.masked_fill(~mask, 0.0)
        # clamp keeps an image without real boxes at a zero mean instead of NaN.
        # shape: (batch_size, image_feature_size)
        mean_features = image_features.sum(dim=1) / mask.sum(dim=1).clamp(min=1).to(image_features.dtype)
        _, mean_weight, _ = self.input_weights()
        return {
            "image_features": image_features,
            "image_features_mask": image_features_mask,
            "projected_features": self.attention.project_features(image_features),
            # shape: (batch_size, 4 * hidden_size)
            "mean_feature_gates": F.linear(mean_features, mean_weight),
        }

    def init_hidden(self, batch_size: int, reference: torch.Tensor) -> dict[str, torch.Tensor]:
        """Zero hidden and cell states of both LSTMs, on ``reference``'s device and dtype.

        Returns:
            A dict with the keys :data:`HIDDEN_KEYS`, each ``(batch_size, hidden_size)``.
        """
        return {key: reference.new_zeros(batch_size, self.hidden_size) for key in HIDDEN_KEYS}

    def word_gates(self, token_embedding: torch.Tensor) -> torch.Tensor:
        """The word's share of the attention LSTM's gates, both LSTM biases included.

        It depends on nothing recurrent, so teacher forcing computes it for every step of every caption in
        ONE matrix product (far faster than one small product per step) and passes each step's rows to
        :meth:`forward` as ``word_gates``.

        Args:
            token_embedding: ``(..., embedding_size)``, ``W_e y``.

        Returns:
            ``(..., 4 * hidden_size)``.
        """
        _, _, word_weight = self.input_weights()
        lstm = self.attention_lstm
        return F.linear(token_embedding, word_weight, lstm.bias_ih + lstm.bias_hh)

    def forward(
        self,
        token_embedding: torch.Tensor | None,
        image: dict[str, torch.Tensor],
        hidden: dict[str, torch.Tensor],
        word_gates: torch.Tensor | None = None,
        hidden_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Run one time step.

        Args:
            token_embedding: ``(batch_size, embedding_size)``, ``W_e y_{t-1}``; may be None when
                ``word_gates`` is given.
            image: the output of :meth:`precompute` (rows aligned with ``token_embedding``).
            hidden: the previous states, keys :data:`HIDDEN_KEYS`, each ``(batch_size, hidden_size)``.
            word_gates: optional ``(batch_size, 4 * hidden_size)``, :meth:`word_gates` of this step's
                embedding, precomputed for all steps at once.
            hidden_weight: optional ``(4 * hidden_size, hidden_size)``, the ``h2`` block of the attention
                LSTM's input weight (:meth:`input_weights`). A training loop takes it once per sequence and
                passes it to every step: each fresh slice of the weight would cost a zero-filled gradient of
                the whole weight in the backward pass.

        Returns:
            ``(output, hidden, attention_weights)``: ``output`` is ``h2_t`` ``(batch_size, hidden_size)``,
            ``hidden`` the new states, ``attention_weights`` ``(batch_size, num_boxes)``.
        """
        if word_gates is None:
            if token_embedding is None:
                raise ValueError("UpDownCell: pass token_embedding or its precomputed word_gates.")
            word_gates = self.word_gates(token_embedding)
        if hidden_weight is None:
            hidden_weight, _, _ = self.input_weights()
        lstm = self.attention_lstm
        # The same gates nn.LSTMCell computes from [h2; mean(v); W_e y] (+ both biases, inside word_gates),
        # with the mean(v) block precomputed per image; addmm accumulates without extra temporaries.
        # shape: (batch_size, 4 * hidden_size)
        gates = torch.addmm(image["mean_feature_gates"] + word_gates, hidden["language_h"], hidden_weight.t())
        gates = torch.addmm(gates, hidden["attention_h"], lstm.weight_hh.t())
        input_gate, forget_gate, cell_gate, output_gate = gates.chunk(4, dim=1)
        attention_c = torch.sigmoid(forget_gate) * hidden["attention_c"] + torch.sigmoid(
            input_gate
        ) * torch.tanh(cell_gate)
        attention_h = torch.sigmoid(output_gate) * torch.tanh(attention_c)

        attention_weights, attended = self.attention(
            attention_h, image["image_features"], image["image_features_mask"], image["projected_features"]
        )
        language_h, language_c = self.language_lstm(
            torch.cat([attended, attention_h], dim=1), (hidden["language_h"], hidden["language_c"])
        )
        new_hidden = {
            "attention_h": attention_h,
            "attention_c": attention_c,
            "language_h": language_h,
            "language_c": language_c,
        }
        return language_h, new_hidden, attention_weights
