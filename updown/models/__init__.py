"""Complete models as plain ``nn.Module`` objects (no Lightning), runnable in a notebook without a Trainer.

Import a model from its own module, e.g. ``from updown.models.captioner import UpDownCaptioner``.
"""
