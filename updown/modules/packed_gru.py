"""A one-layer GRU run over the real tokens of right-padded questions only.

Questions are padded to a fixed length (14 tokens for VQA v2) but hold about 6 real tokens on average, so a
GRU over the padded batch spends more than half of its arithmetic on padding. Packing the batch removes that
work, but PyTorch's packed GRU on the CPU backpropagates into its precomputed input gates one time step at
a time, zero-filling a buffer of all ``tokens x 3 hidden`` gate gradients at every step (about 9 % of a VQA
training step at batch 512). :func:`run_gru` therefore packs the batch and, off CUDA, runs the recurrence
itself: one matrix product for the input gates of every real token, then one ``(b_t, H) x (H, 3H)`` product
per step over the ``b_t`` questions still running, with gradients that flow back without zero-filling.
On CUDA it calls the module's own packed GRU (cuDNN fuses the recurrence there).

Either way the result is that of ``torch.nn.GRU`` (same parameters, same equations, same state dict); the
state after a question's last token is exactly the state it would have if it were run alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence


def run_gru(
    gru: nn.GRU, inputs: torch.Tensor, lengths: torch.Tensor, all_states: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``gru`` over the first ``lengths[b]`` steps of each sequence ``b`` of ``inputs``.

    Args:
        gru: a one-layer, unidirectional ``batch_first`` ``nn.GRU`` with biases.
        inputs: ``(B, T, input_size)``.
        lengths: ``(B,)`` integer lengths, each in ``1..T`` (any device; copied to the CPU once).
        all_states: also return the state after every step.

    Returns:
        ``final`` ``(B, hidden_size)``, the state after each sequence's last real step, and ``states``
        ``(B, T, hidden_size)`` with zeros after each sequence's end (``None`` unless ``all_states``).
    """
    if gru.num_layers != 1 or gru.bidirectional or not gru.batch_first or not gru.bias:
        raise ValueError(
            f"run_gru: needs a one-layer, unidirectional, batch_first GRU with biases, got {gru}; build it as "
            "nn.GRU(input_size, hidden_size, batch_first=True)."
        )
    # pack_padded_sequence wants the lengths on the CPU (one small copy from an accelerator).
    packed = pack_padded_sequence(
        inputs, lengths.to("cpu", torch.int64), batch_first=True, enforce_sorted=False
    )
    if inputs.is_cuda:
        packed_states, last = gru(packed)
        final = last[0]
    else:
        packed_data, final = _recurrence(gru, packed)
        packed_states = PackedSequence(
            packed_data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices
        )
    if not all_states:
        return final, None
    states, _ = pad_packed_sequence(packed_states, batch_first=True, total_length=inputs.shape[1])
    return final, states


def _recurrence(gru: nn.GRU, packed: PackedSequence) -> tuple[torch.Tensor, torch.Tensor]:
    """The GRU equations of ``torch.nn.GRU`` over a packed batch (sequences sorted by decreasing length).

    Returns the packed states ``(N, H)`` (N = number of real steps, time-major as ``packed.data``) and the
    final states ``(B, H)`` in the original batch order.
    """
    hidden_size = gru.hidden_size
    # The state stays in the input's precision; under autocast only the matrix products run in bf16/fp16.
    dtype = packed.data.dtype
    # shape: (N, 3H), the input gates of every real step in one product
    input_gates = F.linear(packed.data, gru.weight_ih_l0, gru.bias_ih_l0).to(dtype)
    # split (not slicing) so the backward concatenates the per-step gradients once instead of zero-filling
    # an (N, 3H) buffer for every step.
    steps = input_gates.split(packed.batch_sizes.tolist())
    state = packed.data.new_zeros(len(packed.sorted_indices), hidden_size)
    outputs, finished = [], []
    for step, step_gates in enumerate(steps):
        running = step_gates.shape[0]
        if running < state.shape[0]:
            # The questions at sorted positions running.. have ended: keep their last state.
            state, ended = state.split([running, state.shape[0] - running])
            finished.append(ended)
        if step == 0 and len(steps) > 1:
            # The initial state is zero, so its product with W_hh is exactly zero: only the bias remains
            # (one of the ~9 (B, H) x (H, 3H) products of a VQA batch, and its two backward products). Not when
            # every question has one token: W_hh must still take part, or DDP finds an unused parameter.
            hidden_gates = gru.bias_hh_l0.to(dtype).expand(running, -1)
        else:
            hidden_gates = F.linear(state, gru.weight_hh_l0, gru.bias_hh_l0).to(dtype)
        reset_update = torch.sigmoid(step_gates[:, : 2 * hidden_size] + hidden_gates[:, : 2 * hidden_size])
        reset, update = reset_update.chunk(2, dim=1)
        candidate = torch.tanh(step_gates[:, 2 * hidden_size :] + reset * hidden_gates[:, 2 * hidden_size :])
        # (1 - z) * n + z * h, with one fewer pass over memory
        state = candidate + update * (state - candidate)
        outputs.append(state)
    # Sorted positions: the longest questions (still running at the end) first, then those that ended later
    # before those that ended earlier.
    final_sorted = torch.cat([state, *reversed(finished)])
    return torch.cat(outputs), final_sorted.index_select(0, packed.unsorted_indices)
