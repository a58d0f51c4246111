"""The status page: a small read-only web server on the agent's event loop (docs/status-page.md).

Off unless the site file has a ``status_page:`` section; loopback unless it names a host. It
serves ``/`` (the page, agent/service/page.html: inline CSS and script, nothing fetched from
anywhere else), ``/api/status`` (the snapshot ``pvgate status --json`` prints) and
``/api/power`` (today's power per inverter and for the station). Only GET and HEAD.

Polling shares this event loop, so a browser, or anything hammering the port, must not be able
to delay it: a request is a few header lines read under strict limits (size, header count,
time, connections at once, requests per second), one request per connection, and every answer
is either static or computed on a worker thread and cached (agent/service/webdata.py). A port
already in use is logged and the agent polls on without its page: readings are worth more.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from agent import i18n
from agent.config import SiteConfig, StatusPageConfig
from agent.logutil import RateLimitedLog
from agent.service import process
from agent.service.pagetext import render
from agent.service.webdata import POWER_TTL_S, STATUS_TTL_S, Cached, choose_language, power_today, to_json

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 8192
MAX_HEADERS = 50
HEAD_TIMEOUT_S = 5.0
WRITE_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 32
RATE_PER_S = 100.0  # requests answered per second, all clients together; more wait their turn
RATE_BURST = 50.0
REALM = "pvgate"
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable", 505: "HTTP Version Not Supported"}
_REQUEST_LINE = re.compile(r"^([A-Z]{1,16}) (\S{1,2048}) HTTP/(1\.[01])$")
_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


class PageHost(Protocol):
    """What the page reads of the running agent (agent.service.runtime.Agent)."""

    @property
    def cfg(self) -> SiteConfig: ...

    def status_snapshot(self, values: bool = True) -> dict[str, Any]: ...


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _template() -> tuple[str, str]:
    """The page template and the Content-Security-Policy that allows its one inline script."""
    text = resources.files("agent.service").joinpath("page.html").read_text(encoding="utf-8")
    found = _SCRIPT.search(text)
    script = found.group(1) if found else ""
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    # Nothing but this origin: no CDN, no font, no tracker, even if the page were changed to ask.
    csp = (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return text, csp


class RateLimit:
    """A token bucket: RATE_PER_S requests a second, bursts of RATE_BURST."""

    def __init__(self, rate: float = RATE_PER_S, burst: float = RATE_BURST) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.at = burst, time.monotonic()

    def delay(self) -> float:
        """Take a token; the seconds to wait before the request may be answered."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class StatusPageServer:
    """Start, stop and reconfigure the page; answer its requests."""

    def __init__(self, agent: PageHost) -> None:
        self.agent = agent
        self.cfg: StatusPageConfig | None = None
        self.requests = 0
        self.refused = 0
        self._server: asyncio.AbstractServer | None = None
        self._connections = 0
        self._rate = RateLimit()
        self._rl = RateLimitedLog(log)
        self._template, self._csp = _template()
        self._pages: dict[str, bytes] = {}
        self.status = Cached(lambda: to_json(agent.status_snapshot(True)), STATUS_TTL_S)
        self.power = Cached(lambda: to_json(power_today(agent.cfg)), POWER_TTL_S)

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def apply(self, cfg: StatusPageConfig | None) -> None:
        """Serve as `cfg` says: start, stop, or restart on other settings (a reload); a page that
        could not listen before is tried again."""
        if cfg == self.cfg and (cfg is None or self.listening):
            return
        await self.stop()
        if cfg is None and self.cfg is not None:
            log.info("device=_site status page off (no status_page section in the site file)")
        self.cfg = cfg
        self.power.clear()
        if cfg is not None:
            await self.start(cfg)

    async def start(self, cfg: StatusPageConfig) -> bool:
        self.cfg = cfg
        try:
            self._server = await asyncio.start_server(self._serve, cfg.host, cfg.port, limit=MAX_HEAD_BYTES,
                                                      reuse_address=True)
        except OSError as err:
            log.warning("device=_site status page: cannot listen on %s:%d (%s); polling goes on without the "
                        "page. Free the port or change status_page.port, then reload (systemctl reload pvgate)",
                        cfg.host, cfg.port, err.strerror or err)
            return False
        auth = "with login" if cfg.password is not None else "without login"
        log.info("device=_site status page on http://%s:%d/ (%s)", _url_host(cfg.host), cfg.port, auth)
        return True

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2.0)

    # -- one connection, one request -----------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._connections >= MAX_CONNECTIONS:
            self.refused += 1
            writer.close()  # no answer at all: anything else would cost the loop more
            return
        self._connections += 1
        try:
            head_only = False
            try:
                request = await self._read(reader)
                head_only = request.method == "HEAD"
                wait = self._rate.delay()
                if wait > 0:
                    await asyncio.sleep(wait)
                reply = await self._answer(request)
            except BadRequest as err:
                reply = Reply(err.status, f"{err}\n".encode())
            self.requests += 1
            writer.write(self._encode(reply, head_only))
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
            if reply.status in (400, 431):
                if writer.can_write_eof():
                    writer.write_eof()  # the client sees the end of the answer and hangs up
                await _discard(reader)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError) as err:
            log.debug("device=_site status page client went away: %s", err)
        except Exception as err:  # a request must never take the agent down, nor fill its log
            self._rl.warning("page-serve", "device=_site status page: request failed: %s", err)
        finally:
            self._connections -= 1
            writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> Request:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
        except (asyncio.LimitOverrunError, ValueError):
            raise BadRequest(431, f"request too large (at most {MAX_HEAD_BYTES} bytes of request line and headers)")
        except asyncio.TimeoutError:
            raise BadRequest(408, "request not received in time")
        lines = head[:-4].decode("latin-1").split("\r\n")
        if len(lines) - 1 > MAX_HEADERS:
            raise BadRequest(431, f"too many header lines (at most {MAX_HEADERS})")
        match = _REQUEST_LINE.match(lines[0])
        if match is None:
            raise BadRequest(505 if lines[0].startswith(("GET ", "HEAD ")) and " HTTP/" in lines[0] else 400,
                             "malformed request line")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise BadRequest(400, "malformed header line")
            headers[name.lower()] = value.strip()
        try:
            target = urlsplit(match.group(2))
            query = parse_qs(target.query, max_num_fields=10)
        except ValueError:
            raise BadRequest(400, "malformed request target") from None
        return Request(match.group(1), target.path, query, headers)

    async def _answer(self, request: Request) -> Reply:
        cfg = self.cfg
        if cfg is not None and cfg.password is not None and not self._authorized(request, cfg):
            return Reply(401, b"login required\n",
                         headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'})
        if request.method not in ("GET", "HEAD"):
            return Reply(405, b"read-only: only GET and HEAD\n", headers={"Allow": "GET, HEAD"})
        try:
            if request.path in ("/", "/index.html"):
                return self._page(request)
            if request.path == "/api/status":
                return Reply(200, with_process(await self.status.get()), "application/json")
            if request.path == "/api/power":
                return Reply(200, await self.power.get(), "application/json")
        except Exception as err:  # the page must never take the agent down
            self._rl.warning("page-error", "device=_site status page: %s failed: %s", request.path, err)
            return Reply(500, b"internal error; see the agent's log\n")
        return Reply(404, b"not found\n")

    def _authorized(self, request: Request, cfg: StatusPageConfig) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        try:
            user, _, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            user, password = "", ""
        # Both compared, in constant time, whatever the first gave: no timing tells which was wrong.
        ok_user = hmac.compare_digest(user.encode(), (cfg.username or "").encode())
        ok_password = hmac.compare_digest(password.encode(), (cfg.password or "").encode())
        if scheme.lower() == "basic" and ok_user and ok_password:
            return True
        if token:  # a browser first asks without credentials: only wrong ones are worth a line
            self._rl.warning("page-auth", "device=_site status page: wrong user name or password from a client "
                             "(user %r)", user[:40])
        return False

    def _page(self, request: Request) -> Reply:
        site_lang = self.agent.cfg.site.language
        asked = request.query.get("lang")
        lang = choose_language(asked[0] if asked else None, site_lang,
                               request.headers.get("accept-language"), i18n.language())
        body = self._pages.get(lang)
        if body is None:
            body = self._pages[lang] = render(self._template, lang).encode("utf-8")
        return Reply(200, body, "text/html; charset=utf-8",
                     {"Content-Security-Policy": self._csp, "Content-Language": lang, "Vary": "Accept-Language"})

    def _encode(self, reply: Reply, head_only: bool) -> bytes:
        headers = {"Content-Type": reply.content_type, "Content-Length": str(len(reply.body)),
                   "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                   "Referrer-Policy": "no-referrer", "Connection": "close", **reply.headers}
        head = f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Error')}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        return head.encode("latin-1") + (b"" if head_only else reply.body)


async def _discard(reader: asyncio.StreamReader) -> None:
    """Read (and drop) what a refused client still sends, for a moment: closing a socket with
    unread data resets the connection, and the client would never see why it was refused."""
    deadline = time.monotonic() + 1.0
    taken = 0
    with contextlib.suppress(Exception):
        while taken < 256 * 1024 and time.monotonic() < deadline:
            chunk = await asyncio.wait_for(reader.read(65536), max(0.01, deadline - time.monotonic()))
            if not chunk:
                return
            taken += len(chunk)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


__all__ = ["MAX_HEAD_BYTES", "PageHost", "StatusPageServer"]


def with_process(body: bytes) -> bytes:
    """The cached snapshot plus the `process` object `pvgate status` shows, taken now on the loop
    (asyncio tasks are counted only there). Spliced in, not re-encoded: a hammered page costs
    the loop a few microseconds, not a JSON round trip of every device."""
    extra = to_json(process.snapshot())
    return body[:-1] + b',"process":' + extra + b"}" if body.endswith(b"}") else body
