"""Loopback-only networking for tests: free ports and confining third-party servers to 127.0.0.1.

DCMTK's storescp and Orthanc 1.10 have no option to choose the address they listen on; both bind
every interface. `loopback_env()` adds an LD_PRELOAD shim (compiled once from the C source below)
that rewrites a bind() to the wildcard address into a bind() to loopback, and
`wait_until_listening()` then proves from /proc/net/tcp* that the port is bound to loopback only.
`terminate()` and `tail()` help stop such servers and report their logs.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

LOOPBACK = "127.0.0.1"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

_SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

/* Rewrite bind() to the wildcard address (0.0.0.0 or ::) into a bind() to loopback. */
typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    bind_fn real = (bind_fn)dlsym(RTLD_NEXT, "bind");
    if (addr != NULL && addr->sa_family == AF_INET
            && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in a;
        memcpy(&a, addr, sizeof a);
        if (a.sin_addr.s_addr == htonl(INADDR_ANY)) {
            a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real(fd, (const struct sockaddr *)&a, sizeof a);
        }
    }
    if (addr != NULL && addr->sa_family == AF_INET6
            && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 a6;
        memcpy(&a6, addr, sizeof a6);
        if (memcmp(&a6.sin6_addr, &in6addr_any, sizeof a6.sin6_addr) == 0) {
            a6.sin6_addr = in6addr_loopback;
            return real(fd, (const struct sockaddr *)&a6, sizeof a6);
        }
    }
    return real(fd, addr, len);
}
"""

_TCP_LISTEN = "0A"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def require_loopback(host: str) -> str:
    """Return `host` unchanged if it names loopback; raise ValueError for any other address."""
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"tests talk to loopback only, not to {host!r}")
    return host


def loopback_bind_shim() -> Path:
    """Path of the compiled LD_PRELOAD shim, building it on first use (needs a C compiler)."""
    digest = hashlib.sha256(_SHIM_SOURCE.encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"pacs-agent-{os.getuid()}"
    target = cache / f"loopback-bind-{digest}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError(
            "a C compiler (cc/gcc) is needed to build the shim that keeps storescp and Orthanc "
            "on 127.0.0.1 (they cannot be told which address to bind); install gcc"
        )
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as build:
        source = Path(build) / "shim.c"
        source.write_text(_SHIM_SOURCE)
        built = Path(build) / "shim.so"
        result = subprocess.run(
            [compiler, "-O2", "-shared", "-fPIC", "-o", str(built), str(source), "-ldl"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"building the loopback bind shim failed:\n{result.stderr}")
        os.replace(built, target)  # atomic: concurrent test processes never see a partial file
    return target


def loopback_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for DCMTK tools and Orthanc: TCP_NODELAY=1, loopback bind shim preloaded."""
    env = dict(os.environ if base is None else base)
    env["TCP_NODELAY"] = "1"
    preload = [str(loopback_bind_shim())]
    if env.get("LD_PRELOAD"):
        preload.append(env["LD_PRELOAD"])
    env["LD_PRELOAD"] = " ".join(preload)
    return env


def listening_sockets(port: int) -> dict[int, str]:
    """TCP sockets in LISTEN state on `port` (inode -> address), from /proc/net/tcp and tcp6."""
    found: dict[int, str] = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            address_hex, port_hex = local.split(":")
            if state != _TCP_LISTEN or int(port_hex, 16) != port or len(address_hex) != width:
                continue
            # /proc prints each 32-bit word in host (little-endian) order.
            raw = b"".join(bytes.fromhex(address_hex[i : i + 8])[::-1] for i in range(0, width, 8))
            found[inode] = str(ipaddress.ip_address(raw))
    return found


def listening_addresses(port: int) -> set[str]:
    """Addresses that a TCP socket listens on at `port`."""
    return set(listening_sockets(port).values())


def _socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets that process `pid` has open (empty if it is gone)."""
    inodes: set[int] = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except (FileNotFoundError, PermissionError):
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def wait_until_listening(
    port: int,
    *,
    timeout: float,
    pid: int | None = None,
    alive: Callable[[], bool] = lambda: True,
    describe: Callable[[], str] = lambda: "",
) -> None:
    """Wait until process `pid` (or anything) listens on `port`; check it is on loopback only.

    `alive` is polled so a server that died is reported at once; `describe` adds context (such as
    a log tail) to the error. With `pid`, a socket of another process on the port (a lost race for
    a free port) does not count.
    """
    deadline = time.monotonic() + timeout
    while True:
        sockets = listening_sockets(port)
        if pid is not None:
            owned = _socket_inodes(pid)
            sockets = {inode: a for inode, a in sockets.items() if inode in owned}
        if sockets:
            break
        if not alive():
            raise RuntimeError(f"server exited before listening on port {port}\n{describe()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on port {port} after {timeout:g} s\n{describe()}")
        time.sleep(0.02)
    exposed = {a for a in listening_addresses(port) if not ipaddress.ip_address(a).is_loopback}
    if exposed:
        raise RuntimeError(f"port {port} is listening on non-loopback addresses {sorted(exposed)}")


def terminate(process: subprocess.Popen[bytes], *, grace: float) -> None:
    """SIGTERM `process`, SIGKILL it if it has not exited after `grace` seconds, and reap it."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


def tail(path: Path, lines: int) -> str:
    """The last `lines` lines of a text file, or a note that it does not exist."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])
