"""MQTT delivery that survives faults, against a real mosquitto: in-flight messages capped at what
paho can track (16-bit packet ids), unacknowledged events spooled to disk and resent after a crash,
a persistent session, and the password taken from a file or the environment and never echoed."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mnet.runtime.sinks import MQTT_PASSWORD_ENV, MqttSink, _Spool
from _faultkit import Broker, mosquitto_binary
from test_runtime_sinks import _ev, _Subscriber

from mnet.errors import ConfigError

TOPIC = "factory/line1/grades"


@pytest.fixture
def broker(tmp_path):
    if mosquitto_binary() is None:
        pytest.skip("mosquitto binary not found (apt-get install mosquitto) — MQTT tests need a real broker")
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


def test_in_flight_messages_are_capped_at_what_paho_can_track(broker):
    with pytest.raises(ConfigError, match="max_inflight"):
        MqttSink(f"mqtt://127.0.0.1:{broker.port}/{TOPIC}", max_inflight=70_000)
    sub = _Subscriber(broker.port, TOPIC)
    sink = MqttSink(f"mqtt://127.0.0.1:{broker.port}/{TOPIC}", max_inflight=4, reconnect_delay_s=(0.1, 0.5),
                    close_timeout_s=15)
    try:
        assert sink.flush(5)
        broker.stop()
        for i in range(1, 31):
            sink.write(_ev(i))
        time.sleep(0.3)
        assert sink.outstanding == 30
        assert len(sink._client._out_messages) <= 4  # the rest waits in our queue, not under paho packet ids
        broker.start()
        sink.close()
        assert sink.unsent == 0 and sink.outstanding == 0
        assert sub.wait_for(30, timeout=15) == set(range(1, 31))
    finally:
        sub.close()


_CRASHING_GRADER = """
import os, sys
sys.path.insert(0, sys.argv[3])
sys.path.append(os.path.join(os.path.dirname(sys.argv[3]), "bench"))  # as conftest does
from test_runtime_sinks import _ev
from mnet.runtime.sinks import MqttSink
sink = MqttSink(f"mqtt://127.0.0.1:{sys.argv[1]}/factory/line1/grades", spool=sys.argv[2],
                reconnect_delay_s=(0.1, 0.5))
for i in range(1, 6):
    sink.write(_ev(i))
assert sink.flush(10)
print("acked", flush=True)
sys.stdin.readline()  # the test stops the broker
for i in range(6, 11):
    sink.write(_ev(i))
print("written", flush=True)
sys.stdin.readline()  # killed here, before any ack
"""


def test_events_unacknowledged_when_the_process_dies_are_resent_on_the_next_start(broker, tmp_path):
    spool = tmp_path / "spool"
    sub = _Subscriber(broker.port, TOPIC)  # persistent session: it gets what the broker takes while it restarts
    proc = subprocess.Popen([sys.executable, "-c", _CRASHING_GRADER, str(broker.port), str(spool),
                             str(Path(__file__).parent)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "acked"
        assert sub.wait_for(5) == set(range(1, 6))
        broker.stop()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "written"
        os.kill(proc.pid, signal.SIGKILL)  # a crash: no close(), nothing acknowledged since the broker left
        proc.wait(10)
        broker.start()

        sink = MqttSink(f"mqtt://127.0.0.1:{broker.port}/{TOPIC}", spool=spool, close_timeout_s=10)
        assert sink.resent == 5  # 1..5 were acknowledged before the crash: not sent again
        sink.close()
        assert sink.unsent == 0
        assert sub.wait_for(10, timeout=15) == set(range(1, 11))
        # at least once: the broker may hand the subscriber a message twice around its restart (QoS 1), but
        # the sink itself published 1..5 once (resent == 5 above), and event_id makes every copy droppable
        unique = {m["event_id"]: m for m in sub.received}
        assert sorted(m["fruit_id"] for m in unique.values()) == list(range(1, 11))
        assert list(spool.iterdir()) == []  # everything acknowledged: the spool is gone
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()


def test_close_with_the_broker_away_keeps_the_events_in_the_spool(broker, tmp_path, caplog):
    uri = f"mqtt://127.0.0.1:{broker.port}/{TOPIC}"
    a = MqttSink(uri, spool=tmp_path, close_timeout_s=5)
    assert a.flush(5)
    assert a._client._clean_session is False  # a persistent session, under a fixed client id
    broker.stop()
    for i in range(1, 4):
        a.write(_ev(i))
    a.close_timeout_s = 0.3
    a.close()
    assert a.unsent == 3 and "resent on the next start" in caplog.text
    broker.start()
    sub = _Subscriber(broker.port, TOPIC)
    try:
        b = MqttSink(uri, spool=tmp_path, close_timeout_s=10)
        assert b.client_id == a.client_id and b.resent == 3
        b.write(_ev(4))
        b.close()
        assert sub.wait_for(4) == {1, 2, 3, 4} and b.unsent == 0
        c = MqttSink(uri, spool=tmp_path, close_timeout_s=1)
        c.close()
        assert c.resent == 0  # nothing left to resend
    finally:
        sub.close()


def test_spool_reads_past_a_torn_line_and_refuses_a_second_process(tmp_path, caplog):
    path = tmp_path / "s.jsonl"
    path.write_text('{"seq": 0, "event": "{\\"fruit_id\\": 1}"}\n{"seq": 1, "event": "{\\"fruit_id\\": 2}"}\n'
                    '{"ack": 0}\n{"seq": 2, "ev')  # a crash tore the last line
    spool = _Spool(path)
    assert spool.recovered == ['{"fruit_id": 2}'] and "unreadable" in caplog.text
    assert [json.loads(x)["seq"] for x in path.read_text().splitlines()] == [0]  # compacted on open
    with pytest.raises(ConfigError, match="in use"):
        _Spool(path)
    spool.ack(0)
    spool.close()
    assert not path.exists()


def test_events_over_the_memory_buffer_wait_in_the_spool_for_the_next_start(tmp_path, caplog):
    with socket.socket() as s:  # a port nobody listens on: the broker is away for the whole run
        s.bind(("127.0.0.1", 0))
        uri = f"mqtt://127.0.0.1:{s.getsockname()[1]}/{TOPIC}"
    a = MqttSink(uri, spool=tmp_path, max_buffer=3, close_timeout_s=0.2)
    for i in range(1, 6):
        a.write(_ev(i))
    assert a.overflowed == 2 and a.outstanding == 5
    assert sum("buffer full" in r.getMessage() for r in caplog.records) == 1  # not one line per event
    a.close()
    assert a.unsent == 5
    b = MqttSink(uri, spool=tmp_path, close_timeout_s=0.2)
    assert b.resent == 5 and [json.loads(p)["fruit_id"] for p in b._spool.recovered] == [1, 2, 3, 4, 5]
    b.close()


def _auth_broker(tmp_path: Path, user: str, password: str) -> Broker:
    if mosquitto_binary() is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto and mosquitto_passwd needed (apt-get install mosquitto)")
    return Broker(tmp_path, user, password)


def test_mqtt_password_from_a_file_the_environment_or_the_uri_and_never_echoed(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    b = _auth_broker(tmp_path, "line1", "secret")
    b.start()
    try:
        sub_broker_port = b.port
        (tmp_path / "pw").write_text("secret\n")
        monkeypatch.setenv(MQTT_PASSWORD_ENV, "secret")
        ways = [({"password_file": tmp_path / "pw"}, "mqtt://line1@127.0.0.1:{}/t"),
                ({}, "mqtt://line1@127.0.0.1:{}/t"),  # from $MNET_MQTT_PASSWORD
                ({}, "mqtt://line1:secret@127.0.0.1:{}/t")]
        for i, (kw, uri) in enumerate(ways, 1):
            sink = MqttSink(uri.format(sub_broker_port), close_timeout_s=5, spool=tmp_path / "spool", **kw)
            sink.write(_ev(i))
            sink.close()
            assert sink.unsent == 0 and sink.acked == 1, uri
            assert "secret" not in sink.uri
        monkeypatch.delenv(MQTT_PASSWORD_ENV)
        wrong = MqttSink(f"mqtt://line1:wrong@127.0.0.1:{sub_broker_port}/t", close_timeout_s=0.5)
        wrong.write(_ev(9))
        wrong.close()
        assert wrong.unsent == 1 and "refused" in caplog.text
        with pytest.raises(ConfigError, match="cannot read"):
            MqttSink(f"mqtt://line1@127.0.0.1:{sub_broker_port}/t", password_file=tmp_path / "missing")
        with pytest.raises(ConfigError, match="needs a user"):
            MqttSink(f"mqtt://127.0.0.1:{sub_broker_port}/t", password_file=tmp_path / "pw")
        assert "secret" not in caplog.text
        assert all("secret" not in r.getMessage() for r in caplog.records)
    finally:
        b.stop()


def test_grading_with_credentials_in_the_source_and_broker_uris_leaks_them_nowhere(broker, tmp_path, caplog):
    import threading

    from mnet.runtime.grader import GradeConfig, grade
    from mnet.runtime.sinks import open_sinks
    from conftest import ByBrightness
    from test_redact import CLASSES, _camera

    from mnet.preprocess import Preprocess

    caplog.set_level(logging.DEBUG)
    sub = _Subscriber(broker.port, TOPIC)
    raw: list[bytes] = []
    sub.c.on_message = lambda c, u, m: (raw.append(m.payload), sub.received.append(json.loads(m.payload)))
    try:
        sinks = open_sinks(events=tmp_path / "e.jsonl", csv_path=tmp_path / "e.csv",
                           mqtt=f"mqtt://line1:secret@127.0.0.1:{broker.port}/{TOPIC}")
        stop, seen = threading.Event(), []

        def on_frame(img, info):
            seen.append(info)
            if len(seen) == 6:
                stop.set()

        summary = grade(ByBrightness(), Preprocess((24, 32)), CLASSES, "rtsp://admin:secret@cam.local/stream",
                        GradeConfig.from_options(full_frame=True), sinks, stop=stop, on_frame=on_frame,
                        capture_factory=_camera(6))
        n = summary.fruit_graded
        assert n > 0 and len(sub.wait_for(n)) == n
        assert {m["source"] for m in sub.received} == {"rtsp://admin:***@cam.local/stream"}
        for text in [b"".join(raw).decode(), (tmp_path / "e.jsonl").read_text(), (tmp_path / "e.csv").read_text(),
                     json.dumps(summary.to_json()), caplog.text, *(r.getMessage() for r in caplog.records)]:
            assert "secret" not in text
    finally:
        sub.close()


def test_grade_cli_with_a_password_file_and_a_spool_echoes_no_secret(broker, colour_data, tmp_path_factory, tmp_path,
                                                                     monkeypatch, capsys):
    import cv2
    import numpy as np
    from test_export_support import exported_bundle

    from mnet.cli import main

    bundle = exported_bundle(colour_data, tmp_path_factory)  # shared with the export tests
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user:secret@shots").mkdir()
    for i in range(3):
        cv2.imwrite(str(tmp_path / "user:secret@shots" / f"{i}.png"), np.full((48, 64, 3), 90 * i, np.uint8))
    (tmp_path / "pw").write_text("secret\n")  # anonymous broker: any password is accepted, none may be echoed
    sub = _Subscriber(broker.port, TOPIC)
    capsys.readouterr()
    try:
        rc = main(["grade", str(bundle), "--source", "file://user:secret@shots", "--full-frame",
                   "--events", "e.jsonl", "--csv", "e.csv", "--summary", "s.json",
                   "--mqtt", f"mqtt://line1@127.0.0.1:{broker.port}/{TOPIC}", "--mqtt-password-file", "pw",
                   "--mqtt-spool", "spool"])
        out = capsys.readouterr()
        assert rc == 0, out.err
        assert "file://user:***@shots" in out.out
        assert sub.wait_for(3) == {1, 2, 3}
        assert not (tmp_path / "spool").exists() or list((tmp_path / "spool").iterdir()) == []
        for text in [out.out, out.err, *(Path(f).read_text() for f in ("e.jsonl", "e.csv", "s.json")),
                     *(json.dumps(m) for m in sub.received)]:
            assert "secret" not in text
    finally:
        sub.close()


def test_with_a_spool_mqtt_is_written_before_the_jsonl(broker, tmp_path):
    from mnet.runtime.sinks import JsonlSink, open_sinks

    uri = f"mqtt://127.0.0.1:{broker.port}/{TOPIC}"
    for spool, first in ((tmp_path / "spool", MqttSink), (None, JsonlSink)):
        sinks = open_sinks(events=tmp_path / f"e{first.__name__}.jsonl", mqtt=uri, mqtt_spool=spool)
        try:
            # a SIGKILL between two writes must not leave a JSONL event that the broker never gets
            assert isinstance(sinks.sinks[0], first)
        finally:
            sinks.close()
