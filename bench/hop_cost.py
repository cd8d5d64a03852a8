"""What one hop between processes costs on this machine, alone and in batches.

taskmode's CPU per task is mostly the price of its messages: every message from one process to
another wakes the receiver, and on a virtual machine a wakeup is dear. This prints:
- a round trip over a loopback TCP socket between two processes, one message at a time: CPU
  per round trip on each side;
- the same messages written back to back (no wait for the answer): CPU per message;
- JetStream appends on the event stream, one at a time (each waits for its acknowledgement)
  and with many in flight: CPU per append of nats-server and of the client;
- a filtered consumer reading those events, one fetch per message and in batches of 256.
Divide a task's messages (about 23 through nats-server, see README "Performance") by these to
see how much of the CPU per task is hops rather than work. Asserts nothing.
Run: `python -m bench.hop_cost`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import tempfile
import time
from pathlib import Path

import nats
import psutil
from nats.js.api import AckPolicy, ConsumerConfig

from shared import wire
from shared.devstack import start_nats
from shared.eventstore import ensure_stream

PAYLOAD = b"x" * 200


def _child(listener: socket.socket, *, echo: bool) -> None:
    connection, _ = listener.accept()
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := connection.recv(65536):
        if echo:
            connection.sendall(data)
    os._exit(0)


def _connect_to_child(*, echo: bool) -> tuple[socket.socket, int]:
    listener = socket.create_server(("127.0.0.1", 0))
    pid = os.fork()
    if pid == 0:
        _child(listener, echo=echo)
    address = listener.getsockname()
    listener.close()
    client = socket.create_connection(address)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, pid


def socket_figures(count: int) -> tuple[float, float, float]:
    """(client µs, echo process µs) of CPU per round trip, and client µs per message written
    back to back, over loopback TCP."""
    client, pid = _connect_to_child(echo=True)
    echo = psutil.Process(pid)
    echo_before, before = sum(echo.cpu_times()[:2]), time.process_time()
    for _ in range(count):
        client.sendall(PAYLOAD)
        received = 0
        while received < len(PAYLOAD):
            received += len(client.recv(65536))
    round_trip = (time.process_time() - before) / count * 1e6
    echo_round_trip = (sum(echo.cpu_times()[:2]) - echo_before) / count * 1e6
    client.close()
    os.waitpid(pid, 0)
    client, pid = _connect_to_child(echo=False)  # a reader that answers nothing
    before = time.process_time()
    for _ in range(count):
        client.sendall(PAYLOAD)
    streamed = (time.process_time() - before) / count * 1e6
    client.close()
    os.waitpid(pid, 0)
    return round_trip, echo_round_trip, streamed


async def jetstream_figures(count: int) -> list[tuple[str, float, float]]:
    """(what, nats-server µs, client µs) of CPU per message, for appends and reads."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = start_nats(Path(tmp))
        try:
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            await ensure_stream(js)
            processes = {"server": psutil.Process(server.process.pid), "client": psutil.Process()}

            def used() -> dict[str, float]:
                return {name: sum(p.cpu_times()[:2]) for name, p in processes.items()}

            def row(what: str, before: dict[str, float], messages: int) -> None:
                after = used()
                rows.append((what, (after["server"] - before["server"]) / messages * 1e6,
                             (after["client"] - before["client"]) / messages * 1e6))

            def subject(prefix: str, i: int, status: str) -> str:
                return f"taskmode.events.0.bench.{prefix}{i:07d}.{status}"

            before = used()
            for i in range(count):
                await js.publish(subject("one", i, "Processed"), PAYLOAD, stream=wire.EVENT_STREAM)
            row("append, one at a time", before, count)
            before = used()
            for start in range(0, count, 256):
                await asyncio.gather(*(js.publish(subject("many", i, "Processed"), PAYLOAD, stream=wire.EVENT_STREAM)
                                       for i in range(start, min(count, start + 256))))
            row("append, 256 in flight", before, count)
            for label, batch in (("read, one fetch per message", 1), ("read, fetches of 256", 256)):
                durable = f"hops{batch}"
                await js.add_consumer(wire.EVENT_STREAM, ConsumerConfig(
                    durable_name=durable, filter_subject="taskmode.events.*.bench.*.Processed",
                    ack_policy=AckPolicy.EXPLICIT))
                sub = await js.pull_subscribe_bind(durable=durable, stream=wire.EVENT_STREAM)
                before = used()
                read = 0
                while read < 2 * count:
                    msgs = await sub.fetch(batch, timeout=5)
                    for msg in msgs:
                        await msg.ack()
                    read += len(msgs)
                row(label + ", each acked", before, read)
            await nc.close()
        finally:
            server.stop()
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=5000)
    args = parser.parse_args()
    round_trip, echo_round_trip, streamed = socket_figures(args.messages)
    print(f"== one hop between two processes, loopback TCP ({args.messages} messages; load average "
          f"{os.getloadavg()[0]:.2f}) ==")
    print(f"round trip, one at a time: {round_trip:6.1f} µs CPU sender + {echo_round_trip:6.1f} µs echo process")
    print(f"written back to back:      {streamed:6.1f} µs CPU per message")
    print(f"== JetStream, the event stream ({args.messages} per row) ==")
    print(f"{'':42s} {'nats-server':>12s} {'client':>8s}  (µs CPU per message)")
    for what, server_us, client_us in await jetstream_figures(args.messages):
        print(f"{what:42s} {server_us:12.1f} {client_us:8.1f}")


if __name__ == "__main__":
    asyncio.run(main())
