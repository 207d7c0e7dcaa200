"""Reading a store while `blkrewind serve` holds it: the local query socket and its client.

DuckDB lets one process write a database file, and a writer excludes every reader. While the
server runs, it listens on ``STORE/serve.sock`` (0600, in the 0700 store directory; removed on
exit). `sql`, `restore`, `status` and `verify` open a store with `open_for_reading(path)`: the
normal read-only `Store` when no server runs, else a `RemoteStore`: both offer the reading
interface of replayer/store.py (StoreReader); a RemoteStore's queries are run by the server on
its own DuckDB cursor, inside a READ ONLY transaction, and come back as an Arrow IPC stream.
Payload (Parquet) files are read directly by the client.

Only one statement per request, and only SELECT-like statements (SELECT, WITH ... SELECT,
DESCRIBE, SHOW, SUMMARIZE: duckdb.extract_statements type SELECT); file access is off in the
server's database (`enable_external_access = false`, set when the socket starts), so a query
cannot read files either.

Socket protocol (local, one request per connection): request ``u32 length, JSON`` --
``{"op": "sql", "sql": S, "params": list|dict|null, "views": bool}``, ``{"op": "status"}`` or
``{"op": "prune", "device", "keep_ns", "keep_marks", "jobs", "now_ns"}`` (the one writing
request: run by the server with its own store, answered with the result; the cutoff is
now_ns - keep_ns, now_ns the client's time of asking, never later than the server's clock);
answer ``u32 length, JSON {"ok": bool, "error": str, ...}`` and, for a successful sql request,
an Arrow IPC stream of the result until the end of the connection.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from blkrewind.errors import StoreError, UserError
from blkrewind.replayer.store import Store, StoreReader, default_wait

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

SOCK = "serve.sock"
_U32 = struct.Struct("<I")
MAX_REQUEST = 16 << 20
ARROW_BATCH = 1 << 16


def sock_path(store_dir) -> str:
    return os.path.join(os.path.abspath(os.fspath(store_dir)), SOCK)


def _send_msg(sock, obj: dict) -> None:
    b = json.dumps(obj, default=str).encode()
    sock.sendall(_U32.pack(len(b)) + b)


def _recv_exact(f, n: int) -> bytes:
    b = f.read(n)
    if b is None or len(b) != n:
        raise EOFError("connection closed")
    return b


def _recv_msg(f, limit: int = MAX_REQUEST) -> dict:
    n = _U32.unpack(_recv_exact(f, 4))[0]
    if n > limit:
        raise ValueError(f"message of {n} bytes")
    obj = json.loads(_recv_exact(f, n))
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj


def one_line(e: BaseException) -> str:
    lines = []
    for ln in str(e).splitlines():
        if ln.startswith("LINE ") or ln.strip().startswith("^"):
            break
        if ln.strip():
            lines.append(ln.strip())
    return " ".join(lines) or type(e).__name__


def check_read_only(sql: str) -> None:
    """UserError unless sql is exactly one SELECT-like statement."""
    import duckdb

    try:
        stmts = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise UserError(f"SQL: {one_line(e)}") from None
    if len(stmts) != 1:
        raise UserError(f"SQL: give exactly one statement ({len(stmts)} given)")
    t = stmts[0].type
    if t != duckdb.StatementType.SELECT:
        raise UserError(f"SQL: only queries are allowed on a served store "
                        f"({t.name} statements are refused)")


# ------------------------------------------------------------------------------ server
class QueryServer:
    """The server side: accepts local connections on STORE/serve.sock, one thread each."""

    def __init__(self, store: Store, *, status=None, log=print, max_clients: int = 16,
                 on_restored=None, views=None):
        self.store = store
        self.views = views              # (cursor) -> ..., for {"views": true}: the SQL views
                                        # (analytics.views.define_views, given by `serve`)
        self.path = sock_path(store.path)
        self.status = status            # () -> dict, for {"op": "status"}
        self.on_restored = on_restored  # (device, nbytes, seconds): a restore's note (metrics)
        self.log = log
        self._sem = threading.BoundedSemaphore(max_clients)
        self._sock: socket.socket | None = None
        self._root: duckdb.DuckDBPyConnection | None = None   # Store.query_cursor()
        self._root_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closing = False

    def start(self) -> None:
        # no file access for anything run in this database from now on (global setting)
        self._root = self.store.query_cursor()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        s.listen(16)
        self._sock = s
        self._thread = threading.Thread(target=self._accept, name="query-accept", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        if self._thread is not None:
            self._thread.join(5)
        if self._root is not None:
            try:
                self._root.close()
            except Exception:
                pass
            self._root = None

    def _accept(self) -> None:
        sock = self._sock
        if sock is None:   # closed before this thread ran
            return
        while not self._closing:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            if not self._allowed(conn):
                conn.close()
                continue
            if not self._sem.acquire(timeout=5):
                _try_send(conn, {"ok": False, "error": "the server is busy with other queries"})
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="query",
                             daemon=True).start()

    @staticmethod
    def _allowed(conn) -> bool:
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
        except OSError:
            return False
        return uid in (0, os.getuid())

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(30)
                f = conn.makefile("rb")
                try:
                    req = _recv_msg(f)
                except (OSError, ValueError, EOFError) as e:
                    _try_send(conn, {"ok": False, "error": f"bad request: {e}"})
                    return
                conn.settimeout(None)
                op = req.get("op")
                if op == "status":
                    try:
                        st = self.status() if self.status else {}
                    except Exception as e:
                        _try_send(conn, {"ok": False, "error": f"{type(e).__name__}: {e}"})
                        return
                    _try_send(conn, {"ok": True, "status": st})
                elif op == "sql":
                    self._sql(conn, req)
                elif op == "prune":
                    self._prune(conn, req)
                elif op == "restored":
                    self._restored(conn, req)
                else:
                    _try_send(conn, {"ok": False, "error": f"unknown request {op!r}"})
        finally:
            self._sem.release()

    def _restored(self, conn: socket.socket, req: dict) -> None:
        """A finished `blkrewind restore` of this store says what it wrote (the metrics'
        restore bytes): counted for devices the store has."""
        dev, nbytes, secs = req.get("device"), req.get("bytes"), req.get("seconds")
        if not (isinstance(dev, str) and isinstance(nbytes, int) and nbytes >= 0
                and isinstance(secs, (int, float)) and secs >= 0):
            _try_send(conn, {"ok": False, "error": "bad restored note"})
            return
        known = {d.device for d in self.store.devices()}
        if dev not in known:
            _try_send(conn, {"ok": False, "error": f"no device {dev[:128]!r} in the store"})
            return
        if self.on_restored is not None:
            self.on_restored(dev, nbytes, float(secs))
        _try_send(conn, {"ok": True})

    def _prune(self, conn: socket.socket, req: dict) -> None:
        """`blkrewind prune` while the server holds the store: run here, in this process, with
        the server's store (replayer/prune.py takes the store mutex for its reads and its one
        transaction; frames keep being stored meanwhile). One prune at a time, never during the
        payload integrity check (replayer/integrity.py MAINTENANCE)."""
        from dataclasses import asdict

        from blkrewind.replayer.prune import prune

        dev, keep_ns = req.get("device"), req.get("keep_ns")
        keep_marks, jobs = req.get("keep_marks", False), req.get("jobs", 2)
        now_ns = req.get("now_ns", time.time_ns())
        if not (isinstance(dev, str) and isinstance(keep_ns, int) and keep_ns >= 0
                and isinstance(keep_marks, bool) and isinstance(jobs, int) and 1 <= jobs <= 64
                and isinstance(now_ns, int)):
            _try_send(conn, {"ok": False, "error": "bad prune request"})
            return
        from blkrewind.replayer.integrity import MAINTENANCE
        if not MAINTENANCE.acquire(timeout=3600):
            _try_send(conn, {"ok": False, "error": "the store's integrity check or another "
                                                   "prune did not finish within an hour"})
            return
        try:
            device = self.store.find_device(dev)
            # "keep the last DURATION" as of the request, however long it waited for the lock
            res = prune(self.store, device, keep_ns=keep_ns, keep_marks=keep_marks, jobs=jobs,
                        now_ns=min(now_ns, time.time_ns()))
        except (UserError, StoreError) as e:
            _try_send(conn, {"ok": False, "error": str(e)})
            return
        except Exception as e:  # logged; the server goes on (prune is crash-safe)
            self.log(f"prune of {dev} failed: {type(e).__name__}: {one_line(e)}")
            _try_send(conn, {"ok": False, "error": f"prune failed: {type(e).__name__}: "
                                                   f"{one_line(e)}"})
            return
        finally:
            MAINTENANCE.release()
        if res.point is not None:
            self.log(f"pruned {device.device} up to stamp {res.point}: {res.records} records, "
                     f"{res.files_deleted} payload files deleted")
        _try_send(conn, {"ok": True, "device": device.device, "result": asdict(res)})

    def _cursor(self):
        with self._root_lock:
            if self._root is None:
                raise StoreError("the server is shutting down")
            return self._root.cursor()

    def _sql(self, conn: socket.socket, req: dict) -> None:
        import duckdb

        sql, params = req.get("sql"), req.get("params")
        if not isinstance(sql, str) or not (params is None or isinstance(params, (list, dict))):
            _try_send(conn, {"ok": False, "error": "bad sql request"})
            return
        try:
            check_read_only(sql)
            cur = self._cursor()
        except UserError as e:
            _try_send(conn, {"ok": False, "error": str(e)})
            return
        try:
            try:
                if req.get("views"):
                    if self.views is None:
                        raise UserError("SQL: this server does not define the SQL views")
                    self.views(cur)
                cur.execute("BEGIN TRANSACTION READ ONLY")
                rel = cur.sql(sql, params=params) if params else cur.sql(sql)
                desc = rel.description if rel is not None else None
                reader = rel.to_arrow_reader(ARROW_BATCH) if desc is not None else None
                first = next(iter(reader), None) if reader is not None else None
            except duckdb.Error as e:
                _try_send(conn, {"ok": False, "error": f"SQL: {one_line(e)}"})
                return
            except UserError as e:
                _try_send(conn, {"ok": False, "error": str(e)})
                return
            head = {"ok": True,
                    "description": None if desc is None else [[d[0], str(d[1])] for d in desc]}
            try:
                _send_msg(conn, head)
                if reader is not None:
                    import pyarrow as pa
                    import pyarrow.ipc  # noqa: F401  (pa.ipc)
                    with conn.makefile("wb") as out, \
                            pa.ipc.new_stream(out, reader.schema) as w:
                        if first is not None:
                            w.write_batch(first)
                        for batch in reader:
                            w.write_batch(batch)
            except (OSError, ValueError):
                return  # the client went away
            except duckdb.Error as e:
                self.log(f"query socket: query failed while streaming: {one_line(e)}")
        finally:
            try:
                cur.close()
            except Exception:
                pass


def _try_send(conn, obj: dict) -> None:
    try:
        _send_msg(conn, obj)
    except OSError:
        pass


# ------------------------------------------------------------------------------ client
class RemoteResult:
    """A query result fetched from the server (RemoteStore's primitives read it)."""

    def __init__(self, description, table: pa.Table | None):
        self.description = description
        self._table = table
        self._rows: list[tuple] | None = None
        self._pos = 0

    def _all_rows(self) -> list[tuple]:
        if self._rows is None:
            t = self._table
            self._rows = [] if t is None else list(zip(*[c.to_pylist() for c in t.columns])) \
                if t.num_columns else [()] * t.num_rows
        return self._rows

    def fetchall(self) -> list[tuple]:
        rows = self._all_rows()[self._pos:]
        self._pos += len(rows)
        return rows

    def fetchone(self):
        rows = self._all_rows()
        if self._pos >= len(rows):
            return None
        self._pos += 1
        return rows[self._pos - 1]

    def fetchmany(self, size: int = 1) -> list[tuple]:
        rows = self._all_rows()[self._pos:self._pos + size]
        self._pos += len(rows)
        return rows

    def fetchnumpy(self) -> dict:
        out: dict[str, Any] = {}
        t = self._table
        if t is None:
            return out
        import pyarrow as pa
        for name, col in zip(t.column_names, t.columns):
            col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
            if col.null_count:
                mask = np.asarray(col.is_null().to_numpy(zero_copy_only=False), bool)
                vals = col.to_numpy(zero_copy_only=False)
                out[name] = np.ma.masked_array(vals, mask=mask)
            else:
                out[name] = col.to_numpy(zero_copy_only=False)
        return out

    def arrow(self) -> pa.Table | None:
        return self._table

    fetch_arrow_table = arrow
    to_arrow_table = arrow

    def close(self) -> None:
        pass


class RemoteConnection:
    """The client of the server's query socket (RemoteStore's): execute() a query, prune,
    status. `views=True` has the server install
    its SQL views (those `serve` gave it: analytics/views.py) on its cursor before each
    statement."""

    def __init__(self, path: str, views: bool = False, timeout: float | None = None):
        self.path = path
        self.views = views
        self.timeout = timeout

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except OSError:
            s.close()
            raise
        return s

    def request(self, req: dict):
        """(answer header, the connection's buffered reader, the socket)."""
        try:
            s = self._connect()
        except OSError as e:
            raise StoreError(f"cannot reach the server of this store ({self.path}): "
                             f"{e.strerror or e}") from None
        try:
            _send_msg(s, req)
            f = s.makefile("rb")
            head = _recv_msg(f, limit=1 << 30)
        except (OSError, ValueError, EOFError) as e:
            s.close()
            raise StoreError(f"the server of this store did not answer ({e})") from None
        return head, f, s

    def execute(self, sql: str, params=None) -> RemoteResult:
        if params is not None and not isinstance(params, (list, tuple, dict)):
            raise TypeError("params must be a list or a dict")
        head, f, s = self.request({"op": "sql", "sql": sql, "views": self.views,
                                "params": list(params) if isinstance(params, tuple) else params})
        try:
            if not head.get("ok"):
                raise UserError(str(head.get("error") or "the query failed"))
            desc = head.get("description")
            table = None
            if desc is not None:
                import pyarrow as pa  # (here: a store opened without serve needs none)
                import pyarrow.ipc  # noqa: F401
                try:
                    table = pa.ipc.open_stream(f).read_all()
                except (pa.ArrowInvalid, OSError) as e:
                    raise StoreError(f"the server's answer was cut short ({e})") from None
                desc = [(d[0], d[1], None, None, None, None, None) for d in desc]
            return RemoteResult(desc, table)
        finally:
            f.close()
            s.close()

    def prune(self, device: str, keep_ns: int, keep_marks: bool, jobs: int,
              now_ns: int | None = None) -> tuple[str, dict]:
        """Prune run by the server: (device key, replayer.prune.Result as a dict); the history
        older than now_ns (default: now) - keep_ns goes."""
        head, f, s = self.request({"op": "prune", "device": device, "keep_ns": keep_ns,
                                   "keep_marks": keep_marks, "jobs": jobs,
                                   "now_ns": time.time_ns() if now_ns is None else now_ns})
        f.close()
        s.close()
        if not head.get("ok"):
            raise UserError(str(head.get("error") or "prune failed"))
        return str(head["device"]), dict(head["result"])

    def status(self) -> dict:
        head, f, s = self.request({"op": "status"})
        f.close()
        s.close()
        if not head.get("ok"):
            raise StoreError(str(head.get("error") or "status failed"))
        return head.get("status") or {}

    def close(self) -> None:
        pass


class RemoteStore(StoreReader):
    """A store held by a running server, read through its query socket: the reading interface
    of every store (replayer/store.py StoreReader), each query one request (a READ ONLY
    transaction on the server's cursor); payload files are read directly."""

    remote = True

    def __init__(self, path: str, conn: RemoteConnection):
        self.path = path
        self._conn = conn

    def query(self, sql: str, params=None) -> list[tuple]:
        return self._conn.execute(sql, params).fetchall()

    def query_one(self, sql: str, params=None):
        return self._conn.execute(sql, params).fetchone()

    def numpy(self, sql: str, params=None) -> dict:
        return self._conn.execute(sql, params).fetchnumpy()

    def user_query(self, sql: str) -> tuple[list[str], list[tuple]]:
        r = self._conn.execute(sql)
        if r.description is None:
            raise UserError("the statement returned no rows (only queries are allowed)")
        return [d[0] for d in r.description], r.fetchall()

    def server_status(self) -> dict:
        return self._conn.status()


def note_restored(path, device: str, nbytes: int, seconds: float) -> None:
    """Tell the server holding the store at path (if one runs) that a restore of device wrote
    nbytes in seconds: `serve`'s metrics count restores. Best effort: never fails."""
    try:
        sp = server_running(path)
        if sp is None:
            return
        head, f, s = RemoteConnection(sp, timeout=5).request(
            {"op": "restored", "device": device, "bytes": int(nbytes),
             "seconds": round(float(seconds), 6)})
        f.close()
        s.close()
    except Exception:
        pass


def server_running(path) -> str | None:
    """The query socket of the server holding the store at path, if one answers."""
    p = sock_path(path)
    if not os.path.exists(p):
        return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(p)
        return p
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return None
        raise StoreError(f"cannot reach the server of {path} ({p}): {e.strerror}") from None
    finally:
        s.close()


def open_for_reading(path, *, views=None, wait: float | None = None) -> StoreReader:
    """The store at path for reading: a RemoteStore when a server holds it (its query socket
    answers), else Store.open(path) read-only. A server starting or stopping meanwhile is
    waited for up to `wait` seconds ($BLKREWIND_STORE_WAIT, default 10). views: a function
    (connection) -> ... that defines SQL views (analytics.views.define_views): run on the
    local store's connection, or the server runs its own (`serve` gives it the same)."""
    if wait is None:
        wait = default_wait()
    path = os.path.abspath(os.fspath(path))
    from blkrewind.replayer.store import check_access
    check_access(path)
    deadline = time.monotonic() + wait
    while True:
        sp = server_running(path)
        if sp is not None:
            return RemoteStore(path, RemoteConnection(sp, views=views is not None))
        left = deadline - time.monotonic()
        try:
            st = Store.open(path, wait=min(max(left, 0.0), 0.5))
        except StoreError as e:
            if "busy" not in str(e) or left <= 0:
                raise
            continue
        if views is not None:
            st.define_views(views)
        return st
