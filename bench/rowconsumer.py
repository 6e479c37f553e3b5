"""The consumer a user would write first: paho-mqtt, one INSERT (and commit) per message.

``python -m bench.rowconsumer --broker mqtt://H:P --db postgresql://...`` subscribes to
``fleet/#`` (QoS 1) and inserts each message as one row of ``row_records`` (node, seq,
payload; duplicates dropped by its primary key).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

import paho.mqtt.client as mqtt
import psycopg

from edge.mqtt import parse_url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rowconsumer", description=__doc__)
    p.add_argument("--broker", required=True)
    p.add_argument("--db", required=True)
    a = p.parse_args(argv)
    db = psycopg.connect(a.db, autocommit=True)
    db.execute("CREATE TABLE IF NOT EXISTS row_records (node text NOT NULL, seq bigint NOT NULL,"
               " payload jsonb NOT NULL, ts timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (node, seq))")
    stop = threading.Event()

    def on_message(_c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        _, node, seq = m.topic.split("/")
        db.execute("INSERT INTO row_records (node, seq, payload) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                   (node, int(seq), m.payload.decode()))

    def on_connect(c: mqtt.Client, *_: object) -> None:
        c.subscribe("fleet/#", qos=1)

    def on_subscribe(*_: object) -> None:
        print("consuming", flush=True)

    u = parse_url(a.broker)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="rowconsumer", clean_session=False)
    c.on_message, c.on_connect, c.on_subscribe = on_message, on_connect, on_subscribe
    c.connect(u.host, u.port, keepalive=30)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    c.loop_start()
    stop.wait()
    c.loop_stop()
    c.disconnect()
    db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
