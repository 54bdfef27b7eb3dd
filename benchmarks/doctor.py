"""Measure how long the certificate doctor takes on a 150-certificate PEM bundle.

Usage: .venv/bin/python benchmarks/doctor.py [BUNDLE.pem]

The bundle defaults to the system's Mozilla roots (/etc/ssl/certs/ca-certificates.crt), topped up with generated
roots, or cut, to exactly 150 certificates. Prints the median and best of 20 runs of ``diagnose``, which parses,
inspects, orders and checks every certificate. The target is under 100 ms.
"""

import datetime
import statistics
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import certdrop  # noqa: E402

SIZE, RUNS = 150, 20
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def generated_root(number: int) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Benchmark Root {number}")])
    start = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(number + 1).not_valid_before(start).not_valid_after(start + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def bundle(path: Path | None) -> tuple[bytes, str]:
    source = path or SYSTEM_BUNDLE
    blocks = []
    if source.exists():
        blocks = [block.group(0) + b"\n" for block in certdrop.PEM_BLOCK_RE.finditer(source.read_bytes())][:SIZE]
    generated = SIZE - len(blocks)
    blocks += [generated_root(number) for number in range(generated)]
    return b"".join(blocks), f"{SIZE - generated} from {source}, {generated} generated"


def main() -> None:
    certdrop.quiet_library_warnings()
    data, origin = bundle(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    now = time.time()
    diagnosis = certdrop.diagnose(data, now=now)
    timings = []
    for _ in range(RUNS):
        start = time.perf_counter()
        certdrop.diagnose(data, now=now)
        timings.append(time.perf_counter() - start)
    median = statistics.median(timings)
    print(f"bundle: {len(diagnosis.certificates)} certificates ({origin}), {len(data)} bytes")
    print(f"diagnose: median {median * 1000:.1f} ms, best {min(timings) * 1000:.1f} ms over {RUNS} runs "
          f"({len(diagnosis.certificates) / median:,.0f} certificates/s); target < 100 ms: "
          f"{'met' if median < 0.1 else 'MISSED'}")


if __name__ == "__main__":
    main()
