#!/usr/bin/env python3
"""A camera stand-in: publishes images from a folder (or frames of a video / webcam) as MQTT v5 frames.

Adapt it to your camera: every frame goes to <prefix>/<camera>/frame with the user
properties frame_id and captured_at that the worker requires.  Needs only
paho-mqtt 2.x (not Debian 12's python3-paho-mqtt, 1.6) and OpenCV for --video.

    python deploy/camera_publisher.py --port 1883 --camera line1 --folder images/ --fps 5
    python deploy/camera_publisher.py --camera line2 --video /dev/video0 --fps 2 --jpeg-quality 90

It runs like a camera: it waits for the broker, reconnects by itself, and while the broker is away
(or does not acknowledge) it drops frames instead of queueing them; a live camera's old frames are
worthless and a backlog would flood the worker when the broker comes back.  For the same reason each live frame
carries an MQTT v5 message expiry (--max-age, 60 s): the broker discards a frame that waited longer for a worker
that is away (restarting, down), instead of handing it over late in a burst.  Frame ids are
<run>-<n>[-<file>]: <run> is the start time (UTC) plus random hex, <n> counts frames read from the
source (gaps are dropped frames), <file> the path under --folder; so no id repeats across restarts
or --loop passes (the worker replaces the record and label of a frame whose id comes again).
SIGTERM, SIGINT and SIGHUP stop it cleanly (exit 0).  Exit 2: bad input; exit 1: nothing was sent.
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import paho.mqtt
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

# What the worker decodes (bundle.FRAME_FORMATS).
SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
PASSWORD_VARIABLE = "CAMERA_MQTT_PASSWORD"
MAX_ID_LENGTH = 128  # worker/wire.py valid_id
REPORT_EVERY_S = 60.0
# Frames paho may hold unacknowledged: publishing past it fails at once, so memory stays bounded
# while a hung broker keeps the TCP link open.
QUEUE_LIMIT = 2
PUBLISH_OVERHEAD = 16  # a PUBLISH's bytes besides topic, properties and payload: header, lengths, packet id
REFUSALS_KEPT = 16  # refusals remembered until their frame's wait asks for them
# How long the broker may hold a live frame for a worker that is away: long enough for a worker's restart, short of
# an outage, whose frames would reach it late in a burst and be scored and answered as if live.
LIVE_MAX_AGE_S = 60
MAX_EXPIRY_S = 0xFFFFFFFF  # MQTT v5's Message Expiry Interval is four bytes


class _Stop:
    """Set by the signal handler, read by the main loop; not a ``threading.Event``: Python runs a handler in the main
    thread between two bytecodes, and ``Event.set`` there waits for the Event's lock, which the main thread may hold
    inside its own ``Event.wait``, so a Ctrl-C could hang the publisher for good (the worker's StopSignals)."""

    POLL_S = 0.05

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` s, ending within POLL_S of a stop; whether it is set."""
        deadline = time.monotonic() + timeout
        while not self._set and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, self.POLL_S))
        return self._set


STOP = _Stop()
Pending = tuple[mqtt.MQTTMessageInfo, float]  # a frame paho took, and when it was published
_stopped_by: list[str] = []


class InputError(Exception):
    """A source that cannot give frames: said in one line, exit 2."""


def log(text: str) -> None:
    print(f"camera_publisher: {text}", file=sys.stderr, flush=True)


class Notice:
    """Says a lasting condition once, then once a minute, so an outage of hours does not flood the log."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.since: float | None = None

    def say(self, text: str) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since = now
        if self.last is None or now - self.last >= REPORT_EVERY_S:
            self.last = now
            log(text)

    def minutes(self) -> str:
        return "" if self.since is None else f" for {(time.monotonic() - self.since) / 60:.0f} min"

    def clear(self) -> bool:
        """True if the condition had been said (so its end is worth saying)."""
        said = self.last is not None
        self.last = self.since = None
        return said


# -- sources -----------------------------------------------------------------------------------------------------

def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)  # dotfiles and macOS "._x.png" AppleDouble files


def image_files(folder: Path, pattern: str) -> list[Path]:
    """The image files under ``folder``, sorted; hidden ones are skipped (an AppleDouble ``._x.png`` is no image)."""
    try:
        found = [p for p in folder.glob(pattern)
                 if p.suffix.lower() in SUFFIXES and not _hidden(p.relative_to(folder)) and p.is_file()]
    except OSError:  # the folder went away while we listed it
        return []
    return sorted(found)


def file_name_part(folder: Path, path: Path) -> str:
    """The path under --folder without suffix, readable in an id (no '/', printable)."""
    rel = path.relative_to(folder).with_suffix("").as_posix().replace("/", "_")
    return "".join(c if c.isprintable() else "?" for c in rel)


def folder_frames(folder: Path, pattern: str, loop: bool) -> Iterator[tuple[str | None, bytes]]:
    """(name, bytes) for each image file; files that vanish or cannot be read are skipped, not fatal."""
    empty, unreadable = Notice(), Notice()
    skipped: set[Path] = set()  # the files the last pass skipped: a file that stays unreadable is said once
    while not STOP.is_set():
        paths = image_files(folder, pattern)
        if not paths:
            if not loop:
                return
            empty.say(f"no image files ({', '.join(sorted(SUFFIXES))}) match {pattern!r} under {folder}"
                      f"{empty.minutes()}; looking again every second")
            STOP.wait(1.0)  # --loop on an empty folder: wait for files instead of spinning
            continue
        if empty.clear():
            log(f"image files under {folder} again")
        skipped_now: set[Path] = set()
        read = 0
        for path in paths:
            if STOP.is_set():
                return
            try:
                data = path.read_bytes()
                why = "" if data else "empty file"
            except OSError as e:  # deleted by an archiver or a ring buffer since the listing
                why = e.strerror or str(e)
            if why:
                skipped_now.add(path)
                if path not in skipped:
                    log(f"skipped {path}: {why}")
                continue
            read += 1
            yield file_name_part(folder, path), data
        skipped = skipped_now
        if not loop:
            return
        if read:
            if unreadable.clear():
                log(f"image files under {folder} can be read again")
        else:  # --loop over files still being written (empty) or unreadable: wait for them instead of spinning
            unreadable.say(f"none of the {len(paths)} image files under {folder} can be read{unreadable.minutes()}; "
                           "looking again every second")
            STOP.wait(1.0)


def _is_live(source: str) -> bool:
    return source.isdigit() or source.startswith("/dev/") or "://" in source


def open_video(source: str) -> tuple[Any, Any]:
    """The capture and its first frame; raises InputError when it gives none (a typo, an image, no device)."""
    import cv2  # only --video needs OpenCV

    capture = cv2.VideoCapture(int(source) if source.isdigit() else source)
    if not capture.isOpened():
        raise InputError(f"--video {source}: cannot open it as a video file, stream or webcam")
    ok, frame = capture.read()
    if not ok:
        capture.release()
        raise InputError(f"--video {source}: opened, but no frame could be read (not a video, or an empty one?)")
    return capture, frame


def video_frames(source: str, quality: int, capture: Any, first: Any) -> Iterator[tuple[str | None, bytes]]:
    """JPEG frames; a live source (webcam, stream) that stops giving frames is reopened, a file ends."""
    import cv2

    live = _is_live(source)
    frame = None if live else first  # a live source's probe frame is stale by the time the broker is up
    lost = Notice()
    while not STOP.is_set():
        if frame is None:
            ok, frame = capture.read()
            if not ok:
                frame = None
                if not live:
                    return
                lost.say(f"--video {source} gives no frames{lost.minutes()}; reopening it every second")
                capture.release()
                STOP.wait(1.0)
                capture = cv2.VideoCapture(int(source) if source.isdigit() else source)
                continue
            if lost.clear():
                log(f"--video {source} gives frames again")
        yield None, cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()
        frame = None
    capture.release()


# -- MQTT --------------------------------------------------------------------------------------------------------

class Link:
    """The broker connection: paho connects and reconnects (with backoff) in its own thread; we watch its state."""

    def __init__(self, args: argparse.Namespace, client_id: str) -> None:
        self.where = f"{args.host}:{args.port}"
        self.up = threading.Event()
        self.reason = "not connected yet"
        # mid -> (the broker's reason, when it came) for the frames it refused in its PUBACK (an ACL without this topic)
        self.refused: dict[int, tuple[str, float]] = {}
        self.refusal = ""  # the reason of the last frame refused
        self.max_packet: int | None = None  # the broker's Maximum Packet Size (its CONNACK), if it has one
        self._refused_lock = threading.Lock()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.max_queued_messages_set(QUEUE_LIMIT)
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_publish = self._on_publish
        if args.username:
            self.client.username_pw_set(args.username, args.password)
        if args.cafile or args.certfile:  # a client certificate alone: TLS too, trusting the system's CAs
            try:
                self.client.tls_set(ca_certs=args.cafile, certfile=args.certfile, keyfile=args.keyfile)
            except (OSError, ValueError) as e:
                raise InputError(f"TLS files (--cafile/--certfile/--keyfile): {e}") from e
        # keepalive: a broker that hangs with the TCP link open is noticed within two of them
        self.client.connect_async(args.host, args.port, keepalive=20)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self.reason = f"the broker refused the connection: {reason}"
        else:
            self.max_packet = getattr(properties, "MaximumPacketSize", None)
            self.up.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.up.clear()
        self.reason = f"connection lost ({reason})"

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self.reason = "cannot connect (broker down or unreachable, or TLS failed)"

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if reason.is_failure:  # mosquitto drops what the ACL does not let this login write, and says so only here
            with self._refused_lock:
                self.refused[mid] = (str(reason), time.monotonic())
                while len(self.refused) > REFUSALS_KEPT:  # those of frames given up on are never asked for
                    del self.refused[next(iter(self.refused))]

    def wait_up(self, notice: Notice, first: bool) -> bool:
        """Block until connected (saying why not, once a minute); False if we are asked to stop first."""
        while not self.up.wait(0.25):
            if STOP.is_set():
                return False
            what = "waiting for the broker" if first else "the broker is away"
            notice.say(f"{what} at {self.where}{notice.minutes()}: {self.reason}")
        return True

    def publish(self, topic: str, data: bytes, props: Properties, ack_timeout: float) -> tuple[str, Pending | None]:
        """('sent', _) once the broker acknowledged it, else why not: 'offline', 'backlog', 'too large', 'refused', 'lost'
        or 'unacked', with the frame paho still holds (None if none): paho sends that again itself after a reconnect."""
        if not self.up.is_set():
            return "offline", None
        # the broker closes the connection of a client that sends past its limit, and paho sends the frame again after
        # each reconnect: one large file would keep the camera off the broker for good
        size = len(data) + len(topic.encode()) + len(props.pack()) + PUBLISH_OVERHEAD
        if self.max_packet is not None and size > self.max_packet:
            self.refusal = f"{size} bytes, over the broker's maximum packet size of {self.max_packet}"
            return "too large", None
        pending = (self.client.publish(topic, data, qos=1, properties=props), time.monotonic())
        if pending[0].rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            return "backlog", None
        # any other rc (not connected after all): paho keeps it (its queue is bounded) and sends it after a reconnect
        return self.wait_acked(pending, ack_timeout), pending

    def wait_acked(self, pending: Pending, ack_timeout: float) -> str:
        """'sent' once the broker acknowledged the frame, 'refused' (the reason in ``refusal``), 'lost' or 'unacked'."""
        info, started = pending
        deadline = time.monotonic() + ack_timeout
        while not info.is_published():
            left = deadline - time.monotonic()
            if left <= 0 or STOP.is_set():
                return "unacked"
            if not self.up.is_set():
                return "lost"
            info.wait_for_publish(min(0.25, left))
        with self._refused_lock:
            refused = self.refused.pop(info.mid, None)
        if refused is None or refused[1] < started:  # an older refusal under a packet id used again is not this one's
            return "sent"
        self.refusal = refused[0]
        return "refused"

    def close(self) -> None:
        self.client.disconnect()
        # loop_stop waits for unacknowledged messages while the link is open: give it a bound (its thread is a daemon)
        stopper = threading.Thread(target=self.client.loop_stop, daemon=True)
        stopper.start()
        stopper.join(5)


# -- main --------------------------------------------------------------------------------------------------------

def _on_signal(signum: int, frame: FrameType | None) -> None:
    _stopped_by.append(signal.Signals(signum).name)
    STOP.set()


def run_token() -> str:
    """Unique per run, readable: the start time plus random hex (an edge box without a clock may boot at one time)."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(2)}"


def frame_id(token: str, n: int, name: str | None) -> str:
    head = f"{token}-{n:08d}"
    if not name:
        return head
    room = MAX_ID_LENGTH - len(head) - 1
    return f"{head}-{name[-room:]}"  # the end of a long path names the file


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--prefix", default="inspect")
    parser.add_argument("--camera", required=True)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", type=Path)
    src.add_argument("--video", help="file, URL or webcam index")
    parser.add_argument("--glob", default="**/*", help="file pattern under --folder (hidden files are skipped)")
    parser.add_argument("--fps", type=float, default=5,
                        help="frames per second; while the broker is away frames are dropped at this pace "
                             "(0 = as fast as the broker takes them: then each frame waits for the broker)")
    parser.add_argument("--limit", type=int, default=0, help="stop after this many frames sent (0 = all)")
    parser.add_argument("--loop", action="store_true", help="repeat the folder forever (ids still never repeat)")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--max-age", type=int, default=None,
                        help="seconds the broker may hold a frame for a worker that is away (MQTT v5 message expiry): "
                             "older ones are discarded by the broker, not delivered late in a burst (default 60 with "
                             "--fps above 0; none with --fps 0, a replay whose every frame is wanted; 0 = none)")
    parser.add_argument("--ack-timeout", type=float, default=10,
                        help="seconds the broker has to acknowledge a frame before it counts as not sent")
    parser.add_argument("--client-id",
                        help="MQTT client id (default camera-<camera>-<random>, unique per process, so a second "
                             "publisher does not disconnect the first; set one only if your broker needs it)")
    parser.add_argument("--username")
    parser.add_argument("--password", default=os.environ.get(PASSWORD_VARIABLE),
                        help=f"default: ${PASSWORD_VARIABLE}, which keeps it out of the process list ('ps' shows the "
                             "command line to every user of the box)")
    parser.add_argument("--cafile", help="CA certificate: connect with TLS")
    parser.add_argument("--certfile", help="client certificate: connect with TLS (without --cafile: the system's CAs)")
    parser.add_argument("--keyfile", help="the client certificate's key, if not in --certfile")
    parser.add_argument("--quiet", action="store_true", help="do not print a line per frame")
    return parser.parse_args(argv)


def open_source(args: argparse.Namespace) -> Iterator[tuple[str | None, bytes]]:
    """The frames; the source is checked first, so a typo fails at once (and not after waiting for the broker)."""
    if args.folder is not None:
        if not args.folder.is_dir():
            raise InputError(f"--folder {args.folder}: no such folder")
        try:
            found = image_files(args.folder, args.glob)
        except (ValueError, NotImplementedError) as e:  # pathlib's refusal of an empty or absolute pattern
            raise InputError(f"--glob {args.glob!r}: {e}; give a pattern under --folder, such as '**/*.png'") from e
        if not found:
            raise InputError(f"--folder {args.folder}: no image files ({', '.join(sorted(SUFFIXES))}) "
                             f"match --glob {args.glob!r}")
        return folder_frames(args.folder, args.glob, args.loop)
    capture, first = open_video(args.video)
    return video_frames(args.video, args.jpeg_quality, capture, first)


def main(argv: list[str] | None = None) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    args = parse_args(argv)
    if not hasattr(mqtt, "CallbackAPIVersion"):  # paho 1.x (Debian 12's package) has neither it nor its callbacks
        log(f"error: needs paho-mqtt 2.0 or later, not {getattr(paho.mqtt, '__version__', 'an older one')} "
            "(Debian's python3-paho-mqtt is 1.6): pip install 'paho-mqtt>=2,<3'")
        return 2
    # not (x >= 0): NaN passes every comparison, and --fps nan published as fast as it could, dropping frames
    if not (0 <= args.fps < math.inf and 0 < args.ack_timeout < math.inf):
        log("error: --fps must be >= 0 and --ack-timeout > 0 (finite numbers)")
        return 2
    if args.max_age is None:
        args.max_age = LIVE_MAX_AGE_S if args.fps > 0 else 0
    if not 0 <= args.max_age <= MAX_EXPIRY_S:
        log(f"error: --max-age must be 0 (none) to {MAX_EXPIRY_S} seconds")
        return 2
    if args.limit < 0 or not 0 <= args.jpeg_quality <= 100:  # --limit -1 sent one frame, not all
        log("error: --limit must be >= 0 (0 = all) and --jpeg-quality 0-100")
        return 2
    if not 0 < args.port < 65536:  # paho raised a traceback for 0 or less, and tried past 65535 for ever
        log(f"error: --port {args.port} is not a TCP port (1-65535)")
        return 2
    # the worker reads <prefix>/<camera>/frame: a camera of several levels, or a wildcard, reaches no worker; mosquitto
    # closes the connection of a client whose topic or client id holds a control character (the camera is in both)
    if not args.camera or not args.camera.isprintable() or any(ch in args.camera for ch in "+#/"):
        log(f"error: --camera {args.camera!r} must be one topic level of printable characters, without '/', '+' or '#'")
        return 2
    if not args.prefix or not args.prefix.isprintable() or any(ch in args.prefix for ch in "+#") \
            or args.prefix.startswith("/") or args.prefix.endswith("/"):
        log(f"error: --prefix {args.prefix!r} must be a topic of printable characters without '+', '#' or a '/' at "
            "either end")
        return 2
    if args.client_id is not None and not args.client_id.isprintable():
        log(f"error: --client-id {args.client_id!r} must be printable characters")
        return 2
    try:
        frames = open_source(args)
        link = Link(args, args.client_id or f"camera-{args.camera}-{secrets.token_hex(4)}")
    except InputError as e:
        log(f"error: {e}")
        return 2
    topic = f"{args.prefix}/{args.camera}/frame"
    token = run_token()
    counts = {"sent": 0, "dropped": 0, "unacked": 0, "refused": 0}
    away, slow = Notice(), Notice()
    try:
        if link.wait_up(away, first=True):
            if away.clear():
                log(f"connected to {link.where}")
            counts = publish_all(args, frames, link, topic, token, away, slow)
    finally:
        link.close()
    summary = (f"published {counts['sent']} frames to {topic} (ids {token}-*); {counts['dropped']} dropped while "
               f"the broker was away or behind, {counts['unacked']} not acknowledged within {args.ack_timeout:g} s, "
               f"{counts['refused']} refused by the broker")
    print(summary, file=sys.stderr, flush=True)
    if _stopped_by:
        log(f"stopped by {_stopped_by[0]}")
        return 0
    if counts["sent"] == 0:
        log("error: no frame was sent")
        return 1
    return 0


def publish_all(args: argparse.Namespace, frames: Iterator[tuple[str | None, bytes]], link: Link, topic: str,
                token: str, away: Notice, slow: Notice) -> dict[str, int]:
    """Publish at the pace of --fps; a frame the broker cannot take now is dropped, never sent late in a burst."""
    counts = {"sent": 0, "dropped": 0, "unacked": 0, "refused": 0}
    backlog, refused = Notice(), Notice()
    period = 1 / args.fps if args.fps > 0 else 0.0
    next_at = time.monotonic()
    for n, (name, data) in enumerate(frames, start=1):
        if STOP.is_set():
            break
        fid = frame_id(token, n, name)
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("frame_id", fid), ("captured_at", f"{time.time():.3f}")]
        if args.max_age:
            props.MessageExpiryInterval = args.max_age
        outcome, pending = link.publish(topic, data, props, args.ack_timeout)
        while outcome not in ("sent", "refused", "too large") and not period and not STOP.is_set():
            # --fps 0 (a replay): this frame waits for the broker instead of being dropped; one paho holds is sent
            # again by paho after a reconnect, and waited for: publishing it again would deliver it twice
            if outcome == "unacked":
                slow.say(f"frame {fid} was not acknowledged within {args.ack_timeout:g} s (broker hung or "
                         "overloaded?); waiting for it (--fps 0)")
            if not link.wait_up(away, first=False) or (pending is None and STOP.wait(0.5)):
                break
            if pending is None:
                outcome, pending = link.publish(topic, data, props, args.ack_timeout)
            else:
                outcome = link.wait_acked(pending, args.ack_timeout)
        if outcome in ("refused", "too large"):
            counts["refused"] += 1
            hint = (f"may login {args.username or '(none)'} write {topic}? (its ACL: deploy/mosquitto/acl)"
                    if outcome == "refused" else "not sent (mosquitto's max_packet_size)")
            refused.say(f"the broker refused frame {fid} ({link.refusal}): {hint}; {counts['refused']} refused so far")
        elif outcome == "sent":
            counts["sent"] += 1
            if any([away.clear(), slow.clear(), backlog.clear()]):  # a list: every notice is cleared
                log(f"the broker at {link.where} takes frames again; {counts['dropped']} dropped, "
                    f"{counts['unacked']} not acknowledged so far")
            if not args.quiet:
                print(f"sent {fid} ({len(data)} bytes)", flush=True)
        elif outcome == "unacked":
            counts["unacked"] += 1
            if not STOP.is_set():
                slow.say(f"frame {fid} was not acknowledged within {args.ack_timeout:g} s (broker hung or "
                         f"overloaded?); frames are dropped until it answers ({counts['unacked']} so far)")
        else:
            counts["dropped"] += 1
            notice = backlog if outcome == "backlog" else away
            notice.say(f"the broker at {link.where} {'is not acknowledging' if outcome == 'backlog' else 'is away'}"
                       f"{notice.minutes()} ({link.reason if outcome != 'backlog' else 'earlier frames pending'}); "
                       f"dropping frames: {counts['dropped']} so far")
        if args.limit and counts["sent"] >= args.limit:
            break
        if period:
            # keep the pace from now: after a stall the frames not sent are gone, not caught up with a burst
            next_at = max(next_at + period, time.monotonic())
            STOP.wait(max(0.0, next_at - time.monotonic()))
    return counts


if __name__ == "__main__":
    sys.exit(main())
