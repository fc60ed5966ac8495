"""Who may associate: called AE titles, calling AE titles, source addresses and networks."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from agent.errors import ConfigError
from agent.receive.handlers import AccessControl
from agent.settings import AllowedCaller, load_settings
from tests.support.data import dicom_files, shared_data
from tests.support.dcmtk import storescu
from tests.support.receiver import Receiver, loopback_settings

CALLING, CALLED = AccessControl.CALLING_AE_TITLE_NOT_RECOGNIZED, 7


def _control(*callers: AllowedCaller, called: tuple[str, ...] = ("PACS_AGENT",)) -> AccessControl:
    table = {"ct1.example": frozenset({"10.1.2.3", "fd00::3"})}
    return AccessControl(callers, called, resolve=lambda name: table.get(name, frozenset()))


def _reason(control: AccessControl, calling: str, address: str, called: str = "PACS_AGENT") -> int:
    refusal = control.refusal(calling, called, address)
    return 0 if refusal is None else refusal[0]


def test_no_allowed_callers_admits_any_caller_but_only_to_our_titles() -> None:
    control = _control(called=("PACS_AGENT", "AI_ALIAS"))
    assert _reason(control, "ANYONE", "192.0.2.1") == 0
    assert _reason(control, "ANYONE", "192.0.2.1", called="AI_ALIAS") == 0
    # AE titles are compared without their padding (PS3.8 Table 9-11).
    assert _reason(control, "ANYONE", "192.0.2.1", called="PACS_AGENT  ") == 0
    assert _reason(control, "ANYONE", "192.0.2.1", called="OTHER_PACS") == CALLED
    assert _reason(control, "ANYONE", "192.0.2.1", called="pacs_agent") == CALLED


def test_calling_ae_title_and_address() -> None:
    control = _control(
        AllowedCaller(ae_title="ANYWHERE"),
        AllowedCaller(ae_title="ONE_HOST", host="10.1.2.3"),
        AllowedCaller(ae_title="SUBNET", host="10.1.0.0/16"),
        AllowedCaller(ae_title="SUBNET", host="192.168.7.0/24"),
        AllowedCaller(ae_title="V6NET", host="fd00:1::/64"),
        AllowedCaller(ae_title="NAMED", host="ct1.example"),
        AllowedCaller(ae_title="GHOST", host="gone.example"),
    )
    assert _reason(control, "ANYWHERE", "203.0.113.9") == 0
    assert _reason(control, "STRANGER", "10.1.2.3") == CALLING
    assert _reason(control, "ONE_HOST", "10.1.2.3") == 0
    assert _reason(control, "ONE_HOST", "10.1.2.4") == CALLING
    assert _reason(control, "SUBNET", "10.1.255.1") == 0
    assert _reason(control, "SUBNET", "192.168.7.20") == 0
    assert _reason(control, "SUBNET", "10.2.0.1") == CALLING
    # An IPv4 caller of a dual-stack listener shows as an IPv4-mapped IPv6 address.
    assert _reason(control, "SUBNET", "::ffff:10.1.9.9") == 0
    assert _reason(control, "V6NET", "fd00:1::abcd") == 0
    assert _reason(control, "V6NET", "fd00:2::abcd") == CALLING
    assert _reason(control, "V6NET", "10.1.2.3") == CALLING
    assert _reason(control, "NAMED", "10.1.2.3") == 0
    assert _reason(control, "NAMED", "fd00::3") == 0
    assert _reason(control, "NAMED", "10.1.2.4") == CALLING
    assert _reason(control, "GHOST", "10.1.2.3") == CALLING
    # A wrong called AE title is reported before anything about the caller.
    assert _reason(control, "ONE_HOST", "10.1.2.3", called="NOT_US") == CALLED


def test_refusals_say_which_check_failed() -> None:
    control = _control(AllowedCaller(ae_title="ONE_HOST", host="10.1.2.3"))
    assert control.refusal("STRANGER", "PACS_AGENT", "10.1.2.3") == (
        CALLING,
        "calling AE title 'STRANGER' is not an allowed caller",
    )
    assert control.refusal("ONE_HOST", "PACS_AGENT", "10.9.9.9") == (
        CALLING,
        "calling AE title 'ONE_HOST' is not allowed from 10.9.9.9",
    )
    assert control.refusal("ONE_HOST", "ELSEWHERE", "10.1.2.3") == (
        CALLED,
        "called AE title 'ELSEWHERE' is not ours",
    )


def test_host_names_are_resolved_once_at_start(caplog: pytest.LogCaptureFixture) -> None:
    asked: list[str] = []

    def resolve(name: str) -> frozenset[str]:
        asked.append(name)
        return frozenset({"10.7.7.7"}) if name == "ct1.example" else frozenset()

    with caplog.at_level(logging.INFO, logger="agent.receive.handlers"):
        control = AccessControl(
            (
                AllowedCaller(ae_title="NAMED", host="ct1.example"),
                AllowedCaller(ae_title="GHOST", host="gone.example"),
            ),
            ("PACS_AGENT",),
            resolve=resolve,
        )
    for _ in range(3):
        assert control.refusal("NAMED", "PACS_AGENT", "10.7.7.7") is None
    assert asked == ["ct1.example", "gone.example"]
    assert "host name ct1.example is 10.7.7.7" in caplog.text
    assert "host name gone.example does not resolve; refused until restart" in caplog.text


def test_the_system_resolver_knows_localhost() -> None:
    assert "127.0.0.1" in AccessControl.resolve_host("localhost")


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("10.1.2.3/16", "write the network, 10.1.0.0/16"),
        ("10.1.2.300", "not an IP address, a CIDR network or a host name"),
        ("10.1.2", "not an IP address, a CIDR network or a host name"),
        ("fd00::1::2", "is not an IP address or network"),
        ("ct 1.example", "not an IP address, a CIDR network or a host name"),
        ("-ct1.example", "not an IP address, a CIDR network or a host name"),
    ],
)
def test_bad_hosts_are_refused_in_the_config(tmp_path: Path, host: str, message: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f'[receiver]\nallowed_callers = [{{ ae_title = "CT", host = "{host}" }}]\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "'receiver.allowed_callers.0.host'" in str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("host", "network"),
    [
        ("10.1.2.3", "10.1.2.3/32"),
        ("10.1.0.0/16", "10.1.0.0/16"),
        ("::1", "::1/128"),
        ("fd00:1::/64", "fd00:1::/64"),
        ("ct1", None),
        ("ct-1.radiology.example.", None),
    ],
)
def test_good_hosts_are_accepted(host: str, network: str | None) -> None:
    caller = AllowedCaller(ae_title="CT", host=host)
    assert caller.host == host
    assert (None if caller.network is None else str(caller.network)) == network


def _associate(
    port: int, calling: str = "MODALITY", called: str = "PACS_AGENT", host: str = "127.0.0.1"
) -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae.associate(host, port, ae_title=called)


def _rejection(assoc: Association) -> tuple[int | None, int | None, int | None]:
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert rj is not None
    return (rj.result, rj.result_source, rj.diagnostic)


def _admitted(assoc: Association) -> bool:
    established = bool(assoc.is_established)
    if established:
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    return established


def test_loopback_network_allowed(tmp_path: Path) -> None:
    callers = (AllowedCaller(ae_title="MODALITY", host="127.0.0.0/8"),)
    with Receiver(tmp_path / "spool", loopback_settings(allowed_callers=callers)) as receiver:
        assert _admitted(_associate(receiver.port))
        assert _rejection(_associate(receiver.port, calling="OTHER")) == (1, 1, CALLING)


def test_caller_outside_its_network_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    callers = (AllowedCaller(ae_title="MODALITY", host="10.0.0.0/8"),)
    with Receiver(tmp_path / "spool", loopback_settings(allowed_callers=callers)) as receiver:
        with caplog.at_level(logging.WARNING, logger="agent.receive.handlers"):
            assert _rejection(_associate(receiver.port)) == (1, 1, CALLING)
        assert "calling AE title 'MODALITY' is not allowed from 127.0.0.1" in caplog.text


def test_caller_by_host_name(tmp_path: Path) -> None:
    callers = (AllowedCaller(ae_title="MODALITY", host="localhost"),)
    with Receiver(tmp_path / "spool", loopback_settings(allowed_callers=callers)) as receiver:
        assert _admitted(_associate(receiver.port))


def test_wrong_called_ae_title_is_refused_with_reason_7(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = loopback_settings(accepted_called_ae_titles=("AI_SEG",))
    with Receiver(tmp_path / "spool", settings) as receiver:
        assert _admitted(_associate(receiver.port, called="PACS_AGENT"))
        assert _admitted(_associate(receiver.port, called="AI_SEG"))
        with caplog.at_level(logging.WARNING, logger="agent.receive.handlers"):
            assert _rejection(_associate(receiver.port, called="SOMEONE")) == (1, 1, CALLED)
        assert "called AE title 'SOMEONE' is not ours" in caplog.text
        # DCMTK calling the wrong AE title is refused too, and nothing is stored.
        files = dicom_files(shared_data("dcmqi", "ct-3slice"))[:1]
        result = storescu(files, port=receiver.port, called_aet="SOMEONE", check=False)
        assert result.returncode != 0
        assert "Called AE Title Not Recognized" in result.stdout + result.stderr
        assert not receiver.spooled()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) on this host")
def test_ipv6_network(tmp_path: Path) -> None:
    callers = (
        AllowedCaller(ae_title="MODALITY", host="::1/128"),
        AllowedCaller(ae_title="OTHER", host="fd00::/8"),
    )
    settings = loopback_settings(host="::1", allowed_callers=callers)
    with Receiver(tmp_path / "spool", settings) as receiver:
        assert _admitted(_associate(receiver.port, host="::1"))
        assert _rejection(_associate(receiver.port, calling="OTHER", host="::1")) == (
            1,
            1,
            CALLING,
        )
