"""Helpers shared by the performance benchmarks: a (sub)set of a category, a bundle + its torch graph, summaries."""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger("benchmarks")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mvtec"
# The older speed benchmarks train 256 px bundles (the fast setting's input size) unless told otherwise
# (benchmarks.throughput --input-size, whose default this is); their figures in docs/benchmarks.md are for it.
FAST_INPUT = 256
WARM_FRAMES = 16  # a worker's unmeasured first burst in the speed benchmarks, before their clocks start
# A burst rig publishes every frame before the workers can take them, so they wait in mosquitto, whose default
# queue (1000 QoS 1 messages per client) drops the rest even at QoS 1: the run would then wait for answers that
# never come.  The rigs' brokers hold every frame they are sent.
BURST_BROKER = "max_queued_messages 0\n"


TORCH = "torch f32"  # what a figure computed by torch (fits, features, samplers) ran at


def cpu_name() -> str:
    """The CPU a benchmark ran on, as OpenVINO names it (lscpu's model name): figures move from CPU to CPU."""
    import openvino as ov

    from bundle.runtime import device_name

    return device_name(ov.Core(), "CPU")


def openvino_ran(precisions: Iterable[str], asked: str | None = None) -> str:
    """OpenVINO's precision(s) as read back from the compiled models (``ran_precision``, ``CompiledBundle.precision``),
    never the one asked for, which a CPU may run as another (an f16 hint runs bf16 without FP16 units)."""
    ran = ", ".join(sorted(set(precisions))) or "nothing compiled"
    return f"OpenVINO {ran} (read back" + (f"; asked {asked})" if asked else ")")


def measured_on(*precisions: str) -> dict[str, str]:
    """The CPU and the precisions (:func:`openvino_ran`, :data:`TORCH`) a benchmark's figures were measured at,
    for its JSON; every figure names both, since either changes the figure."""
    return {"cpu": cpu_name(), "precision": "; ".join(precisions)}


def header(*precisions: str) -> str:
    """The line that heads a benchmark's printed figures: ``CPU: <name>; <precisions>`` (:func:`measured_on`)."""
    where = measured_on(*precisions)
    return f"CPU: {where['cpu']}; {where['precision']}"


def subset(data: Path, category: str, train_images: int, folder: Path) -> Path:
    """An MVTec-layout copy of ``category`` (symlinks) keeping the first ``train_images`` normals (0 = all)."""
    src = data.resolve() / category  # the links' targets: a relative one would be read from the copy's folder
    dst = folder / category
    (dst / "train" / "good").mkdir(parents=True, exist_ok=True)
    goods = sorted((src / "train" / "good").iterdir())
    for p in goods[: train_images or len(goods)]:
        (dst / "train" / "good" / p.name).symlink_to(p)
    for part in ("test", "ground_truth"):
        if (src / part).exists() and not (dst / part).exists():
            (dst / part).symlink_to(src / part)
    return folder


def train_bundles(data: Path, category: str, train_images: int, bank: int, folder: Path,
                  precisions: tuple[str, ...] = ("fp32",), input_size: int = FAST_INPUT, screen_rows: int | None = None,
                  backbone: str | None = None):
    """PatchCore (``input_size`` px, ``bank`` memory-bank rows, ``screen_rows`` and ``backbone`` when given, else default
    settings) on a subset; one bundle per precision.

    Returns the ``Trained`` (its ``graph`` is the torch model) and ``{precision: bundle folder}``.
    """
    from exporter.build import fit_patchcore, package
    from exporter.train.patchcore import PatchcoreSettings

    trained = fit_patchcore(subset(data, category, train_images, folder / "data"), category,
                            PatchcoreSettings(input_size=input_size, coreset_ratio=1.0, max_bank=bank,
                                              **({} if screen_rows is None else {"screen_rows": screen_rows}),
                                              **({} if backbone is None else {"backbone": backbone})))
    return trained, {p: package(trained, folder / p, precision=p) for p in precisions}


def publish_frame(client: mqtt.Client, topic: str, payload: bytes, frame_id: str) -> None:
    """One camera frame as the worker expects it: QoS 1, ``frame_id`` and ``captured_at`` user properties."""
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("frame_id", frame_id), ("captured_at", str(time.time()))]
    client.publish(topic, payload, qos=1, properties=props)


def frames_per_s(compiled, images: list[np.ndarray]) -> float:
    """Frames/s of a compiled bundle through OpenVINO's async queue (its THROUGHPUT hint decides the requests)."""
    queue = compiled.async_queue()
    started = time.perf_counter()
    for image in images:
        queue.start_async({0: image[np.newaxis]})
    queue.wait_all()
    return len(images) / (time.perf_counter() - started)


def latency_ms(compiled, images: list[np.ndarray]) -> float:
    """Median single-frame latency (one request, synchronous) over ``images``."""
    request = compiled.create_request()
    times = []
    for image in images:
        started = time.perf_counter()
        compiled.infer(image[np.newaxis], request)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def summary(values: list[float]) -> dict[str, float]:
    """median and range of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(s: dict[str, float], digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def percentiles(latencies_s: list[float]) -> tuple[float, float]:
    """p50, p99 in milliseconds."""
    arr = np.asarray(latencies_s) * 1000
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def wait_for_answers(cond: threading.Condition, answered: Callable[[], int], n: int, alive: Callable[[], bool],
                     stall_s: float = 60.0) -> None:
    """Wait, holding ``cond``, until ``answered()`` reaches ``n``; fail as soon as the workers exit or no new answer
    has come for ``stall_s`` (a lost frame), rather than after a deadline that grows with ``n``."""
    last, progress = -1, time.monotonic()
    while (count := answered()) < n:
        if count != last:
            last, progress = count, time.monotonic()
        if not alive():
            raise RuntimeError(f"a worker exited with {count}/{n} frames answered")
        if time.monotonic() - progress > stall_s:
            raise RuntimeError(f"{count}/{n} frames answered and none for {stall_s:.0f} s: frames were lost "
                               "(the broker's and the worker's logs say where)")
        cond.wait(1)
