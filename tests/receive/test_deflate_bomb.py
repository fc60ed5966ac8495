"""A deflated dataset that inflates past the instance size limit is refused at the door."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.support.bombs import GIB, bomb_file, deflated_file
from tests.support.receiver import Receiver, loopback_settings, minimal_ct

LIMIT = 64 * 1024 * 1024


def _send(port: int, *paths: Path) -> list[tuple[int, str]]:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, DeflatedExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_AGENT")
    assert assoc.is_established
    answers = []
    for path in paths:
        # From a path, pynetdicom sends the file's encoded dataset as it is, deflated.
        status = assoc.send_c_store(path)
        answers.append((int(status.Status), str(status.get("ErrorComment", ""))))
    assoc.release()
    return answers


@pytest.fixture(autouse=True)
def _send_files_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    # Else pynetdicom reads (and inflates) the whole file before it sends it.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def test_a_deflate_bomb_is_refused_and_a_deflated_instance_stored(tmp_path: Path) -> None:
    bomb, good = minimal_ct(), minimal_ct()
    with Receiver(tmp_path / "spool", loopback_settings(max_instance_bytes=LIMIT)) as rx:
        answers = _send(
            rx.port,
            bomb_file(tmp_path / "bomb.dcm", bomb, 2 * GIB),
            deflated_file(tmp_path / "good.dcm", good, 1024 * 1024),
        )
        assert answers == [
            (0xA700, f"inflated dataset over the {LIMIT}-byte limit"),
            (0x0000, ""),
        ]
        assert [a.sop_uid for a in rx.arrivals] == [good.SOPInstanceUID]
        (stored,) = rx.spooled()
        assert pydicom.dcmread(stored).PixelData == bytes(1024 * 1024)
        assert list(rx.layout.tmp.iterdir()) == []
