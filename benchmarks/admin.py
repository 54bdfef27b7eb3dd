"""Measure the administrator's page (/admin) on large stores, and what counting downloads costs the hot path.

Usage: .venv/bin/python benchmarks/admin.py [--sizes 10000,100000] [--repeat 5]

1. For each size, a store of that many entry files (in /dev/shm, copies of one real format-2 entry with their own
   tokens, names, dates and download counts; a tenth revoked, some ended): the first page of /admin as the
   very first look at the store ("first": every entry file read and parsed once), as a fresh process's first
   request ("cold": from the saved index, data_dir/admin-index.json, and a stat() a file) and again ("warm": the
   median of --repeat); the first page of /admin/api/v1/links (100 links), a search and the last page (warm);
   and the memory the app's index of the links and counts takes (tracemalloc). Target: the first page of
   10,000 links in under 0.5 s (warm), and 100,000 links answered (200), not failed.
2. The hot path with counting on and off: GET /c/<token> as an Android phone through App.serve_hot in one process,
   200,000 times each way, interleaved, in microseconds a request (counting off: the answer's tally removed), the
   best of 10 rounds each; and the one statement counting adds, timed alone (timeit, best of 7), which a busy
   machine moves least.
"""

import argparse
import gc
import io
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
import certdrop  # noqa: E402

ANDROID = ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
           "Mobile Safari/537.36")
DESKTOP = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
DEVICES = ("android", "ios", "windows", "macos", "s60")


def environ(path: str, query: str = "", agent: str = "curl/8.5.0", accept: str = "text/html") -> dict:
    return {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query, "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8080", "HTTP_HOST": "127.0.0.1:8080", "REMOTE_ADDR": "127.0.0.1", "SCRIPT_NAME": "",
            "HTTP_USER_AGENT": agent, "HTTP_ACCEPT": accept, "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO()}


def get(app, path: str, query: str = "", **headers) -> tuple[str, int, float]:
    answer = []
    started = time.perf_counter()
    body = b"".join(app(environ(path, query, **headers), lambda status, headers: answer.append(status)))
    return answer[0], len(body), time.perf_counter() - started


def build_store(directory: Path, size: int) -> None:
    """Write *size* entry files and one count file: copies of one real entry, each with its own facts."""
    store = certdrop.Store(directory)
    template = json.loads(sample_entry(store).to_json())
    now, counts = time.time(), {}
    shards = set()
    for number in range(size):
        token = "".join(random.choice(certdrop.TOKEN_ALPHABET) for _ in range(10))
        record = dict(template, token=token, created=now - random.uniform(0, 300 * 86400),
                      expires=now + random.uniform(-30, 365) * 86400)
        record["certificate"] = dict(template["certificate"], common_names=[f"Benchmark Root {number}"])
        if number % 10 == 0:
            record["revoked"] = now - 3600
        if token[:2] not in shards:
            (directory / token[:2]).mkdir(parents=True, exist_ok=True)
            shards.add(token[:2])
        (directory / token[:2] / f"{token}.json").write_text(json.dumps(record, indent=1) + "\n")
        if number % 3 == 0:
            counts[token] = {random.choice(DEVICES): [random.randint(1, 50), now - 600]}
    (directory / "counts").mkdir()
    (directory / "counts" / "benchmark-1.json").write_text(json.dumps({"format": 1, "counts": counts}))


def sample_entry(store: certdrop.Store) -> certdrop.Entry:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import datetime
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Benchmark Root"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "certdrop benchmark")])
    start = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(start).not_valid_after(start.replace(year=2045))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    certificate = certdrop.inspect_certificate(cert)
    return certdrop.Entry("benchmark", time.time(), time.time() + 86400, certificate.der,
                          facts=certdrop.certificate_facts(certificate), host="mail.example.com", report=())


def measure_page(size: int, repeat: int, base: Path) -> bool:
    directory = base / str(size)
    directory.mkdir()
    begun = time.perf_counter()
    build_store(directory / "data", size)
    built = time.perf_counter() - begun
    config = certdrop.Config(data_dir=directory / "data", access_log=False)
    status, length, first = get(certdrop.make_app(config), "/admin", agent=DESKTOP)  # every entry file read once
    app = certdrop.make_app(config)
    cold_status, _, cold = get(app, "/admin", agent=DESKTOP)  # a fresh process: from the saved index
    warm = statistics.median(get(app, "/admin", agent=DESKTOP)[2] for _ in range(repeat))
    api_status, _, api = get(app, "/admin/api/v1/links", "per_page=100", accept="application/json")
    api = statistics.median([api] + [get(app, "/admin/api/v1/links", "per_page=100")[2] for _ in range(repeat - 1)])
    search = statistics.median(get(app, "/admin", "q=Root+12345", agent=DESKTOP)[2] for _ in range(repeat))
    pages = -(-size // certdrop.ADMIN_PAGE_LINKS)
    last_status, _, last = get(app, "/admin", f"page={pages}", agent=DESKTOP)
    gc.collect()
    tracemalloc.start()
    index = certdrop.AdminIndex(certdrop.make_store(config))
    index.links(), index.counts()
    index_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del index
    ok = status == cold_status == last_status == api_status == "200 OK"
    print(f"   {size:>8,} {built:7.1f} {first:8.3f} {cold:8.3f} {warm:8.3f} {api:8.3f} {search:8.3f} {last:8.3f} "
          f"{index_bytes / 2**20:9.1f}  {status} ({length:,} bytes)", flush=True)
    shutil.rmtree(directory)
    return ok and (size > 10000 or warm < 0.5)


def measure_hot_path(requests: int) -> None:
    base = Path(tempfile.mkdtemp(prefix="certdrop-hot."))
    try:
        config = certdrop.Config(data_dir=base / "data", access_log=False, lookup_limit=0)
        # entries looked at again once an hour: each kept answer stays the one swapped in for the whole run
        store = certdrop.Store(config.data_dir, revalidate_after=3600)
        app = certdrop.make_app(config, store)
        token = store.add(certdrop.inspect_certificate(__import__("cryptography").x509.load_der_x509_certificate(
            sample_entry(store).der)), time.time() + 86400)[0].token
        request = environ(f"/c/{token}", agent=ANDROID)
        start_response = lambda status, headers: None  # noqa: E731
        for _ in range(3):
            app.serve_hot(dict(request), start_response) or app(dict(request), start_response)
        counted = next(iter(app.answers.hot.items.values()))
        assert counted.tally is not None, "the hot answer does not count"
        uncounted = certdrop.HotAnswer(counted.prepared, counted.tail, counted.tail_304, counted.token, counted.since,
                                       counted.until, counted.memory)
        key = next(iter(app.answers.hot.items))
        rounds = {"on": [], "off": []}
        gc.disable()
        for _ in range(10):
            for name, hot in (("on", counted), ("off", uncounted)):
                app.answers.hot.items[key] = hot
                started = time.perf_counter()
                for _ in range(requests // 10):
                    app.serve_hot(request, start_response)
                rounds[name].append((time.perf_counter() - started) / (requests // 10) * 1e6)
        gc.enable()
        on, off = min(rounds["on"]), min(rounds["off"])  # the least disturbed round: the machine is shared
        written = app.counts.write()
        assert written == requests // 10 * 10 + 3, written  # every request of the counting rounds, and the warm-up
        import timeit
        added = min(timeit.repeat("if hot.tally is not None and status < 300: hot.tally()", number=1_000_000,
                                  repeat=7, globals={"hot": counted, "status": 200}))
        bare = min(timeit.repeat("if hot.tally is not None and status < 300: pass", number=1_000_000, repeat=7,
                                 globals={"hot": uncounted, "status": 200}))

        print(f"2. Hot path, GET /c/<token> as Android through serve_hot, {requests:,} requests each way: "
              f"counting on {on:.3f} us, off {off:.3f} us a request (best of 10 rounds); the counting statement "
              f"alone {added * 1000:.0f} ns counted, {bare * 1000:.0f} ns not; {written:,} downloads counted and "
              "written")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200000)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="certdrop-admin.", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    print("1. /admin on large stores (seconds; cold: a fresh app's first page; index: tracemalloc after the first)")
    print(f"   {'links':>8} {'built':>7} {'first':>8} {'cold':>8} {'warm':>8} {'api':>8} {'search':>8} "
          f"{'last pg':>8} {'index MiB':>9}  status")
    try:
        ok = all([measure_page(int(size), args.repeat, base) for size in args.sizes.split(",")])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("   targets met" if ok else "   TARGET MISSED")
    measure_hot_path(args.requests)


if __name__ == "__main__":
    main()
