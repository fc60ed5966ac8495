"""A throw-away Orthanc PACS on loopback ports, with small REST helpers built on urllib.

Orthanc 1.10 cannot be told which address to listen on, so it runs with the loopback bind shim
from `tests.support.ports`; startup checks that its HTTP and DICOM ports are on loopback only.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tests.support.ports import (
    LOOPBACK,
    free_port,
    loopback_env,
    require_loopback,
    terminate,
    wait_until_listening,
)
from tests.support.process import ManagedProcess

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN_ENV = "ORTHANC_DICOMWEB_PLUGIN"
_PLUGIN_CANDIDATES = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
)
# Never use an HTTP proxy from the environment: every request goes straight to 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def find_dicomweb_plugin() -> Path | None:
    """The Orthanc DICOMweb plugin (.so): $ORTHANC_DICOMWEB_PLUGIN, else the Debian locations."""
    override = os.environ.get(DICOMWEB_PLUGIN_ENV)
    if override:
        return Path(override) if Path(override).is_file() else None
    for candidate in _PLUGIN_CANDIDATES:
        if candidate.is_file():
            return candidate
    versioned = sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))
    return versioned[-1] if versioned else None


class Orthanc(ManagedProcess):
    """Orthanc with a generated configuration in a temporary (or given) work directory.

    `modalities` maps a name to (AET, host, port) of DICOM peers Orthanc may send to; hosts must
    be loopback. `extra_config` overrides or adds configuration keys. Use as a context manager;
    without `workdir` everything (storage, config, log) lives in a temp dir removed on exit.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        aet: str = "ORTHANC",
        extra_config: Mapping[str, Any] | None = None,
        startup_timeout: float = 60,
    ) -> None:
        self._given_workdir = workdir
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self.workdir = Path()
        self.aet = aet
        self.host = LOOPBACK
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.http_url = f"http://{LOOPBACK}:{self.http_port}"
        self.modalities = dict(modalities or {})
        for aet_, host, _port in self.modalities.values():
            require_loopback(host)
            if len(aet_) > 16:
                raise ValueError(f"AE title {aet_!r} is longer than 16 characters")
        self.dicomweb_plugin = find_dicomweb_plugin()
        self._extra_config = dict(extra_config or {})
        self._startup_timeout = startup_timeout
        super().__init__(Path())
        self.config_path = Path()

    @property
    def dicomweb_enabled(self) -> bool:
        """Whether the DICOMweb plugin was found and loaded."""
        return self.dicomweb_plugin is not None

    @property
    def dicomweb_url(self) -> str:
        """Root URL of the DICOMweb API (only answers when `dicomweb_enabled`)."""
        return f"{self.http_url}/dicom-web"

    def config(self) -> dict[str, Any]:
        """The configuration written for Orthanc."""
        storage = str(self.workdir / "storage")
        config: dict[str, Any] = {
            "Name": "pacs-agent-test",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {
                name: [aet, host, port] for name, (aet, host, port) in self.modalities.items()
            },
            "StableAge": 1,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "SyncStorageArea": False,
            "Plugins": [],
        }
        if self.dicomweb_plugin is not None:
            config["Plugins"] = [str(self.dicomweb_plugin)]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        config.update(self._extra_config)
        return config

    def start(self) -> None:
        if not ORTHANC_BINARY.is_file():
            raise FileNotFoundError(
                f"{ORTHANC_BINARY} not found (install the Debian packages 'orthanc' and "
                "'orthanc-dicomweb')"
            )
        if self._given_workdir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="orthanc-")
            self.workdir = Path(self._tempdir.name)
        else:
            self.workdir = Path(self._given_workdir)
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        self.log_path = self.workdir / "orthanc.log"
        self.spawn(
            [str(ORTHANC_BINARY), str(self.config_path)], cwd=self.workdir, env=loopback_env()
        )
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        """Wait until GET /system answers and both ports listen on loopback only."""
        process = self.process
        assert process is not None
        deadline = time.monotonic() + self._startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with code {process.returncode} during startup\n"
                    f"{self.log_tail()}"
                )
            try:
                self.get_json("/system", timeout=1)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Orthanc did not answer {self.http_url}/system within "
                    f"{self._startup_timeout:g} s\n{self.log_tail()}"
                )
            time.sleep(0.05)
        for port in (self.http_port, self.dicom_port):
            wait_until_listening(
                port,
                timeout=10,
                pid=process.pid,
                alive=lambda: process.poll() is None,
                describe=self.log_tail,
            )

    def halt(self, process: subprocess.Popen[bytes]) -> None:
        """Orthanc takes about 3.5 s to stop cleanly on SIGTERM (its HTTP and DICOM servers poll),
        so when its workdir is temporary and about to be deleted it is killed at once; a given
        workdir gets the clean SIGTERM (SIGKILL after 15 s) so its index stays consistent.
        """
        if self._tempdir is not None:
            process.kill()
            process.wait()
        else:
            terminate(process, grace=15)

    def stop(self) -> int | None:
        """Stop Orthanc, close its log and remove a temporary workdir."""
        code = super().stop()
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None
        return code

    # -- REST ---------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30,
    ) -> bytes:
        """Send one HTTP request to Orthanc and return the response body (raises HTTPError)."""
        url = path if path.startswith("http") else f"{self.http_url}{path}"
        sent = dict(headers or {})
        users = self._extra_config.get("RegisteredUsers")
        if self._extra_config.get("AuthenticationEnabled") and users:
            # With authentication on, the fixture itself speaks as the first registered user.
            user, password = next(iter(dict(users).items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            sent.setdefault("Authorization", f"Basic {token}")
        request = urllib.request.Request(url, data=body, method=method, headers=sent)
        with _OPENER.open(request, timeout=timeout) as response:
            data: bytes = response.read()
            return data

    def get_json(self, path: str, *, timeout: float = 30) -> Any:
        """GET `path` and decode the JSON answer."""
        return json.loads(
            self.request("GET", path, headers={"Accept": "application/json"}, timeout=timeout)
        )

    def post_json(self, path: str, payload: Any, *, timeout: float = 30) -> Any:
        """POST `payload` as JSON (a str is sent as it is) and decode the JSON answer."""
        body = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        answer = self.request(
            "POST", path, body, headers={"Content-Type": "application/json"}, timeout=timeout
        )
        return json.loads(answer) if answer.strip() else None

    def studies(self) -> list[str]:
        """Orthanc IDs of all studies."""
        ids: list[str] = self.get_json("/studies")
        return ids

    def study_instances(self, orthanc_study_id: str) -> list[dict[str, Any]]:
        """The instances of a study, as Orthanc describes them (ID, MainDicomTags, ...)."""
        instances: list[dict[str, Any]] = self.get_json(f"/studies/{orthanc_study_id}/instances")
        return instances

    def lookup(self, dicom_uid: str, level: str) -> str | None:
        """Orthanc ID of the resource with this DICOM UID at `level` (Study, Series, Instance)."""
        for match in self.post_json("/tools/lookup", dicom_uid):
            if match.get("Type") == level:
                found: str = match["ID"]
                return found
        return None

    def find_study(self, study_uid: str) -> str | None:
        """Orthanc ID of the study with this StudyInstanceUID, or None."""
        return self.lookup(study_uid, "Study")

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc ID of the instance with this SOPInstanceUID, or None."""
        return self.lookup(sop_instance_uid, "Instance")

    def instances_of_series(self, series_uid: str) -> list[dict[str, Any]]:
        """The instances of the series with this SeriesInstanceUID ([] if Orthanc lacks it)."""
        series_id = self.lookup(series_uid, "Series")
        if series_id is None:
            return []
        instances: list[dict[str, Any]] = self.get_json(f"/series/{series_id}/instances")
        return instances

    def download_instance(self, orthanc_instance_id: str) -> bytes:
        """The stored DICOM file of an instance, byte for byte as Orthanc keeps it."""
        return self.request("GET", f"/instances/{orthanc_instance_id}/file", timeout=120)

    def instance_count(self) -> int:
        """How many instances Orthanc stores."""
        count: int = self.get_json("/statistics")["CountInstances"]
        return count

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float, what: str = "condition"
    ) -> None:
        """Poll `predicate` until it is true (see the module-level `wait_for`)."""
        wait_for(predicate, timeout, what)

    def wait_for_instances(self, count: int, timeout: float = 60) -> None:
        """Wait until Orthanc stores at least `count` instances."""
        wait_for(lambda: self.instance_count() >= count, timeout, f"{count} instances in Orthanc")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str = "condition") -> None:
    """Poll `predicate` every 50 ms until it is true; raise TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)
