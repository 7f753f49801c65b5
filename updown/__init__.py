"""updown: bottom-up and top-down attention for vision and language.

Importing this package must stay cheap: no Lightning, no h5py here.
"""

__version__ = "0.1.0"
