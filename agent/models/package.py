"""Open a model package (folder, .zip or .tar), check its weights' SHA-256, load the network."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import pickle
import sys
import tarfile
import tempfile
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from agent.dicom.uids import derive_uid
from agent.domain import ModelIdentity
from agent.models.manifest import (
    MANIFEST_NAME,
    PackageError,
    PackageManifest,
    parse_manifest,
    read_manifest,
)

# A network: (B, C, z, y, x) float to (B, K, z, y, x) scores.
Network = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)
class ModelPackage:
    """A loaded package: its manifest, its network on the CPU, and what identifies it."""

    source: Path
    manifest: PackageManifest
    network: Network
    weights_sha256: str
    identity: ModelIdentity


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in chunks (weights may be gigabytes)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def package_identity(manifest: PackageManifest, digests: tuple[str, ...]) -> ModelIdentity:
    """The identity that SEG and SR provenance name (IHE AIR Contributing Equipment).

    The Device UID derives from the SHA-256 of the weights (and of the code, for a Python
    package) and nothing else: the same network has the same UID on every installation and
    under any name, and retrained weights get a new one even if the version was not changed.
    """
    return ModelIdentity(
        name=manifest.model.name,
        version=manifest.model.version,
        manufacturer=manifest.model.manufacturer,
        device_uid=derive_uid("pacs-agent model weights", *digests),
    )


def read_package_manifest(path: Path) -> PackageManifest:
    """Only the manifest of a package, without loading its network."""
    with _unpacked(path) as root:
        return read_manifest(root / MANIFEST_NAME)


def load_package(path: Path) -> ModelPackage:
    """Validate the manifest, hash the weights and load the network on the CPU."""
    with _unpacked(path) as root:
        manifest = read_manifest(root / MANIFEST_NAME)
        weights = root / manifest.weights.file
        if not weights.is_file():
            raise PackageError(f"{path}: weights file {manifest.weights.file} is missing")
        digest = sha256_file(weights)
        expected = manifest.weights.sha256
        if expected is not None and digest != expected:
            raise PackageError(
                f"{path}: {manifest.weights.file} has SHA-256 {digest}, "
                f"the manifest says {expected}"
            )
        digests: tuple[str, ...] = (digest,)
        if manifest.weights.format == "torchscript":
            network = _load_torchscript(weights)
        elif manifest.weights.format == "export":
            network = _load_exported(weights)
        else:
            assert manifest.weights.entry_point is not None
            module, _, function = manifest.weights.entry_point.partition(":")
            code = root / f"{module}.py"
            if not code.is_file():
                raise PackageError(f"{path}: entry point module {module}.py is missing")
            digests += (sha256_file(code),)
            network = _load_entry_point(code, function, root)
        return ModelPackage(
            source=path,
            manifest=manifest,
            network=network,
            weights_sha256=digest,
            identity=package_identity(manifest, digests),
        )


# What torch's loaders raise for a damaged or foreign file: its own RuntimeError, zip and
# pickle errors (ValueError, EOFError, KeyError, pickle.UnpicklingError) and OS errors.
TORCH_LOAD_ERRORS: tuple[type[Exception], ...] = (
    RuntimeError,
    ValueError,
    EOFError,
    KeyError,
    OSError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
)


# What a package's own code (an entry point, a network's forward) raises when it fails: torch's
# RuntimeError (shapes, dtypes, devices), Python's errors of a wrong call or value, an import
# that fails. They are the package's failure and are named as such; anything else is a fault of
# ours, left to the task's or the command line's boundary.
PACKAGE_CODE_ERRORS: tuple[type[Exception], ...] = (
    ImportError,
    SyntaxError,
    OSError,
    RuntimeError,
    ValueError,
    TypeError,
    AttributeError,
    LookupError,
    ArithmeticError,
    AssertionError,
)


def _load_torchscript(file: Path) -> Network:
    try:
        with warnings.catch_warnings():
            # torch deprecates TorchScript in favour of torch.export; packages made with it are
            # still accepted, and `models check` says so instead of a warning in the log.
            warnings.filterwarnings(
                "ignore", message="`torch.jit.load` is deprecated", category=DeprecationWarning
            )
            module = torch.jit.load(str(file), map_location="cpu")  # type: ignore[no-untyped-call]
    except TORCH_LOAD_ERRORS as exc:
        raise PackageError(f"{file.name}: not a TorchScript file: {first_line(exc)}") from None
    module.eval()
    return module  # type: ignore[no-any-return]


def _load_exported(file: Path) -> Network:
    try:
        program = torch.export.load(str(file))
    except TORCH_LOAD_ERRORS as exc:
        raise PackageError(f"{file.name}: not a torch.export program: {first_line(exc)}") from None
    return program.module()


def _load_entry_point(code: Path, function: str, root: Path) -> Network:
    """Import `code` as a module of its own and call `function(root)` for the network.

    The module is loaded from its file, so sys.path is untouched; it is in sys.modules, under
    a name of its own, only while it runs (dataclasses and pickling look it up there).
    """
    name = f"_pacs_agent_model_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, code)
    if spec is None or spec.loader is None:
        raise PackageError(f"{code.name}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        build = getattr(module, function, None)
        if not callable(build):
            raise PackageError(f"{code.name}: has no function {function}")
        network = build(root)
    except PackageError:
        raise
    except PACKAGE_CODE_ERRORS as exc:
        raise PackageError(f"{code.name}: {function} failed: {first_line(exc)}") from None
    finally:
        sys.modules.pop(name, None)
    if not callable(network):
        raise PackageError(f"{code.name}: {function} did not return a callable network")
    if isinstance(network, torch.nn.Module):
        network.eval()
    return network  # type: ignore[no-any-return]


def first_line(exc: BaseException) -> str:
    """An exception's message, its first line only (torch's run on for pages), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _unpacked(path: Path) -> Iterator[Path]:
    """The package's folder: `path` itself, or an archive extracted to a temporary folder.

    An archive holds model.toml at its top or in its one top-level folder.
    """
    if path.is_dir():
        if not (path / MANIFEST_NAME).is_file():
            raise PackageError(f"{path}: no {MANIFEST_NAME} in this folder")
        yield path
        return
    if not path.is_file():
        raise PackageError(f"{path}: no such file or folder")
    with tempfile.TemporaryDirectory(prefix="pacs-agent-model-") as tmp:
        target = Path(tmp)
        if zipfile.is_zipfile(path):
            _extract_zip(path, target)
        elif tarfile.is_tarfile(path):
            _extract_tar(path, target)
        else:
            raise PackageError(f"{path}: not a folder, .zip or .tar archive")
        yield _root(path, target)


def _extract_zip(path: Path, target: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                parts = PurePosixPath(name).parts
                if name.startswith("/") or ".." in parts:
                    raise PackageError(f"{path}: member {name!r} lies outside the package")
            archive.extractall(target)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PackageError(f"{path}: cannot extract: {exc}") from None


def _extract_tar(path: Path, target: Path) -> None:
    try:
        with tarfile.open(path) as archive:
            # The "data" filter refuses absolute paths, "..", links out of the folder and
            # device files (PEP 706).
            archive.extractall(target, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise PackageError(f"{path}: cannot extract: {exc}") from None


def _root(path: Path, target: Path) -> Path:
    if (target / MANIFEST_NAME).is_file():
        return target
    children = list(target.iterdir())
    if len(children) == 1 and (children[0] / MANIFEST_NAME).is_file():
        return children[0]
    raise PackageError(f"{path}: no {MANIFEST_NAME} at the top of the archive")


__all__ = [
    "PACKAGE_CODE_ERRORS",
    "ModelPackage",
    "Network",
    "PackageError",
    "first_line",
    "load_package",
    "package_identity",
    "parse_manifest",
    "read_package_manifest",
    "sha256_file",
]
