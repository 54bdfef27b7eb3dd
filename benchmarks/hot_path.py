"""Measure what GET /c/<token> costs inside certdrop, next to a bare WSGI app that returns the same DER.

Usage: .venv/bin/python benchmarks/hot_path.py

Calls the WSGI application directly (no server, no sockets), 20,000 times per case after one warm-up call, and
prints the median of three rounds in microseconds per request. It isolates certdrop's own work: routing, the
store's memory cache, device classification and the cached answer. A server-level comparison under load is a
separate, later benchmark.
"""

import datetime
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import certdrop  # noqa: E402

REQUESTS, ROUNDS = 20000, 3
S60 = ("Mozilla/5.0 (SymbianOS/9.1; Series60/3.0 NokiaE61i-1/3.0; Profile/MIDP-2.0 Configuration/CLDC-1.1) "
       "AppleWebKit/413 (KHTML, like Gecko) Safari/413")
ANDROID = ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
           "Mobile Safari/537.36")


def certificate() -> certdrop.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Benchmark Root")])
    start = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(start).not_valid_after(start.replace(year=2035))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return certdrop.inspect_certificate(cert)


def environ(path: str, user_agent: str) -> dict:
    return {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "HTTP_USER_AGENT": user_agent,
            "REMOTE_ADDR": "192.168.1.20",
            "HTTP_HOST": "ca.example.org:8080", "wsgi.input": io.BytesIO(), "wsgi.url_scheme": "http",
            "SERVER_NAME": "ca.example.org", "SERVER_PORT": "8080"}


def microseconds_per_request(app, path: str, user_agent: str) -> float:
    def start_response(status, headers):
        pass

    template = environ(path, user_agent)
    app(dict(template), start_response)
    rounds = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(REQUESTS):
            app(dict(template), start_response)
        rounds.append((time.perf_counter() - start) / REQUESTS * 1e6)
    return statistics.median(rounds)


def main() -> None:
    # As shipped (access log on, written by its background thread, here into /dev/null), but with the unknown-token
    # limit off: a limited guesser gets 429s, and this measures the 404 page.
    access_log = certdrop.AccessLog(open(os.devnull, "w"))
    app = certdrop.make_app(certdrop.Config(data_dir=Path(tempfile.mkdtemp()), lookup_limit=0), access_log=access_log)
    entry, _ = app.store.add(certificate(), time.time() + 86400)
    der = entry.der

    def bare(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/x-x509-ca-cert"), ("Content-Length", str(len(der)))])
        return [der]

    for label, wsgi, path, agent in (("bare WSGI app, same DER", bare, "/", S60),
                                     ("S60: DER", app, f"/c/{entry.token}", S60),
                                     ("Android: landing page", app, f"/c/{entry.token}", ANDROID),
                                     ("unknown token: 404 page", app, "/c/abcdefgh", ANDROID)):
        print(f"{label:26s} {microseconds_per_request(wsgi, path, agent):6.1f} us/request")


if __name__ == "__main__":
    main()
