"""Reusable building blocks (plain ``nn.Module`` objects, no Lightning): attention, the UpDown cell, and more.

Import the blocks from their own modules (``from updown.modules.attention import TopDownAttention``);
this package imports nothing on its own so that each block stays independently importable.
"""
