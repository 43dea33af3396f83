"""Admission and fairness through the transport seam, in-process: the real pipeline, OpenVINO and qdrant-edge,
with :class:`worker.transport.MemoryTransport` in place of the broker."""

from __future__ import annotations

import io
import json
import time
import zlib
from datetime import UTC
from pathlib import Path

import cv2
import numpy as np
import pytest

from bundle import prepare_image, read_manifest
from bundle.runtime import CompiledBundle
from conftest import good_png
from worker.config import Config
from worker.decode import FrameError, Header, decode, probe, reduction
from worker.evidence import EvidenceStore
from worker.metrics import OTHER, Stats
from worker.models import Models
from worker.pipeline import Pipeline
from worker.recorder import Recorder
from worker.store import VectorStore
from worker.supervise import Liveness
from worker.topics import Topics
from worker.transport import Inbound, MemoryTransport
from worker.wire import ErrorCode


class CountsAtEachAnswer(MemoryTransport):
    """Keeps the worker's counters as they stood when each frame's answer (result or error) was published."""

    def __init__(self) -> None:
        super().__init__()
        self.stats: Stats | None = None
        self.counts: list[tuple[str, dict]] = []

    def publish(self, topic, payload, **kwargs) -> None:
        super().publish(topic, payload, **kwargs)
        if self.stats is not None and topic.endswith(("/result", "/error")):
            self.counts.append((topic, self.stats.snapshot()))


@pytest.fixture
def pipeline(bundle_dir, tmp_path, request):
    """The pipeline, not started; ``request.param`` (indirect parametrisation): more config sections."""
    cfg = Config.model_validate({
        "model": {"bundle": str(bundle_dir), "cache_dir": str(tmp_path / "ov"), "rollout_path": str(tmp_path / "rollout")},
        "store": {"path": str(tmp_path / "q"), "log_normal_every": 0},
        "spool": {"path": str(tmp_path / "spool")}, "evidence": {"path": str(tmp_path / "ev")},
        "limits": {"queue_size": 6, "inference_threads": 1},
        **getattr(request, "param", {}),
    })
    liveness = Liveness(0)
    models = Models(cfg)
    recorder = Recorder(lambda: VectorStore(cfg.store, models.embedding_dim), EvidenceStore(cfg.evidence.path, 10),
                        cfg.store, cfg.spool, 16, liveness)
    transport = CountsAtEachAnswer()
    p = Pipeline(cfg, models, transport, Topics("inspect", "w"), recorder, Stats(liveness), liveness)
    transport.stats = p.stats
    yield p, transport
    if p.threads[0].ident is not None:  # started by the test
        p.stop(10)


def _frame(camera: str, frame_id: str, png: bytes, **user: str) -> Inbound:
    return Inbound(f"inspect/{camera}/frame", png, 1, {"frame_id": frame_id, "captured_at": str(time.time()), **user})


def _png(dataset: Path) -> bytes:
    return good_png(dataset).read_bytes()


def test_admission_without_a_broker(pipeline, dataset):
    p, transport = pipeline
    png = _png(dataset)
    for value in ("nan", "inf", "1e25", "-1e20"):
        p.on_frame(_frame("cam", f"t-{value}", png, captured_at=value))
    p.on_frame(_frame("cam", "x/y", png))
    for path_step in (".", ".."):  # folded away in the console's image URLs, as browsers and HTTP clients do
        p.on_frame(_frame("cam", path_step, png))
    p.on_frame(Inbound("inspect/cam/frame", png, 1, {"frame_id": "m"}))
    p.on_frame(_frame("cam", "mismatch", png, camera_id="other"))
    codes = [json.loads(m.payload)["code"] for m in transport.on("inspect/cam/error")]
    assert codes == ["bad_metadata"] * 7 + ["missing_metadata", "camera_mismatch"]
    assert len(p.queue) == 0
    for fine in ("good", "...", ".hidden"):
        p.on_frame(_frame("cam", fine, png))
    assert len(p.queue) == 3



@pytest.mark.parametrize("pipeline", [{"topics": {"metadata": "optional"}}], indirect=True)
def test_a_redelivered_frame_without_an_id_is_not_scored_twice_and_a_still_scenes_next_frame_is(pipeline, dataset):
    """An MQTT 3.1.1 camera sends no frame_id, and the worker gives each of its frames one.  The broker's redelivery
    of such a frame (DUP: the worker's link dropped before it acknowledged) got a new id and was scored again, two
    results and two records of one frame.  A redelivery of bytes already accepted is now a duplicate; the same bytes
    sent again by the camera (a still scene) are its next frame."""
    p, transport = pipeline
    png = _png(dataset)
    p.on_frame(Inbound("inspect/cam/frame", png, 1))
    p.on_frame(Inbound("inspect/cam/frame", png, 1, replayed=True))  # the broker's redelivery
    p.on_frame(Inbound("inspect/cam/frame", png, 1))  # the camera's next frame of a still scene
    assert len(p.queue) == 2 and transport.on("inspect/cam/error") == []
    assert p.stats.snapshot()["cam"]["duplicates"] == 1


def test_a_camera_stamping_its_frames_in_the_future_is_said_once(pipeline, dataset, caplog):
    """A camera that sends its local time without a UTC offset is hours off, read as UTC: retention by age and the
    history's time filters then place its frames hours away, without a word.  It is said once per camera; a frame
    stamped in the past (a backlog) is not."""
    from datetime import datetime, timedelta

    p, transport = pipeline
    png = _png(dataset)
    local = (datetime.now(UTC) + timedelta(hours=2)).replace(tzinfo=None)  # UTC+2 local time, no offset
    with caplog.at_level("WARNING", logger="worker.ingest"):
        p.on_frame(_frame("east", "e1", png, captured_at=local.isoformat()))
        p.on_frame(_frame("east", "e2", png, captured_at=(local + timedelta(seconds=1)).isoformat()))
        p.on_frame(_frame("backlog", "b1", png, captured_at=str(time.time() - 7200)))
    said = [r.getMessage() for r in caplog.records if "ahead of this box's clock" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("camera east stamps its frames 2.00 h ahead"), said
    assert len(p.queue) == 3  # said, not refused


def test_a_camera_clock_off_both_ways_is_said_once_each_way(pipeline, dataset, caplog):
    """The camera-clock warning was said once per camera whichever way came first: a camera that later sent
    frames from 2000 (its clock reset at a reboot) was never named again.  Each direction is said once."""
    p, transport = pipeline
    png = _png(dataset)
    with caplog.at_level("WARNING", logger="worker.ingest"):
        p.on_frame(_frame("cam", "a1", png, captured_at=str(time.time() + 3 * 3600)))
        p.on_frame(_frame("cam", "a2", png, captured_at=str(time.time() + 3 * 3600)))
        p.on_frame(_frame("cam", "r1", png, captured_at="2000-01-02T00:00:00Z"))
        p.on_frame(_frame("cam", "r2", png, captured_at="2000-01-03T00:00:00Z"))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("camera cam stamps its frames")]
    assert len(said) == 2 and "3.00 h ahead" in said[0] and "days before this box's clock" in said[1], said
    assert len(p.queue) == 4

@pytest.mark.parametrize("pipeline", [{"limits": {"queue_size": 6, "inference_threads": 1, "max_frame_age_s": 60},
                                       "cameras": {"noclock": {"metadata": "optional"}}}], indirect=True)
def test_the_frame_age_limit_refuses_old_frames_only_by_a_clock_the_camera_sent(pipeline, dataset):
    """``limits.max_frame_age_s`` refuses a frame captured longer before it arrived (``stale_frame``, counted); a frame
    stamped ahead of the box is no late one, and a camera without a clock (the worker stamps its frames on receipt)
    or a time it sent that cannot be used (replaced, as for such a camera) is never refused for its age."""
    p, transport = pipeline
    png = _png(dataset)
    p.on_frame(_frame("cam", "old", png, captured_at=str(time.time() - 120)))
    p.on_frame(_frame("cam", "recent", png, captured_at=str(time.time() - 30)))
    p.on_frame(_frame("cam", "ahead", png, captured_at=str(time.time() + 3600)))
    p.on_frame(Inbound("inspect/noclock/frame", png, 1, {"frame_id": "n1"}))
    p.on_frame(_frame("noclock", "n2", png, captured_at="1970-01-01T00:00:10Z"))  # replaced: the worker's receipt
    errors = [json.loads(m.payload) for m in transport.on("inspect/cam/error")]
    assert [(e["frame_id"], e["code"]) for e in errors] == [("old", "stale_frame")], errors
    assert "captured 120." in errors[0]["message"] and "limits.max_frame_age_s (60 s)" in errors[0]["message"], errors
    assert [f.frame_id for f in p.queue.drain()] == ["recent", "ahead", "n1", "n2"]
    assert p.stats.snapshot()["cam"]["errored"] == 1


def test_a_frame_is_counted_before_its_answer_leaves(pipeline, dataset):
    """Whoever has seen a frame's result or error and then reads the counters finds the frame in them: each answer
    is published after its outcome (and a result's verdict) is counted."""
    p, transport = pipeline
    p.start()
    frames = [("good", _png(dataset)), ("defect", min((dataset / "weave" / "test" / "hole").glob("*.png"))
                                        .read_bytes()), ("cut", _png(dataset)[:200])]
    for n, (frame_id, data) in enumerate(frames, 1):  # one at a time: nothing else in flight at its answer
        p.on_frame(_frame("cam", frame_id, data))
        transport.wait(lambda m, f=frame_id: m.topic.endswith(("/result", "/error")) and json.loads(m.payload)[
            "frame_id"] == f, 1, timeout=120)
        topic, counts = transport.counts[-1]
        cam = counts["cam"]
        assert cam["received"] == n == cam["processed"] + cam["errored"] + cam["dropped"] + cam["duplicates"], counts
    verdicts = [json.loads(m.payload)["verdict"] for m in transport.on("inspect/cam/result")]
    assert verdicts == ["normal", "anomalous"]
    assert [c["cam"]["anomalous"] for _, c in transport.counts] == [0, 1, 1]
    assert [topic for topic, _ in transport.counts] == ["inspect/cam/result"] * 2 + ["inspect/cam/error"]


def test_a_flooding_camera_pays_for_its_own_flood(pipeline, dataset):
    p, transport = pipeline
    png = _png(dataset)
    for i in range(30):  # no inference thread runs yet: the queue (6) overflows at once
        p.on_frame(_frame("flood", f"f{i}", png))
        if i % 10 == 0:
            p.on_frame(_frame("steady", f"s{i}", png))
    dropped = [json.loads(m.payload) for m in transport.on("inspect/flood/error")]
    assert len(dropped) == 30 + 3 - 6 and {d["code"] for d in dropped} == {"dropped"}
    assert transport.on("inspect/steady/error") == []
    p.start()
    results = transport.wait(lambda m: m.topic.endswith("/result"), 6, timeout=120)
    assert sorted(json.loads(m.payload)["frame_id"] for m in results if m.topic == "inspect/steady/result") == [
        "s0", "s10", "s20"]


def test_a_large_jpeg_is_decoded_smaller_and_scores_as_decoded_in_full(pipeline, dataset, bundle_dir):
    """A JPEG several times the model's input is decoded smaller (limits.reduced_decode, on by default), to twice the
    input at least: the model sees it to about a grey level, and the frame scores as a full decode does.
    Decoded to just above the input (a 1100 px frame at 1/4 for a 256 px model), the last resize took another grid of
    pixels, the input differed by one or two grey levels and scores moved by up to several per cent."""
    p, transport = pipeline
    spec = read_manifest(bundle_dir).input
    w, h = spec.width, spec.height
    assert reduction(Header("jpeg", 8 * w + 8, 8 * h), w, h) == 4  # the largest factor that leaves twice the input
    assert reduction(Header("jpeg", 8 * w + 8, 8 * h), w, h + 1) == 2
    assert reduction(Header("jpeg", 4 * w, 4 * h), 2 * w, 2 * h) == 1
    assert reduction(Header("jpeg", 8 * w, 4 * h), w, h) == 2  # the shorter side decides (EXIF may turn the frame)
    assert reduction(Header("png", 16 * w, 16 * h), w, h) == 1  # only libjpeg scales while decoding
    image = cv2.imread(str(sorted((dataset / "weave" / "test").glob("*/*.png"))[-1]))
    size = (round(4.3 * w), round(4.3 * h))  # not a whole multiple of the input
    large = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)
    data = cv2.imencode(".jpg", large, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    header = probe(data, 1 << 24, 1 << 24)
    assert header == ("jpeg", *size) and reduction(header, w, h) == 2
    full = prepare_image(decode(data), spec)
    assert np.abs(prepare_image(decode(data, 2), spec).astype(int) - full).mean() < 2  # at 1/4: several levels

    p.start()
    p.on_frame(_frame("cam", "large", data))
    (result,) = [json.loads(m.payload) for m in transport.wait(lambda m: m.topic == "inspect/cam/result", 1, timeout=120)]
    want = float(CompiledBundle(bundle_dir).infer(full[np.newaxis]).score[0])
    assert result["raw_score"] == pytest.approx(want, rel=0.02)


@pytest.mark.parametrize("pipeline", [{"cameras": {"tiled": {"tiling": {"grid": [2, 2]}}}}], indirect=True)
def test_a_query_image_for_a_tiled_camera_is_embedded_from_full_size_tiles(pipeline, dataset, bundle_dir):
    """A camera's tiles are cut from the frame at full size; a query's image for such a camera was decoded smaller
    first (a JPEG several times the input), so its embedding was not made as the camera's frames' are."""
    from bundle.tiling import see

    p, _ = pipeline
    grid = p.cfg.cameras["tiled"].tiling
    spec = read_manifest(bundle_dir).input
    image = cv2.imread(str(sorted((dataset / "weave" / "test").glob("*/*.png"))[-1]))
    large = cv2.resize(image, (round(8.6 * spec.width), round(8.6 * spec.height)), interpolation=cv2.INTER_CUBIC)
    data = cv2.imencode(".jpg", large, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    assert reduction(probe(data, 1 << 24, 1 << 24), spec.width, spec.height) > 1  # a frame this large, untiled
    bundle = CompiledBundle(bundle_dir)
    full = see(bundle, bundle.create_request(), decode(data), grid).embedding
    reduced = see(bundle, bundle.create_request(), decode(data, 2), grid).embedding
    embedding, _ = p.embed(data, "tiled")
    assert np.abs(embedding - full).max() < np.abs(reduced - full).max() / 100


@pytest.mark.parametrize("pipeline", [{"cameras": {"roi": {"roi": [16, 8, 96, 80]}}}], indirect=True)
def test_a_query_image_for_a_camera_with_an_roi_is_cropped_as_its_frames_are(pipeline, dataset, bundle_dir):
    """A camera's frames are cropped to its roi before scoring; a query's image for that camera (a frame of it, its
    evidence file) was embedded whole, so it did not find its own frame. An image the rectangle does not fit in is
    taken as the region itself."""
    from bundle.tiling import see

    p, _ = pipeline
    image = cv2.resize(cv2.imread(str(good_png(dataset))), (160, 120), interpolation=cv2.INTER_AREA)
    data = cv2.imencode(".png", image)[1].tobytes()
    bundle = CompiledBundle(bundle_dir)
    cropped = see(bundle, bundle.create_request(), image[8:88, 16:112], None).embedding
    embedding, _ = p.embed(data, "roi")
    np.testing.assert_allclose(embedding, cropped, atol=1e-5)
    region = cv2.imencode(".png", image[:64, :64])[1].tobytes()  # smaller than the roi reaches: the region itself
    np.testing.assert_allclose(p.embed(region, "roi")[0], see(bundle, bundle.create_request(), image[:64, :64],
                                                              None).embedding, atol=1e-5)


def test_a_jpeg_is_refused_when_cut_short_not_when_bytes_follow_its_end(dataset):
    """A frame grabbed from an MJPEG stream often ends in the multipart's line break, or a camera appends a trailer:
    the image is whole and is decoded.  Cut short anywhere in its scan, or with the thumbnail's end marker as the
    last one, it is refused before decoding (libjpeg would fill the rest with grey)."""
    image = cv2.imread(str(good_png(dataset)))
    plain = cv2.imencode(".jpg", image)[1].tobytes()
    progressive = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    for jpeg in (plain, progressive):
        for tail in (b"", b"\r\n", b"\xff", b"\x00\x00", b"trailer"):
            header = probe(jpeg + tail, len(jpeg) + 16, 10**8)
            assert np.array_equal(decode(jpeg + tail), decode(jpeg)) and header.width == image.shape[1]
        scan = jpeg.rfind(b"\xff\xda")
        for cut in (scan + 64, (scan + len(jpeg)) // 2, len(jpeg) - 1):
            with pytest.raises(FrameError) as refused:
                probe(jpeg[:cut], len(jpeg), 10**8)
            assert refused.value.code.value == "truncated_image"
    thumbnail = cv2.imencode(".jpg", cv2.resize(image, (32, 32)))[1].tobytes()
    exif = b"Exif\x00\x00" + thumbnail  # an APP1 segment holding a complete JPEG, as an EXIF thumbnail is
    with_thumbnail = plain[:2] + b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif + plain[2:]
    assert np.array_equal(decode(with_thumbnail), decode(plain))
    with pytest.raises(FrameError) as refused:
        probe(with_thumbnail[:len(with_thumbnail) - 100], len(with_thumbnail), 10**8)
    assert refused.value.code.value == "truncated_image"


def test_a_png_cut_short_is_truncated_not_corrupt_and_libpng_writes_nothing(dataset, capfd):
    """A PNG cut short was answered corrupt_image ("header valid, data cannot be decoded"), where a JPEG cut short
    is truncated_image, and libpng wrote "PNG input buffer is incomplete" to stderr for each such frame, a journal
    line that names no frame.  It is refused before decoding; bytes after IEND are still read."""
    png = good_png(dataset).read_bytes()
    image = decode(png)
    assert np.array_equal(decode(png + b"\r\n"), image)
    iend = png.rfind(b"IEND") - 4
    for cut in (33 + 20, len(png) // 2, iend, len(png) - 1):
        with pytest.raises(FrameError) as refused:
            probe(png[:cut], len(png), 10**8)
        assert refused.value.code == ErrorCode.TRUNCATED_IMAGE, cut
        assert "PNG ends before its IEND chunk" in refused.value.message
    assert "libpng" not in capfd.readouterr().err


def test_a_jpeg_with_restart_markers_cut_short_and_closed_with_an_end_marker_is_truncated(dataset, tmp_path):
    """A depacketiser that drops a lost fragment (RTP/JPEG) or an encoder that ran out of buffer ends the frame with
    its end marker: the end-marker check passed it, and libjpeg filled the rest with grey (128), saying so only on
    stderr, so a half-grey frame was scored (and trained on).  With restart markers, a scan that holds fewer intervals
    than its picture needs is cut short, on both sides; whole ones, of any subsampling and size, and progressive ones
    are read."""
    from exporter.data import _why_unreadable, decoded

    image = cv2.imread(str(good_png(dataset)))
    for size in ((image.shape[1], image.shape[0]), (1001, 777), (17, 9)):
        picture = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        for source in (picture, cv2.cvtColor(picture, cv2.COLOR_BGR2GRAY)):
            for sampling in (cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
                             cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444):
                for interval, progressive in ((0, 0), (1, 0), (16, 0), (4, 1)):
                    jpeg = cv2.imencode(".jpg", source, [cv2.IMWRITE_JPEG_RST_INTERVAL, interval,
                                                         cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling,
                                                         cv2.IMWRITE_JPEG_PROGRESSIVE, progressive])[1].tobytes()
                    assert probe(jpeg + b"\r\n", len(jpeg) + 2, 10**8) == ("jpeg", size[0], size[1])
    jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_RST_INTERVAL, 4])[1].tobytes()
    scan = jpeg.find(b"\xff\xda")
    for cut in (scan + 64, (scan + len(jpeg)) // 2, scan + (len(jpeg) - scan) * 9 // 10):
        closed = jpeg[:cut] + b"\xff\xd9"
        # what was scored: grey where the data was lost
        assert not np.array_equal(cv2.imdecode(np.frombuffer(closed, np.uint8), cv2.IMREAD_COLOR), decode(jpeg))
        with pytest.raises(FrameError) as refused:
            probe(closed, len(jpeg), 10**8)
        assert refused.value.code == ErrorCode.TRUNCATED_IMAGE, cut
        (tmp_path / "closed.jpg").write_bytes(closed)
        assert decoded(tmp_path / "closed.jpg") is None and _why_unreadable(tmp_path / "closed.jpg") == "a JPEG cut short"


def test_a_jpeg_without_restart_markers_cut_short_and_closed_with_an_end_marker_is_truncated(dataset, tmp_path):
    """Without restart markers (most JPEGs) a frame cut short and closed with its end marker could not be told from
    its bytes, and OpenCV passes none of libjpeg's warnings on: the worker scored it with the lost part grey (128).
    libjpeg-turbo's warning is now heard (simplejpeg decodes JPEGs): truncated_image, wherever the cut is, and for a
    frame decoded smaller too; the exporter leaves such a training image out ("a JPEG cut short"), where it trained
    on it.  A JPEG libjpeg warns about otherwise (bytes between segments, which cameras write) is still decoded."""
    from exporter.data import _why_unreadable, decoded

    image = cv2.imread(str(good_png(dataset)))
    jpeg = cv2.imencode(".jpg", image)[1].tobytes()
    scan = jpeg.find(b"\xff\xda")
    for cut in (scan + 64, (scan + len(jpeg)) // 2, len(jpeg) - 64):
        closed = jpeg[:cut] + b"\xff\xd9"
        assert probe(closed, len(jpeg), 10**8).format == "jpeg"  # nothing in its bytes says so
        assert not np.array_equal(cv2.imdecode(np.frombuffer(closed, np.uint8), cv2.IMREAD_COLOR), decode(jpeg))
        for reduce in (1, 2):
            with pytest.raises(FrameError) as refused:
                decode(closed, reduce)
            assert refused.value.code == ErrorCode.TRUNCATED_IMAGE, (cut, reduce)
            assert "premature end of data segment" in refused.value.message
        (tmp_path / "closed.jpg").write_bytes(closed)
        assert decoded(tmp_path / "closed.jpg") is None and _why_unreadable(tmp_path / "closed.jpg") == "a JPEG cut short"
    table = jpeg.find(b"\xff\xdb")
    extra = jpeg[:table] + b"\x00\x00" + jpeg[table:]  # libjpeg: "2 extraneous bytes before marker 0xdb"
    assert np.array_equal(decode(extra), decode(jpeg))
    (tmp_path / "extra.jpg").write_bytes(extra)
    assert np.array_equal(decoded(tmp_path / "extra.jpg"), decode(jpeg))


def test_jpegs_are_decoded_to_the_pixels_opencv_gives_as_training_does(dataset):
    """JPEGs, frames and training images alike, are decoded by simplejpeg (libjpeg-turbo), other formats by OpenCV,
    which decoded JPEGs too until 2026-12-07: every kind of JPEG a camera writes gives OpenCV's pixels (a bundle
    trained before sees what it was trained on), its EXIF orientation applied as OpenCV's IMREAD_COLOR does, and
    decoded smaller (limits.reduced_decode) as IMREAD_REDUCED does."""
    from PIL import Image

    picture = Image.open(good_png(dataset)).convert("RGB").resize((203, 131))
    kinds = {}
    for subsampling in (0, 1, 2):
        for progressive in (False, True):
            out = io.BytesIO()
            picture.save(out, "JPEG", quality=90, subsampling=subsampling, progressive=progressive)
            kinds[f"subsampling {subsampling}, progressive {progressive}"] = out.getvalue()
    for mode in ("L", "CMYK"):
        out = io.BytesIO()
        picture.convert(mode).save(out, "JPEG")
        kinds[mode] = out.getvalue()
    for orientation in range(1, 9):
        exif, out = Image.Exif(), io.BytesIO()
        exif[0x0112] = orientation
        picture.save(out, "JPEG", exif=exif.tobytes())
        kinds[f"EXIF orientation {orientation}"] = out.getvalue()
    reduced = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
               8: cv2.IMREAD_REDUCED_COLOR_8}
    for kind, jpeg in kinds.items():
        for reduce, flag in reduced.items():
            expected = cv2.imdecode(np.frombuffer(jpeg, np.uint8), flag)
            assert np.array_equal(decode(jpeg, reduce), expected), (kind, reduce)


def test_a_png_damaged_on_its_way_is_corrupt_and_libpng_writes_nothing(dataset, tmp_path, capfd):
    """A PNG with a flipped bit (a camera on a bad link) was answered corrupt_image, but libpng first wrote "IDAT: CRC
    error" or "bad adaptive filter value" to stderr for each such frame, journal lines that name no frame; the
    exporter wrote the same for such a training image.  A critical chunk whose CRC does not match is refused before
    decoding, on both sides."""
    from exporter.data import _why_unreadable, decoded

    png = good_png(dataset).read_bytes()
    idat = png.find(b"IDAT")
    rng = np.random.default_rng(15)
    for at in (*rng.integers(idat + 4, len(png) - 16, 8), idat + 8):
        damaged = bytearray(png)
        damaged[int(at)] ^= 0x10
        with pytest.raises(FrameError, match="PNG chunk IDAT does not match its CRC") as refused:
            probe(bytes(damaged), len(png), 10**8)
        assert refused.value.code == ErrorCode.CORRUPT_IMAGE
        (tmp_path / "damaged.png").write_bytes(bytes(damaged))
        assert decoded(tmp_path / "damaged.png") is None
        assert _why_unreadable(tmp_path / "damaged.png") == "a PNG damaged: its IDAT chunk does not match its CRC"
    assert "libpng" not in capfd.readouterr().err
    assert np.array_equal(decode(png), cv2.imread(str(good_png(dataset))))


def test_a_png_whose_text_chunk_or_end_was_damaged_is_decoded_and_libpng_writes_nothing(dataset, tmp_path, capfd):
    """A flipped bit in an ancillary chunk (a text or time chunk) or in IEND's CRC leaves the pixels whole: the frame
    was decoded, but libpng wrote "tEXt: CRC error" or "IEND: CRC error" to stderr for each such frame (and training
    image), journal lines that name none.  Those chunks are left out before decoding, on both sides; the pixels are
    the same."""
    from exporter.data import _header, decoded

    png = good_png(dataset).read_bytes()
    image = cv2.imread(str(good_png(dataset)))

    def chunk(kind: bytes, body: bytes, damaged: bool) -> bytes:
        crc = zlib.crc32(kind + body) ^ (1 if damaged else 0)
        return len(body).to_bytes(4, "big") + kind + body + crc.to_bytes(4, "big")

    ihdr_end, iend = 8 + 25, len(png) - 12
    whole, damaged_text = chunk(b"tEXt", b"Comment\x00part 7", False), chunk(b"tEXt", b"Comment\x00part 7", True)
    bad_end = png[iend:-4] + (zlib.crc32(b"IEND") ^ 1).to_bytes(4, "big")
    for variant in (png[:ihdr_end] + damaged_text + png[ihdr_end:],  # before the pixels
                    png[:iend] + chunk(b"tIME", b"\x07\xea\x0c\x07\x01\x02\x03", True) + png[iend:],  # after them
                    png[:iend] + bad_end, png[:ihdr_end] + whole + png[ihdr_end:iend] + damaged_text + bad_end):
        assert probe(variant, len(variant), 10**8) == ("png", image.shape[1], image.shape[0])
        assert np.array_equal(decode(variant), image)
        (tmp_path / "frame.png").write_bytes(variant)
        assert np.array_equal(decoded(tmp_path / "frame.png"), image) and _header(variant)[0] == "PNG"
    assert "libpng" not in capfd.readouterr().err


def test_a_phone_jpeg_with_a_second_picture_is_a_jpeg(dataset):
    """Phones store an HDR gain map (or a stereo pair) as a second picture in the JPEG (Pillow calls it MPO): the
    exporter trained on such files, and the worker refused them as an unknown format."""
    from PIL import Image

    image = cv2.imread(str(good_png(dataset)))
    first = Image.fromarray(image[:, :, ::-1])
    buffer = io.BytesIO()
    first.save(buffer, "MPO", save_all=True, append_images=[first.resize((32, 32))])
    data = buffer.getvalue()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert probe(data, len(data), 10**8) == ("jpeg", image.shape[1], image.shape[0])
    plain = io.BytesIO()
    first.save(plain, "JPEG")
    assert np.array_equal(decode(data), decode(plain.getvalue()))  # the photo, not the second picture
    with pytest.raises(FrameError) as refused:
        probe(data[: len(data) // 3], len(data), 10**8)
    assert refused.value.code.value == "truncated_image"


def test_a_tiff_of_32_bit_samples_is_refused_as_a_format_not_as_damaged():
    """A depth or float image saved as TIFF was answered corrupt_image, as if damaged in transit."""
    from PIL import Image

    for samples, said in ((np.zeros((8, 8), np.float32), "32-bit floating-point"),
                          (np.zeros((8, 8), np.int32), "32-bit or signed integer"),
                          (np.zeros((8, 8), np.int16), "32-bit or signed integer")):
        out = io.BytesIO()
        Image.fromarray(samples).save(out, "TIFF")
        with pytest.raises(FrameError, match=f"TIFF with {said} samples") as refused:
            probe(out.getvalue(), 10**6, 10**6)
        assert refused.value.code == ErrorCode.UNSUPPORTED_FORMAT


def test_a_tiff_of_signed_bytes_is_refused_not_wrapped_to_bright():
    """Pillow opens a TIFF of signed 8-bit samples as an unsigned one, and OpenCV wrapped -1 to 255: it was scored."""
    import tifffile

    out = io.BytesIO()
    tifffile.imwrite(out, np.full((8, 8), -100, np.int8), photometric="minisblack")
    with pytest.raises(FrameError, match="signed integer samples") as refused:
        probe(out.getvalue(), 10**6, 10**6)
    assert refused.value.code == ErrorCode.UNSUPPORTED_FORMAT


def test_a_colour_tiff_of_float_or_signed_samples_is_an_unsupported_format_not_garbage():
    """Pillow has no mode for floating-point or signed colour TIFFs and cannot open them: they were answered
    ``not_an_image``, as random bytes are, though README says such samples are refused ``unsupported_format``."""
    import tifffile

    for samples, said in ((np.full((8, 8, 3), 0.5, np.float32), "32-bit floating-point"),
                          (np.full((8, 8, 3), -100, np.int16), "16-bit signed integer")):
        out = io.BytesIO()
        tifffile.imwrite(out, samples, photometric="rgb")
        with pytest.raises(FrameError, match=f"TIFF with {said} samples") as refused:
            probe(out.getvalue(), 10**6, 10**6)
        assert refused.value.code == ErrorCode.UNSUPPORTED_FORMAT
    with pytest.raises(FrameError) as garbage:  # a TIFF signature before garbage is no image still
        probe(b"II*\x00" + bytes(range(256)) * 4, 10**6, 10**6)
    assert garbage.value.code == ErrorCode.NOT_AN_IMAGE


def test_a_tiff_of_10_12_or_14_bit_samples_is_an_unsupported_format_not_damaged_or_no_image():
    """A camera's TIFF of packed 12-bit samples (BitsPerSample 12) was answered corrupt_image ("header valid, data
    cannot be decoded") and its 10- and 14-bit or colour ones not_an_image, as if damaged or no image: OpenCV reads
    such samples only as stored, never as the 8-bit colour it scores.  8- and 16-bit and 1-bit TIFFs are read."""
    import tifffile

    rng = np.random.default_rng(12)
    for bits in (2, 4, 10, 12, 14):
        for shape, photometric in (((8, 8), "minisblack"), ((8, 8, 3), "rgb")):
            out = io.BytesIO()
            samples = rng.integers(0, 1 << bits, shape).astype(np.uint16 if bits > 8 else np.uint8)
            tifffile.imwrite(out, samples, bitspersample=bits, photometric=photometric)
            with pytest.raises(FrameError, match=f"TIFF with {bits}-bit unsigned samples is not accepted") as refused:
                probe(out.getvalue(), 10**6, 10**6)
            assert refused.value.code == ErrorCode.UNSUPPORTED_FORMAT, (bits, photometric)
    deep = rng.integers(0, 1 << 16, (8, 8)).astype(np.uint16)
    for samples in (deep, rng.integers(0, 256, (8, 8, 3)).astype(np.uint8), deep > 1 << 15):
        out = io.BytesIO()
        tifffile.imwrite(out, samples, photometric="rgb" if samples.ndim == 3 else "minisblack")
        assert probe(out.getvalue(), 10**6, 10**6) == ("tiff", 8, 8)
        assert decode(out.getvalue()).shape == (8, 8, 3)
    out = io.BytesIO()
    tifffile.imwrite(out, deep, photometric="minisblack")
    assert np.array_equal(decode(out.getvalue())[:, :, 0], (deep >> 8).astype(np.uint8))


def test_a_tiff_whose_tiles_pass_the_pixel_limit_is_refused_before_decoding(dataset):
    """libtiff inflates a whole tile, whatever the picture's size: an 8 x 8 picture in 4096 x 4096 tiles passed the
    header's pixel limit in a few kilobytes and took a tile's memory per decode.  Tiles are checked as a picture is;
    a picture in ordinary tiles is read as the same picture in one piece."""
    import tifffile

    bomb = io.BytesIO()
    tifffile.imwrite(bomb, np.full((8, 8, 3), 77, np.uint8), photometric="rgb", tile=(4096, 4096), compression="zlib")
    with pytest.raises(FrameError, match="TIFF tiles are 4096x4096") as refused:
        probe(bomb.getvalue(), 10**6, 10**6)
    assert refused.value.code == ErrorCode.IMAGE_TOO_LARGE
    image = cv2.imread(str(good_png(dataset)))
    tiled = io.BytesIO()
    tifffile.imwrite(tiled, image[:, :, ::-1], photometric="rgb", tile=(64, 64))
    assert probe(tiled.getvalue(), 10**8, 10**8) == ("tiff", image.shape[1], image.shape[0])
    assert np.array_equal(decode(tiled.getvalue()), image)


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding(dataset):
    """Each scan of a progressive JPEG is one more pass over the whole picture and the format does not bound their
    number: a frame of a few hundred kilobytes of repeated scans held an inference thread for minutes, past the
    watchdog.  More than MAX_JPEG_SCANS are refused before decoding; ordinary progressive JPEGs, and a scan marker's
    bytes inside an EXIF segment, are not scans."""
    from worker.decode import MAX_JPEG_SCANS, jpeg_scans

    image = cv2.imread(str(good_png(dataset)))
    progressive = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    assert 1 < jpeg_scans(progressive) <= 10
    assert probe(progressive, 10**8, 10**8).format == "jpeg"
    last = progressive.rfind(b"\xff\xda")  # the last scan, its header and coded data up to the end marker
    bomb = progressive[:-2] + progressive[last:-2] * 3 * MAX_JPEG_SCANS + b"\xff\xd9"
    with pytest.raises(FrameError, match="scans is not accepted") as refused:
        probe(bomb, 10**8, 10**8)
    assert refused.value.code == ErrorCode.UNSUPPORTED_FORMAT
    exif = b"Exif\x00\x00" + b"\xff\xda" * 2 * MAX_JPEG_SCANS  # the marker's bytes in a segment's payload
    with_exif = progressive[:2] + b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif + progressive[2:]
    assert jpeg_scans(with_exif) == jpeg_scans(progressive)
    assert np.array_equal(decode(with_exif), decode(progressive))


def test_the_normal_frame_count_per_camera_is_bounded(pipeline):
    """``store.log_normal_every`` counted the normal frames of every camera id ever seen, for good: a source that
    puts a timestamp in its topic grew it by a camera per frame (a helper's long-run probe)."""
    p, _ = pipeline
    p.cfg = p.cfg.model_copy(update={"store": p.cfg.store.model_copy(update={"log_normal_every": 3})})
    logged = [p._should_log(f"cam-{i}", anomalous=False) for i in range(5000)]
    assert all(logged[: p.cfg.metrics.max_cameras])  # each camera's first normal frame is logged
    assert len(p._normal_seen) == p.cfg.metrics.max_cameras + 1  # then one shared count (metrics.OTHER)
    assert [p._should_log("cam-0", anomalous=False) for _ in range(3)] == [False, False, True]


@pytest.mark.parametrize("pipeline", [{"topics": {"cameras": ["line1"], "metadata": "optional"}}], indirect=True)
def test_cameras_outside_topics_cameras_take_no_camera_slot(pipeline, dataset):
    """Frames of cameras that topics.cameras does not list are refused (unknown_camera), yet each such id took one of
    the metrics.max_cameras slots of the stats and /metrics, for good: a camera publishing under wrong ids filled
    them, and the listed camera that came after was counted as /other. They now count under /other."""
    p, transport = pipeline
    png = _png(dataset)
    for i in range(p.stats.max_cameras + 5):
        p.on_frame(_frame(f"stray-{i}", f"f{i}", png))
        p.on_frame(Inbound(f"inspect/stray-{i}/frame", png, 1, {}))  # no id: the worker makes one up (optional)
    p.on_frame(_frame("line1", "f0", png))
    errors = [json.loads(m.payload) for m in transport.published if m.topic.endswith("/error")]
    assert len(errors) == 2 * (p.stats.max_cameras + 5)
    assert {e["code"] for e in errors} == {"unknown_camera"}  # each still answered on its camera's error topic
    counts = p.stats.snapshot()
    assert set(counts) == {"line1", OTHER}
    assert counts[OTHER]["received"] == counts[OTHER]["errored"] == 2 * (p.stats.max_cameras + 5)
    labels = {s.labels["camera"] for s in p.stats._frames.collect()[0].samples}
    assert labels == {"line1", OTHER}


def test_two_inference_threads_meeting_the_bound_of_the_shape_notes_both_get_their_note(pipeline, dataset) -> None:
    """Each inference thread notes once per frame size and bundle whether frames of that size are unlike the training
    images, in a table cleared at 1000 sizes (a camera sending crops of many sizes).  A thread that had just noted a
    size read its note back from the table; another thread clearing it in between made that a KeyError, and the frame
    was answered internal_error.  Here the first thread is held after its note is written until the second has
    cleared the table."""
    import threading

    p, _ = pipeline
    model = p.models.default
    image = decode(_png(dataset))
    written, cleared = threading.Event(), threading.Event()

    class Held(dict):
        def __setitem__(self, key, value) -> None:
            super().__setitem__(key, value)
            if threading.current_thread().name == "first":  # its note written: the other thread clears the table
                written.set()
                assert cleared.wait(30)

        def clear(self) -> None:
            super().clear()
            cleared.set()

    p._shape_notes = Held({(i, i, "other", "1", False): None for i in range(999)})
    frame = p._admit("cam", {"frame_id": "f", "captured_at": str(time.time())}, _png(dataset), time.time(),
                     time.monotonic())
    notes: dict[str, object] = {}

    def note(name: str, size: tuple[int, int]) -> None:
        try:
            notes[name] = p._unlike_training(frame, model, None, size, image)
        except Exception as exc:  # what the inference thread answered the frame with
            notes[name] = exc

    first = threading.Thread(target=note, args=("first", (64, 64)), name="first")
    first.start()
    assert written.wait(60)
    second = threading.Thread(target=note, args=("second", (128, 128)), name="second")
    second.start()
    first.join(60)
    second.join(60)
    assert notes["second"] is None  # the model's own size
    assert isinstance(notes["first"], str) and notes["first"].startswith("64x64 is smaller"), notes


def _bmp_header(width: int, height: int) -> bytes:
    """A BMP whose header declares ``width`` x ``height`` (its pixels cut short): admission reads only the header."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "BMP")
    data = bytearray(out.getvalue())
    data[18:26] = width.to_bytes(4, "little") + height.to_bytes(4, "little")
    return bytes(data)


@pytest.mark.parametrize("pipeline", [{"limits": {"max_pixels": 2_000_000_000, "max_frame_bytes": 50_000_000}}],
                         indirect=True)
def test_a_frame_larger_than_the_decoder_takes_is_refused_as_too_large_not_an_internal_error(pipeline):
    """OpenCV decodes no image over 2^30 pixels or 2^20 on a side, and libpng (as OpenCV builds it) no PNG over
    1,000,000 on a side: such a frame within limits.max_pixels (a 2,000,000 x 2 strip is within the default) was
    admitted, then answered ``internal_error`` (OpenCV raised) or ``corrupt_image``.  It is refused from its header
    as ``image_too_large``, saying the decoder's limits."""
    from PIL import Image

    p, transport = pipeline
    strip = io.BytesIO()
    Image.new("L", (1_000_001, 2)).save(strip, "PNG")
    frames = {"huge": _bmp_header(40_000, 30_000), "long": _bmp_header(2_000_000, 2), "png-strip": strip.getvalue()}
    for frame_id, data in frames.items():
        p.on_frame(_frame("cam", frame_id, data))
    errors = [json.loads(m.payload) for m in transport.on("inspect/cam/error")]
    assert [(e["frame_id"], e["code"]) for e in errors] == [(f, "image_too_large") for f in frames], errors
    assert "the decoder takes at most 1073741824 pixels" in errors[0]["message"], errors[0]
    assert len(p.queue) == 0
