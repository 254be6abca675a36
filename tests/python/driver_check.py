#!/usr/bin/env python3
"""Drives shardgate with psycopg 3 (libpq underneath), a client from another ecosystem.

Usage: driver_check.py "<libpq conninfo through the router>"

Exercises simple queries, server-side parameter binding, forced prepared statements
(`prepare=True`) executed repeatedly and evicted (DEALLOCATE), a transaction rolled
back, COPY in and out with `cursor.copy()` (text and binary), errors and recovery,
pipeline mode, cancel, and several connections in threads (more than the pool size)
running interleaved prepared statements. Prints "OK" at the end; exits non-zero on any
mismatch, with a message saying what was expected and what came back.
"""

import datetime
import decimal
import sys
import threading
import time
import traceback

try:
    import psycopg
    from psycopg import errors, sql
except ImportError as e:  # the Rust test turns this into a clear failure
    print(f"psycopg is not installed ({e}): pip install 'psycopg[binary]'", file=sys.stderr)
    sys.exit(3)

CONNINFO = sys.argv[1] if len(sys.argv) > 1 else ""
THREADS = 10  # more than the router's pool size (4 in the test)
ROUNDS = 40


class Mismatch(Exception):
    pass


def check(what, got, want):
    if got != want:
        raise Mismatch(f"{what}: expected {want!r}, got {got!r}")


def connect(**kw):
    kw.setdefault("autocommit", True)
    return psycopg.connect(CONNINFO, connect_timeout=10, **kw)


def simple_queries(conn):
    # ClientCursor binds client-side and sends the Simple Query protocol, so several
    # statements in one string work.
    cur = psycopg.ClientCursor(conn)
    cur.execute(
        "CREATE TABLE kv (k int PRIMARY KEY, v text, n numeric, d date, b bytea);"
        "INSERT INTO kv VALUES (1, 'one', 1.5, '2024-01-02', '\\x0102');"
        "INSERT INTO kv VALUES (2, NULL, NULL, NULL, NULL)"
    )
    counts = [cur.rowcount]
    while cur.nextset():
        counts.append(cur.rowcount)
    check("rowcounts of the three statements", counts, [-1, 1, 1])
    cur.execute("SELECT k, v FROM kv ORDER BY k; SELECT 42")
    check("first result", cur.fetchall(), [(1, "one"), (2, None)])
    check("second result is there", cur.nextset(), True)
    check("second result", cur.fetchall(), [(42,)])
    # Client-side binding through the simple protocol.
    cur.execute("SELECT %s::text || %s::text", ("it's ", "quoted"))
    check("client-side binding", cur.fetchone(), ("it's quoted",))
    check("empty query", conn.execute("").pgresult.status, psycopg.pq.ExecStatus.EMPTY_QUERY)
    check("server_version", conn.info.server_version // 10000 >= 15, True)
    check("client_encoding", conn.info.parameter_status("client_encoding"), "UTF8")


def server_side_binding(conn):
    row = conn.execute(
        "SELECT v, n, d, b, k * %s FROM kv WHERE k = %s", (10, 1)
    ).fetchone()
    check(
        "bound row",
        row,
        ("one", decimal.Decimal("1.5"), datetime.date(2024, 1, 2), b"\x01\x02", 10),
    )
    # Typed parameters of many kinds, text and binary formats both ways.
    params = (
        None,
        -7,
        2**40,
        3.25,
        decimal.Decimal("12345678901234567890.125"),
        "héllo wörld ✓",
        b"\x00\xff\x10",
        datetime.date(1999, 12, 31),
        [1, 2, 3],
        True,
    )
    q = "SELECT " + ", ".join(["%s"] * len(params))
    check("text round trip", conn.execute(q, params).fetchone(), params)
    qb = "SELECT " + ", ".join(["%b"] * len(params))
    cur = conn.cursor(binary=True)
    check("binary round trip", cur.execute(qb, params).fetchone(), params)
    # Named parameters, repeated.
    check(
        "named parameters",
        conn.execute("SELECT %(a)s::int + %(a)s::int, %(b)s", {"a": 20, "b": "x"}).fetchone(),
        (40, "x"),
    )
    # A large result streams back intact.
    rows = conn.execute(
        "SELECT g, repeat('y', %s) FROM generate_series(1, %s) g", (500, 20000)
    ).fetchall()
    check("large result rows", len(rows), 20000)
    check("large result sum", sum(r[0] + len(r[1]) for r in rows), 20000 * 20001 // 2 + 20000 * 500)
    # executemany (pipelined by psycopg when libpq supports it).
    with conn.cursor() as c:
        c.executemany("INSERT INTO kv (k, v) VALUES (%s, %s)", [(i, f"v{i}") for i in range(100, 150)])
    check(
        "executemany rows",
        conn.execute("SELECT count(*), sum(k) FROM kv WHERE k >= 100").fetchone(),
        (50, sum(range(100, 150))),
    )


def prepared_statements(conn):
    # prepare=True prepares on first use (named statement _pg3_N) and then runs only
    # Bind/Execute with that name: the router must keep the statement alive on whatever
    # backend each autocommit transaction lands on.
    for i in range(60):
        got = conn.execute("SELECT %s::int * 2, %s::text", (i, f"p{i}"), prepare=True).fetchone()
        check(f"prepared round {i}", got, (i * 2, f"p{i}"))
    for i in range(30):
        got = conn.execute(
            "SELECT v FROM kv WHERE k = %s", (100 + i,), prepare=True
        ).fetchone()
        check(f"prepared lookup {i}", got, (f"v{100 + i}",))
    # Evictions: with a tiny cache psycopg sends DEALLOCATE for statements it drops,
    # then prepares them again under new names.
    conn.prepared_max = 3
    for rnd in range(4):
        for j in range(6):
            q = sql.SQL("SELECT %s::int + {}").format(sql.Literal(j))
            got = conn.execute(q, (rnd,), prepare=True).fetchone()
            check(f"evicted statement {j} round {rnd}", got, (rnd + j,))
    conn.prepared_max = 100
    # The same prepared statement inside an explicit transaction.
    with conn.transaction():
        for i in range(10):
            got = conn.execute("SELECT %s::int * 2, %s::text", (i, "t"), prepare=True).fetchone()
            check(f"prepared in transaction {i}", got, (i * 2, "t"))


def transaction_rollback(conn):
    conn.execute("CREATE TABLE acct (id int PRIMARY KEY, bal int NOT NULL)")
    conn.execute("INSERT INTO acct VALUES (1, 100), (2, 100)")
    # Explicit rollback on a non-autocommit connection.
    with connect(autocommit=False) as c2:
        c2.execute("UPDATE acct SET bal = bal - 50 WHERE id = 1")
        c2.execute("UPDATE acct SET bal = bal + 50 WHERE id = 2")
        check("inside the transaction", c2.execute("SELECT sum(bal), min(bal) FROM acct").fetchone(), (200, 50))
        check("transaction status", c2.info.transaction_status, psycopg.pq.TransactionStatus.INTRANS)
        c2.rollback()
        check("status after rollback", c2.info.transaction_status, psycopg.pq.TransactionStatus.IDLE)
    check("rolled back", conn.execute("SELECT bal FROM acct ORDER BY id").fetchall(), [(100,), (100,)])
    # conn.transaction() with psycopg.Rollback, and a nested savepoint rolled back.
    with conn.transaction() as tx:
        conn.execute("UPDATE acct SET bal = 0 WHERE id = 1")
        raise psycopg.Rollback(tx)
    with conn.transaction():
        conn.execute("UPDATE acct SET bal = bal + 1 WHERE id = 1")
        try:
            with conn.transaction():  # SAVEPOINT
                conn.execute("UPDATE acct SET bal = bal + 1000 WHERE id = 2")
                conn.execute("SELECT 1/0")
        except errors.DivisionByZero:
            pass
    check("savepoint rolled back", conn.execute("SELECT bal FROM acct ORDER BY id").fetchall(), [(101,), (100,)])


def copy_in_out(conn):
    conn.execute("CREATE TABLE items (id int, name text, price numeric)")
    want = [(i, f"item\t{i}\n" if i % 7 == 0 else f"item {i}", decimal.Decimal(i) / 4) for i in range(3000)]
    want.append((-1, None, None))
    with conn.cursor() as cur:
        with cur.copy("COPY items (id, name, price) FROM STDIN") as cp:
            for r in want:
                cp.write_row(r)
        check("copy in rowcount", cur.rowcount, len(want))
        # Raw text blocks too.
        with cur.copy("COPY items FROM STDIN") as cp:
            cp.write("5000\tfrom block\t1.5\n5001\t\\N\t\\N\n")
        check("copy block rowcount", cur.rowcount, 2)
        # COPY out, rows parsed by psycopg.
        got = []
        with cur.copy("COPY (SELECT id, name, price FROM items WHERE id < 5000 ORDER BY id) TO STDOUT") as cp:
            cp.set_types(["int4", "text", "numeric"])
            for row in cp.rows():
                got.append(row)
        check("copy out rows", got, sorted(want))
        # COPY out raw.
        raw = b""
        with cur.copy("COPY (SELECT id, name FROM items WHERE id >= 5000 ORDER BY id) TO STDOUT") as cp:
            for block in cp:
                raw += bytes(block)
        check("copy out raw", raw, b"5000\tfrom block\n5001\t\\N\n")
        # Binary COPY both ways.
        conn.execute("CREATE TABLE items2 (LIKE items)")
        with cur.copy("COPY items2 FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(["int4", "text", "numeric"])
            for r in want:
                cp.write_row(r)
        got = []
        with cur.copy("COPY (SELECT * FROM items2 ORDER BY id) TO STDOUT (FORMAT BINARY)") as cp:
            cp.set_types(["int4", "text", "numeric"])
            got = list(cp.rows())
        check("binary copy round trip", got, sorted(want))
        # A COPY that fails on the server mid-stream leaves the connection usable.
        try:
            with cur.copy("COPY items (id) FROM STDIN") as cp:
                cp.write("1\nnot a number\n2\n")
            raise Mismatch("bad COPY data was accepted")
        except errors.InvalidTextRepresentation:
            pass
        check("after failed copy", conn.execute("SELECT count(*) FROM items").fetchone(), (len(want) + 2,))
        # A COPY the client aborts (exception inside the block sends CopyFail).
        try:
            with cur.copy("COPY items (id) FROM STDIN") as cp:
                cp.write_row((77777,))
                raise RuntimeError("client gives up")
        except errors.QueryCanceled:
            pass  # psycopg reports the server's answer to CopyFail
        except RuntimeError:
            pass
        check("aborted copy wrote nothing", conn.execute("SELECT count(*) FROM items WHERE id = 77777").fetchone(), (0,))


def errors_and_recovery(conn):
    try:
        conn.execute("SELECT 1/0")
        raise Mismatch("division by zero succeeded")
    except errors.DivisionByZero as e:
        check("sqlstate", e.sqlstate, "22012")
    try:
        conn.execute("SELECT * FROM no_such_table")
        raise Mismatch("missing table was found")
    except errors.UndefinedTable as e:
        check("sqlstate", e.sqlstate, "42P01")
        check("error message", e.diag.message_primary, 'relation "no_such_table" does not exist')
    try:
        conn.execute("SELECT %s::int", ("abc",), prepare=True)
        raise Mismatch("bad parameter accepted")
    except errors.InvalidTextRepresentation:
        pass
    check("after errors", conn.execute("SELECT 'fine'").fetchone(), ("fine",))
    # An error inside a transaction aborts it until rollback.
    with connect(autocommit=False) as c2:
        c2.execute("SELECT 1")
        try:
            c2.execute("INSERT INTO acct VALUES (1, 0)")  # duplicate key
            raise Mismatch("duplicate key accepted")
        except errors.UniqueViolation as e:
            check("sqlstate", e.sqlstate, "23505")
        check("status", c2.info.transaction_status, psycopg.pq.TransactionStatus.INERROR)
        try:
            c2.execute("SELECT 1")
            raise Mismatch("statement ran in an aborted transaction")
        except errors.InFailedSqlTransaction:
            pass
        c2.rollback()
        check("after rollback", c2.execute("SELECT 2").fetchone(), (2,))
        c2.commit()
    # A syntax error while a prepared statement is being prepared.
    try:
        conn.execute("SELEKT %s", (1,), prepare=True)
        raise Mismatch("syntax error accepted")
    except errors.SyntaxError:
        pass
    check("prepared after error", conn.execute("SELECT %s::int * 2, %s::text", (5, "e"), prepare=True).fetchone(), (10, "e"))


def pipeline_mode(conn):
    with conn.pipeline():
        curs = [conn.execute("SELECT %s::int + 1", (i,), prepare=(i % 2 == 0)) for i in range(50)]
    check("pipeline results", [c.fetchone()[0] for c in curs], list(range(1, 51)))
    # An error in a pipeline fails that query, and the pipeline recovers after the sync.
    try:
        with conn.pipeline():
            conn.execute("SELECT 1")
            conn.execute("SELECT 1/0")
            conn.execute("SELECT 2")
        raise Mismatch("pipeline error swallowed")
    except errors.DivisionByZero:
        pass
    check("after pipeline error", conn.execute("SELECT 3").fetchone(), (3,))


def cancel_query():
    with connect() as c:
        def later():
            time.sleep(0.5)
            c.cancel_safe(timeout=10)

        t = threading.Thread(target=later)
        t.start()
        start = time.monotonic()
        try:
            c.execute("SELECT pg_sleep(20)")
            raise Mismatch("pg_sleep was not cancelled")
        except errors.QueryCanceled as e:
            check("cancel sqlstate", e.sqlstate, "57014")
        t.join()
        elapsed = time.monotonic() - start
        if elapsed > 10:
            raise Mismatch(f"cancel took {elapsed:.1f}s")
        check("after cancel", c.execute("SELECT 'alive'").fetchone(), ("alive",))


def threaded_prepared():
    failures = []
    barrier = threading.Barrier(THREADS)

    def worker(n):
        try:
            with connect() as c:
                barrier.wait(timeout=30)
                for r in range(ROUNDS):
                    # Several prepared statements per connection, interleaved, same SQL
                    # text across connections (same psycopg statement names, too).
                    a = c.execute("SELECT %s::int * 2, %s::text", (n * 1000 + r, f"t{n}"), prepare=True).fetchone()
                    check(f"thread {n} round {r} a", a, ((n * 1000 + r) * 2, f"t{n}"))
                    b = c.execute("SELECT v FROM kv WHERE k = %s", (100 + (n + r) % 50,), prepare=True).fetchone()
                    check(f"thread {n} round {r} b", b, (f"v{100 + (n + r) % 50}",))
                    if r % 5 == 0:
                        with c.transaction():
                            c.execute("UPDATE acct SET bal = bal + 1 WHERE id = 1", prepare=True)
                            c.execute("UPDATE acct SET bal = bal - 1 WHERE id = 2", prepare=True)
                            s = c.execute("SELECT sum(bal) FROM acct", prepare=True).fetchone()
                            check(f"thread {n} round {r} sum", s, (201,))
                    q = sql.SQL("SELECT %s::int + {}").format(sql.Literal(n))
                    d = c.execute(q, (r,), prepare=True).fetchone()
                    check(f"thread {n} round {r} d", d, (r + n,))
        except Exception:
            failures.append(f"thread {n}:\n{traceback.format_exc()}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        if t.is_alive():
            failures.append("a thread did not finish within 60 s")
    if failures:
        raise Mismatch("\n".join(failures))
    with connect() as c:
        check("balance after threads", c.execute("SELECT bal FROM acct ORDER BY id").fetchall(),
              [(101 + THREADS * (ROUNDS // 5),), (100 - THREADS * (ROUNDS // 5),)])


def main():
    if not CONNINFO:
        print("usage: driver_check.py CONNINFO", file=sys.stderr)
        return 2
    steps = [
        ("simple queries", simple_queries),
        ("server-side binding", server_side_binding),
        ("prepared statements", prepared_statements),
        ("transaction rollback", transaction_rollback),
        ("copy in and out", copy_in_out),
        ("errors and recovery", errors_and_recovery),
        ("pipeline mode", pipeline_mode),
    ]
    with connect() as conn:
        for name, step in steps:
            try:
                step(conn)
            except Exception:
                print(f"FAILED in {name}:\n{traceback.format_exc()}", file=sys.stderr)
                return 1
            print(f"ok: {name}")
    for name, step in [("cancel", cancel_query), ("threads", threaded_prepared)]:
        try:
            step()
        except Exception:
            print(f"FAILED in {name}:\n{traceback.format_exc()}", file=sys.stderr)
            return 1
        print(f"ok: {name}")
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
