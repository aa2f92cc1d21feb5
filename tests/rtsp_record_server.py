"""The far end of `mnet grade --save rtsp://HOST:PORT/PATH` in the tests: an RTSP server (GStreamer's
gst-rtsp-server) that accepts one published H.264 stream (RECORD, what rtspclientsink does) and writes it
as an Annex-B byte stream to a file. On a line this is mediamtx or a DeepStream RTSP server.

Runs under an interpreter with PyGObject (Debian's python3-gi, gir1.2-gst-rtsp-server-1.0), not the venv:

    python3 tests/rtsp_record_server.py PATH OUT.h264      # prints the bound port, then serves until killed
"""

from __future__ import annotations

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main() -> None:
    path, out = sys.argv[1], sys.argv[2]
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service("0")  # any free port: printed below for the test to connect to
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_transport_mode(GstRtspServer.RTSPTransportMode.RECORD)
    factory.set_launch(f"( rtph264depay name=depay0 ! h264parse ! video/x-h264,stream-format=byte-stream "
                       f"! filesink location={out} )")
    server.get_mount_points().add_factory("/" + path.strip("/"), factory)
    server.attach(None)
    print(server.get_bound_port(), flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
