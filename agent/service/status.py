"""`pvgate status`: a unix socket in the agent's state directory, and the client that reads it.

The running agent listens on ``$PVGATE_RUNTIME_DIR/pvgate.sock`` (``/run/pvgate`` under the
systemd unit), else ``<state_dir>/pvgate.sock`` (mode 0660: root and the service's
group may ask). The protocol is one JSON object per line each way, then the agent closes the
connection::

    -> {"cmd": "status"}
    <- {"ok": true, "status": {...}}

Only read-only questions are answered here (``status``, ``ping``); reloading is
``systemctl reload pvgate`` (SIGHUP) or the ``reload`` remote command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import stat
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent.i18n import _
from agent.service import process
from agent.service.statustext import format_status

log = logging.getLogger(__name__)

SOCKET_NAME = "pvgate.sock"
MAX_REQUEST_BYTES = 4096
MAX_REPLY_BYTES = 64 * 1024 * 1024
CLIENT_TIMEOUT_S = 10.0
EX_OK = 0
EX_UNAVAILABLE = 69
EX_NOPERM = 77

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


RUNTIME_ENV = "PVGATE_RUNTIME_DIR"
SERVICE_RUNTIME_DIR = Path("/run/pvgate")  # RuntimeDirectory=pvgate of systemd/pvgate.service
SERVICE_STATE_DIR = "/var/lib/pvgate"


def socket_path(state_dir: str | Path) -> Path:
    """Where the agent listens: $PVGATE_RUNTIME_DIR (the unit sets /run/pvgate), else the state dir."""
    runtime = os.environ.get(RUNTIME_ENV)
    return Path(runtime) / SOCKET_NAME if runtime else Path(state_dir) / SOCKET_NAME


def find_socket(state_dir: str | Path) -> Path:
    """Where a client finds the agent: as socket_path, and for the installed service (default state
    dir) /run/pvgate/pvgate.sock, since a shell has not the service's environment."""
    path = socket_path(state_dir)
    if os.environ.get(RUNTIME_ENV) or str(state_dir).rstrip("/") != SERVICE_STATE_DIR:
        return path
    service = SERVICE_RUNTIME_DIR / SOCKET_NAME
    return service if service.exists() or not path.exists() else path


# -- server (runs on the agent's event loop) ---------------------------------------------------


class StatusServer:
    """Answers JSON requests on a unix socket; never lets a client block or crash the agent."""

    def __init__(self, path: str | Path, handler: Handler) -> None:
        self.path = Path(path)
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def start(self) -> bool:
        """Listen; False (with a logged reason) when the socket cannot be had. Never fatal."""
        if not self._clear_stale():
            return False
        old_umask = os.umask(0o117)  # socket file 0660
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path),
                                                           limit=MAX_REQUEST_BYTES + 2)
        except OSError as err:
            log.warning("device=_site status socket %s not available: %s; `pvgate status` will not work",
                        self.path, err)
            return False
        finally:
            os.umask(old_umask)
        log.info("device=_site status socket listening on %s", self.path)
        return True

    def _clear_stale(self) -> bool:
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return True
        except OSError as err:
            log.warning("device=_site status socket %s not available: %s", self.path, err)
            return False
        if not stat.S_ISSOCK(st.st_mode):
            log.warning("device=_site status socket %s not available: the path exists and is not a socket",
                        self.path)
            return False
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(0.5)
        try:
            probe.connect(str(self.path))
        except OSError:
            pass  # nobody listens: left behind by an agent that was killed
        else:
            log.warning("device=_site status socket %s is answered by another running agent; not replacing it",
                        self.path)
            return False
        finally:
            probe.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        return True

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._server = None
        with contextlib.suppress(OSError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), 5.0)
            except (ValueError, asyncio.LimitOverrunError):
                reply: dict[str, Any] = {"ok": False, "error": f"request too large (at most {MAX_REQUEST_BYTES} bytes)"}
            else:
                reply = await self._answer(line)
            writer.write(json.dumps(reply, ensure_ascii=False, default=str).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), 5.0)
        except (asyncio.TimeoutError, ConnectionError, OSError) as err:
            log.debug("device=_site status client went away: %s", err)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line.decode("utf-8")) if line.strip() else {"cmd": "status"}
        except (UnicodeDecodeError, ValueError):
            return {"ok": False, "error": "malformed request: expected one JSON object per line"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "malformed request: expected a JSON object"}
        try:
            reply = await self.handler(request)
        except Exception as err:  # a status question must never take the agent down
            log.warning("device=_site status request failed: %s", err)
            return {"ok": False, "error": f"internal error: {err}"}
        if isinstance(reply.get("status"), dict):
            # Here, on the event loop: its asyncio tasks can only be counted from its own thread.
            reply["status"]["process"] = process.snapshot()
        return reply


# -- client (pvgate status) --------------------------------------------------------------------


class StatusUnavailable(Exception):
    """No agent answers; the message says why, for the technician."""

    def __init__(self, message: str, code: int = EX_UNAVAILABLE) -> None:
        super().__init__(message)
        self.code = code


def query(path: str | Path, request: dict[str, Any] | None = None,
          timeout_s: float = CLIENT_TIMEOUT_S) -> dict[str, Any]:
    """Send one request to the agent's status socket and return its reply."""
    path = Path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise StatusUnavailable(_("no agent is running: {path} does not exist "
                                      "(is the service started? `systemctl status pvgate`)").format(path=path)) from None
        except ConnectionRefusedError:
            raise StatusUnavailable(_("no agent is running: nothing listens on {path} (left behind by a stopped "
                                      "agent; `systemctl status pvgate`)").format(path=path)) from None
        except PermissionError:
            raise StatusUnavailable(_("permission denied on {path}: run as root or as a member of the "
                                      "pvgate group (sudo pvgate status)").format(path=path), EX_NOPERM) from None
        except OSError as err:
            if err.errno in (errno.ENOTSOCK, errno.ENOTDIR):
                raise StatusUnavailable(_("no agent is running: {path} is not a socket").format(path=path)) from None
            raise StatusUnavailable(_("cannot reach the agent at {path}: {reason}").format(
                path=path, reason=err.strerror or err)) from None
        sock.sendall(json.dumps(request or {"cmd": "status"}).encode() + b"\n")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REPLY_BYTES:
                raise StatusUnavailable(_("the agent at {path} sent an oversized reply").format(path=path))
    except TimeoutError:
        raise StatusUnavailable(_("the agent at {path} did not answer within {seconds:g} s").format(
            path=path, seconds=timeout_s)) from None
    except OSError as err:
        raise StatusUnavailable(_("connection to the agent at {path} failed: {reason}").format(
            path=path, reason=err.strerror or err)) from None
    finally:
        sock.close()
    try:
        reply = json.loads(b"".join(chunks).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise StatusUnavailable(_("the agent at {path} sent an unreadable reply").format(path=path)) from None
    if not isinstance(reply, dict):
        raise StatusUnavailable(_("the agent at {path} sent an unexpected reply").format(path=path))
    return reply



# -- the `pvgate status` subcommand ------------------------------------------------------------


def add_command(sub: Any) -> None:
    """Register `pvgate status` on the CLI's subparsers."""
    p = sub.add_parser("status", help=_("what the running agent is doing (links, devices, values, buffer)"))
    p.add_argument("-c", "--config", default=None,
                   help=_("site file; its agent.state_dir locates the agent's socket"))
    p.add_argument("--socket", default=None,
                   help=_("the agent's status socket (default: $PVGATE_RUNTIME_DIR/{name}, /run/pvgate/{name} "
                          "for the installed service, else STATE_DIR/{name})").format(name=SOCKET_NAME))
    p.add_argument("--json", action="store_true", help=_("print the raw status as JSON"))
    p.add_argument("--no-values", action="store_true", help=_("leave out the devices' last values"))
    p.set_defaults(func=cmd_status)


def _state_dir_of(config: str | None) -> str:
    """The agent's state directory, read leniently: a status look-up must not need secrets."""
    from agent.config import DEFAULT_STATE_DIR

    default = os.environ.get("PVGATE_STATE_DIR", DEFAULT_STATE_DIR)
    if config is None:
        return default
    from drivers.errors import ConfigError
    from drivers.yamlsrc import load_text  # YAML 1.2, as the agent reads the file

    try:
        data = load_text(Path(config).read_text(encoding="utf-8-sig"), config)
    except FileNotFoundError:
        raise StatusUnavailable(_("site file {file} not found").format(file=config), 66) from None
    except (OSError, UnicodeDecodeError, ConfigError) as err:
        raise StatusUnavailable(_("cannot read site file {file}: {reason}").format(file=config, reason=err), 66) from None
    agent = data.get("agent") if isinstance(data, dict) else None
    state = agent.get("state_dir") if isinstance(agent, dict) else None
    return state if isinstance(state, str) and state else default


def cmd_status(args: argparse.Namespace) -> int:
    try:
        path = Path(args.socket) if args.socket else find_socket(_state_dir_of(args.config))
        reply = query(path)
    except StatusUnavailable as err:
        print(f"pvgate status: {err}", file=sys.stderr)
        return err.code
    if not reply.get("ok"):
        print(_("pvgate status: the agent refused: {error}").format(error=reply.get("error", _("unknown error"))),
              file=sys.stderr)
        return EX_UNAVAILABLE
    status = reply.get("status", {})
    if args.json:
        print(json.dumps(status, ensure_ascii=False, indent=2))
    else:
        print(format_status(status, values=not args.no_values))
    return EX_OK


__all__ = ["SOCKET_NAME", "StatusServer", "StatusUnavailable", "add_command", "cmd_status", "format_status",
           "query", "socket_path", "find_socket"]
