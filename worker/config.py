"""The worker's configuration: ``config.yaml``, validated at start, every key documented here.

Unknown keys are errors (a typo must not silently fall back to a default), as is a key given twice; a text
key takes its value as written (camera ``off``, user ``007``), other keys YAML's value.  Any key
can be overridden from the environment as ``EDGE_INSPECT__SECTION__KEY`` (for
secrets: ``EDGE_INSPECT__MQTT__PASSWORD``), and a password can be read from a file.
"""

from __future__ import annotations

import logging
import os
from difflib import get_close_matches
from enum import StrEnum
from pathlib import Path
from types import UnionType
from typing import Literal, Union, cast, get_args, get_origin, overload

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator

from bundle import FRAME_MAX_BYTES, FRAME_MAX_PIXELS, TileGrid, plain_name
from bundle.extension import Views
from bundle.tiling import Grid
from worker.wire import MAX_TOPIC_BYTES, PIXEL_FORMATS, publishable, refused_character, said

log = logging.getLogger(__name__)
ENV_PREFIX = "EDGE_INSPECT__"
YAML_NULL = {"null", "Null", "NULL", "~"}  # what YAML reads as null, written out (an empty value is refused for a path)
OTHER_ENV = {"EDGE_INSPECT_CACHE", "EDGE_INSPECT_TEACHERS"}  # the exporter's own variables, not overrides


class ConfigError(Exception):
    """The config file is missing, not YAML, or names a bad key or value (the message says which)."""


YEAR_S = 366 * 86400  # the longest interval or timeout a key takes: the OS's timers overflow not far beyond
EMBEDDED_MAX_POINTS = 100_000  # the history the store benchmark measured; the worker's memory grows with each point
MAX_SIDE = 8192  # the longest side of an image the worker makes: a typo of 100000 would cost 30 GB per heatmap
MAX_THREADS = 256  # threads a key may ask for: each inference thread is made at start, with its own infer request
WATCHDOG_MIN_S = 1.0  # above the longest a worker's idle thread waits for work (0.5 s) within one step of its loop
MAX_MB = 1_000_000_000  # a petabyte, the largest budget in megabytes a key takes: counted in bytes, a typo must stay finite


class _Section(BaseModel):
    # a NaN threshold would pass every frame, an infinite interval overflows the OS's timers: finite numbers only
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _kind_of_value(cls, v: object, info: ValidationInfo) -> object:
        """An empty path is the config file's folder: an override left empty to turn a cache off put it there, and an
        empty session file was written beside that folder; none is null (where the key takes it).  YAML reads
        ``yes``, ``no``, ``on``, ``off`` as booleans, which pydantic took as 1 and 0: ``queue_size: yes`` was a
        queue of one frame, ``log_normal_every: no`` logged no normal frame, without a word."""
        annotation = cls.model_fields[info.field_name].annotation if info.field_name is not None else None
        if v == "" and (annotation is Path or Path in get_args(annotation)):
            raise ValueError("an empty path would be the config file's folder: give a path (an optional key is left unset "
                             "by null, in config.yaml or an override)")
        if _numeric(annotation) and (isinstance(v, bool) or (isinstance(v, list | tuple) and
                                                              any(isinstance(x, bool) for x in v))):
            raise ValueError("a boolean (YAML reads yes, no, on, off, true and false as one) where a number is expected")
        return v


def _numeric(annotation: object) -> bool:
    """True for a key that takes numbers: int, float, a Literal of them, or an optional or tuple of those."""
    if annotation in (int, float):
        return True
    if get_origin(annotation) is Literal:
        return all(type(a) in (int, float) for a in get_args(annotation))
    return any(_numeric(a) for a in get_args(annotation))


class TLSConfig(_Section):
    ca_file: Path | None = Field(None, description="CA certificate that signed the broker's certificate.")
    cert_file: Path | None = Field(None, description="Client certificate, for brokers that require one.")
    key_file: Path | None = Field(None, description="Client private key, not encrypted (one with a pass phrase is refused: "
                                                     "nothing could ask for it); unset: the key is in cert_file.")
    insecure_skip_verify: bool = Field(False, description="Accept any broker certificate. Only for lab use.")


class MQTTConfig(_Section):
    host: str = Field("127.0.0.1", min_length=1, description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port (8883 is usual for TLS).")
    client_id: str | None = Field(None, description="Default: edge-inspect-<worker.id>. Keep it stable for persistent sessions.")
    username: str | None = Field(None, description="Broker user name, if the broker requires a login.")
    password: SecretStr | None = Field(None, description="Prefer EDGE_INSPECT__MQTT__PASSWORD or password_file.")
    password_file: Path | None = Field(None, description="File whose first line is the password.")
    tls: TLSConfig | None = Field(None, description="Set to use TLS; leave out for plain TCP on a trusted network.")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keep-alive; the broker publishes our last will after 1.5x this.")
    qos: Literal[0, 1] = Field(1, description="QoS for subscriptions and publications.")
    session_expiry_s: int = Field(3600, ge=0, le=0xFFFFFFFF, description="Broker keeps our subscriptions and queued frames this long "
                                                                         "while we are away.")
    reconnect_min_s: int = Field(1, ge=1, le=YEAR_S, description="First reconnect delay after the broker is lost (whole seconds, as "
                                                                 "paho takes it).")
    reconnect_max_s: int = Field(30, ge=1, le=YEAR_S, description="Reconnect delays double up to this (whole seconds).")
    session_file: Path | None = Field(Path("data/mqtt-session.json"), description=(
        "Remembers the topic filters the worker's persistent session holds at the broker, so that after a change of "
        "topics.prefix, topics.share_group or worker.id the filters no longer configured are left at the next "
        "connect (a kept session would still deliver them: half of a group's frames, lost), and after a change of the "
        "client id (worker.id, mqtt.client_id) with spool.path kept, the earlier client id's session is ended. Workers "
        "may share the file (a record per client id, written under a lock, <file>.lock); none: not remembered."))

    @field_validator("client_id", "username")
    @classmethod
    def _sendable(cls, v: str | None) -> str | None:
        return None if v is None else mqtt_text(v)

    @model_validator(mode="after")
    def _login(self) -> MQTTConfig:
        """MQTT sends no password without a user name: one given alone was dropped, and the worker connected
        anonymously, refused as "Not authorized" with no hint why."""
        given = [name for name in ("password", "password_file") if getattr(self, name) is not None]
        if given and self.username is None:
            raise ValueError(f"mqtt.{given[0]} is set but mqtt.username is not: the broker gets no password without a "
                             "user name")
        if len(given) == 2:
            raise ValueError("mqtt.password and mqtt.password_file are both set: keep one")
        return self

    @model_validator(mode="after")
    def _delays_in_order(self) -> MQTTConfig:
        """paho waits reconnect_min_s first and then doubles up to reconnect_max_s: a first delay above the cap was
        taken, then every later one was the cap, which is not what either key says."""
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError(f"mqtt.reconnect_min_s ({self.reconnect_min_s}) is above mqtt.reconnect_max_s "
                             f"({self.reconnect_max_s}), the longest delay: raise the one or lower the other")
        return self

    def secret(self) -> str | None:
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            lines = self.password_file.read_text().splitlines()
            return lines[0] if lines else ""
        return None


MetadataPolicy = Literal["required", "optional"]


def mqtt_text(value: str) -> str:
    """``value`` unless it holds a character a broker refuses in a topic, client id or user name
    (worker.wire.refused_character): the config check passed it, then the broker closed every connection and the log
    blamed a TLS listener."""
    if (character := refused_character(value)) is not None:
        raise ValueError(f"{value!r} holds {said(character)}, a control character or noncharacter, which MQTT brokers "
                         "refuse in topics, client ids and user names")
    return value


def one_topic_level(value: str) -> str:
    """``value`` when it can be one level of an MQTT topic (a camera id, the worker id, a share group): a name that
    could never match a topic the worker reads or writes is refused at start rather than ignored."""
    if not value or any(ch in value for ch in "+#/"):
        raise ValueError(f"{value!r} must be one non-empty topic level, without '/', '+' or '#'")
    return mqtt_text(value)


class TopicsConfig(_Section):
    prefix: str = Field("inspect", description="First level of every topic, as Frigate's 'frigate/'.")
    cameras: list[str] = Field(default_factory=list, description="Allowed camera ids; empty accepts any camera.")
    metadata: MetadataPolicy = Field("required", description="Frames without frame_id/captured_at: refused with missing_metadata "
                                                             "(required), or given a generated frame_id and captured_at = receive time, "
                                                             "also in place of unusable ones (optional: cameras and MQTT 3.1.1 clients "
                                                             "that cannot send user properties, cameras whose clock is not set); "
                                                             "cameras.<id>.metadata overrides it.")
    share_group: str | None = Field(None, description="Join MQTT v5 shared subscription $share/<group>/...: the broker balances frames "
                                                      "(and queries) across the workers of a group. Set mqtt.session_expiry_s to 0 (or a "
                                                      "few seconds) in a group: mosquitto keeps routing a dead member's share to its "
                                                      "session until the session expires.")

    @field_validator("prefix")
    @classmethod
    def _no_wildcards(cls, v: str) -> str:
        if not v or any(ch in v for ch in "+#") or v.startswith(("/", "$")) or v.endswith("/"):
            # '$' topics are the broker's own ($SYS): mosquitto refuses a client's publish there
            raise ValueError("must be non-empty, without '+', '#', a leading '$' or a leading/trailing '/'")
        return mqtt_text(v)

    @field_validator("share_group")
    @classmethod
    def _one_level(cls, v: str | None) -> str | None:
        return None if v is None else one_topic_level(v)

    @field_validator("cameras")
    @classmethod
    def _camera_levels(cls, v: list[str]) -> list[str]:
        return [one_topic_level(c) for c in v]


PrecisionSetting = Literal["f32", "bf16", "f16", "int8", "auto"]


class ModelConfig(_Section):
    bundle: Path = Field(description="Model bundle folder (bundle.json + model.xml/.bin).")
    device: str = Field("CPU", description="OpenVINO device: CPU, GPU, AUTO, ...")
    precision: PrecisionSetting = Field("f32", description="Inference precision: f32 (the same numbers on every CPU), bf16 or f16 (where "
                                                           "the CPU runs them natively: bf16 is faster with AMX, f16 only with f16 matrix "
                                                           "units, and slower than f32 on a Xeon without AMX-FP16), int8 (INT8 bundles), "
                                                           "auto (the device's default). The bundle's thresholds for that precision are "
                                                           "used; a bundle without them is refused.")
    cache_dir: Path | None = Field(Path("data/ov-cache"), description=(
        "OpenVINO model cache (faster restarts): a folder per bundle; those of bundles neither served nor kept for "
        "rollback are deleted; a compiled blob that no longer matches the digest recorded after its compile is "
        "compiled again."))
    threshold: float | None = Field(None, description="Override the bundle's raw image threshold.")
    rollout_path: Path | None = Field(Path("data/rollout"), description=(
        "Where reloads and rollbacks (control topic, console, model.watch_s) are recorded, so a restart serves what was "
        "rolled out, with its rollback, until config.yaml names another bundle for that scope; null = a restart "
        "serves config.yaml's bundles."))
    watch_s: float = Field(0, ge=0, le=YEAR_S, description="Check every N seconds whether a configured bundle changed on disk and "
                                                           "hot-reload it (0 = off, else at least 0.1; reloads also come over the "
                                                           "control topic).")

    @field_validator("watch_s")
    @classmethod
    def _not_a_spin(cls, v: float) -> float:
        """The request thread looks at the bundles as often as asked: a tiny interval spun it on the files' status."""
        if 0 < v < 0.1:
            raise ValueError("0 (off) or at least 0.1 s: the bundles are looked at that often, on the thread that answers "
                             "queries and labels")
        return v


class QueuePolicy(StrEnum):
    """What happens to a new frame when the internal queue is full."""

    DROP_OLDEST = "drop_oldest"  # keep the newest frames: a live line cares about now
    DROP_NEWEST = "drop_newest"  # keep what arrived first
    BLOCK = "block"  # the broker keeps the surge (and drops past its own limit): see LimitsConfig.queue_policy


class LimitsConfig(_Section):
    max_frame_bytes: int = Field(FRAME_MAX_BYTES, gt=0, description="Larger payloads are rejected before decoding.")
    max_pixels: int = Field(FRAME_MAX_PIXELS, gt=0, description="Width x height limit, checked from the header (a raw buffer: its "
                                                                "declaration) before decoding; an encoded frame is also "
                                                                "held to the decoder's 2^30 pixels.")
    queue_size: int = Field(32, ge=1, description="Frames waiting for inference.")
    queue_policy: QueuePolicy = Field(QueuePolicy.DROP_OLDEST, description=(
        "What happens to a new frame when the internal queue is full: drop_oldest, drop_newest (answered dropped), "
        "or block: the broker keeps the surge; the worker asks it for at most min(queue_size, queue_max_bytes / "
        "max_frame_bytes) + inference_threads unanswered frames (MQTT v5 Receive Maximum) and acknowledges each "
        "once the broker has its answer, so a killed worker's unanswered frames come to its next start."))
    inference_threads: int = Field(0, ge=0, le=MAX_THREADS, description="0 = OpenVINO's optimal number of requests for this "
                                                                        "device; at most 256.")
    opencv_threads: int = Field(1, ge=0, le=MAX_THREADS, description="Threads OpenCV may use per call (resizing, heatmaps), at "
                                                                      "most 256; 0 = its own pool (one thread per core). The "
                                                                      "inference threads already work on frames in parallel, "
                                                                      "and a pool on top spends CPU that inference needs.")
    reduced_decode: bool = Field(True, description="Decode a JPEG frame at 1/2, 1/4 or 1/8 of its size (libjpeg scales "
                                                    "while decoding, at a fraction of the cost) when that still leaves twice "
                                                    "the model's input; not for cameras with an roi or tiles. The model's input "
                                                    "then differs slightly from a full decode's (docs/benchmarks.md, \"large "
                                                    "frames decoded smaller\"); evidence and the capture sample keep the "
                                                    "frame as sent. false: always decode in full.")
    max_frame_age_s: float | None = Field(None, gt=0, le=100 * YEAR_S, description=(
        "A frame whose captured_at is more than this many seconds before the worker received it is answered "
        "stale_frame, not scored: frames the broker kept for the worker's persistent session while it was away (an "
        "outage's, delivered in a burst when it is back) would otherwise be scored and answered as if live. A camera "
        "whose clock is behind this box's (or that sends its local time west of UTC without an offset) has its "
        "frames refused so too; not checked for a captured_at the worker stamps itself, nor while this box's clock "
        "is not set. Reckoned when the frame arrives: the time it then waits in the worker's own queue (at most "
        "queue_size frames) is not counted. none = every frame is scored, however late."))
    dedupe_window: int = Field(10_000, ge=0, description="Recent (camera, frame_id) pairs remembered to drop QoS 1 redeliveries "
                                "(the same id and captured_at; an id sent again with another time is a new frame).")
    queue_max_bytes: int = Field(64_000_000, gt=0, description="Frame queue bound in payload bytes (with queue_size; queue_policy applies "
                                                               "to either).")
    recorder_max_records: int = Field(1000, ge=1, description="Logged frames waiting for the recorder; past this (or recorder_max_bytes) "
                                                              "the oldest record is dropped and counted.")
    recorder_max_bytes: int = Field(128_000_000, gt=0, description="Recorder backlog bound in bytes (frame, evidence files and embedding "
                                                                   "of each record).")
    request_queue_size: int = Field(16, ge=1, description="Queries, labels and control commands waiting; past this (or "
                                                          "request_queue_max_bytes) a new one is answered busy.")
    request_queue_max_bytes: int = Field(16_000_000, gt=0, description="Request queue bound in payload bytes.")


HeatmapPolicy = Literal["always", "anomalous", "never"]


class HeatmapConfig(_Section):
    publish: HeatmapPolicy = Field("always", description="Publish a heatmap with every result, only with anomalous ones, or never "
                                                         "(evidence keeps anomalous heatmaps regardless).")
    format: Literal["jpeg", "png"] = Field("jpeg", description="jpeg (small) or png (lossless).")
    quality: int = Field(85, ge=10, le=100, description="JPEG quality.")
    size: int | None = Field(None, ge=16, le=MAX_SIDE, description="Longer side in pixels; default the model's input size.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the colour map over the frame.")


class TilingConfig(_Section):
    """Cut a high-resolution frame into overlapping tiles, each inferred at the model's input size."""

    grid: TileGrid = Field(description="Tiles across and down [cols, rows], each 1..16; pick them so a tile has about the model's "
                                       "aspect ratio.")
    overlap: float = Field(0.1, ge=0, lt=0.5, description="Fraction of a tile shared with its neighbour, so a defect on a seam is whole in "
                                                          "one tile.")


class PixelsConfig(_Section):
    """A camera whose frames are raw pixel buffers, declared once here instead of in every frame."""

    format: str = Field(description="GenICam pixel format: " + ", ".join(PIXEL_FORMATS) + " (README, Worker API).")
    width: int = Field(gt=0, description="Pixels per row.")
    height: int = Field(gt=0, description="Rows.")

    @field_validator("format")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in PIXEL_FORMATS:
            raise ValueError(f"not one of {', '.join(PIXEL_FORMATS)}")
        return v


class CameraConfig(_Section):
    """Settings for one camera; anything left unset follows the global section."""

    bundle: Path | None = Field(None, description="Another model bundle for this camera (default model.bundle).")
    threshold: float | None = Field(None, description="Raw image threshold for this camera.")
    precision: PrecisionSetting | None = Field(None, description="Inference precision for this camera (default model.precision).")
    heatmap: HeatmapPolicy | None = Field(None, description="Heatmap policy for this camera: always, anomalous or never.")
    heatmap_format: Literal["jpeg", "png"] | None = Field(None, description="Heatmap encoding for this camera.")
    heatmap_size: int | None = Field(None, ge=16, le=MAX_SIDE, description="Heatmap longer side for this camera.")
    roi: tuple[int, int, int, int] | None = Field(None, description="Region of interest x, y, width, height in frame pixels; only it is "
                                                                    "inspected; a frame it does not fit in is refused "
                                                                    "(roi_outside_frame).")
    metadata: MetadataPolicy | None = Field(None, description="required or optional for this camera (default topics.metadata).")
    payload: Literal["raw", "json_envelope"] = Field("raw", description="raw: the payload is the image; json_envelope: a JSON object with "
                                                                        "the base64 image and its fields (README, Worker API).")
    pixels: PixelsConfig | None = Field(None, description="The camera's frames are raw pixel buffers of this format and size "
                                                           "(a frame's own pixel_format, width and height user properties win); "
                                                           "unset: image files, or buffers each frame declares.")
    topic: str | None = Field(None, description="Also read this camera's frames from this MQTT topic: a camera or bridge that "
                                                "publishes on a topic of its own (e.g. plant/line1/cam3/jpeg). One exact topic: "
                                                "no wildcard, no $-topic, none under topics.prefix (those are the API's), no other "
                                                "camera's. Its results, heatmaps and errors go to <prefix>/<id>/... as any camera's.")
    tiling: TilingConfig | None = Field(None, description="Inspect the frame (after roi) as a grid of tiles at the model's input size; "
                                                          "score = the highest tile's. Unset: the bundle's own tiling, if it was "
                                                          "trained on tiles (exporter train --tiling), else the whole frame.")

    @field_validator("topic")
    @classmethod
    def _one_topic(cls, v: str | None) -> str | None:
        if v is not None and not publishable(v):
            mqtt_text(v)  # a control character or noncharacter: named
            raise ValueError("must be one topic name: not empty, no '+' or '#', not a broker '$'-topic, at most "
                             f"{MAX_TOPIC_BYTES} bytes of UTF-8")
        return v

    @field_validator("roi")
    @classmethod
    def _positive(cls, v: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        if v is not None and (v[0] < 0 or v[1] < 0 or v[2] <= 0 or v[3] <= 0):
            raise ValueError("x, y must be >= 0 and width, height > 0")
        return v



def camera_tiling(camera: CameraConfig | None, bundle: Grid | None) -> Grid | None:
    """How a camera's frames are cut: its own ``tiling``, else its bundle's (one trained on tiles), else whole."""
    return camera.tiling if camera is not None and camera.tiling is not None else bundle

class MetricsConfig(_Section):
    enabled: bool = Field(True, description="Serve Prometheus metrics over HTTP at /metrics.")
    host: str = Field("127.0.0.1", min_length=1, description="Bind address; 0.0.0.0 to let a Prometheus on another host scrape it.")
    port: int = Field(9108, ge=0, le=65535, description="HTTP port for /metrics and /healthz; give each worker on one box its own "
                                                 "(one in use stops the start, exit code 2), and not console.port (refused "
                                                 "where the hosts overlap).")
    max_cameras: int = Field(64, ge=1, description="Distinct camera labels in /metrics and the stats; frames of further cameras, and "
                                                   "the refused frames of cameras topics.cameras does not list, are counted under "
                                                   "camera=\"/other\" (bounds the series when topics.cameras is empty).")


class StoreConfig(_Section):
    path: Path | None = Field(Path("data/qdrant"), description="Embedded store (qdrant-edge) folder on disk, the default; one sub-folder "
                                                               "per collection.")
    url: str | None = Field(None, min_length=1, description="Qdrant server URL; when set, used instead of path.")
    api_key: SecretStr | None = Field(None, description="Qdrant server API key (prefer EDGE_INSPECT__STORE__API_KEY).")
    collection: str = Field("frames", description="Qdrant collection; one per embedding space (model family/backbone).")
    hnsw: bool = Field(False, description="Embedded: approximate HNSW index (rebuilt on the recorder thread at each retention pass) "
                                          "instead of exact search; for histories well past 100k frames (raise max_points with it).")
    log_normal_every: int = Field(1, ge=0, description="Log every Nth normal frame per camera (0 = none); anomalous frames are always "
                                                       "logged.")
    batch_size: int = Field(64, ge=1, description="Embeddings written per batch, off the inference path.")
    flush_s: float = Field(0.5, gt=0, le=YEAR_S, description="Longest an embedding waits before it is written.")
    max_points: int | None = Field(None, ge=1, description="Retention: past this many frames the oldest (by when the worker received them, "
                                                           "not by the camera's clock) unlabelled normal frames are deleted first, then "
                                                           "unlabelled anomalous ones, labelled ones last. Left unset: 100000 for the "
                                                           "embedded store (its memory and its exact search's time grow with every "
                                                           "frame: docs/store.md), no limit for a server; "
                                                           "null = no limit.")
    max_age_h: float | None = Field(None, gt=0, le=100 * YEAR_S / 3600, description="Retention: frames received more than this many "
                                                                                    "hours ago are deleted (labelled ones too; "
                                                                                    "a camera's wrong clock does not count, nor "
                                                                                    "this box's before NTP sets it or after it "
                                                                                    "steps back: docs/reliability.md); "
                                                                                    "none = no limit.")
    retention_every_s: float = Field(60, gt=0, le=YEAR_S, description="How often retention runs while the worker runs (on the recorder "
                                                                      "thread, never the inference path).")
    min_free_mb: int = Field(64, ge=0, description="Embedded: no write starts while its disk has less free (a vacuum needs the "
                                                   "collection's size on top); embeddings are spooled meanwhile. The engine maps its "
                                                   "files into memory, and a write to a full disk would kill the worker; it writes a whole "
                                                   "32 MB log segment when it opens the store, so values below 40 count as 40. "
                                                   "A capture export is refused unless it leaves this much free too.")

    @field_validator("collection")
    @classmethod
    def _one_folder(cls, v: str) -> str:
        """The embedded store keeps a collection in ``path/<collection>``: a name that is a path would put it elsewhere."""
        return plain_name(v, "a collection")

    # max_points is the embedded store's default: config.yaml leaves it unset (set by _bounded_when_embedded)
    _default_bound: bool = PrivateAttr(False)

    @model_validator(mode="after")
    def _bounded_when_embedded(self) -> StoreConfig:
        if "max_points" not in self.model_fields_set and self.url is None:
            self.max_points = EMBEDDED_MAX_POINTS
            self._default_bound = True
        return self


class SpoolConfig(_Section):
    path: Path = Field(Path("data/spool"), description="Embeddings the store could not take wait here, in order, across restarts.")
    max_mb: int = Field(200, ge=1, description="Past this, the oldest spooled batches are dropped (and counted).")
    retry_s: float = Field(5, gt=0, le=YEAR_S, description="How often an unavailable store is tried again.")


class EvidenceBudget(_Section):
    max_frames: int = Field(20_000, ge=1, description="Oldest frames of this class are deleted past this many.")
    max_mb: float | None = Field(None, gt=0, le=MAX_MB, description="... or past this many megabytes of files; none = no limit.")
    max_age_h: float | None = Field(None, gt=0, le=100 * YEAR_S / 3600, description="... or once written longer ago than this many "
                                                                                    "hours; none = no limit.")


class AnomalousBudget(EvidenceBudget):
    max_mb: float | None = Field(4000, gt=0, le=MAX_MB, description="... or past this many megabytes of files (each keeps its frame and "
                                                         "heatmap too); none = no limit.")


class EvidenceConfig(_Section):
    path: Path = Field(Path("data/evidence"), description="Folder for thumbnails, anomalous frames and heatmaps.")
    max_frames: int = Field(5000, ge=1, description="Normal frames: the oldest normal frame's evidence is deleted past this many "
                                                    "(anomalous and labelled frames have budgets of their own and are never evicted by "
                                                    "normal traffic).")
    max_mb: float | None = Field(None, gt=0, le=MAX_MB, description="Normal frames: byte budget in megabytes; none = no limit.")
    max_age_h: float | None = Field(None, gt=0, le=100 * YEAR_S / 3600, description="Normal frames: evidence older than this many "
                                                                                    "hours is deleted (checked with store retention); "
                                                                                    "none = no limit.")
    anomalous: AnomalousBudget = Field(AnomalousBudget(), description="Budget of anomalous frames (thumbnail, original frame, "
                                                                      "heatmap).")
    labelled: EvidenceBudget = Field(EvidenceBudget(max_frames=20_000), description="Budget of frames an operator labelled (kept apart, so "
                                                                                    "labels outlive both other classes).")
    thumbnail_size: int = Field(128, ge=16, le=MAX_SIDE, description="Longer side of the thumbnail kept for every logged frame.")


class LearningConfig(_Section):
    """A false alarm an operator labels is absorbed into the bundle's bank extension (PatchCore bundles that have one)."""

    enabled: bool = Field(True, description="Absorb false-alarm labels; off: labels are only recorded.")
    path: Path = Field(Path("data/extensions"), description="One folder per bundle (by its weights' sha256) with the rows each label "
                                                           "added; survives restarts.")
    max_rows: int = Field(1024, ge=1, le=65536, description="Rows an extension may hold; a label that would overflow it is refused "
                                                            "(nothing older is evicted). Every frame pays for this many rows, used or "
                                                            "not.")
    margin: float = Field(0.975, gt=0, le=2, description="A label absorbs the frame's patches whose distance is at least this share "
                                                         "of the raw image threshold, so the next frames of the same appearance, "
                                                         "which come a little farther, pass too; lower learns faster and blinds more "
                                                         "(chosen on the validation split with confirmed defects guarding: "
                                                         "docs/benchmarks.md).")
    views: Views = Field(Views.D4, description="Views of a labelled frame whose patches are absorbed: frame (it alone), flips (and its "
                                               "three flips), d4 (and its rotations too). More views learn an appearance that "
                                               "recurs elsewhere on the part from fewer labels, with more rows per label, and "
                                               "blind more to real defects that look like it (chosen on the validation split: "
                                               "docs/benchmarks.md); frame is the careful setting, and a texture that is not "
                                               "the same flipped or turned wants frame or flips.")
    guard_defects: int = Field(200, ge=0, description="A label absorbs no patch that could take a confirmed defect below its threshold "
                                                      "(one near the patches that keep it flagged); this many of the newest frames "
                                                      "labelled confirmed_defect are checked, each scored once per model (when it is "
                                                      "labelled; for a new bundle while the worker is idle, or at the next "
                                                      "false-alarm label, if its image is still kept) and kept on disk beside the "
                                                      "extension, so restarts do not score it again (0: no guard; chosen on the "
                                                      "validation split: docs/benchmarks.md).")
    guard_patches: int = Field(16, ge=0, description="How many of a confirmed defect's decisive patches (those that keep it flagged) its "
                                                      "guard protects, the farthest first; one is enough to keep that frame flagged, "
                                                      "more protect the real defects that look like it, and leave out more of what a "
                                                      "label would absorb (0: all, which lost no real defect on grid's test split "
                                                      "where 16 lost one in one order; chosen on the validation split: "
                                                      "docs/benchmarks.md).")


class CaptureConfig(_Section):
    """A bounded sample of each camera's normal frames (and its false alarms) at full resolution, for the next training set."""

    enabled: bool = Field(True, description="Keep the sample; off: nothing is captured.")
    path: Path = Field(Path("data/capture"), description="One folder per camera; survives restarts.")
    max_frames: int = Field(500, ge=1, description="Normal frames kept per camera, a uniform sample of all it sent (reservoir "
                                                   "sampling).")
    max_mb: float | None = Field(1000, gt=0, le=MAX_MB, description="... and at most this many megabytes of them per camera "
                                                                    "(whichever bound comes first: full-resolution PNG or BMP "
                                                                    "frames reach it long before max_frames); none = no limit.")
    max_cameras: int = Field(64, ge=1, description="Cameras with a sample: normal frames of further cameras are not sampled, "
                                                   "only counted (stats topic capture_skipped_frames), so the sample takes at most "
                                                   "max_cameras x max_mb of disk where topics.cameras accepts any camera; false "
                                                   "alarms are always kept.")
    min_distance: float = Field(0.01, ge=0, le=2, description="A frame this close (cosine, on a 16x16 grey signature) to a kept one is "
                                                              "skipped as a near-duplicate (0 = keep duplicates).")
    export_path: Path = Field(Path("data/training"), description="Where an export requested over MQTT or from the console is "
                                                                 "written (a new folder per export, named by its UTC "
                                                                 "second: 20261205T101500Z, then -2, -3... for more in "
                                                                 "that second).")


class QueryConfig(_Section):
    max_top_k: int = Field(50, ge=1, description="Largest top_k a query may ask for.")
    timeout_s: float = Field(10, gt=0, le=YEAR_S, description="CLI: how long to wait for the worker's answer.")


class ConsoleConfig(_Section):
    host: str = Field("127.0.0.1", min_length=1,
                      description="Operator console (python -m worker console) bind address; loopback by default.")
    port: int = Field(8080, ge=1, le=65535, description="Operator console HTTP port.")
    username: str | None = Field(None, description="Console HTTP basic-auth user; required (with password) to bind beyond loopback.")
    password: SecretStr | None = Field(None, description="Console basic-auth password (prefer EDGE_INSPECT__CONSOLE__PASSWORD).")
    history: int = Field(500, ge=1, description="Anomalous frames (result, heatmap, thumbnail) the console keeps in memory for its defect "
                                                "feed.")
    recent_frames: int = Field(64, ge=8, description="Latest frames (camera bytes, heatmap, result) of all cameras kept in memory for the "
                                                     "live tiles.")
    recent_max_bytes: int = Field(128_000_000, gt=0, description="Bytes of camera frames the console keeps of those recent_frames: "
                                                                 "past it the oldest frames are forgotten (their results and "
                                                                 "heatmaps stay, shown without the picture). A raw pixel buffer "
                                                                 "counts as received until a page asks for it, then as its JPEG.")
    series_minutes: float = Field(60, gt=0, le=YEAR_S / 60, description="Score-over-time window per camera.")
    max_cameras: int = Field(64, ge=1, description="Cameras the console keeps (tile, score series, error count): the most recently "
                                                   "active; past this many the longest quiet one is dropped, so invented camera ids "
                                                   "cannot grow its memory.")
    max_workers: int = Field(32, ge=1, description="Workers the console keeps (availability, model, stats): the most recently active; "
                                                   "past this many the longest quiet one is dropped, so invented worker ids "
                                                   "cannot grow its memory.")
    pending_max_bytes: int = Field(64_000_000, gt=0, description="Bytes of camera frames (and of heatmaps, counted apart) the "
                                                                 "console holds while they wait for their result, with at most "
                                                                 "recent_frames of each; past either bound pending_policy applies. "
                                                                 "A frame over limits.max_frame_bytes or limits.max_pixels is never kept.")
    pending_policy: Literal["drop_oldest", "drop_newest"] = Field(
        "drop_oldest", description="Which waiting image goes when pending_max_bytes or recent_frames is reached: drop_oldest "
                                   "forgets the one waiting the longest (its result likely never comes), drop_newest refuses "
                                   "the new one.")
    max_connections: int = Field(200, ge=4, description="HTTP connections and requests the console serves at once (uvicorn's "
                                                        "limit_concurrency); a request past it is answered 503 and its "
                                                        "connection closed. Keep it well under the open-files limit (the "
                                                        "console raises its soft limit to the hard one at start).")
    max_event_streams: int = Field(32, ge=1, description="Open live-update streams (one per open page) in all; past it a new "
                                                         "one is answered 503 too_many_streams.")
    max_event_streams_per_client: int = Field(8, ge=1, description="Open live-update streams per client address; past it "
                                                                   "503 too_many_streams (behind a reverse proxy every page "
                                                                   "shares the proxy's address).")
    keep_alive_s: int = Field(5, ge=1, le=300, description="An idle keep-alive HTTP connection is closed after this "
                                                             "many seconds.")
    header_timeout_s: float = Field(10, gt=0, le=300, description="A connection that has not sent a request's complete headers "
                                                                  "this many seconds after it opened or after its last "
                                                                  "answer is closed: a client that opens connections and "
                                                                  "never finishes them (slowloris) cannot hold them.")
    control_timeout_s: float = Field(120, gt=0, le=YEAR_S, description="How long the console waits for the worker to answer a reload, "
                                                                       "rollback or capture export (a reload compiles the bundle) before "
                                                                       "HTTP 504.")

    @model_validator(mode="after")
    def _auth_beyond_loopback(self) -> ConsoleConfig:
        if (self.username is None) != (self.password is None):
            raise ValueError("set both username and password, or neither")
        if self.username is None and self.host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"binding to {self.host} needs username and password (basic auth)")
        if self.password is not None and not self.password.get_secret_value():  # e.g. an empty line in an env file
            raise ValueError("console.password is empty: a login without a password guards nothing")
        return self


class WorkerConfig(_Section):
    id: str = Field("worker-1", description="Names this worker in topics and its availability status.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")
    # the stats loop publishes as often as asked: a tiny interval floods the broker
    stats_interval_s: float = Field(10, ge=0.1, le=YEAR_S, description="How often counters are published on the stats topic "
                                                                       "(at least 0.1 s).")
    watchdog_s: float = Field(120, ge=0, le=YEAR_S, description="A thread busy this long without progress is stuck: /healthz fails and "
                                                                "the worker answers its queued frames shutdown and exits with code 3 for "
                                                                "its service manager to restart it; the process also ends (exit 1, every "
                                                                "thread's stack) if its main loop stops running for 1.8-2 times this. "
                                                                "Time the whole process was stopped or paused is not counted (0 = off; "
                                                                "else at least 1).")
    stop_wait_s: float = Field(30, ge=0, le=60, description="At a stop with results and answers the broker has not taken (it "
                                                            "is away), wait up to this long for it to come back and take "
                                                            "them; those left then are lost with the process, logged and "
                                                            "counted (unsent_at_stop in the stopped line). Within the stop's "
                                                            "110 s in all.")

    @field_validator("id")
    @classmethod
    def _one_level(cls, v: str) -> str:
        return one_topic_level(v)

    @field_validator("watchdog_s")
    @classmethod
    def _longer_than_idle(cls, v: float) -> float:
        """An idle thread's wait for work is one step of its loop: a shorter watchdog took an idle worker for stuck and
        it exited for a restart at once, at every start."""
        if 0 < v < WATCHDOG_MIN_S:
            raise ValueError(f"0 (off) or at least {WATCHDOG_MIN_S:g} s: the worker's idle threads wait up to half a "
                             "second for work, and a shorter watchdog takes them for stuck")
        return v


class Config(_Section):
    worker: WorkerConfig = WorkerConfig()
    mqtt: MQTTConfig = MQTTConfig()
    topics: TopicsConfig = TopicsConfig()
    model: ModelConfig
    limits: LimitsConfig = LimitsConfig()
    heatmap: HeatmapConfig = HeatmapConfig()
    store: StoreConfig = StoreConfig()
    spool: SpoolConfig = SpoolConfig()
    cameras: dict[str, CameraConfig] = Field(default_factory=dict, description="Per-camera overrides, by camera id.")
    metrics: MetricsConfig = MetricsConfig()
    evidence: EvidenceConfig = EvidenceConfig()
    query: QueryConfig = QueryConfig()
    learning: LearningConfig = LearningConfig()
    capture: CaptureConfig = CaptureConfig()
    console: ConsoleConfig = ConsoleConfig()

    @model_validator(mode="after")
    def _store_target(self) -> Config:
        if self.store.url is None and self.store.path is None:
            raise ValueError("store: set path (embedded) or url (server)")
        unlisted = sorted(set(self.cameras) - set(self.topics.cameras))
        if self.topics.cameras and unlisted:
            raise ValueError(f"cameras: {', '.join(unlisted)} not in topics.cameras")
        if "default" in self.cameras:  # the models' name for model.bundle's scope (worker/models.py DEFAULT)
            raise ValueError("cameras.default: 'default' names the model of every camera without one of its own "
                             "(model.bundle, model.precision), and an override under it replaced that model for every "
                             "camera: set model.* instead, or give the camera another id")
        for camera in self.cameras:
            try:
                one_topic_level(camera)
            except ValueError as exc:
                raise ValueError(f"cameras: camera id {exc}") from None
        taken: dict[str, str] = {}
        for camera, override in self.cameras.items():
            if (topic := override.topic) is None:
                continue
            if topic == self.topics.prefix or topic.startswith(self.topics.prefix + "/"):
                raise ValueError(f"cameras.{camera}.topic: {topic!r} is under topics.prefix {self.topics.prefix!r}, whose "
                                 f"topics are the API's: frames there go to {self.topics.prefix}/{camera}/frame")
            if topic in taken:
                raise ValueError(f"cameras.{camera}.topic: {topic!r} is camera {taken[topic]}'s too: a frame on it "
                                 "could not be told whose")
            taken[topic] = camera
        return self

    @model_validator(mode="after")
    def _ports_apart(self) -> Config:
        """The worker's metrics and the console listen on one box: on one port, whichever started second stopped with
        exit 2, where the config check had passed."""
        if self.metrics.enabled and self.metrics.port == self.console.port and \
                _hosts_overlap(self.metrics.host, self.console.host):
            raise ValueError(f"metrics.port and console.port are both {self.console.port} on hosts "
                             f"{self.metrics.host} and {self.console.host}: the worker or the console could not "
                             "listen; give one another port")
        return self

    @property
    def camera_topics(self) -> dict[str, str]:
        """Each camera's own frame topic (cameras.<id>.topic) -> its id."""
        return {c.topic: camera for camera, c in self.cameras.items() if c.topic is not None}


def _hosts_overlap(a: str, b: str) -> bool:
    """Whether listening on ``a`` and on ``b`` at one port collide: the same address, or either the wildcard."""
    def plain(host: str) -> str:
        return "127.0.0.1" if host.lower() == "localhost" else host.lower()
    return plain(a) == plain(b) or {"0.0.0.0", "::"} & {a, b} != set()


def _field_at(path: list[str]) -> object | None:
    """The annotation of the config key at ``path`` (None when the path is not a known key), walked as
    :func:`_typed` walks the file: through optional sections (``mqtt.tls``) and a camera's id (``cameras.<id>``)."""
    annotation: object = Config
    for part in path:
        model, args = _required(annotation)
        fields = getattr(model, "model_fields", None)
        if fields is not None and part in fields:
            annotation = fields[part].annotation
        elif fields is None and get_origin(model) is dict:
            annotation = args[1]
        else:
            return None
    return annotation


def _is_text(annotation: object) -> bool:
    """True for keys whose value is text (str, SecretStr, Path, or an optional of those)."""
    if get_origin(annotation) in (Union, UnionType):
        args = get_args(annotation)
        return all(a is type(None) or _is_text(a) for a in args) and any(a is not type(None) for a in args)
    return annotation in (str, SecretStr, Path)


def _apply_env(raw: dict, environ: dict[str, str]) -> tuple[dict, dict[tuple[str, ...], str]]:
    """Overrides from EDGE_INSPECT__SECTION__KEY, and which variable set each key (errors in it name the variable,
    not config.yaml).  Text keys (passwords, paths, ids) take the value verbatim, but YAML's null (``null``, ``~``)
    unsets an optional one as in config.yaml (a secret is always taken as written); other keys (numbers, booleans,
    lists) are read as YAML, so ``[a, b]`` and ``null`` work there.  EDGE_INSPECT_ with one underscore is not an
    override: said, since it would be ignored without a word."""
    sources: dict[tuple[str, ...], str] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            if key.startswith(ENV_PREFIX[:-1]) and key not in OTHER_ENV:
                log.warning("%s is ignored: an override is %s<SECTION>__<KEY>, two underscores after the prefix and "
                            "between the parts%s", key, ENV_PREFIX, _meant(key[len(ENV_PREFIX) - 1:]))
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX):].split("__")]
        sources[tuple(path)] = key
        node = raw
        for depth, part in enumerate(path[:-1], 1):
            if part not in node:  # a section only the variable names (a misspelt one too): its errors are the variable's
                sources.setdefault(tuple(path[:depth]), key)
            if node.get(part) is None:  # a section whose keys are all commented out, or an optional one left null
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {'.'.join(path[:-1])} is not a section")
        field = _field_at(path)
        if value in YAML_NULL and type(None) in get_args(field) and SecretStr not in get_args(field):
            node[path[-1]] = None  # unset, as null in config.yaml: a path key took it as a folder named null
            continue
        if not value or _is_text(field):
            node[path[-1]] = value
            continue
        try:  # read as the file is: a list of camera ids keeps ``off`` and ``007`` as written
            node[path[-1]] = _typed(yaml.load(value, Loader=_Loader), field)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: not a valid value ({exc.__class__.__name__})") from None
    return raw, sources


def _meant(rest: str) -> str:
    """``(EDGE_INSPECT__SECTION__KEY?)`` where ``rest`` (after EDGE_INSPECT_) reads as a section and one of its
    keys joined by single underscores, else nothing."""
    for section, field in Config.model_fields.items():
        keys = getattr(field.annotation, "model_fields", {})
        if rest.lower().startswith(section + "_") and (key := rest.lower()[len(section) + 1:]) in keys:
            return f" ({ENV_PREFIX}{section.upper()}__{key.upper()}?)"
    return ""


class _Plain(str):
    """A plain (unquoted) YAML scalar's text, with the value YAML 1.1 reads in it: which one the config takes is
    decided by its key's type, as for the environment overrides."""

    value: object


class _Loader(yaml.SafeLoader):
    """YAML read as the config means it.  YAML 1.1 reads ``off`` as false and ``007`` as 7, so camera ``off`` or
    user ``007`` would be refused as not text, or a zero lost; a text key takes them as written.  A key given twice
    is an error (PyYAML keeps the last one silently: a camera's settings written twice would lose the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys merged from an anchor may be overridden: that is what a merge is for
            key = str(self.construct_object(key_node))
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    f"in the mapping starting on line {node.start_mark.line + 1}", node.start_mark,
                    f"{key!r} is given twice (first on line {seen[key]}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        mapping = super().construct_mapping(node, deep=True)
        return {str(k) if isinstance(k, _Plain) else k: v for k, v in mapping.items()}


def _plain(tag: str) -> None:
    construct = _Loader.yaml_constructors[tag]

    def keep_text(loader: _Loader, node: yaml.ScalarNode) -> object:
        value = construct(loader, node)
        if node.style is not None:
            return value
        plain = _Plain(node.value)
        plain.value = value
        return plain

    _Loader.add_constructor(tag, keep_text)


for _tag in ("bool", "int", "float", "timestamp"):
    _plain(f"tag:yaml.org,2002:{_tag}")


def _required(annotation: object) -> tuple[object, tuple[object, ...]]:
    """``X`` of an optional ``X | None``, else the annotation as it is; with its type arguments (None left out)."""
    args = tuple(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
        return args[0], get_args(args[0])
    return annotation, args


def _keys_beside(loc: tuple[str, ...]) -> list[str]:
    """The keys of the section holding ``loc``'s last key (``cameras.<id>`` is a CameraConfig's), walked as
    :func:`_typed` walks the file: what a misspelt key may have meant; none where the section is no model."""
    annotation: object = Config
    for part in loc[:-1]:
        annotation, args = _required(annotation)
        fields = getattr(annotation, "model_fields", None)
        if fields is not None and part in fields:
            annotation = fields[part].annotation
        elif fields is None and get_origin(annotation) is dict:
            annotation = args[1]
        else:
            return []
    return list(getattr(_required(annotation)[0], "model_fields", {}))


def _typed(raw: object, annotation: object) -> object:
    """``raw`` with each plain scalar as its key's type asks: the text for a text key, else YAML's value."""
    if isinstance(raw, _Plain):
        return str(raw) if _is_text(annotation) else raw.value
    optional = annotation is not _required(annotation)[0]
    annotation, args = _required(annotation)
    if raw is None and not optional and (hasattr(annotation, "model_fields") or get_origin(annotation) is dict):
        return {}  # a section (or camera) whose keys are all commented out: its defaults, as if it were left out
    if isinstance(raw, dict):
        fields = getattr(annotation, "model_fields", None)
        if fields is not None:
            return {k: _typed(v, fields[k].annotation if k in fields else None) for k, v in raw.items()}
        value = args[1] if get_origin(annotation) is dict else None
        return {k: _typed(v, value) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_typed(v, args[0] if args else None) for v in raw]
    return raw


def _resolve_paths(config: Config, base: Path) -> Config:
    """Relative paths in the file are relative to the file, not to wherever the worker was started (``~`` is the home
    folder of the worker's user); a symbolic link stays a link (as an absolute path does), so a bundle path
    ``bundles/current`` that is switched to the next bundle is read anew by a reload or ``model.watch_s``, not the
    bundle it pointed to at start."""
    @overload
    def fix(p: Path) -> Path: ...
    @overload
    def fix(p: Path | None) -> Path | None: ...
    def fix(p: Path | None) -> Path | None:
        # ``~/...`` is the home folder, as in a shell: a folder named ``~`` was made beside the config file
        if p is None:
            return None
        try:
            p = p.expanduser()
        except RuntimeError:  # no HOME and a user the system does not know (a container run as a bare uid)
            raise ConfigError(f"{p}: '~' names the home folder, and the worker's user has none (HOME unset, no "
                              "passwd entry): give the full path") from None
        return p if p.is_absolute() else base / p

    config.model.bundle = fix(config.model.bundle)
    for camera in config.cameras.values():
        camera.bundle = fix(camera.bundle)
    config.model.cache_dir = fix(config.model.cache_dir)
    config.model.rollout_path = fix(config.model.rollout_path)
    config.store.path = fix(config.store.path)
    config.evidence.path = fix(config.evidence.path)
    config.spool.path = fix(config.spool.path)
    config.learning.path = fix(config.learning.path)
    config.capture.path = fix(config.capture.path)
    config.capture.export_path = fix(config.capture.export_path)
    config.mqtt.session_file = fix(config.mqtt.session_file)
    if config.mqtt.password_file:
        config.mqtt.password_file = fix(config.mqtt.password_file)
    if config.mqtt.tls:
        for name in ("ca_file", "cert_file", "key_file"):
            setattr(config.mqtt.tls, name, fix(getattr(config.mqtt.tls, name)))
    return config


# A key near none of its section's: a config written for a newer version (the box rolled back) is the likely cause,
# which the operator cannot tell from a damaged file without being told; the refusal stays, so a typo cannot pass.
_NOT_OURS = ("not a setting of this version, a newer version's config met by a worker rolled back or a typo: "
             "docs/configuration.md lists this version's settings")


def load_config(path: Path | str, environ: dict[str, str] | None = None) -> Config:
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: not found") from exc
    except PermissionError as exc:  # a file mode 0600 owned by root: the service's user may not read it
        raise ConfigError(f"{path}: this user may not read it ({exc.strerror}): make it readable by the worker's and "
                          "the console's users (secrets belong in their environment files)") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read as UTF-8 text ({exc})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    raw, sources = _apply_env(cast(dict, _typed(raw, Config)), dict(os.environ if environ is None else environ))
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        said, in_file = [], []
        for e in exc.errors():
            loc = tuple(str(p) for p in e["loc"])
            problem = f"{'.'.join(loc) or '(top)'}: {e['msg']}"
            if e["type"] == "extra_forbidden":
                near = get_close_matches(loc[-1], _keys_beside(loc), n=1)
                problem += f" (did you mean {near[0]}?)" if near else f" ({_NOT_OURS})"
            variable = next((v for key, v in sources.items() if loc[:len(key)] == key), None)
            if variable is None:
                in_file.append(problem)
            else:
                said.append(f"{variable} (environment): {problem}")
        if in_file:
            said.append(f"{path}: {'; '.join(in_file)}")
        raise ConfigError("; ".join(said)) from exc
    return _resolve_paths(config, path.parent.resolve())
