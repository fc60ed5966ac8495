"""Which segmentation models exist, by name, and the interface every model implements."""

from __future__ import annotations

import functools
from typing import Protocol

import numpy as np
import torch

from agent.domain import ModelIdentity, SegmentSpec
from agent.errors import PermanentError
from agent.inference.volume import Volume


class Model(Protocol):
    """A segmentation model: what it is, what it outputs, and how to run it."""

    @property
    def identity(self) -> ModelIdentity: ...

    @property
    def segments(self) -> tuple[SegmentSpec, ...]: ...

    def predict(self, volume: Volume, device: torch.device) -> np.ndarray:
        """Bool masks shaped (len(segments), z, y, x), in the order of `segments`."""
        ...


def model_names() -> tuple[str, ...]:
    """The names `get_model` knows."""
    return ("ct-tissue",)


@functools.cache
def get_model(name: str) -> Model:
    """The model called `name`, built once per process; PermanentError if there is none."""
    # Imported here so that listing names does not import every model's dependencies.
    if name == "ct-tissue":
        from agent.inference.models.ct_tissue import CtTissueModel

        return CtTissueModel()
    raise PermanentError(f"unknown model {name!r}; known models: {', '.join(model_names())}")
