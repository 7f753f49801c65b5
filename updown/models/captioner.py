"""The bottom-up top-down captioner of Anderson et al. (2018), as a plain ``nn.Module``.

Training calls :meth:`UpDownCaptioner.forward` (teacher forcing); decoding calls :meth:`init_state` once
and then :meth:`step` once per token through the functions of :mod:`updown.decoding`, for example::

    state = model.init_state(batch["image_features"], batch["image_features_mask"])
    output = beam_search(model.step, state, beam_size=5, max_length=model.max_caption_length)
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from updown.config import Config, FeatureEncoderName, HalfOpenUnitInterval, PositiveInt
from updown.modules.blocks import build_feature_encoder
from updown.modules.updown_cell import UpDownCell


@dataclasses.dataclass(frozen=True)
class CaptionerConfig(Config):
    """The captioner's hyper-parameters (the paper's sizes by default).

    Args:
        embedding_size: size of the word embedding ``W_e`` (1000 in the paper).
        hidden_size: size of both LSTMs (1000 in the paper).
        attention_size: size of the attention's projection space (512 in the paper).
        dropout: dropout probability on ``h2_t`` before ``W_p`` (0 disables it; the Adam recipe uses 0.5).
        feature_encoder: optional attention block applied to the region features first
            (:func:`updown.modules.blocks.build_feature_encoder`).
        word_vectors: a GloVe-format text file (``word v_1 ... v_E`` a line; ``.gz`` ok) whose vectors become the
            word embedding AND the output layer, both frozen, as in the nocaps baseline's CBS model:
            ``p(y_t) = softmax(E tanh(W h2_t + b))`` with ``E`` the ``(V, embedding_size)`` vectors, so a word
            never seen in a training caption still gets a score from its vector (novel object captioning).
            ``embedding_size`` must equal the file's dimension. Words the file lacks get a random vector, as in
            the reference. The file is read once, when a run starts from scratch; checkpoints hold the vectors.
            None (default): the paper's learned embedding and ``W_p h2_t + b_p`` output.
    """

    embedding_size: PositiveInt = 1000
    hidden_size: PositiveInt = 1000
    attention_size: PositiveInt = 512
    dropout: HalfOpenUnitInterval = 0.0
    feature_encoder: FeatureEncoderName | None = None
    word_vectors: str | None = None


def frozen_word_vector_output(embedding: nn.Embedding, hidden_size: int) -> nn.Sequential:
    """Freeze ``embedding`` and return the output layer tied to it: ``logits = E tanh(W h + b)``.

    The nocaps baseline's CBS model: ``h2_t`` is projected to the word-vector space and scored against every
    word's (frozen) vector, so the logit of a word depends only on where its vector lies, and a word absent from
    the training captions scores high where similar words do. Embedding and output share one tensor, saved in
    the state dict (``embedding.weight``, ``output.2.weight``), so a checkpoint rebuilds without the file.

    Args:
        embedding: the ``(V, E)`` word embedding (frozen here; fill it with :meth:`UpDownCaptioner.set_word_vectors`).
        hidden_size: size of ``h2_t``.

    Returns:
        ``Sequential(Linear(hidden_size, E), Tanh(), Linear(E, V, bias=False))`` mapping ``(..., hidden_size)``
        to ``(..., V)`` logits; the last layer's weight is ``embedding.weight``.
    """
    embedding.weight.requires_grad_(False)
    vocabulary_size, embedding_size = embedding.weight.shape
    scores = nn.Linear(embedding_size, vocabulary_size, bias=False)
    scores.weight = embedding.weight
    return nn.Sequential(nn.Linear(hidden_size, embedding_size), nn.Tanh(), scores)


class UpDownCaptioner(nn.Module):
    """Two-LSTM captioner attending over region features; ``p(y_t) = softmax(W_p h2_t + b_p)``.

    Args:
        vocabulary_size: ``V``, number of tokens including the special ones.
        image_feature_size: ``D``, size of one region feature (2048 for bottom-up features).
        config: the hyper-parameters (:class:`CaptionerConfig`).
        max_caption_length: default number of tokens (including ``<eos>``) decoding may generate.
        pad_index: id of ``<pad>``; its embedding stays zero.
        bos_index: id of ``<bos>``, the first input token.
        eos_index: id of ``<eos>``.
        unk_index: id of ``<unk>`` (kept so decoding can suppress it).
        grid_shape: ``(H, W)`` of grid features, for a 2-D ``config.feature_encoder``.
        feature_encoder: a module ``forward(features (B, R, D), mask (B, R)) -> (B, R, D)`` used instead of
            the one ``config.feature_encoder`` names.
    """

    def __init__(
        self,
        vocabulary_size: int,
        image_feature_size: int = 2048,
        config: CaptionerConfig = CaptionerConfig(),
        *,
        max_caption_length: int = 20,
        pad_index: int = 0,
        bos_index: int = 2,
        eos_index: int = 3,
        unk_index: int = 1,
        grid_shape: tuple[int, int] | None = None,
        feature_encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        special = {
            "pad_index": pad_index,
            "bos_index": bos_index,
            "eos_index": eos_index,
            "unk_index": unk_index,
        }
        for name, index in special.items():
            if not 0 <= index < vocabulary_size:
                raise ValueError(
                    f"UpDownCaptioner: {name}={index} is outside the vocabulary of size {vocabulary_size}; "
                    f"pass the ids of your vocabulary's special tokens."
                )
        if max_caption_length < 1:
            raise ValueError(
                f"UpDownCaptioner: max_caption_length must be at least 1, got {max_caption_length}."
            )
        self.config = config
        self.vocabulary_size = vocabulary_size
        self.image_feature_size = image_feature_size
        self.max_caption_length = max_caption_length
        self.pad_index, self.bos_index, self.eos_index, self.unk_index = (
            pad_index,
            bos_index,
            eos_index,
            unk_index,
        )

        self.feature_encoder = feature_encoder or build_feature_encoder(
            config.feature_encoder, image_feature_size, grid_shape=grid_shape
        )
        self.embedding = nn.Embedding(vocabulary_size, config.embedding_size, padding_idx=pad_index)
        self.cell = UpDownCell(
            image_feature_size, config.embedding_size, config.hidden_size, config.attention_size
        )
        self.dropout = nn.Dropout(config.dropout)
        if config.word_vectors is None:
            self.output = nn.Linear(config.hidden_size, vocabulary_size)
        else:
            self.output = frozen_word_vector_output(self.embedding, config.hidden_size)

    def set_word_vectors(self, vectors: torch.Tensor) -> None:
        """Copy ``(vocabulary_size, embedding_size)`` word vectors into the frozen embedding (and so into the
        tied output layer); only for a model built with ``config.word_vectors``."""
        if self.config.word_vectors is None:
            raise ValueError(
                "UpDownCaptioner.set_word_vectors: the model was built without word_vectors, so its embedding is "
                "learned; set CaptionerConfig.word_vectors to use frozen word vectors."
            )
        if vectors.shape != self.embedding.weight.shape:
            raise ValueError(
                f"UpDownCaptioner.set_word_vectors: vectors are {tuple(vectors.shape)}, the embedding is "
                f"{tuple(self.embedding.weight.shape)} (vocabulary_size, embedding_size); set embedding_size to the "
                "vectors' dimension."
            )
        with torch.no_grad():
            self.embedding.weight.copy_(vectors)

    def _check_features(self, image_features: torch.Tensor, image_features_mask: torch.Tensor) -> None:
        if image_features.dim() != 3 or image_features.size(-1) != self.image_feature_size:
            raise ValueError(
                f"UpDownCaptioner: image_features must be (batch_size, num_boxes, {self.image_feature_size}), "
                f"got {tuple(image_features.shape)}; set image_feature_size to your features' size."
            )
        if image_features_mask.dtype != torch.bool or image_features_mask.shape != image_features.shape[:2]:
            raise ValueError(
                f"UpDownCaptioner: image_features_mask must be bool of shape {tuple(image_features.shape[:2])} "
                f"(True = real box), got {image_features_mask.dtype} {tuple(image_features_mask.shape)}."
            )

    def init_state(
        self,
        image_features: torch.Tensor,
        image_features_mask: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode the images once and return the decoding state before the first token.

        Args:
            image_features: ``(num_images, num_boxes, image_feature_size)``.
            image_features_mask: ``(num_images, num_boxes)`` bool, True for a real box.
            image_index: optional ``(batch_size,)`` int64 mapping each output row to its image, so each
                image is encoded and projected once however many captions it has. Without it, row ``i``
                is image ``i``.

        Returns:
            A dict of tensors, each with ``batch_size`` as its first dimension (so decoding can reorder
            or repeat rows with ``index_select``): the image context of
            :meth:`updown.modules.updown_cell.UpDownCell.precompute` plus zero LSTM states.
        """
        self._check_features(image_features, image_features_mask)
        if self.feature_encoder is not None:
            image_features = self.feature_encoder(image_features, image_features_mask)
        image = self.cell.precompute(image_features, image_features_mask)
        if image_index is not None:
            self._check_image_index(image_index, image_features.size(0))
            image = {key: value.index_select(0, image_index) for key, value in image.items()}
        batch_size = image["image_features"].size(0)
        return {**image, **self.cell.init_hidden(batch_size, image["mean_feature_gates"])}

    def compile_steps(self, dynamic: bool = True, mode: str | None = None) -> None:
        """``torch.compile`` the one-step cell in place, the code every training and decoding step runs.

        The cell's element-wise LSTM and attention work fuses into a few kernels; the matrix products stay
        BLAS/cuBLAS calls. ``dynamic=True`` compiles once for all batch sizes (packed training shrinks the
        batch step by step). Parameter names, so checkpoints, do not change.
        """
        self.cell.compile(dynamic=dynamic, mode=mode)

    @staticmethod
    def _check_image_index(image_index: torch.Tensor, num_images: int) -> None:
        if image_index.dim() != 1 or image_index.dtype != torch.long:
            raise ValueError(
                f"UpDownCaptioner: image_index must be a 1-D int64 tensor, got {image_index.dtype} "
                f"{tuple(image_index.shape)}."
            )
        if image_index.numel() and not 0 <= int(image_index.min()) <= int(image_index.max()) < num_images:
            raise ValueError(
                f"UpDownCaptioner: image_index has values outside [0, {num_images}) for {num_images} images."
            )

    def _advance(
        self, tokens: torch.Tensor, state: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """One step of the cell; returns ``(h2_t, new state, attention)`` without the output layer."""
        output, hidden, attention = self.cell(self.embedding(tokens), state, state)
        return output, {**state, **hidden}, attention

    def step(
        self, tokens: torch.Tensor, state: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Predict the next token's distribution from the previous token.

        Args:
            tokens: ``(batch_size,)`` int64, the previous token (``<bos>`` at the first step).
            state: the state from :meth:`init_state` or the previous :meth:`step`.

        Returns:
            ``(logprobs, state, attention)``: ``logprobs`` ``(batch_size, vocabulary_size)``, the new
            state (same keys), and the attention weights ``(batch_size, num_boxes)`` used for this token.
        """
        if tokens.dim() != 1 or tokens.size(0) != state["image_features"].size(0):
            raise ValueError(
                f"UpDownCaptioner.step: tokens must be (batch_size,) = ({state['image_features'].size(0)},), "
                f"got {tuple(tokens.shape)}."
            )
        output, state, attention = self._advance(tokens, state)
        # float32 log-probabilities under bf16 autocast too: beam search sums them over many steps.
        logprobs = torch.log_softmax(self.output(self.dropout(output)).float(), dim=-1)
        return logprobs, state, attention

    def _check_captions(
        self,
        image_features: torch.Tensor,
        caption_tokens: torch.Tensor,
        image_index: torch.Tensor | None,
        scheduled_sampling_probability: float,
    ) -> None:
        if caption_tokens.dim() != 2 or caption_tokens.size(1) < 2:
            raise ValueError(
                f"UpDownCaptioner: caption_tokens must be (batch_size, max_length >= 2) starting with <bos>, "
                f"got {tuple(caption_tokens.shape)}."
            )
        if image_index is None and caption_tokens.size(0) != image_features.size(0):
            raise ValueError(
                f"UpDownCaptioner: {caption_tokens.size(0)} captions but {image_features.size(0)} images; "
                f"pass image_index to map captions to images."
            )
        if image_index is not None and image_index.shape != caption_tokens.shape[:1]:
            raise ValueError(
                f"UpDownCaptioner: image_index must have one entry per caption ({caption_tokens.size(0)}), "
                f"got shape {tuple(image_index.shape)}."
            )
        if (
            caption_tokens.numel()
            and not 0 <= int(caption_tokens.min()) <= int(caption_tokens.max()) < self.vocabulary_size
        ):
            raise ValueError(
                f"UpDownCaptioner: caption_tokens hold ids outside [0, {self.vocabulary_size}); the vocabulary "
                f"does not match the model's vocabulary_size."
            )
        if not 0.0 <= scheduled_sampling_probability <= 1.0:
            raise ValueError(
                f"UpDownCaptioner: scheduled_sampling_probability must be in [0, 1], got "
                f"{scheduled_sampling_probability}."
            )

    def forward(
        self,
        image_features: torch.Tensor,
        image_features_mask: torch.Tensor,
        caption_tokens: torch.Tensor,
        image_index: torch.Tensor | None = None,
        scheduled_sampling_probability: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """Teacher-forced pass: input ``caption_tokens[:, :-1]`` predicts targets ``caption_tokens[:, 1:]``.

        Every caption runs every step, padding included; training uses :meth:`forward_packed`, which
        skips the padding and returns the same logits for the real tokens.

        Args:
            image_features: ``(num_images, num_boxes, image_feature_size)``; ``num_images`` equals
                ``batch_size`` unless ``image_index`` is given.
            image_features_mask: ``(num_images, num_boxes)`` bool, True for a real box.
            caption_tokens: ``(batch_size, max_length)`` int64, ``<bos> w_1 .. w_n <eos> <pad> ..``.
            image_index: optional ``(batch_size,)`` int64, the image of each caption (see :meth:`init_state`).
            scheduled_sampling_probability: probability (Bengio et al. 2015) of feeding, from the second
                step on, a token sampled from the model's previous prediction instead of the ground truth
                (per caption and step; in training mode only, evaluation always teacher-forces).

        Returns:
            A dict with ``logits`` ``(batch_size, max_length - 1, vocabulary_size)`` and ``attention``
            ``(batch_size, max_length - 1, num_boxes)``.
        """
        self._check_captions(image_features, caption_tokens, image_index, scheduled_sampling_probability)
        state = self.init_state(image_features, image_features_mask, image_index)
        input_tokens = caption_tokens[:, :-1]
        sampling = self.training and scheduled_sampling_probability > 0.0

        outputs, attentions, logits = [], [], []
        if not sampling:
            # The word's gates of every step in one product; time-major so each step's rows are contiguous.
            # shape: (max_length - 1, batch_size, 4 * hidden_size)
            # unbind: one gradient assembly for all steps (each [t] view would zero-fill a full-size one).
            word_gates = self.cell.word_gates(self.embedding(input_tokens.t())).unbind(0)
            hidden_weight, _, _ = self.cell.input_weights()
        for time_step in range(input_tokens.size(1)):
            tokens = input_tokens[:, time_step]
            if sampling:
                if time_step > 0:
                    previous = torch.softmax(logits[-1].detach(), dim=-1)
                    sampled = torch.multinomial(previous, 1).squeeze(1)
                    replace = torch.rand(tokens.shape, device=tokens.device) < scheduled_sampling_probability
                    tokens = torch.where(replace, sampled, tokens)
                output, state, attention = self._advance(tokens, state)
                logits.append(self.output(self.dropout(output)))
            else:
                output, hidden, attention = self.cell(
                    None, state, state, word_gates=word_gates[time_step], hidden_weight=hidden_weight
                )
                state = {**state, **hidden}
            outputs.append(output)
            attentions.append(attention)

        if sampling:
            # shape: (batch_size, max_length - 1, vocabulary_size)
            all_logits = torch.stack(logits, dim=1)
        else:
            # One large matrix product over all steps is faster than one per step.
            # shape: (batch_size, max_length - 1, vocabulary_size)
            all_logits = self.output(self.dropout(torch.stack(outputs, dim=1)))
        # shape: (batch_size, max_length - 1, num_boxes)
        attention = torch.stack(attentions, dim=1)
        return {"logits": all_logits, "attention": attention}

    def forward_packed(
        self,
        image_features: torch.Tensor,
        image_features_mask: torch.Tensor,
        caption_tokens: torch.Tensor,
        image_index: torch.Tensor | None = None,
        scheduled_sampling_probability: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """:meth:`forward` for training: logits of the real (non-``<pad>``) target tokens only.

        Captions are sorted by length and step ``t`` runs only the captions still going at ``t`` (as
        ``torch.nn.utils.rnn.pack_padded_sequence`` does), and the output layer, the largest product, sees
        only real tokens. With COCO's caption lengths this skips about a third of the work of :meth:`forward`
        and gives the same logits for the real tokens (up to float rounding). Scheduled sampling, or
        ``<pad>`` before the end of a caption, takes :meth:`forward` and keeps its real tokens.

        Args:
            As :meth:`forward`.

        Returns:
            A dict of ``num_tokens`` rows (one per real target token, in an unspecified but fixed order):
            ``logits`` ``(num_tokens, vocabulary_size)``, ``targets`` ``(num_tokens,)`` int64, and for
            mapping rows back to ``caption_tokens[:, 1:]``, ``caption_index`` and ``time_index``
            ``(num_tokens,)`` int64, with ``attention`` ``(num_tokens, num_boxes)``.
        """
        self._check_captions(image_features, caption_tokens, image_index, scheduled_sampling_probability)
        input_tokens, targets = caption_tokens[:, :-1], caption_tokens[:, 1:]
        num_steps = input_tokens.size(1)
        # shape: (batch_size, max_length - 1)
        real = targets != self.pad_index
        lengths = real.sum(dim=1)
        steps = torch.arange(num_steps, device=caption_tokens.device)
        trailing_padding = torch.equal(real, steps.unsqueeze(0) < lengths.unsqueeze(1))
        if (self.training and scheduled_sampling_probability > 0.0) or not trailing_padding:
            output = self.forward(
                image_features,
                image_features_mask,
                caption_tokens,
                image_index,
                scheduled_sampling_probability,
            )
            caption_index, time_index = real.nonzero(as_tuple=True)
            return {
                "logits": output["logits"][caption_index, time_index],
                "targets": targets[caption_index, time_index],
                "caption_index": caption_index,
                "time_index": time_index,
                "attention": output["attention"][caption_index, time_index],
            }

        # Longest first, so the captions still going at step t are the first batch_sizes[t] rows.
        order = torch.argsort(lengths, descending=True, stable=True)
        # shape: (max_length - 1,)
        batch_sizes = (lengths[order].unsqueeze(0) > steps.unsqueeze(1)).sum(dim=1).tolist()
        # Time-major positions of the real tokens: step 0's rows, then step 1's, ...
        # shape: (max_length - 1, batch_size)
        packed = real[order].t()
        caption_index = order.unsqueeze(0).expand(num_steps, -1)[packed]
        time_index = steps.unsqueeze(1).expand(-1, order.numel())[packed]

        self._check_features(image_features, image_features_mask)
        if image_index is not None:
            self._check_image_index(image_index, image_features.size(0))
        row_images = order if image_index is None else image_index.index_select(0, order)
        if self.feature_encoder is not None:
            image_features = self.feature_encoder(image_features, image_features_mask)
        # Per image: each step gathers its captions' rows of the tensors that need a gradient (a slice of a
        # per-caption copy would cost a zero-filled full-size gradient at every step) and slices per-caption
        # copies of the others (free).
        per_image = self.cell.precompute(image_features, image_features_mask)
        per_caption = {
            key: value.index_select(0, row_images)
            for key, value in per_image.items()
            if not value.requires_grad
        }
        gathered = {key: value for key, value in per_image.items() if value.requires_grad}
        hidden = self.cell.init_hidden(order.numel(), per_image["mean_feature_gates"])
        # shape: (num_tokens, 4 * hidden_size), split into the steps' (batch_sizes[t], 4 * hidden_size) blocks
        word_gates = self.cell.word_gates(self.embedding(input_tokens[caption_index, time_index]))
        hidden_weight, _, _ = self.cell.input_weights()
        outputs, attentions = [], []
        for batch_size, step_gates in zip(batch_sizes, word_gates.split(batch_sizes)):
            if batch_size == 0:
                break
            rows = row_images[:batch_size]
            image = {key: value[:batch_size] for key, value in per_caption.items()}
            image.update({key: value.index_select(0, rows) for key, value in gathered.items()})
            hidden = {key: value[:batch_size] for key, value in hidden.items()}
            output, hidden, attention = self.cell(
                None, image, hidden, word_gates=step_gates, hidden_weight=hidden_weight
            )
            outputs.append(output)
            attentions.append(attention)
        if not outputs:  # no real token at all: empty results that still carry a graph
            outputs.append(hidden["language_h"][:0] + word_gates.sum() * 0)
            attentions.append(
                per_caption.get("image_features_mask", image_features_mask)[:0].to(outputs[0].dtype)
            )
        # shape: (num_tokens, hidden_size)
        hidden_states = torch.cat(outputs)
        if self.training and self.dropout.p > 0:
            # Exactly the mask nn.Dropout draws in forward() for its (batch_size, max_length - 1, hidden_size)
            # outputs, read at the real tokens: packing changes neither the masks nor the random state after.
            mask_shape = (*input_tokens.shape, hidden_states.size(-1))
            _, mask = torch.native_dropout(
                torch.empty(mask_shape, device=hidden_states.device), self.dropout.p, True
            )
            hidden_states = hidden_states * mask[caption_index, time_index] * (1.0 / (1.0 - self.dropout.p))
        # shape: (num_tokens, vocabulary_size)
        logits = self.output(hidden_states)
        return {
            "logits": logits,
            "targets": targets[caption_index, time_index],
            "caption_index": caption_index,
            "time_index": time_index,
            "attention": torch.cat(attentions),
        }
