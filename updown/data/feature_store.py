"""Where the region features of a run live: on disk, in host memory, or on the accelerator.

``feature_store`` (an argument of :class:`~updown.data.readers.RegionFeatures` and of every datamodule,
``data.init_args.feature_store`` in a config) chooses:

- ``disk`` (default): each item is read from the HDF5 file when the loader asks for it (lazy reads); the
  resident memory of the main process and of each loader worker stays bounded whatever the number of images.
- ``host``: every image is read and checked once when the reader is built, then kept in host memory in the
  file's dtype (float16 for COCO: 123,287 x 36 x 2048 x 2 bytes, about 18 GB). ``in_memory: true`` is the
  older name of this choice.
- ``device``: every image is read and checked once, block by block, into one ``(N, max_boxes, D)`` tensor on
  the accelerator (:class:`DeviceFeatureStore`), in the file's dtype. Loader items then carry only the image's
  row of that tensor (with the boxes, a few hundred bytes), the collate function puts the rows in the batch as
  ``image_features_index``, and after the batch reaches the device the datamodule's ``on_after_batch_transfer``
  gathers the features there (:meth:`DeviceFeatureStore.gather_batch`): no 2048-d feature crosses the
  host-to-device link per batch.

All three give the same batches, bit for bit (``image_features`` is float32; float16 values convert exactly).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from updown.types import FEATURES_INDEX_KEY

FeatureStoreKind = Literal["disk", "host", "device"]
FEATURE_STORES: tuple[str, ...] = ("disk", "host", "device")


def resolve_feature_store(feature_store: str | None, in_memory: bool, source: str = "RegionFeatures") -> str:
    """The store to use from ``feature_store`` and the older ``in_memory`` flag (``in_memory=True`` is ``host``).

    Raises:
        ValueError: an unknown store, or ``in_memory=True`` together with another store than ``host``.
    """
    if feature_store is not None and feature_store not in FEATURE_STORES:
        raise ValueError(
            f"{source}: feature_store must be one of {list(FEATURE_STORES)}, not {feature_store!r}."
        )
    if in_memory:
        if feature_store not in (None, "host"):
            raise ValueError(
                f"{source}: in_memory=True asks for the host store but feature_store is {feature_store!r}. "
                "in_memory is the older name of feature_store: host; drop it and set feature_store alone."
            )
        return "host"
    return feature_store or "disk"


class DeviceFeatureStore:
    """Every image's region features in one tensor on one device, gathered there by row.

    Rows beyond an image's box count hold zeros, as in a batch from the disk reader. The tensor does not travel
    to DataLoader workers (they only need the row numbers), and is moved to the batch's device on first use if
    it was built elsewhere (e.g. before the Trainer chose the accelerator).

    Args:
        num_rows: ``N``, images in all (every file of the reader, one after the other).
        max_boxes: the largest box count of any file.
        feature_size: ``D``.
        dtype: the files' feature dtype (float16 or float32), kept as it is.
        device: where the tensor lives (``"cuda"``, ``"cpu"``, a ``torch.device``).
    """

    def __init__(
        self, num_rows: int, max_boxes: int, feature_size: int, dtype: np.dtype, device: str | torch.device
    ) -> None:
        self.torch_dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        self.shape = (num_rows, max_boxes, feature_size)
        # shape: (N, max_boxes, D); every row is written whole by put(), padding included.
        self.tensor: torch.Tensor | None = torch.empty(self.shape, dtype=self.torch_dtype, device=device)

    @property
    def device(self) -> torch.device:
        return self._tensor().device

    @property
    def nbytes(self) -> int:
        return self._tensor().numel() * self._tensor().element_size()

    def _tensor(self) -> torch.Tensor:
        if self.tensor is None:
            raise RuntimeError(
                "DeviceFeatureStore: the feature tensor is not in this process (a DataLoader worker gets the "
                "rows only); gather batches in the main process, after the batch reached its device."
            )
        return self.tensor

    def put(self, start: int, rows: np.ndarray) -> None:
        """Write the rows ``start : start + B`` from ``rows`` ``(B, m, D)`` (``m <= max_boxes``), already
        zero beyond each image's box count; the remaining boxes are zeroed."""
        tensor = self._tensor()
        block = torch.from_numpy(np.ascontiguousarray(rows)).to(tensor.device, tensor.dtype)
        stop = start + block.shape[0]
        tensor[start:stop, : block.shape[1]] = block
        if block.shape[1] < tensor.shape[1]:
            tensor[start:stop, block.shape[1] :] = 0

    def gather(self, rows: torch.Tensor, num_regions: int) -> torch.Tensor:
        """Features of the images at ``rows`` ``(B,)`` int64, cut to the batch's ``num_regions`` boxes.

        Returns:
            ``(B, num_regions, D)`` float32 on the device of ``rows``.
        """
        tensor = self._tensor()
        if tensor.device != rows.device:
            # Once: the store was built before the batch's device was known.
            self.tensor = tensor = tensor.to(rows.device)
        return tensor[rows, :num_regions].float()

    def gather_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Replace the batch's ``image_features_index (B,)`` with ``image_features (B, R, D)`` float32, R being
        the width of ``image_features_mask (B, R)``; a batch without the index is returned as it is."""
        if FEATURES_INDEX_KEY not in batch:
            return batch
        rows = batch.pop(FEATURES_INDEX_KEY)
        batch["image_features"] = self.gather(rows, batch["image_features_mask"].shape[1])
        return batch

    def __getstate__(self) -> dict[str, Any]:
        # Workers (and pickled readers) never gather; they must not copy gigabytes, nor touch a CUDA tensor.
        state = self.__dict__.copy()
        state["tensor"] = None
        return state
