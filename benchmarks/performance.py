"""Measure certdrop against its performance targets, in one run, as ratios where a ratio fits.

Usage: .venv/bin/python benchmarks/performance.py [--rounds 7] [--seconds 5] [--sizes 1000,10000,100000]

Needs Debian's ``wrk`` (``apt-get install wrk``) and the test dependencies (``certifi`` comes with them). Prints:

1. Load: certdrop and a bare WSGI app that returns the same status, headers and body, each under the same waitress
   settings on 127.0.0.1, driven in turn by wrk (keep-alive, 8 connections) in rounds after a warm-up, servers and
   wrk pinned to one CPU. For the S60 download, the Android and Windows landing pages, an unknown token's 404 (with
   the lookup limit off) and the 429 a limited guesser gets: requests/s, p50 and p99 latency, the server's CPU
   per request, and the ratios certdrop / bare (per round, then their median). The access log and rate limiting
   are on, as shipped; the log goes to /dev/null.
2. Ingest: the doctor's speed on certifi's Mozilla bundle, then that bundle uploaded through ``POST /`` (confirmed
   with force, from loopback) into a fresh store on disk, and again: time and fsyncs of each.
3. Stores of each size, built through the store's own API (in /dev/shm, where fsync is free, so that building
   100,000 entries takes seconds), each read by a fresh process: start-up to the first answer, resident memory
   after start-up and after touching 10,000 tokens (each once as an S60 and once as an Android phone), cold and
   cached lookup medians, and the sweep with nothing expired.

The machine is shared and noisy: trust the ratios, measured side by side, over any absolute figure.
"""

import argparse
import contextlib
import ctypes
import datetime
import io
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import http.client
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
import certdrop  # noqa: E402

S60 = ("Mozilla/5.0 (SymbianOS/9.1; Series60/3.0 NokiaE61i-1/3.0; Profile/MIDP-2.0 Configuration/CLDC-1.1) "
       "AppleWebKit/413 (KHTML, like Gecko) Safari/413")
ANDROID = ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
           "Mobile Safari/537.36")
WINDOWS = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
           "Safari/537.36")

#: Headers waitress adds itself: the bare app must not send them too.
SERVER_ADDED = {"connection", "date", "server", "via", "transfer-encoding"}

#: One waitress server in a process of its own: certdrop from an ini file, or a bare app with one fixed answer.
SERVER = r"""
import json, logging, sys
sys.path.insert(0, sys.argv[1])
logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "Task queue depth" warnings, in both servers alike
spec = json.loads(sys.argv[2])
if spec["kind"] == "bare":
    status, headers, body = spec["status"], [tuple(pair) for pair in spec["headers"]], bytes.fromhex(spec["body"])
    def app(environ, start_response):
        start_response(status, list(headers))
        return [body]
else:
    import certdrop
    app = certdrop.make_app(certdrop.load_config(spec["ini"]))
from waitress import create_server
server = create_server(app, host="127.0.0.1", port=0, threads=4)
print(server.effective_port, flush=True)
server.run()
"""

WRK_REPORT = r"""
done = function(summary, latency, requests)
  io.write(string.format("REPORT %d %d %d %d\n", summary.requests, summary.duration,
                         latency:percentile(50), latency:percentile(99)))
end
"""

#: One store read by a fresh process: what start-up, lookups, touching tokens and the sweep cost there.
STORE_PROBE = r"""
import time
started = time.perf_counter()
import gc, io, json, statistics, sys
sys.path.insert(0, sys.argv[1])
import certdrop
ini, tokens_file, touch = sys.argv[2], sys.argv[3], int(sys.argv[4])

def resident_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

def get(app, token, agent):
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": f"/c/{token}", "QUERY_STRING": "", "HTTP_USER_AGENT": agent,
               "REMOTE_ADDR": "192.168.1.20", "HTTP_HOST": "ca.example.org", "wsgi.url_scheme": "http",
               "SERVER_NAME": "ca.example.org", "SERVER_PORT": "80", "wsgi.input": io.BytesIO()}
    statuses = []
    body = b"".join(app(environ, lambda status, headers: statuses.append(status)))
    assert statuses[0].startswith("200"), statuses
    return body

tokens = open(tokens_file).read().split()
app = certdrop.make_app(certdrop.load_config(ini))
certdrop.give_back_free_memory()  # as certdrop.py serve does once it has started
get(app, tokens[0], sys.argv[5])
report = {"startup_s": time.perf_counter() - started, "rss_startup_mib": resident_mib()}
cold, cached = [], []
for token in tokens[1:1001]:
    begun = time.perf_counter()
    app.store.get(token)
    cold.append(time.perf_counter() - begun)
    begun = time.perf_counter()
    app.store.get(token)
    cached.append(time.perf_counter() - begun)
report["cold_ms"] = statistics.median(cold) * 1000
report["cached_ms"] = statistics.median(cached) * 1000
fresh = certdrop.make_app(certdrop.load_config(ini))  # the lookups above must not count as touched
del app
gc.collect()  # the first app's store and answers hold each other in cycles: free them before measuring
for token in tokens[-touch:]:
    get(fresh, token, sys.argv[5])
    get(fresh, token, sys.argv[6])
report["rss_touched_mib"] = resident_mib()
report["cached_entries"] = len(fresh.store.memory._cache)
begun = time.perf_counter()
counts = fresh.store.sweep()
report["sweep_s"] = time.perf_counter() - begun
assert not counts["expired"] and not counts["deleted"] and not counts["damaged"], counts
print(json.dumps(report))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds of load per case (default 7)")
    parser.add_argument("--seconds", type=int, default=5, help="seconds of each wrk run (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load per server (default 2)")
    parser.add_argument("--sizes", default="1000,10000,100000", help="store sizes (default 1000,10000,100000)")
    parser.add_argument("--skip", default="", help="parts to leave out: load, ingest, stores (comma-separated)")
    args = parser.parse_args()
    certdrop.quiet_library_warnings()
    work = Path(tempfile.mkdtemp(prefix="certdrop-bench."))
    try:
        if "load" not in args.skip:
            measure_load(work / "load", args)
        if "ingest" not in args.skip:
            measure_ingest(work / "ingest")
        if "stores" not in args.skip:
            measure_stores([int(size) for size in args.sizes.split(",")])
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- 1. load ---------------------------------------------------------------------------------------------------


def measure_load(work: Path, args) -> None:
    if not shutil.which("wrk"):
        sys.exit("wrk is missing: apt-get install -y wrk")
    work.mkdir(parents=True)
    store = certdrop.Store(work / "data")
    token = store.add(root_certificate("Benchmark Root"), time.time() + 30 * 86400)[0].token
    unknown = next(candidate for candidate in ("abcdefgh", "bcdefghj") if candidate != token)
    shipped, unlimited = work / "shipped.ini", work / "unlimited.ini"
    shipped.write_text(f"[certdrop]\ndata_dir = {work / 'data'}\n")
    unlimited.write_text(f"[certdrop]\ndata_dir = {work / 'data'}\nlookup_limit = 0\n")
    report = work / "report.lua"
    report.write_text(WRK_REPORT)
    cases = (("S60 DER download", shipped, f"/c/{token}", S60),
             ("Android landing page", shipped, f"/c/{token}", ANDROID),
             ("Windows landing page", shipped, f"/c/{token}", WINDOWS),
             ("unknown token: 404", unlimited, f"/c/{unknown}", ANDROID),
             ("limited guesser: 429", shipped, f"/c/{unknown}", ANDROID))
    print(f"1. Load: wrk keep-alive, 8 connections, {args.rounds} rounds of {args.seconds} s after "
          f"{args.warmup} s of warm-up, servers and wrk on CPU {os.sched_getaffinity(0) and max(os.sched_getaffinity(0))}")
    print(f"   {'case':24} {'certdrop req/s':>14} {'p50 ms':>7} {'p99 ms':>7} {'cpu us':>7} | {'bare req/s':>10} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'cpu us':>7} | {'ratio':>6} {'min':>6} {'max':>6} {'cpu':>6}")
    for label, ini, path, agent in cases:
        target = start_server({"kind": "certdrop", "ini": str(ini)})
        try:
            if label.endswith("429"):
                for _ in range(certdrop.LOOKUP_BURST + 2):
                    fetch(target.port, path, agent)
            status, headers, body = fetch(target.port, path, agent)
            bare = start_server({"kind": "bare", "status": status, "body": body.hex(),
                                 "headers": [(name, value) for name, value in headers
                                             if name.lower() not in SERVER_ADDED]})
            try:
                print(f"   {label:24} " + compare(target, bare, path, agent, report, args), flush=True)
            finally:
                stop(bare)
        finally:
            stop(target)


def start_server(spec: dict):
    """Start one waitress server in its own process, on the last CPU; return it with its port."""
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(HERE), json.dumps(spec)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, preexec_fn=pin_to_one_cpu)
    process.port = int(process.stdout.readline())
    return process


def stop(process) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()


def pin_to_one_cpu() -> None:
    """Run on the last CPU (servers and wrk alike), and die with this script (PR_SET_PDEATHSIG, Linux)."""
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)


def fetch(port: int, path: str, agent: str) -> tuple[str, list[tuple[str, str]], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers={"User-Agent": agent})
        response = connection.getresponse()
        return f"{response.status} {response.reason}", response.getheaders(), response.read()
    finally:
        connection.close()


def compare(target, bare, path: str, agent: str, report: Path, args) -> str:
    """Load *target* and *bare* in turn (warm-up, then ABBA rounds); return one line of figures."""
    for server in (target, bare):
        load(server, path, agent, report, args.warmup)
    rounds = []
    for number in range(args.rounds):
        order = (target, bare) if number % 2 == 0 else (bare, target)
        figures = {server.pid: load(server, path, agent, report, args.seconds) for server in order}
        rounds.append((figures[target.pid], figures[bare.pid]))
    ratios = [mine["rps"] / theirs["rps"] for mine, theirs in rounds]
    cpu_ratios = [theirs["cpu_us"] / mine["cpu_us"] for mine, theirs in rounds]

    def median(side: int, key: str) -> float:
        return statistics.median(figures[side][key] for figures in rounds)

    return (f"{median(0, 'rps'):14.0f} {median(0, 'p50'):7.2f} {median(0, 'p99'):7.2f} {median(0, 'cpu_us'):7.1f} | "
            f"{median(1, 'rps'):10.0f} {median(1, 'p50'):7.2f} {median(1, 'p99'):7.2f} {median(1, 'cpu_us'):7.1f} | "
            f"{statistics.median(ratios):6.3f} {min(ratios):6.3f} {max(ratios):6.3f} {statistics.median(cpu_ratios):6.3f}")


def load(server, path: str, agent: str, report: Path, seconds: int) -> dict:
    """Run wrk against *server* for *seconds*; return requests/s, latencies (ms) and server CPU per request (us)."""
    cpu_before = process_cpu_ns(server.pid)
    output = subprocess.run(["wrk", "-t1", "-c8", f"-d{seconds}s", "--timeout", "10s", "-s", str(report),
                             "-H", f"User-Agent: {agent}", f"http://127.0.0.1:{server.port}{path}"],
                            capture_output=True, text=True, timeout=seconds + 30, preexec_fn=pin_to_one_cpu).stdout
    cpu = process_cpu_ns(server.pid) - cpu_before
    requests, duration_us, p50, p99 = map(int, re.search(r"^REPORT (\d+) (\d+) (\d+) (\d+)$", output, re.M).groups())
    return {"rps": requests / (duration_us / 1e6), "p50": p50 / 1000, "p99": p99 / 1000,
            "cpu_us": cpu / 1000 / max(requests, 1)}


def process_cpu_ns(pid: int) -> int:
    """Return the CPU time all threads of *pid* have used, in nanoseconds (from /proc/PID/task/*/schedstat)."""
    total = 0
    for thread in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{thread}/schedstat") as schedstat:
            total += int(schedstat.read().split()[0])
    return total


# -- 2. ingest -------------------------------------------------------------------------------------------------


def measure_ingest(work: Path) -> None:
    import certifi

    bundle = Path(certifi.where()).read_bytes()
    now = time.time()
    public = certdrop.system_trust_store()
    timings = []
    for _ in range(5):
        begun = time.perf_counter()
        diagnosis = certdrop.diagnose(bundle, now=now, force=True, public_roots=public)
        timings.append(time.perf_counter() - begun)
    count = len(diagnosis.certificates)
    print(f"2. Ingest: certifi's bundle, {count} certificates")
    print(f"   doctor: {count / statistics.median(timings):,.0f} certificates/s (median of 5 runs)")
    app = certdrop.make_app(certdrop.Config(data_dir=work / "data", access_log=False))
    for attempt in ("fresh store", "again"):
        fsyncs, begun = counting_fsyncs(), time.perf_counter()
        status = upload(app, bundle)
        took = time.perf_counter() - begun
        print(f"   POST / into a {attempt:11}: {took:.3f} s, {status}, {fsyncs.count} fsyncs, "
              f"{len(list((work / 'data').glob('??/*.json')))} entries")
        fsyncs.restore()


class counting_fsyncs:
    """Count os.fsync calls until restored (the store syncs files and directories with it)."""

    def __init__(self):
        self.count, self.original = 0, os.fsync
        os.fsync = self

    def __call__(self, descriptor):
        self.count += 1
        return self.original(descriptor)

    def restore(self):
        os.fsync = self.original


def upload(app, bundle: bytes) -> str:
    statuses = []
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/", "QUERY_STRING": "force=1", "REMOTE_ADDR": "127.0.0.1",
               "CONTENT_TYPE": "application/x-pem-file", "CONTENT_LENGTH": str(len(bundle)),
               "HTTP_ACCEPT": "application/json", "HTTP_HOST": "ca.example.org", "wsgi.url_scheme": "http",
               "SERVER_NAME": "ca.example.org", "SERVER_PORT": "80", "wsgi.input": io.BytesIO(bundle)}
    app(environ, lambda status, headers: statuses.append(status))
    return statuses[0]


# -- 3. stores -------------------------------------------------------------------------------------------------


def measure_stores(sizes: list[int]) -> None:
    base = Path(tempfile.mkdtemp(prefix="certdrop-stores.", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        begun = time.perf_counter()
        certificates = distinct_roots(max(sizes))
        print(f"3. Stores ({max(sizes):,} certificates made in {time.perf_counter() - begun:.0f} s, "
              f"stores in {base})")
        print(f"   {'entries':>8} {'built s':>8} {'start-up s':>10} {'RSS MiB':>8} {'touched MiB':>11} "
              f"{'cached':>7} {'cold ms':>8} {'cached ms':>9} {'sweep s':>8}")
        for size in sizes:
            directory = base / str(size)
            begun = time.perf_counter()
            store = certdrop.Store(directory / "data")
            expires = time.time() + 365 * 86400
            tokens = []
            for start in range(0, size, 1000):
                batch = [(certificate, expires, None) for certificate in certificates[start:min(start + 1000, size)]]
                tokens += [entry.token for entry, _ in store.add_all(batch)]
            built = time.perf_counter() - begun
            random.shuffle(tokens)
            touch = min(10000, size)
            # only the tokens the probe asks for: a list of 100,000 would weigh on the memory it measures
            (directory / "tokens").write_text("\n".join(tokens[:1001] + tokens[-touch:]))
            (directory / "certdrop.ini").write_text("[certdrop]\ndata_dir = data\naccess_log = no\n")
            output = subprocess.run([sys.executable, "-c", STORE_PROBE, str(HERE), str(directory / "certdrop.ini"),
                                     str(directory / "tokens"), str(touch), S60, ANDROID],
                                    capture_output=True, text=True, check=True).stdout
            figures = json.loads(output)
            print(f"   {size:8,} {built:8.1f} {figures['startup_s']:10.2f} {figures['rss_startup_mib']:8.1f} "
                  f"{figures['rss_touched_mib']:11.1f} {figures['cached_entries']:7,} {figures['cold_ms']:8.3f} "
                  f"{figures['cached_ms']:9.4f} {figures['sweep_s']:8.2f}", flush=True)
            shutil.rmtree(directory)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def distinct_roots(count: int) -> list:
    """Return *count* distinct self-signed CA certificates, inspected as an upload's are (one Ed25519 key)."""
    key = ed25519.Ed25519PrivateKey.generate()
    start = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
    certificates = []
    for number in range(count):
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Benchmark Root {number}"),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "certdrop benchmark")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(number + 1).not_valid_before(start).not_valid_after(start.replace(year=2045))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, None))
        certificates.append(certdrop.inspect_certificate(cert))
    return certificates


def root_certificate(name: str) -> "certdrop.Certificate":
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(1).not_valid_before(start).not_valid_after(start.replace(year=2035))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return certdrop.inspect_certificate(cert)


if __name__ == "__main__":
    main()
