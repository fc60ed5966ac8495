"""Export failures say what happened, against real loopback peers: nothing listening, a peer
that rejects the association, one that never answers, one that hangs up or aborts, an HTTP
server that is busy or silent.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian, SegmentationStorage
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from agent.db.deliveries import Deliveries
from agent.errors import RetryableError
from agent.export import dimse, stow
from agent.export.outbox import Outbox
from agent.settings import DestinationSettings
from tests.export.test_outbox import _object
from tests.support.ports import free_port

LOOPBACK = "127.0.0.1"


def _pacs(port: int, **fields: object) -> DestinationSettings:
    return DestinationSettings.model_validate(
        {"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": port, **fields}
    )


def _web(url: str, **fields: object) -> DestinationSettings:
    return DestinationSettings.model_validate(
        {"name": "web", "kind": "dicomweb", "url": url, **fields}
    )


def _failure(send: Callable[[], object]) -> str:
    with pytest.raises(RetryableError) as info:
        send()
    return str(info.value)


@contextmanager
def _listener(backlog: int = 5) -> Iterator[socket.socket]:
    """A TCP socket listening on loopback that accepts nothing by itself."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, 0))
        sock.listen(backlog)
        yield sock
    finally:
        sock.close()


@contextmanager
def _scp(
    ae_title: str = "PACS",
    handlers: list[tuple[evt.EventType, Callable[..., object]]] | None = None,
) -> Iterator[int]:
    """A pynetdicom Storage SCP that knows its own AE title only; yields its port."""
    ae = AE(ae_title=ae_title)
    ae.require_called_aet = True
    for sop_class in (Verification, SegmentationStorage, Comprehensive3DSRStorage):
        ae.add_supported_context(sop_class, ExplicitVRLittleEndian)
    handlers = handlers or [(evt.EVT_C_STORE, _stored)]
    server = ae.start_server((LOOPBACK, 0), block=False, evt_handlers=handlers)
    assert isinstance(server, ThreadedAssociationServer)
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def _stored(event: Event) -> int:
    return 0x0000


# -- C-STORE -------------------------------------------------------------------------------------


def test_nothing_listening_is_connection_refused_at_the_address() -> None:
    port = free_port()
    why = _failure(lambda: dimse.echo(_pacs(port), "PACS_AGENT"))
    assert why == f"destination pacs: connection refused at 127.0.0.1:{port}"


def test_a_wrong_called_ae_title_is_the_rejection_in_words(files: list[Path]) -> None:
    with _scp("PACS") as port:
        wrong = _pacs(port, ae_title="ARCHIVE")
        why = _failure(lambda: dimse.send(wrong, "PACS_AGENT", files, [].append))
        dimse.echo(_pacs(port), "PACS_AGENT")  # the right title is let in
    assert why == (
        "destination pacs: association rejected by ARCHIVE: "
        "called AE title ARCHIVE not recognized (permanent)"
    )


def test_a_peer_that_accepts_the_connection_and_never_answers_times_out() -> None:
    with _listener() as silent:
        port = silent.getsockname()[1]
        why = _failure(lambda: dimse.echo(_pacs(port, timeout_seconds=1), "PACS_AGENT"))
    assert why == (
        f"destination pacs: no answer to the association request from 127.0.0.1:{port} within 1 s"
    )


def test_a_connection_that_is_never_accepted_times_out() -> None:
    # A listen queue that is full: the kernel drops further SYNs, as a firewall would.
    with _listener(backlog=0) as full:
        port = full.getsockname()[1]
        fillers = []
        for _ in range(3):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            with suppress(BlockingIOError):  # it completes in the kernel, unaccepted
                filler.connect((LOOPBACK, port))
            fillers.append(filler)
        try:
            why = _failure(lambda: dimse.echo(_pacs(port, timeout_seconds=1), "PACS_AGENT"))
        finally:
            for filler in fillers:
                filler.close()
    assert why == f"destination pacs: no answer from 127.0.0.1:{port} within 1 s"


def test_a_peer_that_hangs_up_on_the_association_request() -> None:
    with _listener() as closer:
        port = closer.getsockname()[1]

        def hang_up() -> None:
            conn, _ = closer.accept()
            conn.recv(1024)
            conn.close()

        thread = threading.Thread(target=hang_up, daemon=True)
        thread.start()
        why = _failure(lambda: dimse.echo(_pacs(port), "PACS_AGENT"))
        thread.join(5)
    assert why == (
        f"destination pacs: connection closed by 127.0.0.1:{port} during association request"
    )


def test_a_peer_that_aborts_during_c_store(files: list[Path]) -> None:
    def abort(event: Event) -> int:
        event.assoc.abort()
        return 0x0000

    with _scp(handlers=[(evt.EVT_C_STORE, abort)]) as port:
        why = _failure(lambda: dimse.send(_pacs(port), "PACS_AGENT", files[:1], [].append))
    assert why == "destination pacs: association aborted by the peer during C-STORE of SEG"


def test_no_c_store_response_within_the_timeout(files: list[Path]) -> None:
    release = threading.Event()

    def stall(event: Event) -> int:
        release.wait(30)
        return 0x0000

    with _scp(handlers=[(evt.EVT_C_STORE, stall)]) as port:
        try:
            dest = _pacs(port, timeout_seconds=1)
            why = _failure(lambda: dimse.send(dest, "PACS_AGENT", files[:1], [].append))
        finally:
            release.set()
    assert why == "destination pacs: no answer to C-STORE of SEG within 1 s"


def test_the_objects_to_deliver_are_counted_before_any_is_stored(
    deliveries: Deliveries, files: list[Path]
) -> None:
    port = free_port()
    report = Outbox(deliveries, "PACS_AGENT").deliver("job-1", files, [_pacs(port)])
    assert [w.reason for w in report.waiting] == [
        f"destination pacs: connection refused at 127.0.0.1:{port}"
    ]
    [view] = deliveries.of_job("job-1")
    assert (view.stored, view.total, view.attempts) == (0, 2, 1)

    with _scp() as up:
        Outbox(deliveries, "PACS_AGENT").deliver("job-2", files, [_pacs(up)])
    [view] = deliveries.of_job("job-2")
    assert (view.stored, view.total) == (2, 2)


def test_n_counts_what_the_destination_confirmed(deliveries: Deliveries, tmp_path: Path) -> None:
    def refuse_sr(event: Event) -> Dataset:
        ds = Dataset()
        stored = event.request.AffectedSOPClassUID == SegmentationStorage
        ds.Status = 0x0000 if stored else 0xA700
        return ds

    outbox_files = [
        _object(tmp_path / "outbox", SegmentationStorage),
        _object(tmp_path / "outbox", Comprehensive3DSRStorage),
        _object(tmp_path / "outbox", Comprehensive3DSRStorage),
    ]
    with _scp(handlers=[(evt.EVT_C_STORE, refuse_sr)]) as port:
        report = Outbox(deliveries, "PACS_AGENT").deliver("job-3", outbox_files, [_pacs(port)])
    assert len(report.waiting) == 1  # out of resources: retried
    [view] = deliveries.of_job("job-3")
    assert (view.stored, view.total) == (1, 3)


# -- STOW-RS -------------------------------------------------------------------------------------


class _Busy(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(length)
        body = b"database maintenance until 04:00"
        self.send_response(503)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def _http(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    server = ThreadingHTTPServer((LOOPBACK, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_stow_to_a_busy_server_names_the_status_and_its_message(files: list[Path]) -> None:
    with _http(_Busy) as port:
        dest = _web(f"http://127.0.0.1:{port}/dicom-web")
        why = _failure(lambda: stow.send(dest, "PACS_AGENT", files, [].append))
    assert why == (
        "destination web: STOW-RS: HTTP 503 Service Unavailable: database maintenance until 04:00"
    )


def test_stow_with_nothing_listening_is_connection_refused(files: list[Path]) -> None:
    port = free_port()
    dest = _web(f"http://127.0.0.1:{port}/dicom-web")
    why = _failure(lambda: stow.send(dest, "PACS_AGENT", files, [].append))
    assert why == f"destination web: STOW-RS: connection refused at 127.0.0.1:{port}"


def test_stow_to_a_server_that_never_answers_times_out(files: list[Path]) -> None:
    with _listener() as silent:
        port = silent.getsockname()[1]
        dest = _web(f"http://127.0.0.1:{port}/dicom-web", timeout_seconds=1)
        why = _failure(lambda: stow.send(dest, "PACS_AGENT", files, [].append))
    assert why == f"destination web: STOW-RS: no response from 127.0.0.1:{port} within 1 s"
