"""A pynetdicom Storage SCP that acknowledges without storing: the floor under any such receiver.

Run as `python -m bench.bare_scp PORT`. It negotiates exactly what pacs-agent's receiver does and
tunes the association the same way, but its C-STORE handler returns success at once, so its
receive time is what pynetdicom itself costs.
"""

from __future__ import annotations

import sys

from pynetdicom import evt
from pynetdicom.events import Event

from agent.receive.handlers import SUCCESS, handle_conn_open
from agent.receive.scp import build_ae
from agent.settings import ReceiverSettings


def acknowledge(_event: Event) -> int:
    return SUCCESS


def main() -> None:
    port = int(sys.argv[1])
    settings = ReceiverSettings(host="127.0.0.1", port=port)
    ae = build_ae(settings)
    ae.start_server(
        ("127.0.0.1", port),
        block=True,
        evt_handlers=[(evt.EVT_C_STORE, acknowledge), (evt.EVT_CONN_OPEN, handle_conn_open)],
    )


if __name__ == "__main__":
    main()
