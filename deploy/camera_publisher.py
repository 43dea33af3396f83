#!/usr/bin/env python3
"""A camera stand-in: publishes images from a folder (or frames of a video / webcam) as MQTT v5 frames.

Adapt it to your camera: every frame goes to <prefix>/<camera>/frame with the user
properties frame_id and captured_at that the worker requires.  Needs only
paho-mqtt and OpenCV.

    python deploy/camera_publisher.py --port 1883 --camera line1 --folder images/ --fps 5
    python deploy/camera_publisher.py --camera line2 --video /dev/video0 --fps 2 --jpeg-quality 90
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import cv2
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


def folder_frames(folder: Path, pattern: str):
    """(frame id, bytes) for each image file, id = parent folder + file stem (e.g. broken_003)."""
    for path in sorted(p for p in folder.glob(pattern) if p.suffix.lower() in SUFFIXES):
        yield f"{path.parent.name}_{path.stem}", path.read_bytes()


def video_frames(source: str, quality: int):
    capture = cv2.VideoCapture(int(source) if source.isdigit() else source)
    if not capture.isOpened():
        raise SystemExit(f"cannot open video source {source}")
    for seq in itertools.count():
        ok, frame = capture.read()
        if not ok:
            return
        yield f"{seq:08d}", cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--prefix", default="inspect")
    parser.add_argument("--camera", required=True)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", type=Path)
    src.add_argument("--video", help="file, URL or webcam index")
    parser.add_argument("--glob", default="**/*", help="file pattern under --folder")
    parser.add_argument("--fps", type=float, default=5, help="frames per second (0 = as fast as the broker takes them)")
    parser.add_argument("--limit", type=int, default=0, help="stop after this many frames (0 = all)")
    parser.add_argument("--loop", action="store_true", help="repeat the folder forever")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--username")
    parser.add_argument("--password")
    parser.add_argument("--cafile", help="CA certificate: connect with TLS")
    parser.add_argument("--certfile")
    parser.add_argument("--keyfile")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"camera-{args.camera}", protocol=mqtt.MQTTv5)
    if args.username:
        client.username_pw_set(args.username, args.password)
    if args.cafile:
        client.tls_set(ca_certs=args.cafile, certfile=args.certfile, keyfile=args.keyfile)
    client.connect(args.host, args.port)
    client.loop_start()
    topic = f"{args.prefix}/{args.camera}/frame"
    if args.folder:
        frames = folder_frames(args.folder, args.glob)
        if args.loop:
            frames = itertools.chain.from_iterable(folder_frames(args.folder, args.glob) for _ in itertools.count())
    else:
        frames = video_frames(args.video, args.jpeg_quality)
    period = 1 / args.fps if args.fps > 0 else 0
    sent = 0
    next_at = time.monotonic()
    for frame_id, data in frames:
        if args.limit and sent >= args.limit:
            break
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("frame_id", frame_id), ("captured_at", f"{time.time():.3f}")]
        client.publish(topic, data, qos=1, properties=props).wait_for_publish(30)
        sent += 1
        if not args.quiet:
            print(f"sent {frame_id} ({len(data)} bytes)", flush=True)
        if period:
            next_at += period
            time.sleep(max(0.0, next_at - time.monotonic()))
    client.loop_stop()
    client.disconnect()
    print(f"published {sent} frames to {topic}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
