"""What a raw pixel buffer costs the worker against the same frame sent as a JPEG or a PNG.

    python -m benchmarks.pixels [--data ../shared/data/mvtec --category grid] [--sizes 1280x1024,2448x2048] \
        [--input 512] [--rounds 5] [--frames 10]

Each frame size is made from the category's test images (resized; the generated weave where the data is absent), and
sent as each of: a JPEG (quality 92) and a PNG, as the worker reads files, and Mono8, Mono12, Mono12p, RGB8 and BayerRG8
buffers (worker/pixels.py).  Per kind, the CPU per frame, median [range] over the rounds, of the three places the
worker spends it, with OpenCV on the calling thread as the worker runs it (``limits.opencv_threads`` 1):
admission on the MQTT thread (the payload's checksum, which tells a redelivery, and the header probe or the
declaration checked against the payload); the inference
thread's decode or conversion and the resize to the model's input (a JPEG decoded smaller where the worker would:
``limits.reduced_decode``); and the file the history and the capture sample keep (as sent, or a buffer's TIFF).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np

from benchmarks.common import DATA, cpu_name, md_table

KINDS = ("jpeg", "png", "Mono8", "Mono12", "Mono12p", "RGB8", "BayerRG8")


def _payload(image: np.ndarray, kind: str) -> bytes:
    """``image`` (8-bit BGR) as the camera would send it."""
    if kind == "jpeg":
        return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()
    if kind == "png":
        return cv2.imencode(".png", image)[1].tobytes()
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if kind == "Mono8":
        return grey.tobytes()
    if kind == "Mono12":
        return (grey.astype("<u2") << 4).tobytes()
    if kind == "Mono12p":  # two 12-bit samples in 3 bytes, least significant bits first
        first, second = (grey.astype(np.uint16).reshape(-1, 2) << 4).T
        return np.stack([first & 0xFF, first >> 8 | (second & 0xF) << 4, second >> 4], axis=1).astype(np.uint8).tobytes()
    if kind == "RGB8":
        return np.ascontiguousarray(image[..., ::-1]).tobytes()
    mosaic = image[..., 1].copy()  # BayerRG8: red at even rows and columns, blue at odd ones
    mosaic[0::2, 0::2], mosaic[1::2, 1::2] = image[0::2, 0::2, 2], image[1::2, 1::2, 0]
    return mosaic.tobytes()


def _images(data: Path, category: str, count: int) -> list[np.ndarray]:
    files = sorted((data / category / "test").glob("*/*.png"))[:count]
    if files:
        return [cv2.imread(str(f), cv2.IMREAD_COLOR) for f in files]
    from exporter.synthetic import _texture

    textures = [_texture(np.random.default_rng(k), 512) for k in range(count)]
    return [t if t.ndim == 3 else cv2.cvtColor(t, cv2.COLOR_GRAY2BGR) for t in textures]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--category", default="grid")
    ap.add_argument("--sizes", default="1280x1024,2448x2048")
    ap.add_argument("--input", type=int, default=512, help="the model's input side (the default bundle's: 512)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--frames", type=int, default=10)
    args = ap.parse_args(argv)


    from bundle import InputSpec, prepare_image
    from worker.decode import decode, probe, reduction
    from worker.pixels import Pixels, check, lossless_file, to_bgr

    cv2.setNumThreads(1)
    spec = InputSpec.model_construct(width=args.input, height=args.input)  # only its size is read here
    sources = _images(Path(args.data), args.category, args.frames)
    rows = []
    for size in [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]:
        images = [cv2.resize(image, size, interpolation=cv2.INTER_LINEAR) for image in sources]
        for kind in KINDS:
            payloads = [_payload(image, kind) for image in images]
            pixels = None if kind in ("jpeg", "png") else Pixels(kind, size[0], size[1])
            times: dict[str, list[float]] = {"admit": [], "convert": [], "keep": []}
            for _ in range(args.rounds):
                spent = dict.fromkeys(times, 0.0)
                for data in payloads:
                    t0 = time.process_time()
                    zlib.crc32(data)  # what tells a broker's redelivery (worker/pipeline.py, _delivery)
                    header = probe(data, 1 << 30, 1 << 30) if pixels is None else check(data, pixels, 1 << 30, 1 << 30)
                    t1 = time.process_time()
                    image = (decode(data, reduction(header, spec.width, spec.height)) if pixels is None
                             else to_bgr(data, pixels))
                    prepare_image(image, spec)
                    t2 = time.process_time()
                    if pixels is not None:  # a file is kept as sent
                        lossless_file(data, pixels)
                    t3 = time.process_time()
                    spent["admit"] += t1 - t0
                    spent["convert"] += t2 - t1
                    spent["keep"] += t3 - t2
                for key, value in spent.items():
                    times[key].append(value * 1000 / len(payloads))

            def cell(values: list[float]) -> str:
                return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"

            rows.append([f"{size[0]} x {size[1]}", kind, f"{statistics.median(len(p) for p in payloads) / 1e6:.2f}",
                         cell(times["admit"]), cell(times["convert"]), cell(times["keep"])])
    print(f"CPU: {cpu_name()}; OpenCV {cv2.__version__} on the calling thread; model input "
          f"{spec.width} x {spec.height}; {len(sources)} images, {args.rounds} rounds\n")
    print(md_table(["frame", "sent as", "MB", "admission (MQTT thread), CPU ms", "decode or convert + resize "
                    "(inference thread), CPU ms", "kept file (recorder and capture threads), CPU ms"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
