"""The worker's MQTT API: every topic it reads or writes, in one place (documented in README "Worker API").

    <prefix>/<camera>/frame                      in   image bytes; user properties frame_id, captured_at[, camera_id]
    cameras.<camera>.topic                       in   the same, on a camera's own topic where the config names one
    <prefix>/<camera>/result                     out  JSON result per frame
    <prefix>/<camera>/heatmap                    out  JPEG/PNG colour map over the frame; user properties frame_id, camera_id
    <prefix>/<camera>/error                      out  JSON error per refused frame
    <prefix>/query                               in   similarity request (MQTT v5 response_topic + correlation_data)
    <prefix>/label                               in   operator label set/unlabel/extensions/export (MQTT v5 request/response)
    <prefix>/workers/<worker_id>/availability    out  retained: online | offline (last will) | stopped
    <prefix>/workers/<worker_id>/model           out  retained JSON: the bundle this worker runs
    <prefix>/workers/<worker_id>/stats           out  JSON counters, every stats interval
    <prefix>/workers/<worker_id>/control         in   JSON command: reload | rollback | status | export_capture (v5 response_topic)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from paho.mqtt.client import topic_matches_sub


@dataclass(frozen=True)
class Topics:
    prefix: str
    worker_id: str
    sources: Mapping[str, str] = field(default_factory=dict)  # a camera's own frame topic -> its id (cameras.<id>.topic)

    @property
    def frames(self) -> str:
        """Subscription filter for every camera's frames on the API's topics."""
        return f"{self.prefix}/+/frame"

    @property
    def frame_filters(self) -> list[str]:
        """Every subscription frames come on: the API's filter, then each camera's own topic."""
        return [self.frames, *self.sources]

    @staticmethod
    def shared(topic_filter: str, group: str | None) -> str:
        """The filter as an MQTT v5 shared subscription when a group is set."""
        return f"$share/{group}/{topic_filter}" if group else topic_filter

    def frame(self, camera: str) -> str:
        return f"{self.prefix}/{camera}/frame"

    def result(self, camera: str) -> str:
        return f"{self.prefix}/{camera}/result"

    def heatmap(self, camera: str) -> str:
        return f"{self.prefix}/{camera}/heatmap"

    def error(self, camera: str) -> str:
        return f"{self.prefix}/{camera}/error"

    @property
    def query(self) -> str:
        return f"{self.prefix}/query"

    @property
    def label(self) -> str:
        return f"{self.prefix}/label"

    def _worker(self, leaf: str) -> str:
        return f"{self.prefix}/workers/{self.worker_id}/{leaf}"

    @property
    def availability(self) -> str:
        return self._worker("availability")

    @property
    def model(self) -> str:
        return self._worker("model")

    @property
    def stats(self) -> str:
        return self._worker("stats")

    @property
    def control(self) -> str:
        return self._worker("control")

    def of_the_api(self, topic: str) -> bool:
        """Whether ``topic`` is one of the API's own: any camera's frame, result, heatmap or error, a request topic,
        any worker's.  A request's answer is never published there: it would pose as a frame, a result, a command
        or a worker's state, on a topic the asking client may not be allowed to write itself."""
        if topic in self.sources:  # a camera's own frame topic: an answer there would come back as a frame
            return True
        head, parts = self.prefix.split("/"), topic.split("/")
        if parts[: len(head)] != head:
            return False
        rest = parts[len(head):]
        return ((len(rest) == 2 and rest[1] in ("frame", "result", "heatmap", "error")) or rest in (["query"], ["label"])
                or rest[:1] == ["workers"])

    def reads(self, topic: str) -> bool:
        """Whether one of the filters this configuration subscribes matches ``topic`` (frames, requests, control, its
        own availability).  A message on another came through a subscription a persistent session kept from an
        earlier configuration (topics.prefix, worker.id or a camera's topic changed)."""
        return any(_matches(f, topic) for f in (*self.frame_filters, self.query, self.label, self.control,
                                                self.availability))

    @staticmethod
    def earlier_filters(topic: str) -> list[str]:
        """The filters an earlier configuration subscribed that can have delivered ``topic``: its frame filter
        (``<prefix>/+/frame``) for a frame's topic, and the topic itself (a request's, a camera's own).  A shared
        subscription (``$share/<group>/...``) of an earlier group cannot be told from a message."""
        parts = topic.split("/")
        frame = "/".join([*parts[:-2], "+", "frame"]) if len(parts) >= 3 and parts[-1] == "frame" else None
        return [f for f in (frame, topic) if f is not None]

    def camera_of(self, topic: str) -> str | None:
        """The camera id in a frame topic, or None when the topic is neither ``<prefix>/<camera>/frame`` nor a
        camera's own (:attr:`sources`)."""
        if (camera := self.sources.get(topic)) is not None:
            return camera
        head, sep, rest = topic.partition(self.prefix + "/")
        if head or not sep:
            return None
        camera, _, leaf = rest.partition("/")
        return camera if camera and leaf == "frame" else None


def _matches(topic_filter: str, topic: str) -> bool:
    """MQTT's matching of a filter against a topic (paho's); a shared subscription's ``$share/<group>/`` is not part
    of its filter."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    return topic_matches_sub(topic_filter, topic)
