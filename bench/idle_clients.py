#!/usr/bin/env python3
"""Open N idle Postgres client connections that complete startup (trust auth) and keep them.

Usage: idle_clients.py HOST PORT N READY_FILE [CONCURRENCY]

Each connection sends a v3 StartupMessage (user=postgres, database=postgres), reads until
ReadyForQuery ('Z'), then stays open and idle. When all N are ready, writes a JSON summary to
READY_FILE and sleeps until SIGTERM/SIGINT, then closes every socket.
"""
import asyncio, json, resource, signal, struct, sys, time

HOST, PORT, N, READY = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
CONC = int(sys.argv[5]) if len(sys.argv) > 5 else 200

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
want = 65536
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
except (ValueError, OSError):
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def startup_message(user="postgres", database="postgres"):
    body = struct.pack("!I", 196608)  # protocol 3.0
    for k, v in (("user", user), ("database", database), ("application_name", "idle_bench")):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


MSG = startup_message()


async def open_one(sem, writers, errors):
    async with sem:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, PORT), 30)
            writer.write(MSG)
            await writer.drain()
            while True:
                hdr = await asyncio.wait_for(reader.readexactly(5), 30)
                typ, ln = hdr[:1], struct.unpack("!I", hdr[1:])[0]
                body = await reader.readexactly(ln - 4)
                if typ == b"R" and struct.unpack("!I", body[:4])[0] != 0:
                    raise RuntimeError(f"unexpected auth request {struct.unpack('!I', body[:4])[0]}")
                if typ == b"E":
                    raise RuntimeError("ErrorResponse: " + body.decode(errors="replace"))
                if typ == b"Z":
                    break
            writers.append(writer)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))


async def main():
    sem = asyncio.Semaphore(CONC)
    writers, errors = [], []
    t0 = time.monotonic()
    await asyncio.gather(*(open_one(sem, writers, errors) for _ in range(N)))
    elapsed = time.monotonic() - t0
    summary = {"requested": N, "ready": len(writers), "errors": len(errors),
               "first_errors": errors[:5], "seconds": round(elapsed, 2)}
    with open(READY + ".tmp", "w") as f:
        json.dump(summary, f)
    import os
    os.replace(READY + ".tmp", READY)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    await stop.wait()
    for w in writers:
        w.transport.abort()


asyncio.run(main())
