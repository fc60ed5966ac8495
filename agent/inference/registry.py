"""Which segmentation models exist, by name, and the interface every model implements."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from agent.domain import ModelIdentity, SegmentSpec
from agent.errors import ConfigError, PermanentError, RetryableError
from agent.inference.runner import resolve_device
from agent.inference.volume import Volume
from agent.settings import ModelSettings

if TYPE_CHECKING:
    from agent.models.runner import PackagedModel

log = logging.getLogger(__name__)

# Built-in models are model packages shipped inside pacs-agent.
BUILTIN = Path(__file__).resolve().parent.parent / "models" / "builtin"


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
    """The built-in models' names: those a `[[models]]` entry may name without a package."""
    return tuple(sorted(p.name for p in BUILTIN.iterdir() if (p / "model.toml").is_file()))


def package_path(name: str, package: Path | None) -> Path:
    """The package a `[[models]]` entry runs: its own, or the built-in one of that name."""
    if package is not None:
        return package
    if name in model_names():
        return BUILTIN / name
    raise PermanentError(
        f"unknown model {name!r}: no package given and no built-in model of that name; "
        f"built-in models: {', '.join(model_names())}"
    )


def with_package_rules(models: Sequence[ModelSettings]) -> tuple[ModelSettings, ...]:
    """The `[[models]]` entries with each package's own selection rules (its manifest's
    `input.select`) where the entry does not set `select` itself; PackageError if a package
    cannot be read, so that `serve` refuses to start rather than skip every study."""
    from agent.models.package import read_package_manifest

    out = []
    for entry in models:
        if entry.package is not None and "select" not in entry.model_fields_set:
            rules = read_package_manifest(entry.package).input.select
            entry = entry.model_copy(update={"select": rules})
        out.append(entry)
    return tuple(out)


def preload(models: Sequence[ModelSettings]) -> dict[str, str]:
    """Load every configured model and put its network on its device now, so that the first
    study does not wait for it and a broken package stops the worker at start, by name.

    Returns where each model is, by name: its device, or "not loaded" when its device is
    not here."""
    where = {}
    for entry in models:
        try:
            model = get_model(entry.name, entry.package, entry.precision)
            device = resolve_device(entry.device, entry.name)
        except RetryableError as exc:  # no such GPU here: the worker still runs (and retries)
            log.warning("model %s not preloaded: %s", entry.name, exc)
            where[entry.name] = "not loaded"
            continue
        except PermanentError as exc:
            raise ConfigError(f"[[models]] {entry.name}: {exc}") from exc
        model.network_on(device)
        log.info("model %s ready on %s", entry.name, device)
        where[entry.name] = str(device)
    return where


def get_model(name: str, package: Path | None = None, precision: str = "package") -> PackagedModel:
    """The model a `[[models]]` entry names, loaded once per process and kept: a GPU worker
    keeps its networks on the device between studies. `precision` other than "package"
    overrides the package's."""
    return _load(package_path(name, package), None if precision == "package" else precision)


@functools.cache
def _load(path: Path, precision: str | None) -> PackagedModel:
    # Imported here: the registry is read by processes that never run a model.
    from agent.models.package import load_package
    from agent.models.runner import PackagedModel

    package = load_package(path)
    model = PackagedModel(package, precision)
    log.info(
        "model %s %s loaded from %s (weights SHA-256 %s)",
        model.identity.name,
        model.identity.version,
        path,
        package.weights_sha256[:16],
    )
    return model
