"""BFAN image-text retrieval model (Liu et al., ACM MM 2019, arXiv 1909.11416).

Regions are projected to the joint space by one linear layer, words by a bidirectional GRU whose two
directions are averaged; both are l2-normalised, and an image-caption pair is scored by bidirectional
focal attention (:mod:`updown.modules.focal`). Training uses the VSE++ hardest-negative ranking loss on
the square similarity matrix that :meth:`BFANRetrieval.forward` returns (diagonal = matching pairs).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from updown.config import Config, FeatureEncoderName, PositiveFloat, PositiveInt
from updown.modules.blocks import build_feature_encoder
from updown.modules.focal import FocalType, bfan_similarity


def l2_normalize(tensor: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Divide by the l2 norm plus ``eps`` (the reference code's l2norm), along ``dim``."""
    return tensor / (torch.linalg.vector_norm(tensor, dim=dim, keepdim=True) + eps)


@dataclasses.dataclass(frozen=True)
class BFANConfig(Config):
    """BFAN's hyper-parameters (the paper's by default).

    Args:
        word_embedding_size: size of the word embeddings (300).
        joint_embedding_size: size of the joint space, also the GRU hidden size (1024).
        num_gru_layers: number of stacked bidirectional GRU layers (1).
        lambda_softmax: inverse temperature of the attention pre-assignment (20).
        focal_type: ``"equal"`` (fragments above the mean weight are relevant, the paper's default) or
            ``"prob"``.
        feature_encoder: optional attention block applied to the region features before the projection.
        similarity_chunk_size: images and captions per chunk when scoring large sets in
            :meth:`BFANRetrieval.similarity`; memory grows as its square times regions times words.
    """

    word_embedding_size: PositiveInt = 300
    joint_embedding_size: PositiveInt = 1024
    num_gru_layers: PositiveInt = 1
    lambda_softmax: PositiveFloat = 20.0
    focal_type: FocalType = "equal"
    feature_encoder: FeatureEncoderName | None = None
    similarity_chunk_size: PositiveInt = 128


class BFANRetrieval(nn.Module):
    """Bidirectional focal attention network for image-text matching.

    Args:
        vocabulary_size: number of tokens in the caption vocabulary.
        image_feature_size: size D of the region features (2048 for bottom-up features).
        config: the hyper-parameters (:class:`BFANConfig`).
        grid_shape: ``(H, W)`` of grid features, for a 2-D ``config.feature_encoder``.
        feature_encoder: a module ``forward(features (B, R, D), mask (B, R)) -> (B, R, D)`` used instead of
            the one ``config.feature_encoder`` names.
    """

    def __init__(
        self,
        vocabulary_size: int,
        image_feature_size: int = 2048,
        config: BFANConfig = BFANConfig(),
        *,
        grid_shape: tuple[int, int] | None = None,
        feature_encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        joint_embedding_size, word_embedding_size = config.joint_embedding_size, config.word_embedding_size
        self.image_feature_size = image_feature_size
        self.joint_embedding_size = joint_embedding_size
        self.lambda_softmax = config.lambda_softmax
        self.focal_type = config.focal_type
        self.similarity_chunk_size = config.similarity_chunk_size
        self.feature_encoder = feature_encoder or build_feature_encoder(
            config.feature_encoder, image_feature_size, grid_shape=grid_shape
        )

        self.image_projection = nn.Linear(image_feature_size, joint_embedding_size)
        self.word_embedding = nn.Embedding(vocabulary_size, word_embedding_size)
        self.gru = nn.GRU(
            word_embedding_size,
            joint_embedding_size,
            config.num_gru_layers,
            batch_first=True,
            bidirectional=True,
        )
        # The reference code's initialisation: Xavier-uniform projection, zero bias, U(-0.1, 0.1) words.
        bound = math.sqrt(6.0) / math.sqrt(image_feature_size + joint_embedding_size)
        nn.init.uniform_(self.image_projection.weight, -bound, bound)
        nn.init.zeros_(self.image_projection.bias)
        nn.init.uniform_(self.word_embedding.weight, -0.1, 0.1)

    def encode_images(self, image_features: torch.Tensor, image_features_mask: torch.Tensor) -> torch.Tensor:
        """Project regions to the joint space.

        Args:
            image_features: ``(batch_size, num_boxes, image_feature_size)``.
            image_features_mask: ``(batch_size, num_boxes)`` bool, True for a real box.

        Returns:
            ``(batch_size, num_boxes, joint_embedding_size)`` l2-normalised region embeddings; padded
            boxes are zero.
        """
        if image_features.dim() != 3 or image_features.size(-1) != self.image_feature_size:
            raise ValueError(
                f"BFANRetrieval: image_features has shape {tuple(image_features.shape)}, expected "
                f"(batch_size, num_boxes, {self.image_feature_size}); set image_feature_size to the "
                "features' last dimension."
            )
        if image_features_mask.shape != image_features.shape[:2]:
            raise ValueError(
                f"BFANRetrieval: image_features_mask has shape {tuple(image_features_mask.shape)}, expected "
                f"{tuple(image_features.shape[:2])} (one flag per box)."
            )
        if not bool(image_features_mask.any(dim=1).all()):
            raise ValueError("BFANRetrieval: an image has no real box (image_features_mask all False).")
        if self.feature_encoder is not None:
            image_features = self.feature_encoder(image_features, image_features_mask)
        embeddings = l2_normalize(self.image_projection(image_features))
        return embeddings.masked_fill(~image_features_mask.unsqueeze(-1), 0.0)

    def encode_captions(
        self, caption_tokens: torch.Tensor, caption_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode words with the bidirectional GRU.

        Args:
            caption_tokens: ``(batch_size, max_length)`` int64 token ids, right-padded.
            caption_lengths: ``(batch_size,)`` number of real tokens per caption (>= 1).

        Returns:
            ``word_embeddings``: ``(batch_size, max_length, joint_embedding_size)`` l2-normalised mean of
            the two GRU directions, zero on padding; and ``caption_mask``: ``(batch_size, max_length)``
            bool, True for a real token.
        """
        if caption_tokens.dim() != 2 or caption_lengths.shape != caption_tokens.shape[:1]:
            raise ValueError(
                f"BFANRetrieval: caption_tokens {tuple(caption_tokens.shape)} and caption_lengths "
                f"{tuple(caption_lengths.shape)} must be (batch_size, max_length) and (batch_size,)."
            )
        max_length = caption_tokens.size(1)
        if bool((caption_lengths < 1).any()) or bool((caption_lengths > max_length).any()):
            raise ValueError(
                f"BFANRetrieval: caption_lengths must lie in [1, {max_length}] (the padded length); got "
                f"{caption_lengths.tolist()}."
            )
        packed = pack_padded_sequence(
            self.word_embedding(caption_tokens), caption_lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        # shape: (batch_size, max_length, 2 * joint_embedding_size)
        outputs, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=max_length)
        forward_states, backward_states = outputs.chunk(2, dim=-1)
        word_embeddings = l2_normalize((forward_states + backward_states) / 2)
        # shape: (batch_size, max_length)
        caption_mask = torch.arange(max_length, device=caption_tokens.device) < caption_lengths.to(
            caption_tokens.device
        ).unsqueeze(1)
        return word_embeddings.masked_fill(~caption_mask.unsqueeze(-1), 0.0), caption_mask

    def similarity(
        self,
        image_embeddings: torch.Tensor,
        image_features_mask: torch.Tensor,
        word_embeddings: torch.Tensor,
        caption_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Score every image against every caption, ``similarity_chunk_size`` at a time.

        Args:
            image_embeddings: ``(num_images, num_boxes, joint_embedding_size)`` from :meth:`encode_images`.
            image_features_mask: ``(num_images, num_boxes)`` bool.
            word_embeddings: ``(num_captions, max_length, joint_embedding_size)`` from
                :meth:`encode_captions`.
            caption_mask: ``(num_captions, max_length)`` bool.

        Returns:
            ``(num_images, num_captions)`` BFAN similarities (text-to-image plus image-to-text).
        """
        chunk = self.similarity_chunk_size
        rows = []
        for image_start in range(0, image_embeddings.size(0), chunk):
            image_slice = slice(image_start, image_start + chunk)
            row = [
                bfan_similarity(
                    image_embeddings[image_slice],
                    image_features_mask[image_slice],
                    word_embeddings[caption_start : caption_start + chunk],
                    caption_mask[caption_start : caption_start + chunk],
                    self.lambda_softmax,
                    self.focal_type,
                )
                for caption_start in range(0, word_embeddings.size(0), chunk)
            ]
            rows.append(torch.cat(row, dim=1))
        # shape: (num_images, num_captions)
        return torch.cat(rows, dim=0)

    def forward(
        self,
        image_features: torch.Tensor,
        image_features_mask: torch.Tensor,
        caption_tokens: torch.Tensor,
        caption_lengths: torch.Tensor,
    ) -> torch.Tensor:
        """Similarity of every image in the batch with every caption in the batch.

        Args:
            image_features: ``(num_images, num_boxes, image_feature_size)``.
            image_features_mask: ``(num_images, num_boxes)`` bool, True for a real box.
            caption_tokens: ``(num_captions, max_length)`` int64.
            caption_lengths: ``(num_captions,)`` int64.

        Returns:
            ``(num_images, num_captions)`` similarities; with aligned batches the diagonal holds the
            matching pairs, as the ranking loss expects.
        """
        image_embeddings = self.encode_images(image_features, image_features_mask)
        word_embeddings, caption_mask = self.encode_captions(caption_tokens, caption_lengths)
        return self.similarity(image_embeddings, image_features_mask, word_embeddings, caption_mask)
