"""DCMTK command-line peers for tests: storescu as the SCU and storescp as a receiving SCP.

The DCMTK binaries are used from /usr/bin explicitly: `storescu` on PATH may be pynetdicom's
Python app of the same name. Every tool runs with TCP_NODELAY=1 (DCMTK otherwise waits about 40 ms
per message) and, for storescp, with the loopback bind shim from `tests.support.ports`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pydicom.filereader import read_file_meta_info

from tests.support.ports import (
    LOOPBACK,
    free_port,
    loopback_env,
    require_loopback,
    wait_until_listening,
)
from tests.support.process import ManagedProcess

DCMTK_DIR = Path("/usr/bin")

# Uncompressed transfer syntaxes: Explicit VR Little Endian, Implicit VR Little Endian,
# Explicit VR Big Endian (retired). Files in any other syntax are sent in that syntax only.
_UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2")
_MAX_CONTEXTS = 128


def dcmtk_tool(name: str) -> Path:
    """Path of the DCMTK binary `name`, preferring /usr/bin; raise FileNotFoundError if absent."""
    preferred = DCMTK_DIR / name
    if preferred.is_file() and os.access(preferred, os.X_OK):
        return preferred
    found = shutil.which(name)
    if found is not None and _is_dcmtk(Path(found)):
        return Path(found)
    raise FileNotFoundError(
        f"DCMTK tool {name!r} not found in {DCMTK_DIR} (install the Debian package 'dcmtk')"
    )


def _is_dcmtk(path: Path) -> bool:
    """Whether `path` is a DCMTK binary rather than a same-named script (e.g. pynetdicom's)."""
    try:
        result = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "$dcmtk:" in result.stdout


def _association_config(files: Sequence[Path]) -> str:
    """A storescu association profile ("Send") proposing each file's own transfer syntax.

    One presentation context per (SOP class, transfer syntax) found in the files, so compressed
    files go unchanged, plus per SOP class a context with the uncompressed syntaxes as fallback.
    """
    pairs: dict[str, list[str]] = {}
    for path in files:
        meta = read_file_meta_info(path)
        sop_class = str(meta.MediaStorageSOPClassUID)
        syntax = str(meta.TransferSyntaxUID)
        syntaxes = pairs.setdefault(sop_class, [])
        if syntax not in syntaxes:
            syntaxes.append(syntax)
    syntax_sets: list[tuple[str, ...]] = []
    contexts: list[tuple[str, int]] = []
    for sop_class, syntaxes in pairs.items():
        wanted: list[tuple[str, ...]] = [(ts,) for ts in syntaxes]
        wanted.append(_UNCOMPRESSED[:2])
        for syntax_set in wanted:
            if syntax_set not in syntax_sets:
                syntax_sets.append(syntax_set)
            contexts.append((sop_class, syntax_sets.index(syntax_set)))
    if len(contexts) > _MAX_CONTEXTS:
        raise ValueError(
            f"{len(contexts)} presentation contexts needed, DICOM allows {_MAX_CONTEXTS}: "
            "send fewer kinds of files per association"
        )
    lines = ["[[TransferSyntaxes]]"]
    for index, syntax_set in enumerate(syntax_sets):
        lines.append(f"[Syntaxes{index}]")
        lines += [f"TransferSyntax{n} = {uid}" for n, uid in enumerate(syntax_set, start=1)]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    lines += [
        f"PresentationContext{n} = {sop_class}\\Syntaxes{index}"
        for n, (sop_class, index) in enumerate(contexts, start=1)
    ]
    lines += ["[[Profiles]]", "[Send]", "PresentationContexts = Contexts", ""]
    return "\n".join(lines)


def storescu(
    files: Sequence[Path],
    *,
    port: int,
    called_aet: str,
    calling_aet: str = "STORESCU",
    host: str = LOOPBACK,
    timeout: float = 120,
    extra_args: Sequence[str] = (),
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Send `files` with DCMTK storescu over one association, each in its own transfer syntax.

    The presentation contexts come from a generated association profile (`-xf`), so a JPEG 2000
    file is sent as JPEG 2000 rather than decompressed. Files are read for their file meta
    information only. With `check`, a non-zero exit raises CalledProcessError (output attached).
    """
    require_loopback(host)
    paths = [Path(f) for f in files]
    if not paths:
        raise ValueError("storescu needs at least one file")
    with tempfile.TemporaryDirectory(prefix="storescu-") as work:
        config = Path(work) / "associations.cfg"
        config.write_text(_association_config(paths))
        seconds = str(max(1, round(timeout)))
        command = [
            str(dcmtk_tool("storescu")),
            "--config-file",
            str(config),
            "Send",
            "--aetitle",
            calling_aet,
            "--call",
            called_aet,
            "--timeout",
            seconds,
            "--acse-timeout",
            seconds,
            "--dimse-timeout",
            seconds,
            *extra_args,
            host,
            str(port),
            *(str(p) for p in paths),
        ]
        result = subprocess.run(
            command,
            env=loopback_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    if check and result.returncode != 0:
        raise subprocess.CalledProcessError(
            result.returncode, command[:1], output=result.stdout, stderr=result.stderr
        )
    return result


class StoreSCP(ManagedProcess):
    """DCMTK storescp on a free loopback port, writing every received object into `folder`.

    Accepts all transfer syntaxes it knows (`+xa`), so compressed objects are stored unchanged.
    Use as a context manager; the log goes to `log_path` (beside `folder` by default).
    """

    def __init__(
        self,
        folder: Path,
        *,
        aet: str = "STORESCP",
        port: int | None = None,
        log_path: Path | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 30,
    ) -> None:
        self.folder = Path(folder)
        super().__init__(log_path or self.folder.with_name(f"{self.folder.name}-storescp.log"))
        self.aet = aet
        self.host = LOOPBACK
        self.port = free_port() if port is None else port
        self._extra_args = tuple(extra_args)
        self._startup_timeout = startup_timeout

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        process = self.spawn(
            [
                str(dcmtk_tool("storescp")),
                "--accept-all",
                "--output-directory",
                str(self.folder),
                "--aetitle",
                self.aet,
                "--max-pdu",
                "131072",
                *self._extra_args,
                str(self.port),
            ],
            env=loopback_env(),
        )
        wait_until_listening(
            self.port,
            timeout=self._startup_timeout,
            pid=process.pid,
            alive=lambda: process.poll() is None,
            describe=self.log_tail,
        )

    def files(self) -> list[Path]:
        """The files received so far, sorted by name."""
        return sorted(p for p in self.folder.iterdir() if p.is_file())
