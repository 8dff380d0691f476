#!/usr/bin/env python3
"""Minimal ClickHouse HTTP interface on top of chdb (embedded ClickHouse).

Serves the subset of the ClickHouse HTTP protocol that the Rust `clickhouse`
crate (and curl in tests) uses, so integration tests can run unchanged against
a current ClickHouse engine:

  python3 tests/chdb_http.py --port PORT --path DATA_DIR

Prints "ready" once listening; SIGTERM/SIGINT exit cleanly.

Supported:
  GET/POST /ping (and GET / without a query)    -> "Ok.\\n"
  POST /?[database=DB][&default_format=FMT]      body = SQL
  POST /?[database=DB]&query=INSERT ... FORMAT F body = data (chunked or not)
  GET  /?query=SQL                               (also POST with empty body)
  multipart/form-data bodies with a `query` field and `param_*` fields
  query parameters `param_NAME=value` ({NAME:Type} placeholders)
Other URL parameters (settings, user, password, ...) are ignored.
"""

import argparse
import os
import re
import signal
import sys
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

# Same behaviour as the ClickHouse server used in tests (server time zone UTC).
os.environ["TZ"] = "UTC"
time.tzset()

import chdb.session  # noqa: E402  (must come after TZ is set)

SESSION = None
LOCK = threading.Lock()
VERSION = "unknown"
LENIENT_DATABASE = False

# INSERT whose data follows in the request body: `INSERT INTO t (a, b) FORMAT RowBinary`.
INSERT_FORMAT_RE = re.compile(r"^\s*(INSERT\s.*?)\s+FORMAT\s+([A-Za-z0-9_]+)\s*;?\s*$", re.I | re.S)
# Same, but with the data inline after the FORMAT clause (SQL and data both in the body).
INLINE_INSERT_RE = re.compile(rb"^\s*(INSERT\s.*?)\s+FORMAT\s+([A-Za-z0-9_]+)[ \t]*(?:\r?\n)?(.*)\Z", re.I | re.S)
CODE_RE = re.compile(r"Code:\s*(\d+)")

# A few ClickHouse error codes that the real server maps to 4xx statuses.
HTTP_STATUS_BY_CODE = {
    60: 404,  # UNKNOWN_TABLE
    81: 404,  # UNKNOWN_DATABASE
    62: 400,  # SYNTAX_ERROR
    47: 400,  # UNKNOWN_IDENTIFIER
    16: 400,  # NO_SUCH_COLUMN_IN_TABLE
    73: 400,  # UNKNOWN_FORMAT
}


class ClickHouseError(Exception):
    def __init__(self, message, code=None):
        super().__init__(message)
        self.message = message
        self.code = code


def to_ch_error(exc):
    """Turns a chdb exception into (code, "Code: N. DB::Exception: ...")."""
    msg = str(exc).strip()
    m = CODE_RE.search(msg)
    if m:
        code = int(m.group(1))
        msg = msg[m.start():]
        # chdb sometimes nests the same exception text several times; keep the innermost.
        inner = msg.rfind("Code: %d. DB::Exception:" % code)
        if inner > 0:
            msg = msg[inner:]
    else:
        code = 1001  # STD_EXCEPTION
        msg = "Code: 1001. DB::Exception: %s" % msg
    if "(version" not in msg:
        msg += " (version %s)" % VERSION
    return code, msg


def split_statements_check(sql):
    """Rejects multi-statements like the real HTTP interface does.

    Scans outside string literals, quoted identifiers and comments; a trailing
    `;` (followed only by whitespace/comments) is allowed.
    """
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`":
            j = i + 1
            while j < n:
                if sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == c:
                    if j + 1 < n and sql[j + 1] == c:  # doubled quote
                        j += 2
                        continue
                    break
                j += 1
            i = j + 1
        elif sql.startswith("--", i) or c == "#":
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif c == ";":
            rest = sql[i + 1:]
            # Anything but whitespace/comments after the `;` is a second statement.
            rest = re.sub(r"--[^\n]*|/\*.*?\*/|#[^\n]*", "", rest, flags=re.S)
            if rest.strip(" \t\r\n;"):
                raise ClickHouseError(
                    "Code: 62. DB::Exception: Syntax error (Multi-statements are not allowed): "
                    "failed at position %d (end of query) (version %s)" % (i + 1, VERSION), 62)
            return
        else:
            i += 1


def decode_chunked(rfile):
    out = bytearray()
    while True:
        line = rfile.readline(65537)
        if not line:
            raise ClickHouseError("Code: 33. DB::Exception: Unexpected end of chunked body", 33)
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            # Skip trailers up to the terminating empty line.
            while True:
                t = rfile.readline(65537)
                if not t or t in (b"\r\n", b"\n"):
                    break
            return bytes(out)
        chunk = rfile.read(size)
        if len(chunk) != size:
            raise ClickHouseError("Code: 33. DB::Exception: Unexpected end of chunked body", 33)
        out += chunk
        rfile.readline(65537)  # CRLF after the chunk


def parse_multipart(body, content_type):
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise ClickHouseError("Code: 36. DB::Exception: multipart body without boundary", 36)
    delim = b"--" + m.group(1).encode()
    fields = {}
    for part in body.split(delim)[1:]:
        if part.startswith(b"--"):
            break
        part = part[2:] if part.startswith(b"\r\n") else part
        head, _, value = part.partition(b"\r\n\r\n")
        if value.endswith(b"\r\n"):
            value = value[:-2]
        nm = re.search(rb'name="([^"]*)"', head)
        if nm:
            fields[nm.group(1).decode()] = value.decode("utf-8")
    return fields


def execute(database, sql=None, insert=None, data=b"", fmt="TabSeparated", params=None):
    """Runs one request under the session lock. Returns (body, summary)."""
    with LOCK:
        # Every HTTP request starts in its own database context, like a stateless server.
        try:
            SESSION.query("USE `%s`" % (database or "default").replace("`", "\\`"))
        except Exception as e:
            # Like ClickHouse (18.16 and current), a `database` parameter naming a missing
            # database fails every statement, even CREATE DATABASE (code 81), unless
            # --lenient-database is given: then the statement runs in `default`.
            if not LENIENT_DATABASE:
                code, msg = to_ch_error(e)
                raise ClickHouseError(msg, code)
            SESSION.query("USE default")
        try:
            if insert is not None:
                ins = SESSION.send_insert(insert, fmt)
                try:
                    if data:
                        ins.append(data)
                except BaseException:
                    ins.cancel()
                    raise
                res = ins.finish()
                return b"", {"written_rows": res.rows_written, "written_bytes": res.bytes_written}
            res = SESSION.query(sql, fmt, params=params or None)
            summary = {}
            for k in ("rows_read", "bytes_read", "rows_written", "bytes_written"):
                try:
                    v = getattr(res, k)
                    summary[k] = v() if callable(v) else v
                except Exception:
                    pass
            return res.bytes(), {
                "read_rows": summary.get("rows_read", 0),
                "read_bytes": summary.get("bytes_read", 0),
                "written_rows": summary.get("rows_written", 0),
                "written_bytes": summary.get("bytes_written", 0),
            }
        except ClickHouseError:
            raise
        except Exception as e:
            code, msg = to_ch_error(e)
            raise ClickHouseError(msg, code)


CONTENT_TYPES = {
    "tabseparated": "text/tab-separated-values; charset=UTF-8",
    "tsv": "text/tab-separated-values; charset=UTF-8",
    "csv": "text/csv; charset=UTF-8; header=absent",
    "json": "application/json; charset=UTF-8",
    "jsoneachrow": "application/x-ndjson; charset=UTF-8",
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "chdb-http"

    def log_message(self, fmt, *args):  # quiet
        if os.environ.get("CHDB_HTTP_LOG"):
            sys.stderr.write("%s %s\n" % (self.address_string(), fmt % args))

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = decode_chunked(self.rfile)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length > 0 else b""
        enc = self.headers.get("Content-Encoding", "").lower().strip()
        if enc in ("gzip", "x-gzip"):
            body = zlib.decompress(body, 16 + zlib.MAX_WBITS)
        elif enc == "deflate":
            body = zlib.decompress(body)
        elif enc and enc != "identity":
            raise ClickHouseError("Code: 48. DB::Exception: Unsupported Content-Encoding: %s" % enc, 48)
        return body

    def send(self, status, body, headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        self.handle_request()

    def do_POST(self):
        self.handle_request()

    def do_HEAD(self):
        self.send(200, b"Ok.\n", [("Content-Type", "text/html; charset=UTF-8")])

    def handle_request(self):
        query_id = str(uuid.uuid4())
        try:
            url = urlsplit(self.path)
            args = dict(parse_qsl(url.query, keep_blank_values=True))
            body = self.read_body() if self.command == "POST" else b""
            path = url.path.rstrip("/")
            if path in ("/ping", "/replicas_status") or (
                    path == "" and self.command == "GET" and "query" not in args):
                self.send(200, b"Ok.\n", [("Content-Type", "text/html; charset=UTF-8")])
                return
            if path != "":
                self.send(404, b"There is no handle %s\n" % url.path.encode(),
                          [("Content-Type", "text/plain; charset=UTF-8")])
                return

            params = {k[6:]: v for k, v in args.items() if k.startswith("param_")}
            if self.headers.get("Content-Type", "").lower().startswith("multipart/form-data"):
                fields = parse_multipart(body, self.headers["Content-Type"])
                body = b""
                if "query" in fields:
                    args["query"] = args.get("query", "") + fields.pop("query")
                params.update({k[6:]: v for k, v in fields.items() if k.startswith("param_")})

            database = args.get("database") or None
            fmt = args.get("default_format") or "TabSeparated"
            sql = insert = None
            data = b""
            q = args.get("query")
            if q:
                m = INSERT_FORMAT_RE.match(q)
                if m:
                    insert, fmt, data = m.group(1), m.group(2), body
                elif body:
                    sql = q + "\n" + body.decode("utf-8")
                else:
                    sql = q
            else:
                m = INLINE_INSERT_RE.match(body)
                if m:
                    insert, fmt, data = m.group(1).decode("utf-8"), m.group(2).decode(), m.group(3)
                else:
                    sql = body.decode("utf-8")
            if insert is None:
                if not sql.strip():
                    raise ClickHouseError("Code: 62. DB::Exception: Empty query (version %s)" % VERSION, 62)
                split_statements_check(sql)
            else:
                split_statements_check(insert)

            out, summary = execute(database, sql=sql, insert=insert, data=data, fmt=fmt, params=params)
            summ = ",".join('"%s":"%s"' % (k, v) for k, v in summary.items())
            self.send(200, out, [
                ("Content-Type", CONTENT_TYPES.get(fmt.lower(), "application/octet-stream")),
                ("X-ClickHouse-Query-Id", query_id),
                ("X-ClickHouse-Format", fmt),
                ("X-ClickHouse-Timezone", "UTC"),
                ("X-ClickHouse-Summary", "{%s}" % summ),
            ])
        except ClickHouseError as e:
            self.send_error_body(e.code, e.message, query_id)
        except (ValueError, UnicodeDecodeError, zlib.error) as e:
            self.close_connection = True  # the request body may not have been consumed
            self.send_error_body(27, "Code: 27. DB::Exception: Cannot parse request: %s (version %s)"
                                 % (e, VERSION), query_id)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def send_error_body(self, code, message, query_id):
        if code is None:
            m = CODE_RE.search(message)
            code = int(m.group(1)) if m else 1001
        self.send(HTTP_STATUS_BY_CODE.get(code, 500), (message.rstrip("\n") + "\n").encode("utf-8", "replace"), [
            ("Content-Type", "text/plain; charset=UTF-8"),
            ("X-ClickHouse-Query-Id", query_id),
            ("X-ClickHouse-Exception-Code", str(code)),
        ])


def main():
    global SESSION, VERSION, LENIENT_DATABASE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", required=True, help="data directory for chdb.session.Session")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--config", help="a ClickHouse server configuration file for the session (e.g. a "
                                     "cluster in remote_servers and macros)")
    ap.add_argument("--lenient-database", action="store_true",
                    help="run statements in `default` when the `database` parameter names a "
                         "missing database (real ClickHouse answers code 81 instead)")
    opts = ap.parse_args()
    LENIENT_DATABASE = opts.lenient_database

    os.makedirs(opts.path, exist_ok=True)
    SESSION = chdb.session.Session(f"{opts.path}?config-file={opts.config}" if opts.config else opts.path)
    SESSION.query("SET session_timezone = 'UTC'")
    VERSION = SESSION.query("SELECT version()", "TabSeparated").bytes().decode().strip()

    server = ThreadingHTTPServer((opts.host, opts.port), Handler)
    server.daemon_threads = True

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("ready", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        # Wait (bounded) for an in-flight statement before closing the session.
        got = LOCK.acquire(timeout=10)
        try:
            SESSION.close()
        finally:
            if got:
                LOCK.release()


if __name__ == "__main__":
    main()
