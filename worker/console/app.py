"""The operator console: a Starlette app served by uvicorn, in its own process (``python -m worker console``).

It is an MQTT client like any other: it subscribes to the worker's output (live view,
defect feed, score plot), pushes every change to browsers as server-sent events, and
sends similarity queries, labels and control commands (reload, rollback, capture export) to the
worker over MQTT v5 request/response
(:class:`worker.api_client.ApiClient`, the CLI's code path).  It never opens the store.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import json
import logging
import resource
import secrets
import signal
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.api_client import ApiClient, ApiError, NotConnected, Refused
from worker.config import Config, ConfigError
from worker.console.hub import Hub, for_browser
from worker.decode import FrameError
from worker.supervise import StopLoop, Throttle, supervised_loop
from worker.topics import Topics
from worker.wire import MAX_REQUEST_BYTES, RequestError, b64_image, decode_json, parse_timestamp, parse_until

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
KEEPALIVE_S = 15
CLIENT_QUEUE = 1000  # events a slow browser may lag behind before its stream is ended (its page reloads the state)
BACKFILL = "console-backfill"
BACKFILL_RETRY_S = 10.0  # no worker answered for the defects logged before the console started: asked again after


class BasicAuth:
    """HTTP basic auth on every path (browsers ask once and resend it, also for EventSource). A wrong login is
    logged with the client's address, at most once a minute per address with the count since (a guesser must
    not fill the log either); a request without any login (a browser's first, before it asks) is not."""

    LOG_EVERY_S = 60.0
    ADDRESSES = 1024  # addresses whose failures are remembered; the longest quiet is forgotten first

    def __init__(self, app: ASGIApp, username: str, password: str) -> None:
        self.app = app
        self.expected = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        self.failures: OrderedDict[str, list] = OrderedDict()  # address -> [failures since logged, its Throttle]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"").decode(errors="replace")
            if not secrets.compare_digest(given.encode(), self.expected.encode()):
                if given:
                    self._failed(scope["client"][0] if scope.get("client") else "unknown", given)
                await Response("login required", 401, {"WWW-Authenticate": 'Basic realm="edge-inspect"'})(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _failed(self, address: str, given: str) -> None:
        record = self.failures.pop(address, None) or [0, Throttle(self.LOG_EVERY_S)]
        self.failures[address] = record
        while len(self.failures) > self.ADDRESSES:
            self.failures.popitem(last=False)
        record[0] += 1
        if record[1].ready():
            try:
                user = base64.b64decode(given.removeprefix("Basic "), validate=True).decode().split(":", 1)[0]
            except (binascii.Error, UnicodeDecodeError):
                user = "(not basic auth)"
            log.warning("console: failed login from %s as %r: %d failed since the last such line for this address "
                        "(logged at most every %.0f s)", address, user[:64], record[0], self.LOG_EVERY_S)
            record[0] = 0


def _netloc(url: str) -> str:
    """host[:port] of a URL, lower case; "" for one that is not a URL (``Origin: null`` too)."""
    try:
        return urlsplit(url).netloc.lower()
    except ValueError:
        return ""


class SameOriginJson:
    """Refuses a state-changing request (any method but GET/HEAD/OPTIONS) that another site's page could send.

    A cross-site ``<form>`` or ``fetch`` without a preflight can POST ``text/plain`` to the console with the
    operator's basic auth (or just on loopback), labelling frames or reloading models: such a request must come
    from the console's own origin (``Origin``, ``Sec-Fetch-Site``) and carry ``Content-Type: application/json``,
    which a cross-site page cannot send without a CORS preflight the console never grants.
    """

    SAFE = frozenset({"GET", "HEAD", "OPTIONS"})

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in self.SAFE:
            refusal = self.refusal(dict(scope["headers"]))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def refusal(headers: dict[bytes, bytes]) -> Response | None:
        """The answer to a request the console must not act on, or None.  The browser's ``Sec-Fetch-Site`` decides
        where it is sent (no page can set it): behind a reverse proxy that passes ``Host: localhost`` to a console bound
        to loopback (docs/console.md), the ``Origin`` names the proxy's site, not that host.  A client without it (an
        older browser) has its ``Origin`` compared with the ``Host`` it sent, by host and port: behind a TLS proxy the
        scheme differs from the console's own."""
        site = headers.get(b"sec-fetch-site", b"").decode(errors="replace").lower()
        origin = headers.get(b"origin", b"").decode(errors="replace")
        host = headers.get(b"host", b"").decode(errors="replace").lower()
        if site not in ("same-origin", "none") if site else (origin and (not host or _netloc(origin) != host)):
            return _error(403, "forbidden", f"cross-site request refused (Origin {origin or 'absent'}, Sec-Fetch-Site "
                                            f"{site or 'absent'}): the console takes changes only from its own page")
        kind = headers.get(b"content-type", b"").decode(errors="replace").split(";")[0].strip().lower()
        if kind != "application/json":
            return _error(415, "unsupported_media_type",
                          f"send the body as Content-Type: application/json, not {kind or 'none'}")
        return None


def is_loopback(host: str) -> bool:
    """Whether a bind address or a request's host name is this machine's loopback (localhost, 127.x, ::1)."""
    host = host.lower().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name in a ``Host`` header, without its port; IPv6 keeps its brackets off."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else ""
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class LoopbackHost:
    """On a console bound to loopback, refuses every request (GETs too) whose ``Host`` names anything but this
    machine: a page under a name an attacker controls, its DNS rebound to 127.0.0.1, is otherwise "same origin" and
    may read the state and labels and send commands. Bound beyond loopback, basic auth guards the console."""

    def __init__(self, app: ASGIApp, configured: str) -> None:
        self.app = app
        self.configured = configured.lower().strip("[]")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            header = dict(scope["headers"]).get(b"host", b"").decode(errors="replace")
            name = _host_name(header)
            if not (is_loopback(name) or name == self.configured):
                await _error(400, "bad_host", f"Host {header or 'absent'!r} is not this console: bound to loopback, it "
                                              "answers only localhost, 127.0.0.1, [::1] or console.host (a guard "
                                              "against DNS rebinding)")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class NoFraming:
    """Every answer forbids any page, the console's own too, to show it in a frame.  Framed under another site's page,
    its content laid over it, the console's buttons took the operator's clicks (clickjacking), and the frame's
    requests are the console's own, same origin, which :class:`SameOriginJson` lets through: a false alarm labelled
    and absorbed, a model rolled back."""

    HEADERS = ((b"x-frame-options", b"DENY"), (b"content-security-policy", b"frame-ancestors 'none'"))

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def unframed(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *self.HEADERS]}
            await send(message)

        await self.app(scope, receive, unframed)


class ThrottledLog(logging.Filter):
    """Lets a log record whose message starts with one of ``prefixes`` through at most once every ``every_s``, as one
    line without its traceback and with how many such records came since. Out of file descriptors, asyncio logs a
    traceback for every failed ``accept()``, and uvicorn a line for every request past its concurrency limit: a
    flood that can fill the edge box's disk."""

    def __init__(self, prefixes: tuple[str, ...], every_s: float = 60.0) -> None:
        super().__init__()
        self.prefixes, self.every_s = prefixes, every_s
        self.total: dict[str, int] = dict.fromkeys(prefixes, 0)  # every such record, logged or not
        self._since: dict[str, int] = dict.fromkeys(prefixes, 0)
        self._log = {prefix: Throttle(every_s) for prefix in prefixes}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        prefix = next((p for p in self.prefixes if message.startswith(p)), None)
        if prefix is None:
            return True
        self.total[prefix] += 1
        self._since[prefix] += 1
        if not self._log[prefix].ready():
            return False
        cause = f" ({record.exc_info[1]})" if record.exc_info and record.exc_info[1] else ""
        record.msg, record.args = (f"{prefix}{cause}: {self._since[prefix]} time(s) since the last such message, "
                                   f"logged at most every {self.every_s:.0f} s"), ()
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        self._since[prefix] = 0
        return True


ACCEPT_FAILED = "socket.accept() out of system resource"  # asyncio's words
OVER_CONCURRENCY = "Exceeded concurrency limit."  # uvicorn's words
# asyncio takes the listener up again a second after a failed accept(); a stop within that second closes it first,
# and the retry then fails with a traceback ("Invalid file descriptor: -1")
ACCEPT_RETRY = "Exception in callback BaseSelectorEventLoop._start_serving"
THROTTLED = ThrottledLog((ACCEPT_FAILED, OVER_CONCURRENCY, ACCEPT_RETRY))


def raise_open_files_limit() -> tuple[int, int]:
    """The soft limit on open files raised to the hard one (a service's or shell's soft default is often 1024,
    which a client holding connections exhausts): (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class _StreamResponse(StreamingResponse):
    """An event stream that gives its slot back however it ends (a body generator that never started would not)."""

    def __init__(self, release: Callable[[], None], *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


class Broadcaster:
    """Fans hub events out to every connected browser (one bounded queue each), on the event loop. A browser that
    falls CLIENT_QUEUE events behind has its stream ended (counted in ``cut``) rather than miss events unaware: its
    page reconnects and reads the state, the feed and the Learned panel again."""

    def __init__(self) -> None:
        self.queues: set[asyncio.Queue[str | None]] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.cut = 0  # streams ended because their browser fell behind

    def publish(self, event: str, data: dict) -> None:
        """Called on the hub's threads (MQTT, thumbnails)."""
        if self.loop is not None and self.queues:
            message = f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
            self.loop.call_soon_threadsafe(self._put, message)

    def _put(self, message: str) -> None:
        for queue in list(self.queues):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                self.queues.discard(queue)
                self.cut += 1
                while not queue.empty():  # what it has not read yet is stale: its page reads the state again
                    queue.get_nowait()
                queue.put_nowait(None)  # the end of its stream


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"ok": False, "error": {"code": code, "message": message}}, status)


def _unanswered(exc: ApiError) -> JSONResponse:
    """A request no worker answered: 403 when the broker refused it, 503 while the console has no link to the broker
    (nothing was sent either way), else 504 (sent: no answer in time, and the worker may still carry it out)."""
    if isinstance(exc, Refused):
        return _error(403, "broker_refused", str(exc))
    if isinstance(exc, NotConnected):
        return _error(503, "broker_unreachable", f"{exc}: nothing was sent")
    return _error(504, "no_answer", str(exc))


def _fields(body: dict, *taken: str) -> dict:
    """``body``, refused (ValueError) where it holds a field the endpoint does not take: a misspelt key was dropped
    and read as absent, so a canary's ``camra`` rolled the bundle out to every camera, as the worker's own API, which
    refuses unknown fields, never would."""
    if unknown := sorted(set(body) - set(taken)):
        raise ValueError(f"unknown field {unknown[0]!r}: this endpoint takes {', '.join(taken)}")
    return body


def _optional_id(body: dict, key: str) -> str | None:
    """A camera id (or other optional name) from a request body: absent, null, "" or a string; else ValueError."""
    value = body.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    return value


def learned_text(answer: dict) -> str | None:
    """What a label taught the model, in the worker's words: its absorbed/released message, or why nothing; and a
    confirmed defect taken out of the captured normal frames (the next training set)."""
    kind = "absorbed" if "absorbed" in answer else "released" if "released" in answer else None
    change = answer.get(kind) if kind else None
    capture = answer.get("capture") if isinstance(answer.get("capture"), str) else None
    if not isinstance(change, dict):
        return capture
    text = str(change["message"]) if change.get("message") else \
        f"{'not absorbed' if kind == 'absorbed' else 'nothing to release'}: {change.get('reason') or 'no reason given'}"
    return f"{text}; {capture}" if capture else text


def create_app(cfg: Config) -> Starlette:
    hub = Hub(Topics(cfg.topics.prefix, cfg.worker.id, cfg.camera_topics), cfg.console, cfg.limits, cfg.cameras)
    client = ApiClient(cfg, "console", subscriptions=hub.subscriptions, qos=0)
    client.on_message = hub.on_message
    events = Broadcaster()
    hub.subscribe(events.publish)
    stopping = threading.Event()
    not_yet = Throttle(600)  # a console whose worker stays away says so when it starts, then every 10 minutes

    def backfill_step() -> None:
        """One try at the defects a worker logged before the console started (a restarted console showed an empty
        feed): asked once connected, unless every worker is away, and again until one answers."""
        if stopping.is_set():
            raise StopLoop
        if client.link.wait_connected(BACKFILL_RETRY_S) and not stopping.is_set() and hub.away() is None:
            try:
                answer = client.query({"top_k": min(cfg.console.history, cfg.query.max_top_k),
                                       "filters": {"anomalous_only": True}})
            except ApiError as exc:
                answer = {"error": {"message": str(exc)}}
            if answer.get("ok"):
                log.info("console: %d defects logged before it started are in the feed",
                         hub.backfill(answer.get("hits") or []))
                raise StopLoop
            if not_yet.ready():
                log.info("console: the defects logged before it started are not listed yet (asked again every %.0f "
                         "s): %s", BACKFILL_RETRY_S, (answer.get("error") or {}).get("message"))
        stopping.wait(BACKFILL_RETRY_S)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        events.loop = asyncio.get_running_loop()
        hub.start()
        client.link.start()  # connects (and reconnects) in the background; the page shows the link state
        threading.Thread(target=supervised_loop, args=(hub.liveness, BACKFILL, backfill_step), name=BACKFILL,
                         daemon=True).start()
        yield
        stopping.set()
        client.close()
        hub.stop()

    def link_state() -> dict:
        """The console's own MQTT connection, up once the broker has answered its subscriptions (a result published
        before that may not reach it), and why it is down (a refusal names the login); ``broker_refused``: the broker
        said no to the console's login (else it was not reached)."""
        return {"broker": client.link.subscribed.is_set(), "broker_problem": client.link.problem,
                "broker_refused": client.link.connect_refused}

    said: list[dict] = []  # the link state last pushed (paho's thread only)

    def link_changed() -> None:
        """Every page is told when the console's MQTT link comes or goes: the stream's ping comes only after
        KEEPALIVE_S without any other event, never while results flow."""
        now = link_state()
        if said != [now]:
            said[:] = [now]
            events.publish("link", now)

    client.link.on_change = link_changed

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def state(request: Request) -> Response:
        return JSONResponse({**hub.snapshot(), "series": hub.score_series(), **link_state(),
                             "event_streams": sum(streams.values()), "event_streams_cut": events.cut,
                             "accept_failed": THROTTLED.total[ACCEPT_FAILED],
                             "worker": cfg.worker.id, "series_minutes": cfg.console.series_minutes,
                             "now": round(time.time(), 3),  # the console's clock: the page reckons receive times on it
                             "max_cameras": cfg.console.max_cameras, "max_workers": cfg.console.max_workers})

    streams: dict[str, int] = {}  # client address -> open event streams

    async def stream(request: Request) -> Response:
        address = request.client.host if request.client else ""
        if sum(streams.values()) >= cfg.console.max_event_streams:
            return _error(503, "too_many_streams", f"the console already serves {cfg.console.max_event_streams} event "
                                                   "streams (console.max_event_streams): close a page, or try later")
        if streams.get(address, 0) >= cfg.console.max_event_streams_per_client:
            return _error(503, "too_many_streams", f"{address} already holds {cfg.console.max_event_streams_per_client} "
                                                   "event streams (console.max_event_streams_per_client): close a page")
        streams[address] = streams.get(address, 0) + 1

        def release() -> None:
            streams[address] -= 1
            if not streams[address]:
                del streams[address]

        queue: asyncio.Queue[str | None] = asyncio.Queue(CLIENT_QUEUE)
        events.queues.add(queue)

        async def body():
            try:
                yield "retry: 2000\n\n"
                while True:
                    try:
                        message = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                    except TimeoutError:
                        message = f"event: ping\ndata: {json.dumps(link_state())}\n\n"
                    if message is None:  # it fell too far behind (Broadcaster): its page reconnects
                        return
                    yield message
            finally:
                events.queues.discard(queue)

        return _StreamResponse(release, body(), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def image(request: Request) -> Response:
        kind = request.path_params["kind"]
        if kind not in ("frame", "heatmap", "thumbnail"):
            return _error(404, "not_found", f"no image kind {kind!r}")
        camera, frame_id = request.path_params["camera"], request.path_params["frame_id"]
        data = hub.image(camera, frame_id, kind)
        if data is None:
            return _error(404, "not_found", "the console no longer has this image")
        try:
            shown, content = await run_in_threadpool(for_browser, data, cfg.limits)
        except FrameError as exc:
            return _error(422, "image_refused", f"not served: {exc.message}")
        if kind == "frame" and shown is not data:
            hub.shown_as(camera, frame_id, data, shown)
        return Response(shown, media_type=content, headers={"Cache-Control": "private, max-age=3600"})

    async def defects(request: Request) -> Response:
        q = request.query_params
        try:
            since = parse_timestamp(q["since"]) if q.get("since") else None
            until = parse_until(q["until"]) if q.get("until") else None
            limit = min(int(q.get("limit", 100)), cfg.console.history)
        except ValueError as exc:
            return _error(400, "bad_request", str(exc))
        if limit < 1:  # a negative one cut the newest frames off the end instead
            return _error(400, "bad_request", f"limit must be at least 1, not {limit}")
        if since is not None and until is not None and since > until:  # else an empty feed, as if nothing matched
            return _error(400, "bad_request", f"since ({q['since']}) is after until ({q['until']})")
        before_camera, before_frame = q.get("before_camera"), q.get("before_frame_id")
        if (before_camera is None) != (before_frame is None):
            return _error(400, "bad_request", "before_camera and before_frame_id go together: the last item listed")
        before = (before_camera, before_frame) if before_camera is not None and before_frame is not None else None
        # one more than asked: whether the page may offer older ones
        frames = hub.defect_feed(q.get("camera") or None, since, until, limit + 1, before)
        return JSONResponse({"ok": True, "frames": frames[:limit], "more": len(frames) > limit})

    def _unsent(only: str | None = None) -> Response | None:
        """A 503 when the workers' retained availability says none would answer (``only``: the one a control command
        goes to), instead of a wait until the timeout; and nothing is sent, so nothing is carried out later."""
        away = hub.away(only)
        return None if away is None else _error(503, away[0], f"{away[1]}: nothing was sent" + (
            "; ask again once it is online" if away[0] == "worker_offline" else ""))

    async def _ask(call, body: dict, timeout: float | None = None, only: str | None = None) -> Response:
        if (unsent := _unsent(only)) is not None:
            return unsent
        try:
            answer = await run_in_threadpool(call, body, timeout)
        except ApiError as exc:
            return _unanswered(exc)
        return JSONResponse(answer, 200 if answer.get("ok") else 400)

    async def _json_body(request: Request) -> dict:
        """The request's JSON object, read within the worker's own request limits (size, depth, ``decode_json``), so
        no body can exhaust the console's memory or recursion; ValueError says what is wrong with it."""
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_REQUEST_BYTES:
                raise ValueError(f"the body is over {MAX_REQUEST_BYTES} bytes")
        try:
            body = decode_json(bytes(data))
        except RequestError as exc:
            raise ValueError(exc.message) from None
        if not isinstance(body, dict):
            raise ValueError("send a JSON object")
        return body

    def refusing(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """A POST handler whose ValueError (a body that is no request of its kind) is answered 400 bad_request."""
        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except ValueError as exc:
                return _error(400, "bad_request", str(exc))
            except ClientDisconnect:  # the browser went away mid-body: nobody to answer, nothing to log as a bug
                return Response(status_code=400)
        return handle

    @refusing
    async def similar(request: Request) -> Response:
        """The worker's query request, passed on unchanged: validation and search are the worker's."""
        body = await _json_body(request)
        if isinstance(body.get("image_b64"), str):
            try:
                b64_image(body["image_b64"])
            except ValueError:
                return _error(400, "bad_image", "image_b64 is not valid base64")
        return await _ask(client.query, body)

    @refusing
    async def label(request: Request) -> Response:
        keys = ("frame_id", "camera", "label", "defect_type", "note", "captured_at")
        body = _fields(await _json_body(request), *keys)
        if not body.get("frame_id") or "label" not in body:  # a label left out is no withdrawal (label: null is)
            raise ValueError("send {frame_id, camera, label, defect_type, note, captured_at} as JSON (label null "
                             "withdraws it; captured_at, the frame's as shown, keeps a label off a later frame of its id)")
        response = await _ask(client.label, {"action": "set", **{k: body.get(k) for k in keys}})
        answer = json.loads(bytes(response.body))  # starlette types a body bytes | memoryview
        if answer.get("ok"):
            hub.set_label(answer.get("camera") or body["camera"], answer.get("frame_id") or body["frame_id"],
                          answer.get("label"), answer.get("defect_type"), learned_text(answer))
        return response

    @refusing
    async def unlabel(request: Request) -> Response:
        """Undo from the Learned panel: the frame's label goes, and what it taught the model with it."""
        body = _fields(await _json_body(request), "frame_id", "camera")
        if not isinstance(body.get("frame_id"), str) or not isinstance(body.get("camera"), str) \
                or not body["frame_id"] or not body["camera"]:
            raise ValueError("send {frame_id, camera} as JSON")
        response = await _ask(client.label, {"action": "unlabel", "frame_id": body["frame_id"], "camera": body["camera"]})
        if response.status_code == 200:
            hub.set_label(body["camera"], body["frame_id"], None, None, learned_text(json.loads(bytes(response.body))))
        return response

    async def extensions(request: Request) -> Response:
        """What the served bundles learned from false alarms, per extension, with one entry per frame."""
        return await _ask(client.label, {"action": "extensions"})

    async def _camera_command(request: Request, command: str) -> Response:
        """A control command that takes an optional camera: {camera?} in, the worker's answer out."""
        camera = _optional_id(_fields(await _json_body(request), "camera"), "camera")
        return await _ask(client.control, {"command": command, **({"camera": camera} if camera else {})},
                          cfg.console.control_timeout_s, cfg.worker.id)

    @refusing
    async def export_capture(request: Request) -> Response:
        """The worker writes its captured frames as a training folder (on the worker's box) and says where."""
        return await _camera_command(request, "export_capture")

    @refusing
    async def reload(request: Request) -> Response:
        """Canary (with a camera) or roll-out (without) of the bundle at a path on the worker's box."""
        body = _fields(await _json_body(request), "bundle", "camera")
        bundle, camera = _optional_id(body, "bundle"), _optional_id(body, "camera")
        if bundle is None:
            raise ValueError("bundle (a bundle folder on the worker's box) is required")
        return await _ask(client.control, {"command": "reload", "bundle": bundle,
                                           **({"camera": camera} if camera else {})}, cfg.console.control_timeout_s,
                          cfg.worker.id)

    @refusing
    async def rollback(request: Request) -> Response:
        """Back to the model a camera (or the default) ran before its last reload."""
        return await _camera_command(request, "rollback")

    async def export(request: Request) -> Response:
        fmt = request.query_params.get("format", "csv")
        if fmt not in ("csv", "json"):
            return _error(400, "bad_request", "format is csv or json")
        if (unsent := _unsent()) is not None:
            return unsent
        try:
            answer = await run_in_threadpool(client.label, {"action": "export", "format": fmt})
        except ApiError as exc:
            return _unanswered(exc)
        if not answer.get("ok"):
            return JSONResponse(answer, 400)
        disposition = {"Content-Disposition": f'attachment; filename="labels.{fmt}"'}
        if fmt == "csv":
            return Response(answer.get("csv", ""), media_type="text/csv", headers=disposition)
        return JSONResponse(answer["labels"], headers=disposition)

    app = Starlette(routes=[
        Route("/", index),
        Route("/api/state", state),
        Route("/api/events", stream),
        Route("/api/frames/{camera}/{frame_id}/{kind}", image),
        Route("/api/defects", defects),
        Route("/api/similar", similar, methods=["POST"]),
        Route("/api/labels", label, methods=["POST"]),
        Route("/api/labels/export", export),
        Route("/api/labels/unlabel", unlabel, methods=["POST"]),
        Route("/api/extensions", extensions),
        Route("/api/capture/export", export_capture, methods=["POST"]),
        Route("/api/models/reload", reload, methods=["POST"]),
        Route("/api/models/rollback", rollback, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ], lifespan=lifespan)
    app.add_middleware(SameOriginJson)
    if cfg.console.username is not None and cfg.console.password is not None:  # both or neither (ConsoleConfig)
        app.add_middleware(BasicAuth, username=cfg.console.username,
                           password=cfg.console.password.get_secret_value())
    if is_loopback(cfg.console.host):  # outermost: a rebound name gets no answer at all, not even a login prompt
        app.add_middleware(LoopbackHost, configured=cfg.console.host)
    app.add_middleware(NoFraming)  # outermost: a refusal (a login asked for, a bad Host) may not be framed either
    return app


def serve(cfg: Config) -> None:
    """Run the console until SIGINT/SIGTERM."""
    import uvicorn

    host, port = cfg.console.host, cfg.console.port
    try:  # bound here, so a port in use is said as the config's (uvicorn logs it after "console on" and exits 3)
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
    except OSError as exc:
        raise ConfigError(f"console.host/console.port: cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    # uvicorn shuts down on SIGINT/SIGTERM and then re-raises the signal to the handler that was there
    # before: make that one a no-op, so a requested stop exits 0 like the worker.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    before, after = raise_open_files_limit()
    if after != before:
        log.info("console: open-files limit raised from %d to %d", before, after)
    for name in ("asyncio", "uvicorn.error"):
        logging.getLogger(name).addFilter(THROTTLED)
    log.info("operator console on http://%s:%d/", host, port)
    # limit_concurrency: past it uvicorn answers 503 and closes, rather than the process running out of descriptors.
    protocol = type("HeaderDeadline", (header_deadline(),), {"header_timeout_s": cfg.console.header_timeout_s})
    uvicorn.Server(uvicorn.Config(create_app(cfg), log_level="warning", access_log=False, timeout_graceful_shutdown=2,
                                  limit_concurrency=cfg.console.max_connections, http=protocol,
                                  timeout_keep_alive=cfg.console.keep_alive_s)).run(sockets=[listener])


def header_deadline() -> type:
    """uvicorn's HTTP/1.1 protocol with a deadline for a request's headers.  uvicorn waits for ever for headers: a
    client that opens connections and never finishes them (slowloris) held them, up to the open-files limit, and no
    login is asked before the headers are complete.  Each connection must complete a request's headers within
    ``header_timeout_s`` of opening or of its last answer; a request being answered (an event stream) is never cut."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        header_timeout_s: float = 10.0
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self._deadline is not None and self.cycle is not None and not self.cycle.response_complete:
                self._deadline.cancel()  # the headers are in: the request is the app's now
                self._deadline = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this connection gets its own deadline

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(self.header_timeout_s, self._too_slow)

        def _too_slow(self) -> None:
            self._deadline = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline
