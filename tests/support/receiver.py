"""The agent's receiver in this process on a loopback port, and the smallest instance to send it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom.transport import ThreadedAssociationServer

from agent.db.values import ArrivedInstance, SenderNews
from agent.receive.scp import start_receiver
from agent.settings import ReceiverSettings
from agent.spool.layout import SpoolLayout
from agent.spool.watermark import Watermark


def loopback_settings(**fields: Any) -> ReceiverSettings:
    """Receiver settings for 127.0.0.1 and a port the system picks, `fields` on top."""
    return ReceiverSettings(**{"host": "127.0.0.1", "port": 0, **fields})


class Receiver:
    """A started receiver spooling under `root`, with what it spooled and announced.

    As a context manager it shuts the listener down on exit.
    """

    def __init__(
        self, root: Path, settings: ReceiverSettings, watermark: Watermark | None = None
    ) -> None:
        self.layout = SpoolLayout(root)
        self.layout.create()
        self.arrivals: list[ArrivedInstance] = []
        # How each association ended for each study: Interruption or CleanSend.
        self.news: list[SenderNews] = []
        self.server: ThreadedAssociationServer = start_receiver(
            settings, self.layout, self._sink, watermark
        )
        self.port: int = self.server.server_address[1]

    def _sink(self, news: SenderNews) -> None:
        (self.arrivals if isinstance(news, ArrivedInstance) else self.news).append(news)

    def spooled(self) -> list[Path]:
        return sorted(self.layout.studies.glob("*/*/*.dcm"))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()


def minimal_ct() -> Dataset:
    """A CT Image Storage dataset with fresh UIDs and no pixels: all the receiver needs."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    return ds
