"""LightningModules: wiring only (loss, decoding policy, metrics, logging, optimiser) around plain models.

Configs name tasks by their full path, e.g. ``updown.tasks.captioning.CaptioningTask``.
"""
