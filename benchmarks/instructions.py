"""Count the instructions certdrop's server process spends per request, against bare waitress serving the same bytes.

Usage: .venv/bin/python benchmarks/instructions.py PATH USER-AGENT [--fair] [--lookup-limit N] [--requests N]

Needs Debian's ``valgrind``. Runs ``certdrop.py``'s app (or, with --fair, the fair server ``serve`` uses) under
waitress with callgrind, twice, for N and 2N keep-alive requests of PATH: the difference over N cancels start-up.
Then a bare WSGI app that answers the same status, headers and body, the same way. Prints both counts and their
ratio (bare / certdrop: 1.0 is as fast as bare waitress). Instruction counts do not depend on what else the
machine is doing, which makes them the steadiest figure on a shared machine; they leave out what waiting costs.
The access log is on, as shipped (to /dev/null). The store is a fresh one with one root CA (or --data-dir); TOKEN
in PATH is replaced by its token.
"""

import argparse
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
#: Requests of the shorter run (the longer makes twice as many); --requests sets it.
REQUESTS = 1500
#: How many times longer a request takes under callgrind than in a real server (measured: see serve).
SLOWER = 50


def serve(kind: str, port: int, data_dir: str, answer_file: str, lookup_limit: str) -> None:
    """Run the server to be measured (in the process callgrind watches)."""
    sys.path.insert(0, str(HERE))
    import certdrop
    import waitress
    if kind == "bare":
        status, headers, body = json.loads(Path(answer_file).read_text())
        headers, body = [tuple(header) for header in headers], body.encode("latin-1")

        def app(environ, start_response):
            start_response(status, headers)
            return [body]
    else:
        # Under callgrind a request takes some fifty times longer (SLOWER), so work that runs on the clock would fall
        # on fifty times more requests than in a real server: the once-a-second look at an entry's file, the access
        # log writer's look for lines ten times a second (with a real server's batches, not a fiftieth of them) and
        # the write of the download counts. Each runs fifty times less often here, as often per request as for real.
        config = certdrop.Config(data_dir=Path(data_dir), lookup_limit=int(lookup_limit),
                                 count_interval=certdrop.Config.count_interval * SLOWER)
        certdrop.AccessLog.INTERVAL *= SLOWER
        certdrop.AccessLog.MAX_WAIT *= SLOWER
        store = certdrop.Store(config.data_dir, revalidate_after=SLOWER)
        app = certdrop.make_app(config, store)
    if kind == "fair":
        server = certdrop.fair_server_class()(app, screen=app.screen, per_client=64, header_seconds=10, exempt="",
                                              host="127.0.0.1", port=port, threads=4, cleanup_interval=1)
    else:
        server = waitress.create_server(app, host="127.0.0.1", port=port, threads=4)
    server.run()


def count(kind: str, requests: int, path: str, agent: str, data_dir: str, answer_file: str,
          lookup_limit: int = 30) -> tuple[int, tuple]:
    """Return the instructions callgrind counted for *requests* requests, and the first answer."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tempfile.mktemp(prefix="callgrind.", dir=data_dir)
    process = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                                __file__, "--serve", kind, str(port), data_dir, answer_file, str(lookup_limit)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                connection.connect()
                break
            except OSError:
                time.sleep(0.5)
        first = None
        for _ in range(requests + 20):
            connection.request("GET", path, headers={"User-Agent": agent})
            response = connection.getresponse()
            body = response.read()
            if first is None:
                skipped = ("Date", "Server", "Connection")  # as loadbench: the bare app sends Content-Length too
                first = (f"{response.status} {response.reason}",
                         [(name, value) for name, value in response.getheaders() if name not in skipped], body)
        connection.close()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=300)
    finally:
        process.kill()
    total = sum(int(re.search(r"^(?:summary|totals): (\d+)", file.read_text(), re.M)[1])
                for file in Path(data_dir).glob(Path(out).name + "*"))
    return total, first


def main() -> int:
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2], int(sys.argv[3]), *sys.argv[4:7])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path")
    parser.add_argument("agent")
    parser.add_argument("--fair", action="store_true", help="measure the fair server that serve uses")
    parser.add_argument("--data-dir", help="a store to serve (default: a fresh one with one root CA)")
    parser.add_argument("--requests", type=int, default=REQUESTS, help="requests of the shorter run")
    parser.add_argument("--lookup-limit", type=int, default=30, help="0 for an unknown token's 404 (no 429s)")
    args = parser.parse_args()
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="certdrop-instructions-")
    path = args.path
    sys.path.insert(0, str(HERE))
    import certdrop  # here first: its compiled file is written now, not counted in the first measured run
    if not args.data_dir:
        from performance import root_certificate
        store = certdrop.make_store(certdrop.Config(data_dir=Path(data_dir)))
        entry, _ = store.add(root_certificate("Instructions Root CA"), time.time() + 86400)
        path = path.replace("TOKEN", entry.token)
    answer_file = os.path.join(data_dir, "answer.json")
    kind = "fair" if args.fair else "certdrop"
    n = args.requests
    once, first = count(kind, n, path, args.agent, data_dir, answer_file, args.lookup_limit)
    twice, _ = count(kind, 2 * n, path, args.agent, data_dir, answer_file, args.lookup_limit)
    Path(answer_file).write_text(json.dumps([first[0], first[1], first[2].decode("latin-1")]))
    bare_once, _ = count("bare", n, path, args.agent, data_dir, answer_file)
    bare_twice, _ = count("bare", 2 * n, path, args.agent, data_dir, answer_file)
    certdrop_per, bare_per = (twice - once) / n, (bare_twice - bare_once) / n
    print(f"{path} ({first[0]}, {len(first[2])} bytes){' through the fair server' if args.fair else ''}: "
          f"certdrop {certdrop_per:,.0f}, bare waitress {bare_per:,.0f} instructions a request; "
          f"ratio {bare_per / certdrop_per:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
