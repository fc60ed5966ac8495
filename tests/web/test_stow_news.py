"""What a STOW-RS request tells the assembler of its sender's delivery, over real HTTP on
127.0.0.1: a request cut off (the client gone, its body stalled, its multipart body without an
end) or with instances refused for want of resources leaves its studies interrupted; one
answered in full is a clean send that makes up for it. Then through a real assembler and
database: the interrupted study waits for the sender, and its re-send is sealed whole."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from agent.assembly.assembler import Assembler
from agent.assembly.policy import PARTIAL
from agent.db.states import State
from agent.db.values import ArrivedInstance, CleanSend, Interruption, SenderNews
from agent.settings import ModelSettings
from agent.spool.watermark import DiskSpace, Watermark
from tests.assembly.test_assembler import T0, FakeClock, Recorder
from tests.support.phantom import write_phantom_series
from tests.support.receiver import minimal_ct
from tests.support.web import (
    CONTENT_TYPE,
    WebAgent,
    multipart,
    new_boundary,
    part10,
    post_head,
    send_cut_off,
    session,
    web_settings,
)

WAIT_SECONDS = 30.0  # how long a test waits for what must happen; never asserted as a time
QUIET = 30.0


def _study(count: int, study_uid: str | None = None) -> list[Dataset]:
    study, series = study_uid or generate_uid(), generate_uid()
    datasets = []
    for _ in range(count):
        ds = minimal_ct()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        datasets.append(ds)
    return datasets


def _post(url: str, parts: list[bytes], path: str = "/dicom-web/studies") -> requests.Response:
    boundary = new_boundary()
    return session().post(
        f"{url}{path}",
        data=multipart(parts, boundary),
        headers={"Content-Type": CONTENT_TYPE.format(boundary=boundary)},
        timeout=WAIT_SECONDS,
    )


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"no {what}"
        time.sleep(0.02)


def _news(agent: WebAgent, count: int = 1) -> list[SenderNews]:
    _until(lambda: len(agent.news) >= count, "news of the request")
    return list(agent.news)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[WebAgent]:
    with WebAgent(tmp_path, web_settings(tmp_path)) as web:
        yield web


def test_a_request_answered_in_full_is_a_clean_send_of_its_study(agent: WebAgent) -> None:
    datasets = _study(3)
    before = datetime.now(UTC)
    assert _post(agent.url, [part10(ds) for ds in datasets]).status_code == 200
    (clean,) = _news(agent)
    assert isinstance(clean, CleanSend)
    assert clean.study_uid == datasets[0].StudyInstanceUID
    assert before <= clean.began <= datetime.now(UTC)
    assert len(agent.arrivals) == 3


def test_a_client_gone_mid_body_interrupts_the_study(agent: WebAgent) -> None:
    datasets = _study(4)
    send_cut_off(agent.server.port, agent.layout.tmp, [part10(ds) for ds in datasets], complete=2)
    (cut,) = _news(agent)
    assert isinstance(cut, Interruption)
    assert cut.study_uid == datasets[0].StudyInstanceUID
    assert cut.what == "STOW-RS request cut off after 2 instances, none stored"
    assert agent.arrivals == [] and agent.spooled() == []
    assert datasets[0].StudyInstanceUID not in cut.what


def test_a_body_stalled_past_the_body_timeout_interrupts_the_study(tmp_path: Path) -> None:
    datasets = _study(3)
    boundary = new_boundary()
    body = multipart([part10(ds) for ds in datasets], boundary)
    end = body.rindex(f"\r\n--{boundary}\r\n".encode()) + 100  # two parts, and the third begun
    with WebAgent(tmp_path, web_settings(tmp_path, body_timeout_seconds=0.5)) as agent:
        with socket.create_connection(("127.0.0.1", agent.server.port), WAIT_SECONDS) as sock:
            sock.sendall(post_head(boundary, len(body)) + body[:end])
            (cut,) = _news(agent)
        assert cut == Interruption(
            datasets[0].StudyInstanceUID,
            cut.at,
            "STOW-RS request cut off after 2 instances, none stored",
        )


def test_a_multipart_body_without_its_end_interrupts_the_study(agent: WebAgent) -> None:
    datasets = _study(2)
    boundary = new_boundary()
    body = multipart([part10(ds) for ds in datasets], boundary)
    truncated = body[: body.rindex(b"\r\n--")]  # the HTTP body whole, the multipart one not
    response = session().post(
        f"{agent.url}/dicom-web/studies",
        data=truncated,
        headers={"Content-Type": CONTENT_TYPE.format(boundary=boundary)},
        timeout=WAIT_SECONDS,
    )
    assert response.status_code == 400
    (cut,) = _news(agent)
    assert isinstance(cut, Interruption)
    assert cut.what == "STOW-RS request cut off after 1 instances, none stored"


def test_instances_refused_for_resources_interrupt_the_study(tmp_path: Path) -> None:
    big, small = _study(2)
    big.add_new(0x7FE00010, "OB", b"\0" * 200_000)  # PixelData
    receiver = {"receiver": {"max_instance_bytes": 100_000}}
    with WebAgent(tmp_path, web_settings(tmp_path), **receiver) as agent:
        assert _post(agent.url, [part10(small), part10(big)]).status_code == 202
        (cut,) = _news(agent)
    assert isinstance(cut, Interruption) and cut.study_uid == small.StudyInstanceUID
    assert cut.what == "STOW-RS: 1 instances refused for resources"


def test_the_spool_low_interrupts_the_study_the_path_names(tmp_path: Path) -> None:
    watermark = Watermark(
        tmp_path,
        min_free_percent=10,
        min_free_bytes=0,
        probe=lambda _path: DiskSpace(free_bytes=1, total_bytes=100),
    )
    (ds,) = _study(1)
    with WebAgent(tmp_path, web_settings(tmp_path), watermark) as agent:
        path = f"/dicom-web/studies/{ds.StudyInstanceUID}"
        assert _post(agent.url, [part10(ds)], path).status_code == 503
        (cut,) = _news(agent)
    assert cut == Interruption(ds.StudyInstanceUID, cut.at, "STOW-RS request refused, spool low")


def test_a_refusal_the_re_send_would_meet_again_is_no_interruption(agent: WebAgent) -> None:
    ours = _study(2)
    (other,) = _study(1)
    garbage = b"\0" * 128 + b"DICM" + b"\x08\x00\x16\x00UI\xff\xff"
    path = f"/dicom-web/studies/{ours[0].StudyInstanceUID}"
    parts = [part10(ours[0]), part10(other), garbage, part10(ours[1])]
    assert _post(agent.url, parts, path).status_code == 202
    # The other study's instance was refused, not delivered: it neither waits nor is cleared.
    (clean,) = _news(agent)
    assert isinstance(clean, CleanSend) and clean.study_uid == ours[0].StudyInstanceUID


# -- through the assembler and its database --------------------------------------------------


class Forward:
    """A sink that keeps the news and hands everything on to an assembler."""

    def __init__(self) -> None:
        self.to: Callable[[SenderNews], None] | None = None
        self.news: list[SenderNews] = []

    def __call__(self, news: SenderNews) -> None:
        if not isinstance(news, ArrivedInstance):
            self.news.append(news)
        assert self.to is not None
        self.to(news)


def test_a_cut_off_request_waits_for_the_re_send_which_is_sealed_whole(tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path / "ct", slices=12, rows=32, cols=32)
    parts = [path.read_bytes() for path in truth.files]
    forward = Forward()
    clock = FakeClock()
    with WebAgent(tmp_path, web_settings(tmp_path), sink=forward) as agent:
        assembler = Assembler(
            agent.db,
            agent.layout,
            quiet_seconds=QUIET,
            models=(ModelSettings(),),
            enqueue=Recorder(),
            clock=clock,
            sender_retry_seconds=300.0,
        )
        forward.to = assembler.submit

        def state() -> tuple[State, str, int]:
            study = agent.db.get(truth.study_uid)
            assert study is not None
            return State(study.state), study.reason, study.instance_count

        assert _post(agent.url, parts[:6]).status_code == 200  # the first request
        forward.news.clear()
        send_cut_off(
            agent.server.port, agent.layout.tmp, parts[6:], complete=3
        )  # the second, cut off
        _until(lambda: bool(forward.news), "news of the cut-off request")
        assembler.drain()
        clock.at = T0 + timedelta(seconds=QUIET + 10)  # quiet, but cut short
        assembler.seal_quiet_studies()
        assert state() == (
            State.RECEIVING,
            "waiting up to 300 s for the sender to send again: "
            "STOW-RS request cut off after 3 instances, none stored",
            6,
        )

        clock.at = T0 + timedelta(seconds=100)  # the sender sends the whole study again
        assert _post(agent.url, parts).status_code == 200
        assembler.drain()
        clock.at = T0 + timedelta(seconds=100 + QUIET)
        assembler.seal_quiet_studies()
        found, reason, count = state()
        assert (found, count) == (State.QUEUED, 12)
        assert PARTIAL not in reason and "waiting" not in reason
