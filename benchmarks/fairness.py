"""Measure how fairly certdrop's server shares itself out (issue 19): what one hostile client costs everyone else.

Usage: .venv/bin/python benchmarks/fairness.py [--only baseline,slow-header,idle,slow-body,allowed-body]
                                               [--seconds 30] [--attacker 127.0.0.2]

For each part, a fresh ``certdrop.py serve`` on 127.0.0.1 (memory.py's: shipped settings, one CPU, one upload
from 127.0.0.1 for a live link and 8 ordinary requests), then:

1. baseline: 50 ``GET /c/<token>`` as an S60 phone from 127.0.0.1, a fresh connection each; resident memory
   (VmRSS) after them is the baseline every attack is measured against.
2. the attacks, from one other address (--attacker, 127.0.0.2: each loopback address is a client of its own),
   each for --seconds in a process of its own, while a victim from the other address (127.0.0.1, or 127.0.0.2
   when the attacker is 127.0.0.1) sends the same GET every 0.25 s on a fresh connection with a 5 s timeout.
   The attacker keeps 1,000 connections (950 for bodies) going: one the server closes is opened again a second
   later, until the attack ends or 40,000 have been opened.

   - slow-header: ``GET / HTTP/1.1`` and then one byte of a header name a second, never ending;
   - idle: connect and send nothing;
   - slow-body: ``POST /`` with ``Content-Length: 2000000`` (over max_upload), ``Content-Type:
     application/pkix-cert`` and no key, then the body, "trickle" (1 KiB every 0.5 s) and "firehose" (as fast as
     the socket takes it);
   - allowed-body: the same with ``Content-Length: 1000000``, a body the server must take: uploads from loopback
     need no key (upload_auth = remote), so this is what a client allowed to upload can hold.

   For each: the connections opened, how they ended ("429 cap": refused at the door for holding client_connections
   already; another answer, such as the 413 or 429 the screen gives from a request's headers; closed unanswered;
   reset: the attacker sent on after the server had closed),
   how many the attacker held at most at once, the server's open descriptors at most, its resident memory at most
   and after the attacker has closed everything (over the baseline; target for the bodies: under 150 MiB), and
   the victim's latency (median, p99, max) and answers (target: every GET a 200 in under 1 s).
"""

import argparse
import collections
import contextlib
import errno
import http.client
import multiprocessing
import os
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from memory import S60, memory_mib, start_certdrop, stop, verdict, warm_up
from performance import certdrop

PARTS = ("baseline", "slow-header", "idle", "slow-body", "allowed-body")

BASELINE_REQUESTS = 50
VICTIM_INTERVAL, VICTIM_TIMEOUT, VICTIM_TARGET = 0.25, 5.0, 1.0
BODY_TARGET_MIB = 150

#: Connections the attacker keeps going, and the most it opens in one attack (every loop here is bounded).
HEADER_CONNECTIONS, BODY_CONNECTIONS, MOST_OPENED = 1000, 950, 40_000
REOPEN_AFTER = 1.0  # seconds before a closed connection is opened again
TRICKLE = 1024  # bytes of body per connection each TRICKLE_EVERY seconds
TRICKLE_EVERY = 0.5
FIREHOSE_CHUNK = 64 * 1024

POST = ("POST / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/pkix-cert\r\n"
        "Content-Length: {declared}\r\nUser-Agent: fairness\r\n\r\n")

#: What the attacker does on each connection: open it, send *head* (its {port} and {declared} filled in), then
#: every *interval* seconds send *drip*, and body until *declared* bytes are sent: TRICKLE a round, or firehose.
Attack = collections.namedtuple("Attack", "connections interval head drip declared firehose")
ATTACKS = {
    "slow-header": Attack(HEADER_CONNECTIONS, 1.0, "GET / HTTP/1.1\r\n", b"X", 0, False),
    "idle": Attack(HEADER_CONNECTIONS, 1.0, "", b"", 0, False),
    "slow-body trickle": Attack(BODY_CONNECTIONS, TRICKLE_EVERY, POST, b"", 2_000_000, False),
    "slow-body firehose": Attack(BODY_CONNECTIONS, 0.02, POST, b"", 2_000_000, True),
    "allowed-body trickle": Attack(BODY_CONNECTIONS, TRICKLE_EVERY, POST, b"", 1_000_000, False),
    "allowed-body firehose": Attack(BODY_CONNECTIONS, 0.02, POST, b"", 1_000_000, True),
}

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux: pick the port at connect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"parts to run (default {','.join(PARTS)})")
    parser.add_argument("--seconds", type=int, default=30, help="seconds each attack lasts (default 30)")
    parser.add_argument("--attacker", default="127.0.0.2", choices=("127.0.0.2", "127.0.0.1"),
                        help="the attacker's address; the victim uses the other (default 127.0.0.2)")
    args = parser.parse_args()
    parts = args.only.split(",")
    if set(parts) - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(set(parts) - set(PARTS)))}; choose from {', '.join(PARTS)}")
    victim = "127.0.0.1" if args.attacker == "127.0.0.2" else "127.0.0.2"
    certdrop.quiet_library_warnings()
    raise_file_limit(HEADER_CONNECTIONS + 256)
    rows = []
    if "baseline" in parts:
        rows.append(measure_baseline(victim))
    for name, attack in ATTACKS.items():
        if name.split()[0] in parts:
            rows.append(measure_attack(name, attack, args.attacker, victim, args.seconds))
    print_table(rows, args.attacker, victim, args.seconds)


def raise_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard),
                                                    hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < wanted:
        sys.exit(f"{wanted} open files are needed, the hard limit is {hard}: raise it (ulimit -Hn)")


# -- the server and its victim ---------------------------------------------------------------------------------


Row = collections.namedtuple("Row", "name opened endings held descriptors baseline peak after victim")


def measure_baseline(victim: str) -> Row:
    with tempfile.TemporaryDirectory(prefix="certdrop-fairness.") as work:
        server = start_certdrop(Path(work), {})
        try:
            token = warm_up(server.port)
            answers = [victim_get(server.port, token, victim) for _ in range(BASELINE_REQUESTS)]
            baseline = memory_mib(server.pid)
            return Row("baseline", 0, collections.Counter(), 0, descriptors(server.pid), baseline, baseline,
                       baseline, answers)
        finally:
            stop(server)


def measure_attack(name: str, attack: Attack, attacker: str, victim: str, seconds: int) -> Row:
    """Start a fresh server, take its baseline, run *attack* from *attacker* for *seconds* while *victim* asks."""
    print(f"{name}: {seconds} s ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="certdrop-fairness.") as work:
        server = start_certdrop(Path(work), {})
        attacking = None
        try:
            token = warm_up(server.port)
            for _ in range(8):
                victim_get(server.port, token, victim)
            baseline = memory_mib(server.pid)
            results, sending = multiprocessing.get_context("fork").Pipe(duplex=False)
            attacking = multiprocessing.get_context("fork").Process(
                target=run_attack, args=(sending, server.port, attacker, attack, seconds), daemon=True)
            attacking.start()
            samples = Sampler(server.pid)
            answers = []
            deadline = time.monotonic() + seconds
            for _ in range(int(seconds / VICTIM_INTERVAL) + 1):
                begun = time.monotonic()
                if begun > deadline:
                    break
                answers.append(victim_get(server.port, token, victim))
                time.sleep(max(0.0, VICTIM_INTERVAL - (time.monotonic() - begun)))
            opened, endings, held = results.recv() if results.poll(seconds + 30) else (0, {"no report": 1}, 0)
            attacking.join(10)
            time.sleep(3)  # the server's maintenance runs every second; lingering closes take 2 s
            samples.stop()
            after = memory_mib(server.pid)
            return Row(name, opened, collections.Counter(endings), held, samples.descriptors, baseline,
                       max(samples.rss, after), after, answers)
        finally:
            if attacking is not None and attacking.is_alive():
                attacking.kill()
            stop(server)


def victim_get(port: int, token: str, source: str) -> tuple[float, str]:
    """GET /c/<token> as an S60 phone on a fresh connection from *source*; return the seconds and the answer."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=VICTIM_TIMEOUT, source_address=(source, 0))
    begun = time.perf_counter()
    try:
        connection.request("GET", f"/c/{token}", headers={"User-Agent": S60})
        response = connection.getresponse()
        response.read()
        answer = str(response.status)
    except (http.client.HTTPException, OSError) as error:
        answer = type(error).__name__
    finally:
        connection.close()
    return time.perf_counter() - begun, answer


class Sampler:
    """The server's resident memory and open descriptors at most, sampled five times a second in a thread."""

    def __init__(self, pid: int):
        self.pid, self.rss, self.descriptors = pid, 0.0, 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopping.wait(0.2):
            with contextlib.suppress(OSError, StopIteration):
                self.rss = max(self.rss, memory_mib(self.pid))
                self.descriptors = max(self.descriptors, descriptors(self.pid))

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- the attacker ----------------------------------------------------------------------------------------------


class Slot:
    """One of the attacker's connections: its socket, what is still to send, what came back."""

    def __init__(self):
        self.sock, self.pending, self.body_left, self.answer = None, b"", 0, b""
        self.opened_at, self.closed_at = 0.0, -REOPEN_AFTER


def run_attack(report, port: int, source: str, attack: Attack, seconds: int) -> None:
    """Keep *attack*'s connections going from *source* for *seconds*; send (opened, endings, held at most)."""
    head = attack.head.format(port=port, declared=attack.declared).encode("ascii")
    body = b"0" * (FIREHOSE_CHUNK if attack.firehose else TRICKLE)
    slots = [Slot() for _ in range(attack.connections)]
    opened, endings, held = 0, collections.Counter(), 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        begun = time.monotonic()
        for slot in slots:
            if slot.sock is not None:
                ending = read(slot)
                if ending is None:
                    ending = write(slot, attack.drip, attack.firehose, body)
                if ending is not None:
                    endings[ending] += 1
                    close(slot, begun)
        # held: open since an earlier round and not answered (a connection still in the listen backlog counts too)
        held = max(held, sum(slot.sock is not None and not slot.answer and slot.opened_at < begun for slot in slots))
        for slot in slots:
            if slot.sock is None and opened < MOST_OPENED and begun - slot.closed_at >= REOPEN_AFTER:
                opened += 1
                if not open_slot(slot, port, source, head, attack.declared):
                    endings["connect failed"] += 1
                slot.opened_at = begun
        time.sleep(max(0.0, attack.interval - (time.monotonic() - begun)))
    for slot in slots:
        if slot.sock is not None:
            endings["open at the end" + (f", {status(slot)} read" if slot.answer else "")] += 1
            close(slot, 0.0)
    report.send((opened, dict(endings), held))


def open_slot(slot: Slot, port: int, source: str, head: bytes, declared: int) -> bool:
    sock = socket.socket()
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
        if sock.connect_ex(("127.0.0.1", port)) not in (0, errno.EINPROGRESS):
            sock.close()
            return False
    except OSError:
        sock.close()
        return False
    slot.sock, slot.pending, slot.body_left, slot.answer = sock, head, declared, b""
    return True


def read(slot: Slot) -> str | None:
    """Read what the server sent; return how the connection ended, or None while it lasts."""
    try:
        data = slot.sock.recv(65536)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as error:
        return ending(slot, "reset" if error.errno == errno.ECONNRESET else type(error).__name__)
    if not data:
        return ending(slot, "closed")
    if len(slot.answer) < 512:
        slot.answer += data[:512]
    return None


def write(slot: Slot, drip: bytes, firehose: bool, body: bytes) -> str | None:
    """Send the rest of the head, else one drip and the next of the body; return how the connection ended, or None."""
    try:
        if slot.pending:
            slot.pending = slot.pending[slot.sock.send(slot.pending):]
            return None
        if drip and not slot.answer:
            slot.sock.send(drip)
        for _ in range(64 if firehose else 1):  # a firehose round sends at most 4 MiB on one connection
            if slot.body_left <= 0:
                break
            slot.body_left -= slot.sock.send(body[:slot.body_left])
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as error:
        if error.errno == errno.ENOTCONN:  # still connecting: the server's backlog is full
            return None
        return ending(slot, "reset" if error.errno in (errno.ECONNRESET, errno.EPIPE) else type(error).__name__)
    return None


def status(slot: Slot) -> str:
    """Return the answer's status, "429 cap" for the server's per-client connection cap (its own message)."""
    parts = slot.answer.split(b" ", 2)
    if len(parts) < 3 or not parts[0].startswith(b"HTTP/"):
        return "junk"
    cap = parts[1] == b"429" and b"open connections" in slot.answer
    return parts[1].decode("ascii", "replace") + (" cap" if cap else "")


def ending(slot: Slot, how: str) -> str:
    """Name an ending by the answer that came before it ("413 then closed"), or *how* if none came."""
    return f"{status(slot)} then {how}" if slot.answer else f"{how} unanswered"


def close(slot: Slot, now: float) -> None:
    with contextlib.suppress(OSError):
        slot.sock.close()
    slot.sock, slot.closed_at = None, now


# -- the table -------------------------------------------------------------------------------------------------


def print_table(rows: list[Row], attacker: str, victim: str, seconds: int) -> None:
    print(f"\nAttacker {attacker}, victim {victim}, {seconds} s each; memory in MiB (VmRSS), over the baseline; "
          f"victim: GET /c/<token> as an S60 phone every {VICTIM_INTERVAL} s, fresh connection, ms")
    print(f"{'case':22} {'opened':>6} {'held':>5} {'fds':>5} {'base':>6} {'peak+':>6} {'after+':>6} "
          f"{'victim n':>8} {'median':>7} {'p99':>7} {'max':>7} {'not 200':>7}  verdict  attacker's endings")
    for row in rows:
        times = sorted(took for took, _ in row.victim)
        failed = sum(answer != "200" for _, answer in row.victim)
        passed = failed == 0 and times and times[-1] < VICTIM_TARGET
        if row.name.startswith(("slow-body", "allowed-body")):
            passed = passed and row.peak - row.baseline < BODY_TARGET_MIB
        others = collections.Counter(answer for _, answer in row.victim if answer != "200")
        endings = ", ".join(f"{how}: {number:,}" for how, number in row.endings.most_common())
        if others:
            endings += "; victim got " + ", ".join(f"{answer}: {number}" for answer, number in others.items())
        print(f"{row.name:22} {row.opened:6,} {row.held:5,} {row.descriptors:5,} {row.baseline:6.1f} "
              f"{row.peak - row.baseline:6.1f} {row.after - row.baseline:6.1f} {len(times):8} "
              f"{ms(statistics.median(times)):7} {ms(percentile(times, 0.99)):7} {ms(times[-1]):7} {failed:7}  "
              f"{verdict(passed):7}  {endings}", flush=True)
    print(f"Targets: every victim GET a 200 in under {VICTIM_TARGET:.0f} s; for the bodies also a peak under "
          f"{BODY_TARGET_MIB} MiB over the baseline.")


def percentile(ordered: list[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


if __name__ == "__main__":
    main()
