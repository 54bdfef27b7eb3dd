"""Measure certdrop's memory against issue 18's targets: what hostile traffic leaves behind, what a big store costs.

Usage: .venv/bin/python benchmarks/memory.py [--only long-path,long-query,unknown,store,rotation] [--megabytes 1024]

Prints, for each part chosen (all by default):

1. long-path, long-query, unknown: a fresh ``certdrop.py serve`` on 127.0.0.1 for each (access log on, as shipped,
   to /dev/null), its resident memory (VmRSS) taken as the baseline after one upload and a few ordinary requests,
   then driven by keep-alive connections from this process: 1 GiB of GETs whose path is ``/c/`` or ``/`` and 250 KiB
   of random characters, each unique; 1 GiB of ``GET /c/<live token>?<250 KiB of random query>``, each unique;
   100,000 distinct unknown 8-character tokens, with ``lookup_limit = 0`` and again at the shipped limit (one
   client, so mostly 429). For each: requests, bytes sent, wall time, statuses, resident memory after, growth over
   the baseline; target: within 20 MiB of it. ``--megabytes`` scales all three down (the unknown tokens with it).
2. store: 100,000 links with 10,000 touched (each as an S60 and as an Android phone) stays under 80 MiB, measured
   by performance.py's stores part, whose table is printed too.
3. rotation: 3,000 live links, ``cache_entries = 1000``; 20,000 requests (after 5,000 unmeasured) go to 900 of them
   with probability 0.9 and to the other 2,100 with 0.1. The app runs in this process, its store's file reads
   counted: a hot hit is an answer that read no entry file. Target: over 90 % for the working set.

Statuses do not matter here, only memory: certdrop may answer 404, 414 or 429, waitress 431.
"""

import argparse
import base64
import collections
import contextlib
import http.client
import io
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import performance  # benchmarks/ is this script's directory, so on sys.path; it puts certdrop there too
from performance import ANDROID, HERE, certdrop, distinct_roots, pin_to_one_cpu, root_certificate, stop

S60 = ("Mozilla/5.0 (SymbianOS/9.2; U; Series60/3.1 NokiaE61i-1/3.0633.09.04; Profile/MIDP-2.0 "
       "Configuration/CLDC-1.1) AppleWebKit/413 (KHTML, like Gecko) Safari/413")
PHONES = (S60, ANDROID)
PARTS = ("long-path", "long-query", "unknown", "store", "rotation")

#: Characters of random path or query in one long request: with the request line and headers still under waitress's
#: max_request_header_size (256 KiB), so that certdrop, not waitress, decides what to do with it.
LONG = 250 * 1024
UNKNOWN_TOKENS = 100_000
GROWTH_TARGET_MIB = 20
CLIENTS = 4  # keep-alive connections at once, one thread each; the server has 4 worker threads

STORE_ENTRIES = 100_000
STORE_TARGET_MIB = 80

ROTATION_LINKS, ROTATION_CACHE, WORKING_SET = 3000, 1000, 900
ROTATION_WARM_UP, ROTATION_REQUESTS = 5000, 20000
HIT_RATE_TARGET = 0.90


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"parts to run (default {','.join(PARTS)})")
    parser.add_argument("--megabytes", type=int, default=1024, help="MiB of long requests per part (default 1024)")
    parser.add_argument("--seconds", type=int, default=900, help="longest any request loop runs (default 900)")
    args = parser.parse_args()
    parts = args.only.split(",")
    if set(parts) - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(set(parts) - set(PARTS)))}; choose from {', '.join(PARTS)}")
    certdrop.quiet_library_warnings()
    servers = {"long-path", "long-query", "unknown"} & set(parts)
    if servers:
        long_requests = -(-args.megabytes * 1024 * 1024 // LONG)
        unknown = max(1, UNKNOWN_TOKENS * args.megabytes // 1024)
        print(f"1. Traffic: a fresh `certdrop.py serve` for each case, on CPU {max(os.sched_getaffinity(0))}, "
              f"{CLIENTS} keep-alive connections; target: resident memory within {GROWTH_TARGET_MIB} MiB of the "
              "baseline (after one upload and 8 ordinary requests)")
        print(f"   {'case':28} {'requests':>8} {'MiB sent':>9} {'wall s':>7} {'base MiB':>8} {'after MiB':>9} "
              f"{'peak MiB':>8} {'growth':>8}  verdict  statuses")
        if "long-path" in parts:
            measure_traffic("long paths /c/… and /…", {}, long_requests, long_path, args.seconds)
        if "long-query" in parts:
            measure_traffic("long queries /c/<token>?…", {}, long_requests, long_query, args.seconds)
        if "unknown" in parts:
            paths = unknown_paths(unknown)
            measure_traffic("unknown tokens, no limit", {"lookup_limit": 0}, unknown,
                            lambda number, token: paths[number], args.seconds)
            measure_traffic("unknown tokens, limit 30/min", {}, unknown, lambda number, token: paths[number],
                            args.seconds)
    if "store" in parts:
        measure_store()
    if "rotation" in parts:
        measure_rotation(args.seconds)


# -- 1. traffic ------------------------------------------------------------------------------------------------


def long_path(number: int, token: str) -> str:
    return ("/c/" if number % 2 == 0 else "/") + random_text(LONG)


def long_query(number: int, token: str) -> str:
    return f"/c/{token}?{random_text(LONG)}"


def random_text(length: int) -> str:
    """Return *length* (a multiple of 4) random URL-safe characters: letters, digits, - and _."""
    return base64.urlsafe_b64encode(os.urandom(length * 3 // 4)).decode("ascii")


def unknown_paths(count: int) -> list[str]:
    """Return the paths of *count* distinct random 8-character tokens: unknown ones (31 ** 8 are possible, 1 stored)."""
    generator = random.Random(18)
    tokens = set()
    while len(tokens) < count:
        tokens.add("".join(generator.choices(certdrop.TOKEN_ALPHABET, k=8)))
    return [f"/c/{token}" for token in tokens]


def measure_traffic(label: str, settings: dict, count: int, path_for, seconds: int) -> None:
    """Start certdrop with *settings*, take its baseline, send *count* GETs of path_for(number, token); print a row."""
    with tempfile.TemporaryDirectory(prefix="certdrop-memory.") as work:
        server = start_certdrop(Path(work), settings)
        try:
            token = warm_up(server.port)
            baseline = memory_mib(server.pid)
            traffic = drive(server.port, lambda number: path_for(number, token), count, seconds)
            time.sleep(0.5)  # the access log's writer runs ten times a second
            after, peak = memory_mib(server.pid), memory_mib(server.pid, "VmHWM")
        finally:
            stop(server)
    growth = after - baseline
    statuses = ", ".join(f"{status}: {number:,}" for status, number in sorted(traffic.statuses.items()))
    print(f"   {label:28} {traffic.requests:8,} {traffic.sent / 2 ** 20:9,.1f} {traffic.seconds:7.1f} {baseline:8.1f} "
          f"{after:9.1f} {peak:8.1f} {growth:8.1f}  {verdict(growth <= GROWTH_TARGET_MIB):7}  {statuses}", flush=True)


def start_certdrop(work: Path, settings: dict) -> subprocess.Popen:
    """Run ``certdrop.py serve`` on 127.0.0.1 with *settings* in its ini, on the last CPU; return it with its port."""
    ini = work / "certdrop.ini"
    ini.write_text("[certdrop]\n" + "".join(f"{key} = {value}\n" for key, value in
                                             {"data_dir": work / "data", **settings}.items()))
    with socket.socket() as probe:  # a free port, since serve --port 0 tells its port only in its log
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, str(HERE / "certdrop.py"), "-c", str(ini), "serve", "--host", "127.0.0.1",
               "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pin_to_one_cpu)
    server.port = port
    deadline = time.monotonic() + 30
    while server.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        time.sleep(0.05)
    stop(server)
    sys.exit(f"certdrop did not start listening; see why with: {' '.join(command)}")


def warm_up(port: int) -> str:
    """Upload one root through POST / and ask 8 ordinary questions; return its token."""
    connection = Connection("127.0.0.1", port, timeout=30)
    try:
        pem = certdrop.pem_bytes(root_certificate("Memory Benchmark Root"))
        connection.request("POST", "/", pem, {"Content-Type": "application/x-pem-file", "Accept": "application/json"})
        response = connection.getresponse()
        response.read()
        token = re.search(r"/c/([^/?#]+)", response.getheader("Location") or "")
        if response.status != 201 or not token:
            sys.exit(f"the upload was answered {response.status} {response.reason}")
        for path, agent in (("/", performance.WINDOWS), ("/healthz", "curl/8.0"), (f"/c/{token[1]}", S60),
                            (f"/c/{token[1]}", ANDROID), (f"/c/{token[1]}", performance.WINDOWS),
                            (f"/c/{token[1]}.cer", S60), (f"/c/{token[1]}", S60), (f"/c/{token[1]}", ANDROID)):
            exchange(connection, path, agent)
        return token[1]
    finally:
        connection.close()


class Connection(http.client.HTTPConnection):
    """A keep-alive connection that counts the bytes it sends."""

    sent = 0

    def send(self, data) -> None:
        self.sent += len(data)
        super().send(data)


Traffic = collections.namedtuple("Traffic", "requests sent seconds statuses")


def drive(port: int, path_for, count: int, seconds: int) -> Traffic:
    """GET path_for(0) .. path_for(count - 1), alternately as an S60 and an Android phone, over CLIENTS keep-alive
    connections, for at most *seconds*; return what was sent and the statuses (or errors) that came back."""
    numbers, lock = iter(range(count)), threading.Lock()
    statuses, sent = collections.Counter(), []
    deadline = time.monotonic() + seconds

    def client() -> None:
        connection = Connection("127.0.0.1", port, timeout=60)
        try:
            while time.monotonic() < deadline:
                with lock:
                    number = next(numbers, None)
                if number is None:
                    break
                status = exchange(connection, path_for(number), PHONES[number % 2])
                with lock:
                    statuses[status] += 1
        finally:
            connection.close()
            with lock:
                sent.append(connection.sent)

    begun = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Traffic(sum(statuses.values()), sum(sent), time.perf_counter() - begun, statuses)


def exchange(connection: Connection, path: str, agent: str) -> str:
    """GET *path* on *connection*, again on a new one if the server had closed the old; return the status or error."""
    reused = connection.sock is not None
    try:
        connection.request("GET", path, headers={"User-Agent": agent})
        response = connection.getresponse()
        response.read()
        return str(response.status)
    except (http.client.HTTPException, OSError) as error:
        connection.close()
        if reused:  # a keep-alive connection the server had closed: once more, on a new one
            return exchange(connection, path, agent)
        return type(error).__name__


def memory_mib(pid: int, field: str = "VmRSS") -> float:
    """Return *field* of /proc/PID/status (VmRSS: resident now, VmHWM: resident at most) in MiB."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


# -- 2. a big store --------------------------------------------------------------------------------------------


def measure_store() -> None:
    """Run performance.py's stores part for 100,000 entries (it touches 10,000 tokens as an S60 phone, with a
    User-Agent of the same device class as issue 18's, and as an Android one); judge its touched figure."""
    print(f"2. Store: performance.py's stores part, {STORE_ENTRIES:,} entries (takes a few minutes)", flush=True)
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        performance.measure_stores([STORE_ENTRIES])
    print(re.sub("(?m)^", "   ", table.getvalue()), end="")
    row = table.getvalue().splitlines()[-1].split()
    assert row[0] == f"{STORE_ENTRIES:,}", f"performance.py's table has changed: {row}"
    touched = float(row[4])
    print(f"   resident after touching 10,000 of {STORE_ENTRIES:,}: {touched:.1f} MiB, "
          f"target < {STORE_TARGET_MIB} MiB: {verdict(touched < STORE_TARGET_MIB)}", flush=True)


# -- 3. rotation -----------------------------------------------------------------------------------------------


def measure_rotation(seconds: int) -> None:
    base = Path(tempfile.mkdtemp(prefix="certdrop-rotation.", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        store = certdrop.Store(base / "data")
        expires = time.time() + 365 * 86400
        tokens = [entry.token for entry, _ in store.add_all([(certificate, expires, None)
                                                             for certificate in distinct_roots(ROTATION_LINKS)])]
        (base / "certdrop.ini").write_text(f"[certdrop]\ndata_dir = data\naccess_log = no\n"
                                           f"cache_entries = {ROTATION_CACHE}\n")
        certdrop.App.starts_background = False  # no count writer: its last write at exit would find base gone
        app = certdrop.make_app(certdrop.load_config(str(base / "certdrop.ini")))
        reads = count_reads(app.store)
        generator = random.Random(18)
        working, others = tokens[:WORKING_SET], tokens[WORKING_SET:]
        deadline = time.monotonic() + seconds
        counts, statuses, timings = collections.Counter(), collections.Counter(), collections.defaultdict(list)
        for number in range(ROTATION_WARM_UP + ROTATION_REQUESTS):
            if time.monotonic() > deadline:
                break
            hot = generator.random() < 0.9
            token = generator.choice(working if hot else others)
            before, begun = reads.count, time.perf_counter()
            status = phone_get(app, token, generator.choice(PHONES))
            took, hit = time.perf_counter() - begun, reads.count == before
            if number >= ROTATION_WARM_UP:
                counts[hot, hit] += 1
                statuses[status] += 1
                timings[hit].append(took)
        cached, cached_bytes = len(app.store.memory._cache), app.store.memory._cached_bytes
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def rate(*kinds: bool) -> tuple[float, int]:
        asked = sum(counts[kind, hit] for kind in kinds for hit in (True, False))
        return sum(counts[kind, True] for kind in kinds) / max(asked, 1), asked

    print(f"3. Rotation: {ROTATION_LINKS:,} live links, cache_entries = {ROTATION_CACHE:,}, {WORKING_SET} of them "
          f"asked for 9 times in 10; {sum(counts.values()):,} requests in this process after "
          f"{ROTATION_WARM_UP:,} unmeasured")
    for label, kinds in (("working set", (True,)), ("the others", (False,)), ("overall", (True, False))):
        hits, asked = rate(*kinds)
        target = f", target > {HIT_RATE_TARGET:.0%}: {verdict(hits > HIT_RATE_TARGET)}" if kinds == (True,) else ""
        print(f"   hot hit rate, {label + ':':12} {hits:6.1%} of {asked:6,}{target}")
    print(f"   median time, hot hit {median_ms(timings[True]):.3f} ms, entry read {median_ms(timings[False]):.3f} ms; "
          f"{cached:,} entries in memory, {cached_bytes / 2 ** 20:.1f} MiB by the store's count; statuses: "
          + ", ".join(f"{status}: {number:,}" for status, number in sorted(statuses.items())), flush=True)


class count_reads:
    """Count the entry files *store* reads (Store._read, which a cold lookup goes through)."""

    def __init__(self, store):
        self.count, self.read = 0, store._read
        store._read = self

    def __call__(self, token: str):
        self.count += 1
        return self.read(token)


def phone_get(app, token: str, agent: str) -> str:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": f"/c/{token}", "QUERY_STRING": "", "HTTP_USER_AGENT": agent,
               "REMOTE_ADDR": "192.168.1.20", "HTTP_HOST": "ca.example.org", "wsgi.url_scheme": "http",
               "SERVER_NAME": "ca.example.org", "SERVER_PORT": "80", "wsgi.input": io.BytesIO()}
    statuses = []
    b"".join(app(environ, lambda status, headers: statuses.append(status)))
    return statuses[0].split()[0]


def median_ms(timings: list) -> float:
    return statistics.median(timings) * 1000 if timings else float("nan")


if __name__ == "__main__":
    main()
