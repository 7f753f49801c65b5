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

import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from updown.modules.fusion import CrossAttentionFusion
from updown.modules.gated_tanh import ACTIVATIONS, GatedTanh, linear_layer

FUSIONS = ("product", "cross_attention")
FEATURE_NORMS = ("none", "layer")


def load_glove(
    glove_path: str | os.PathLike, tokens: Sequence[str], initial: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Read GloVe vectors for ``tokens`` from a GloVe text file (``word v_1 ... v_N`` per line; ``.gz`` ok).

    Only lines whose word is one of ``tokens`` are parsed and validated, so a 2 GB file costs one pass of
    string splitting. Words containing spaces (glove.840B has a few) are handled; a word2vec-style header
    line (``count dim``) is skipped.

    Args:
        glove_path: the text file, e.g. ``glove.6B.300d.txt``.
        tokens: vocabulary in index order.
        initial: optional ``(len(tokens), N)`` float tensor whose rows are kept for tokens not in the file
            (default: zeros).

    Returns:
        ``(vectors, num_found)``: ``vectors`` ``(len(tokens), N)`` float32, and how many tokens were found.

    Raises:
        FileNotFoundError: ``glove_path`` does not exist.
        ValueError: the file is empty or malformed, or ``initial`` has the wrong shape.
    """
    path = Path(glove_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: GloVe file not found. Download glove.6B.zip from https://nlp.stanford.edu/projects/glove/, "
            "unzip it and pass glove.6B.300d.txt as glove_path, or set glove_path to None for random embeddings."
        )
    positions: dict[str, list[int]] = {}
    for index, token in enumerate(tokens):
        positions.setdefault(token, []).append(index)
    vectors: dict[str, list[float]] = {}
    dim = None
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as file:
        for line_number, line in enumerate(file, start=1):
            line = line.rstrip()
            if not line:
                continue
            if dim is None:
                fields = line.split(" ")
                if line_number == 1 and len(fields) == 2 and all(field.isdigit() for field in fields):
                    continue
                dim = len(fields) - 1
                if dim < 1:
                    raise ValueError(
                        f"{path}, line {line_number}: no vector after the word; expected a GloVe "
                        "text file with one 'word v_1 ... v_N' per line."
                    )
            # Cheap test on the first field before splitting the whole line.
            if line.partition(" ")[0] not in positions:
                continue
            fields = line.split(" ")
            if len(fields) - 1 < dim:
                raise ValueError(
                    f"{path}, line {line_number}: {len(fields) - 1} values, but the first vector has {dim}; "
                    "the file is truncated or not a GloVe text file."
                )
            word = " ".join(fields[: len(fields) - dim])
            if word not in positions or word in vectors:
                continue
            try:
                vectors[word] = [float(value) for value in fields[-dim:]]
            except ValueError:
                raise ValueError(
                    f"{path}, line {line_number}: the vector of {word!r} holds a non-number; expected a GloVe "
                    "text file with one 'word v_1 ... v_N' per line."
                ) from None
    if dim is None:
        raise ValueError(f"{path}: the GloVe file is empty.")
    if initial is None:
        result = torch.zeros(len(tokens), dim)
    elif initial.shape != (len(tokens), dim):
        raise ValueError(
            f"{path}: vectors have {dim} dimensions, but the embedding to initialise is "
            f"{tuple(initial.shape)} for {len(tokens)} tokens; set embedding_size={dim}, or use the GloVe file "
            f"of {initial.shape[-1]} dimensions (e.g. glove.6B.{initial.shape[-1]}d.txt)."
        )
    else:
        result = initial.detach().to(torch.float32).clone()
    num_found = 0
    for word, vector in vectors.items():
        result[positions[word]] = torch.tensor(vector)
        num_found += len(positions[word])
    return result, num_found


ATTENTIONS = ("concat", "product")


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
        form: str = "concat",
        layer: type[nn.Module] = GatedTanh,
    ):
        super().__init__()
        if form not in ATTENTIONS:
            raise ValueError(f"GatedTanhAttention: form={form!r} is not one of {ATTENTIONS}.")
        self.form = form
        if form == "concat":
            self.scorer = layer(image_feature_size + question_size, hidden_size, weight_norm=weight_norm)
        else:
            self.image_scorer = layer(image_feature_size, hidden_size, weight_norm=weight_norm)
            self.question_scorer = layer(question_size, hidden_size, weight_norm=weight_norm)
        self.dropout = nn.Dropout(dropout)
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
        else:
            joint = self.image_scorer(image_features) * self.question_scorer(question).unsqueeze(1)
        # shape: (B, R)
        scores = self.score(self.dropout(joint)).squeeze(-1)
        scores = scores.masked_fill(~image_features_mask, float("-inf"))
        return torch.softmax(scores, dim=1).masked_fill(~image_features_mask, 0.0)


class UpDownVQA(nn.Module):
    """Gated-tanh VQA model with top-down attention over region features (see the module docstring).

    Args:
        vocabulary_size: number of question tokens, ``<pad>`` included.
        num_answers: size of the answer vocabulary (3129 on VQA v2).
        image_feature_size: size ``D`` of a region feature (2048 for bottom-up features).
        embedding_size: word embedding size (300, GloVe's).
        hidden_size: GRU size and joint embedding size (512 in the paper, 1024 in the reproduction).
        dropout: dropout in the attention scorer and the cross-attention fusion.
        classifier_dropout: dropout between the classifier's two layers (0.5 in the reproduction).
        weight_norm: weight-normalise every linear layer, one scalar norm per matrix (as the reproduction).
        fusion: ``"product"`` (the paper's top-down attention and product) or ``"cross_attention"``.
        feature_norm: ``"none"`` (the paper) or ``"layer"``: LayerNorm on each region feature before anything
            reads it. Bottom-up features are non-negative (ReLU-pooled), so every region shares a large
            positive mean; under Adam(ax) the first updates move all weights of a layer coherently along
            that mean, which pushes the bounded gated-tanh units of the image path into saturation, and the
            model falls back on the language prior. Centring each feature avoids it (measured on the
            synthetic world: see configs/vqa/synthetic.yaml).
        activation: ``"gated_tanh"`` (the paper) or ``"relu"`` (the reproduction's ``FCNet``), for every
            non-linear layer of the attention, the projections and the classifier.
        attention: the top-down attention's scorer with ``fusion="product"``: ``"concat"`` (the paper's
            ``w^T GT([v_i; q])``) or ``"product"`` (the reproduction's ``w^T (GT(v_i) * GT(q))``).
        num_heads: attention heads of the cross-attention fusion.
        question_only: no image path at all: ``logits = classifier(GatedTanh_q(q))``.
        glove_path: optional GloVe text file to initialise the word embedding; words it lacks keep their
            random initialisation. Needs ``vocabulary_tokens``.
        vocabulary_tokens: the question vocabulary in index order (for GloVe look-up).
        feature_encoder: optional module applied first as ``feature_encoder(image_features,
            image_features_mask) -> (B, R, image_feature_size)`` (e.g. an SE or Non-local block).
        pad_index: index of ``<pad>``; its embedding stays zero.
    """

    def __init__(
        self,
        vocabulary_size: int,
        num_answers: int,
        image_feature_size: int = 2048,
        embedding_size: int = 300,
        hidden_size: int = 512,
        dropout: float = 0.2,
        classifier_dropout: float = 0.5,
        weight_norm: bool = True,
        fusion: str = "product",
        attention: str = "concat",
        feature_norm: str = "none",
        activation: str = "gated_tanh",
        num_heads: int = 8,
        question_only: bool = False,
        glove_path: str | None = None,
        vocabulary_tokens: Sequence[str] | None = None,
        feature_encoder: nn.Module | None = None,
        pad_index: int = 0,
    ):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"UpDownVQA: fusion={fusion!r} is not one of {FUSIONS}.")
        if attention not in ATTENTIONS:
            raise ValueError(f"UpDownVQA: attention={attention!r} is not one of {ATTENTIONS}.")
        if activation not in ACTIVATIONS:
            raise ValueError(f"UpDownVQA: activation={activation!r} is not one of {tuple(ACTIVATIONS)}.")
        layer = ACTIVATIONS[activation]
        if feature_norm not in FEATURE_NORMS:
            raise ValueError(f"UpDownVQA: feature_norm={feature_norm!r} is not one of {FEATURE_NORMS}.")
        if question_only and feature_encoder is not None:
            raise ValueError("UpDownVQA: question_only=True reads no image, so feature_encoder must be None.")
        if not 0 <= pad_index < vocabulary_size:
            raise ValueError(
                f"UpDownVQA: pad_index={pad_index} must lie in [0, vocabulary_size={vocabulary_size})."
            )
        self.fusion_name = fusion
        self.question_only = question_only
        self.pad_index = pad_index

        self.embedding = nn.Embedding(vocabulary_size, embedding_size, padding_idx=pad_index)
        self.glove_words_found = 0
        if glove_path is not None:
            if vocabulary_tokens is None or len(vocabulary_tokens) != vocabulary_size:
                given = None if vocabulary_tokens is None else len(vocabulary_tokens)
                raise ValueError(
                    f"UpDownVQA: glove_path={glove_path!r} needs vocabulary_tokens, the {vocabulary_size} question "
                    f"tokens in index order (got {given}); pass the question vocabulary's tokens."
                )
            vectors, self.glove_words_found = load_glove(glove_path, vocabulary_tokens, self.embedding.weight)
            with torch.no_grad():
                self.embedding.weight.copy_(vectors)
                self.embedding.weight[pad_index].zero_()
        self.gru = nn.GRU(embedding_size, hidden_size, num_layers=1, batch_first=True)

        self.feature_norm = (
            nn.LayerNorm(image_feature_size) if feature_norm == "layer" and not question_only else None
        )
        self.feature_encoder = feature_encoder
        if question_only or fusion == "product":
            self.question_projection = layer(hidden_size, hidden_size, weight_norm=weight_norm)
        if not question_only and fusion == "product":
            self.attention = GatedTanhAttention(
                image_feature_size,
                hidden_size,
                hidden_size,
                dropout,
                weight_norm,
                form=attention,
                layer=layer,
            )
            self.image_projection = layer(image_feature_size, hidden_size, weight_norm=weight_norm)
        elif not question_only:
            # The fusion projects the question tokens itself.
            self.fusion = CrossAttentionFusion(
                hidden_size, image_feature_size, hidden_size, num_heads, dropout, weight_norm, layer=layer
            )
        self.classifier = nn.Sequential(
            layer(hidden_size, 2 * hidden_size, weight_norm=weight_norm),
            nn.Dropout(classifier_dropout),
            linear_layer(2 * hidden_size, num_answers, weight_norm),
        )

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

        # shape: (B, T, hidden_size)
        states, _ = self.gru(self.embedding(question_tokens))
        # The GRU runs left to right, so the state at the last real token never saw the padding.
        last = (question_lengths.long() - 1).view(batch_size, 1, 1).expand(-1, 1, states.shape[-1])
        # shape: (B, hidden_size)
        question = states.gather(1, last).squeeze(1)

        if self.question_only:
            joint = self.question_projection(question)
            # shape: (B, R)
            attention = image_features_mask.new_zeros(image_features_mask.shape, dtype=question.dtype)
        else:
            # Zero padded rows so that whatever they hold (even NaN) cannot reach real outputs.
            features = image_features.masked_fill(~image_features_mask.unsqueeze(-1), 0.0)
            if self.feature_norm is not None:
                # LayerNorm maps a zero row to its bias: zero the padded rows again.
                features = self.feature_norm(features).masked_fill(~image_features_mask.unsqueeze(-1), 0.0)
            if self.feature_encoder is not None:
                features = self.feature_encoder(features, image_features_mask)
            if self.fusion_name == "product":
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
