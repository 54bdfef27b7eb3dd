"""certdrop: put a private CA certificate onto phones and laptops with one short link.

An administrator uploads the CA certificate once (on the page at ``/`` or with ``add``) and gets a link
``http://host/c/<token>``. Each device that opens the link gets what it can install: raw DER as
``application/x-x509-ca-cert`` for Nokia Symbian S60, a ``.crt`` download for everyone else.

Usage::

    python3 certdrop.py serve                 # run the web server under waitress
    python3 certdrop.py add ca.pem --ttl 7d   # store a certificate, print its link
    python3 certdrop.py list | show TOKEN | revoke TOKEN | gc

Configuration comes from ``-c/--config PATH``, else ``$CERTDROP_CONFIG``, else ``certdrop.ini`` beside this
file, else the built-in defaults of :class:`Config`. Every key is documented in ``certdrop.ini``.
"""

import base64
import binascii
import configparser
import contextlib
import dataclasses
import functools
import hashlib
import html
import io
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import socket
import string
import sys
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from http import HTTPStatus
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

try:
    import fcntl
except ImportError:  # Windows: one process per data directory, guarded by a thread lock only
    fcntl = None

__version__ = "0.1.0"

log = logging.getLogger("certdrop")


###############################################################################
# Constants ###################################################################
###############################################################################

MODULE_DIR = Path(__file__).resolve().parent

#: Token characters: lowercase letters and digits without the look-alikes 0 o 1 l i,
#: because people type these links on phone keypads.
TOKEN_ALPHABET = "23456789abcdefghjkmnpqrstuvwxyz"

#: A well-formed token path; old links keep working when the configured length changes.
TOKEN_RE = re.compile(f"[{TOKEN_ALPHABET}]{{6,32}}")

#: Seconds a cached entry is trusted before its file is looked at again, so that a
#: revocation made by another process is seen within two seconds.
REVALIDATE_SECONDS = 1.0

#: Temporary files older than this are leftovers of a crashed writer; the sweep removes them.
STALE_TEMP_SECONDS = 3600

MIME_CA_CERT = "application/x-x509-ca-cert"
MIME_HTML = "text/html; charset=utf-8"
MIME_TEXT = "text/plain; charset=utf-8"
MIME_JSON = "application/json"

STATUS_LINES = {status.value: f"{status.value} {status.phrase}" for status in HTTPStatus}

#: Lifetimes offered on the upload form, shortest first; "cert" means until the certificate expires.
TTL_CHOICES = (
    ("1h", "1 hour"),
    ("1d", "1 day"),
    ("7d", "7 days"),
    ("30d", "30 days"),
    ("90d", "90 days"),
    ("365d", "1 year"),
    ("cert", "until the certificate expires"),
)

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

#: Command-line HTTP clients get plain text instead of HTML.
TEXT_AGENTS = ("curl/", "wget/", "httpie/", "python-requests/", "python-urllib/", "powershell/")

#: Nokia Symbian S60 browsers. Android phones named "S60" exist (Cat S60, Lenovo S60),
#: so these markers count only without an Android token.
S60_RE = re.compile(r"SymbianOS|Symbian/3|Series ?60|\bS60(?:V\d)?\b|SymbOS")
ANDROID_RE = re.compile(r"\bAndroid\b")


###############################################################################
# Errors ######################################################################
###############################################################################


class CertdropError(Exception):
    """An error whose message is written for the person who caused it."""


class ConfigError(CertdropError):
    """The configuration file is missing, unreadable or holds a bad value."""


class CertificateError(CertdropError):
    """The upload is not something certdrop will store."""


class UnknownToken(CertdropError):
    """No link with this token exists (or its entry is unreadable)."""


class LinkGone(CertdropError):
    """The link existed but was revoked or has expired."""

    def __init__(self, reason: str, since: float):
        #: "revoked" or "expired"
        self.reason = reason
        #: Unix time of the revocation or expiry
        self.since = since
        super().__init__(f"This link {'was revoked' if reason == 'revoked' else 'expired'} on {format_time(since)}.")


class HTTPError(Exception):
    """An answer other than success, with a status and a message for people."""

    status = 500
    message = "Something went wrong on the server. The error has been logged."

    def __init__(self, message: str | None = None, headers: tuple = ()):
        self.message = message or self.message
        self.headers = tuple(headers)
        super().__init__(self.message)


class BadRequest(HTTPError):
    status = 400
    message = "The request could not be understood."


class NotFound(HTTPError):
    status = 404
    message = "There is no such page or link. Check the address for typing mistakes."


class MethodNotAllowed(HTTPError):
    status = 405

    def __init__(self, allowed: list[str]):
        super().__init__(f"This address accepts only {', '.join(allowed)}.", headers=(("Allow", ", ".join(allowed)),))


class Gone(HTTPError):
    status = 410


class PayloadTooLarge(HTTPError):
    status = 413


class UnsupportedMediaType(HTTPError):
    status = 415


class Unprocessable(HTTPError):
    status = 422


def http_error_for(error: CertdropError) -> HTTPError:
    """Return the HTTP answer for a domain error raised by the doctor or the store."""
    if isinstance(error, CertificateError):
        return Unprocessable(str(error))
    if isinstance(error, LinkGone):
        return Gone(str(error))
    if isinstance(error, UnknownToken):
        return NotFound(NotFound.message)
    return HTTPError()


###############################################################################
# Configuration ###############################################################
###############################################################################


def parse_duration(text: str) -> int:
    """Return seconds for ``"90s"``, ``"45m"``, ``"12h"``, ``"7d"``, ``"2w"`` or a bare number of seconds."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", text.lower())
    if not match or int(match[1]) == 0:
        raise ValueError(f"{text!r} is not a duration like 90m, 12h, 7d or 2w")
    return int(match[1]) * DURATION_UNITS.get(match[2] or "s")


def parse_size(text: str) -> int:
    """Return bytes for ``"1048576"``, ``"512KiB"``, ``"1MiB"`` (also KB/MB, meaning the same powers of two)."""
    match = re.fullmatch(r"\s*(\d+)\s*(|b|k|kb|kib|m|mb|mib)\s*", text.lower())
    if not match or int(match[1]) == 0:
        raise ValueError(f"{text!r} is not a size like 1MiB or 512KiB")
    factor = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024}.get(match[2], 1024 * 1024)
    return int(match[1]) * factor


def format_duration(seconds: float) -> str:
    """Return a rough human duration: ``"3 days"``, ``"5 hours"``, ``"20 minutes"``."""
    seconds = max(0, int(seconds))
    for unit, size in (("year", 365 * 86400), ("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} seconds"


def format_time(timestamp: float) -> str:
    """Return a Unix time as ``2026-11-22 20:43 UTC``."""
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _parse_max_ttl(text: str) -> int | None:
    return None if text.strip().lower() in ("certificate", "cert") else parse_duration(text)


def _parse_public_url(text: str) -> str:
    text = text.strip().rstrip("/")
    if text and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", text):
        raise ValueError(f"{text!r} is not an http:// or https:// address")
    return text


def _parse_log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"{text!r} is not one of debug, info, warning, error")
    return level


def _parse_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise ValueError(f"{value} is not between {low} and {high}")
        return value

    return parse


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting, with the built-in defaults; ``certdrop.ini`` documents each key."""

    host: str = "0.0.0.0"  # address to listen on; 0.0.0.0 = all IPv4 interfaces
    port: int = 8080  # TCP port
    public_url: str = ""  # e.g. https://intranet.example.com/certdrop; empty = from the request's Host
    data_dir: Path = MODULE_DIR / "data"  # where entries live; relative paths are relative to the ini file
    token_length: int = 8  # characters in a new token (31 symbols each, about 5 bits)
    default_ttl: int = 7 * 86400  # seconds a link lives when the uploader does not choose
    max_ttl: int | None = None  # longest lifetime allowed, seconds; None = up to the certificate's expiry
    tombstone_ttl: int = 30 * 86400  # seconds an expired or revoked link keeps answering 410
    sweep_interval: int = 3600  # seconds between expiry sweeps in the server; 0 = never
    max_upload: int = 1024 * 1024  # bytes in one upload request
    cache_entries: int = 10000  # entries kept in memory
    threads: int = 4  # waitress worker threads
    log_level: str = "INFO"  # debug, info, warning or error

    @classmethod
    def from_ini(cls, path: Path) -> "Config":
        """Read *path*; raise ConfigError naming the file and key for anything unknown or malformed."""
        parser = configparser.ConfigParser(interpolation=None)
        try:
            with open(path, encoding="utf-8") as file:
                parser.read_file(file)
        except (OSError, UnicodeDecodeError, configparser.Error) as error:
            raise ConfigError(f"cannot read {path}: {error}") from None
        unknown_sections = set(parser.sections()) - {"certdrop"}
        if unknown_sections:
            raise ConfigError(f"unknown section [{sorted(unknown_sections)[0]}] in {path}")
        values = {}
        for key, text in parser.items("certdrop") if parser.has_section("certdrop") else ():
            if key not in CONFIG_PARSERS:
                raise ConfigError(f"unknown setting {key!r} in {path}")
            try:
                values[key] = CONFIG_PARSERS[key](text)
            except ValueError as error:
                raise ConfigError(f"bad value for {key!r} in {path}: {error}") from None
        if "data_dir" in values:
            values["data_dir"] = (path.parent / values["data_dir"]).resolve()
        if values.get("max_ttl") and values["max_ttl"] < values.get("default_ttl", cls.default_ttl):
            raise ConfigError(f"bad value for 'max_ttl' in {path}: it is shorter than default_ttl")
        return cls(**values)


CONFIG_PARSERS: dict[str, Callable[[str], object]] = {
    "host": str.strip,
    "port": _parse_int(0, 65535),
    "public_url": _parse_public_url,
    "data_dir": lambda text: Path(text.strip()).expanduser(),
    "token_length": _parse_int(6, 32),
    "default_ttl": parse_duration,
    "max_ttl": _parse_max_ttl,
    "tombstone_ttl": parse_duration,
    "sweep_interval": lambda text: 0 if text.strip() == "0" else parse_duration(text),
    "max_upload": parse_size,
    "cache_entries": _parse_int(1, 10_000_000),
    "threads": _parse_int(1, 256),
    "log_level": _parse_log_level,
}


def load_config(path: str | None = None) -> Config:
    """Return the configuration from *path*, ``$CERTDROP_CONFIG``, ``certdrop.ini`` beside the module, or defaults."""
    path = path or os.environ.get("CERTDROP_CONFIG")
    if path:
        return Config.from_ini(Path(path).resolve())
    default = MODULE_DIR / "certdrop.ini"
    return Config.from_ini(default) if default.exists() else Config()


###############################################################################
# Certificates ################################################################
###############################################################################

PEM_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----")
PEM_PRIVATE_KEY_RE = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")


@dataclasses.dataclass(frozen=True)
class Certificate:
    """The facts about one X.509 certificate that certdrop shows and serves."""

    der: bytes
    subject: str
    issuer: str
    common_names: tuple[str, ...]
    organization: str | None
    serial: int
    not_before: datetime
    not_after: datetime
    sha256: bytes
    sha1: bytes

    @property
    def name(self) -> str:
        """Return what people call this certificate: its first CN, else its O, else "CA"."""
        if self.common_names:
            return self.common_names[0]
        return self.organization or "CA"

    @property
    def file_stem(self) -> str:
        """Return a file name (no extension) made only of safe characters."""
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", self.name).strip("._-")[:64]
        return stem or "ca"

    @property
    def serial_hex(self) -> str:
        return colon_hex(self.serial.to_bytes((self.serial.bit_length() + 7) // 8 or 1, "big"))


def colon_hex(data: bytes) -> str:
    """Return bytes as colon-separated upper-case hex, the way Windows and phones show fingerprints."""
    return data.hex(":").upper()


def _name_values(name: x509.Name, oid: x509.ObjectIdentifier) -> tuple[str, ...]:
    return tuple(str(attribute.value) for attribute in name.get_attributes_for_oid(oid))


def inspect_certificate(cert: x509.Certificate) -> Certificate:
    """Return the facts certdrop needs from a parsed certificate."""
    der = cert.public_bytes(serialization.Encoding.DER)
    organizations = _name_values(cert.subject, NameOID.ORGANIZATION_NAME)
    return Certificate(
        der=der,
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        common_names=_name_values(cert.subject, NameOID.COMMON_NAME),
        organization=organizations[0] if organizations else None,
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        sha256=hashlib.sha256(der).digest(),
        sha1=hashlib.sha1(der).digest(),
    )


def load_der(der: bytes) -> Certificate:
    """Return the facts of a DER certificate; raise CertificateError if it is not one."""
    try:
        return inspect_certificate(x509.load_der_x509_certificate(der))
    except ValueError:
        raise CertificateError("This is not a DER certificate.") from None


def read_upload(data: bytes) -> Certificate:
    """Return the one certificate in an uploaded PEM or DER file, or raise CertificateError saying why not."""
    if not data.strip():
        raise CertificateError("The upload is empty. Choose the CA certificate file or paste its text.")
    if PEM_PRIVATE_KEY_RE.search(data):
        raise CertificateError(
            "This upload contains a private key. A CA's private key must never leave the CA: "
            "only its certificate is needed. Nothing was stored."
        )
    if not PEM_CERT_RE.search(data):
        return load_der(data) if data[:1] == b"\x30" else _refuse_unknown()
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError("The PEM text is damaged: a certificate block could not be decoded.") from None
    if len(certs) > 1:
        raise CertificateError(
            f"This file holds {len(certs)} certificates. Upload the CA certificate on its own "
            "(the top entry of the certificate's Certification Path)."
        )
    return inspect_certificate(certs[0])


def _refuse_unknown() -> Certificate:
    raise CertificateError(
        "This is neither a PEM nor a DER certificate. Upload the CA certificate as a .cer, .crt, .der or .pem file."
    )


###############################################################################
# Store #######################################################################
###############################################################################


@dataclasses.dataclass(frozen=True)
class Entry:
    """One link: its token, lifetime and certificate. Without DER it is a tombstone that answers 410."""

    token: str
    created: float
    expires: float
    der: bytes | None = None
    revoked: float | None = None

    def gone(self, now: float) -> LinkGone | None:
        """Return why this link no longer serves at *now*, or None while it is live."""
        if self.revoked is not None:
            return LinkGone("revoked", self.revoked)
        if now >= self.expires or self.der is None:
            return LinkGone("expired", self.expires)
        return None

    @functools.cached_property
    def certificate(self) -> Certificate:
        return load_der(self.der)

    def to_json(self) -> bytes:
        record = {"format": 1, "token": self.token, "created": self.created, "expires": self.expires,
                  "revoked": self.revoked}
        if self.der is not None:
            record["sha256"] = hashlib.sha256(self.der).hexdigest()
            record["der"] = base64.b64encode(self.der).decode("ascii")
        return json.dumps(record, indent=1).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, token: str, data: bytes) -> "Entry":
        """Return the entry stored in *data*; raise ValueError if it is damaged or belongs to another token."""
        record = json.loads(data)
        if record.get("format") != 1 or record.get("token") != token:
            raise ValueError("wrong format or token")
        der = None
        if "der" in record:
            der = base64.b64decode(record["der"], validate=True)
            if hashlib.sha256(der).hexdigest() != record.get("sha256"):
                raise ValueError("certificate does not match its checksum")
        revoked = record.get("revoked")
        return cls(token, float(record["created"]), float(record["expires"]), der,
                   None if revoked is None else float(revoked))


class Store:
    """Entries on disk, one JSON file per token, with a bounded memory cache in front.

    Files are replaced atomically and made durable before an upload is acknowledged, so a crash never leaves
    a half-written entry to serve. Several processes may share the directory: writers take a file lock, and a
    cached entry is re-checked against its file at most every REVALIDATE_SECONDS.
    """

    def __init__(self, directory: Path, *, token_length: int = 8, cache_entries: int = 10000,
                 tombstone_ttl: float = 30 * 86400, clock: Callable[[], float] = time.time,
                 revalidate_after: float = REVALIDATE_SECONDS):
        self.directory = Path(directory)
        self.token_length = token_length
        self.cache_entries = cache_entries
        self.tombstone_ttl = tombstone_ttl
        self.clock = clock
        self.revalidate_after = revalidate_after
        self._cache: OrderedDict[str, tuple[Entry, tuple, float]] = OrderedDict()
        self._lock = threading.Lock()

    # -- paths: derived only from tokens that match TOKEN_RE -------------------------------------------------

    def path_for(self, token: str) -> Path:
        """Return the entry file of *token*; raise UnknownToken for anything that is not a token."""
        if not TOKEN_RE.fullmatch(token):
            raise UnknownToken(token)
        return self.directory / token[:2] / f"{token}.json"

    def _index_path(self, sha256: bytes) -> Path:
        return self.directory / "sha256" / sha256.hex()

    # -- reading ------------------------------------------------------------------------------------------

    def get(self, token: str) -> Entry:
        """Return the live entry for *token*; raise UnknownToken or LinkGone."""
        token = token.lower()
        entry = self._cached(token) or self._load(token)
        gone = entry.gone(self.clock())
        if gone:
            raise gone
        return entry

    def lookup(self, token: str) -> Entry:
        """Return the entry for *token* whether live or gone; raise UnknownToken."""
        token = token.lower()
        return self._cached(token) or self._load(token)

    def _cached(self, token: str) -> Entry | None:
        with self._lock:
            item = self._cache.get(token)
            if item is None:
                return None
            entry, signature, checked = item
            if time.monotonic() - checked < self.revalidate_after:
                self._cache.move_to_end(token)
                return entry
        if _file_signature(self.path_for(token)) != signature:
            with self._lock:
                self._cache.pop(token, None)
            return None
        with self._lock:
            self._cache[token] = (entry, signature, time.monotonic())
            self._cache.move_to_end(token)
        return entry

    def _load(self, token: str) -> Entry:
        path = self.path_for(token)
        try:
            with open(path, "rb") as file:
                signature = _file_signature_of(file)
                data = file.read()
        except FileNotFoundError:
            raise UnknownToken(token) from None
        try:
            entry = Entry.from_json(token, data)
            if entry.der is not None:
                entry.certificate  # parse once now, so a damaged certificate is caught here, not while serving
        except (ValueError, KeyError, TypeError, binascii.Error, CertificateError) as error:
            log.warning("entry %s is damaged and is not served: %s", path, error)
            raise UnknownToken(token) from None
        self._remember(entry, signature)
        return entry

    def _remember(self, entry: Entry, signature: tuple) -> None:
        with self._lock:
            self._cache[entry.token] = (entry, signature, time.monotonic())
            self._cache.move_to_end(entry.token)
            while len(self._cache) > self.cache_entries:
                self._cache.popitem(last=False)

    def entries(self) -> Iterator[Entry]:
        """Yield every readable entry on disk, live or gone, skipping damaged files with a warning."""
        for path in sorted(self.directory.glob("??/*.json")):
            try:
                yield self.lookup(path.stem)
            except UnknownToken:
                continue

    # -- writing ------------------------------------------------------------------------------------------

    def add(self, certificate: Certificate, expires: float) -> tuple[Entry, bool]:
        """Store *certificate* until *expires*; return its entry and whether the link is new.

        A certificate that already has a live link keeps it, and the link's expiry moves to the later of the two.
        """
        with self._exclusive():
            existing = self._live_entry_for(certificate.sha256)
            if existing is not None:
                entry = dataclasses.replace(existing, expires=max(existing.expires, expires))
                if entry != existing:
                    self._write(entry)
                return entry, False
            entry = Entry(self._new_token(), self.clock(), expires, certificate.der)
            self._write(entry)
            _write_atomically(self._index_path(certificate.sha256), entry.token.encode("ascii"))
            return entry, True

    def revoke(self, token: str) -> Entry:
        """Revoke *token* now, keeping a tombstone; raise UnknownToken or LinkGone if it is not live."""
        with self._exclusive():
            entry = self._load(token.lower())
            gone = entry.gone(self.clock())
            if gone:
                raise gone
            self._drop_index(entry)
            tombstone = dataclasses.replace(entry, der=None, revoked=self.clock())
            self._write(tombstone)
            return tombstone

    def sweep(self) -> dict[str, int]:
        """Turn expired entries into tombstones, delete old tombstones and stale temporary files; return counts."""
        counts = {"expired": 0, "deleted": 0, "temporary": 0}
        now = self.clock()
        with self._exclusive():
            for path in self.directory.glob("??/*.json"):
                outcome = self._sweep_entry(path, now)
                if outcome:
                    counts[outcome] += 1
            for path in self.directory.glob("*/.*.tmp"):
                if time.time() - path.stat().st_mtime > STALE_TEMP_SECONDS:
                    path.unlink(missing_ok=True)
                    counts["temporary"] += 1
        return counts

    def _sweep_entry(self, path: Path, now: float) -> str | None:
        try:
            entry = self._load(path.stem)
        except UnknownToken:
            return None
        gone = entry.gone(now)
        if gone is None:
            return None
        if now >= gone.since + self.tombstone_ttl:
            self._drop_index(entry)
            path.unlink(missing_ok=True)
            self._forget(entry.token)
            return "deleted"
        if entry.der is not None:
            self._drop_index(entry)
            self._write(dataclasses.replace(entry, der=None))
            return "expired"
        return None

    def _live_entry_for(self, sha256: bytes) -> Entry | None:
        try:
            token = self._index_path(sha256).read_text("ascii").strip()
            entry = self._load(token)
        except (FileNotFoundError, UnknownToken, UnicodeDecodeError):
            return None
        return None if entry.gone(self.clock()) else entry

    def _drop_index(self, entry: Entry) -> None:
        if entry.der is None:
            return
        index = self._index_path(hashlib.sha256(entry.der).digest())
        with contextlib.suppress(FileNotFoundError, UnicodeDecodeError):
            if index.read_text("ascii").strip() == entry.token:
                index.unlink()

    def _new_token(self) -> str:
        while True:
            token = "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(self.token_length))
            if not self.path_for(token).exists():
                return token

    def _write(self, entry: Entry) -> None:
        path = self.path_for(entry.token)
        _write_atomically(path, entry.to_json())
        self._remember(entry, _file_signature(path))

    def _forget(self, token: str) -> None:
        with self._lock:
            self._cache.pop(token, None)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the directory's write lock, shared with every other process using it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".lock", "a+b") as lock_file:
            if fcntl is not None:
                fcntl.flock(lock_file, fcntl.LOCK_EX)
            yield


def _file_signature(path: Path) -> tuple:
    try:
        status = path.stat()
    except FileNotFoundError:
        return ()
    return (status.st_ino, status.st_size, status.st_mtime_ns)


def _file_signature_of(file) -> tuple:
    status = os.fstat(file.fileno())
    return (status.st_ino, status.st_size, status.st_mtime_ns)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write *data* to *path* so that readers see the old file or the whole new one, even after power loss."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        with open(temporary, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":  # Windows cannot open a directory; NTFS journals the rename itself
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


###############################################################################
# Links #######################################################################
###############################################################################


def is_loopback_host(host: str) -> bool:
    """Return whether *host* (a name or address, without port) names this machine only."""
    host = host.strip("[]").lower().rstrip(".")
    if host in ("localhost", "ip6-localhost", "ip6-loopback") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@functools.cache
def machine_name() -> str | None:
    """Return a name of this machine that other devices may reach, or None if it only knows itself as localhost."""
    for name in (socket.getfqdn(), socket.gethostname()):
        if name and not is_loopback_host(name):
            return name
    return None


def split_host(host_header: str) -> tuple[str, str]:
    """Return (host, ":port" or "") from a Host header; raise BadRequest if it is not a host name or address."""
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?", host_header)
    if not match:
        raise BadRequest("The Host header is not a valid host name.")
    return match[1], match[2] or ""


def install_url(base: str, token: str) -> str:
    return f"{base}/c/{token}"


def reachable_base(base: str, port: str) -> str | None:
    """Return *base* rebuilt on the machine's reachable name when *base* points at loopback, else None."""
    parts = urllib.parse.urlsplit(base)
    if not is_loopback_host(parts.hostname or ""):
        return None
    name = machine_name()
    if name is None:
        return None
    return f"{parts.scheme}://{name}{port}{parts.path}"


###############################################################################
# Rendering ###################################################################
###############################################################################

CSS = """
body{font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2430;background:#f4f6f9}
main{max-width:46rem;margin:0 auto;padding:1.25rem}
h1{font-size:1.6rem;margin:.5rem 0 1rem}h2{font-size:1.15rem;margin:1.75rem 0 .5rem}
section,form{background:#fff;border:1px solid #dde3ea;border-radius:8px;padding:1rem 1.25rem;margin:1rem 0}
label{display:block;font-weight:600;margin:.75rem 0 .25rem}
textarea{width:100%;box-sizing:border-box;min-height:8rem;font:13px/1.3 ui-monospace,monospace}
button{font:inherit;font-weight:600;padding:.55rem 1.4rem;border:0;border-radius:6px;background:#1f5fbf;color:#fff}
.link{font-size:1.7rem;font-weight:700;word-break:break-all;margin:.25rem 0}
.link a{color:#1f5fbf}
.warn{background:#fff6e0;border-color:#f0c36d}
.error{background:#fdecec;border-color:#e8a3a3}
table{border-collapse:collapse;width:100%}th,td{text-align:left;vertical-align:top;padding:.3rem .5rem .3rem 0}
th{white-space:nowrap;color:#556}td{word-break:break-all}
code,.fp{font:13px/1.4 ui-monospace,monospace}
.muted,footer{color:#667;font-size:.9rem}footer{text-align:center;padding:1rem}
"""

#: Pages carry no script at all; the one inline style block is allowed by its hash.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; "
    f"style-src 'sha256-{base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()}'; "
    "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

HTML_HEADERS = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("Referrer-Policy", "no-referrer"),  # tokens are in our URLs
    ("X-Frame-Options", "DENY"),
)

# Pages are polyglot HTML5: they are also well-formed XML, so tests can parse them and old XHTML browsers cope.
LAYOUT = string.Template("""<!DOCTYPE html>
<html xmlns="http://www.w3.org/1999/xhtml" lang="en">
<head>
<meta charset="utf-8" />
<meta name="viewport" content="width=device-width, initial-scale=1" />
<title>$title</title>
<style>$css_html</style>
</head>
<body>
<main>
$body_html
</main>
<footer>certdrop $version</footer>
</body>
</html>
""")


def esc(value: object) -> str:
    """Return *value* as text safe inside HTML and XML, attribute values included."""
    return html.escape(str(value), quote=True)


def render(template: string.Template, **values: object) -> str:
    """Fill *template*, escaping every value except those whose name ends in ``_html``."""
    return template.substitute({key: value if key.endswith("_html") else esc(value) for key, value in values.items()})


def render_page(title: str, body_html: str) -> bytes:
    return render(LAYOUT, title=title, css_html=CSS, body_html=body_html, version=__version__).encode("utf-8")


UPLOAD_FORM = string.Template("""<h1>Share a CA certificate</h1>
<p>Upload your CA certificate once and get a short link. Open the link on each phone or laptop:
it gets the certificate in the form that device installs.</p>
<form method="post" action="$action" enctype="multipart/form-data">
<label for="cert">Certificate file (.cer, .crt, .der or .pem)</label>
<input type="file" id="cert" name="cert" />
<label for="pem">or paste the certificate text</label>
<textarea id="pem" name="pem" rows="8" cols="64" placeholder="-----BEGIN CERTIFICATE-----"></textarea>
<label for="ttl">The link works for</label>
<select id="ttl" name="ttl">$options_html</select>
<p><button type="submit">Get the link</button></p>
</form>
<section>
<h2>Which file?</h2>
<p>Phones need the certificate of the <strong>CA that issued</strong> your server's certificate, not the server
certificate itself.</p>
<ul>
<li>Windows certificate services: open <code>http://your-ca-server/certsrv</code>, choose
<em>Download a CA certificate, certificate chain, or CRL</em>, then <em>Download CA certificate</em>
(DER or Base 64, either works).</li>
<li>On Windows, from a server certificate: open it, go to <em>Certification Path</em>, select the
<strong>top</strong> entry, <em>View Certificate</em>, then <em>Details</em> and <em>Copy to File</em>.</li>
<li>OpenSSL or step-ca: upload the root certificate file (often <code>ca.crt</code> or
<code>root_ca.crt</code>), never a file with a private key.</li>
</ul>
</section>
""")


def render_upload_form(config: Config, action: str) -> bytes:
    options = []
    for value, label in allowed_ttl_choices(config):
        selected = ' selected="selected"' if ttl_seconds_for(value) == config.default_ttl else ""
        options.append(f'<option value="{esc(value)}"{selected}>{esc(label)}</option>')
    return render_page("certdrop", render(UPLOAD_FORM, action=action, options_html="".join(options)))


#: What the administrator passes on to each device family.
INSTALL_STEPS = (
    ("Nokia Symbian (S60: E- and N-series)",
     "Open the link in the phone's own browser and choose Save. Give the certificate a name and tick the trust "
     "entry for Internet connections (\u201cInternet\u201d on 3rd edition; the name varies by release). "
     "If the phone still warns, restart it."),
    ("Android",
     "Open the link; the file is downloaded. Then Settings \u203a Security \u203a Encryption & credentials \u203a "
     "Install a certificate \u203a CA certificate, and pick the downloaded file. Android needs a screen lock for this."),
    ("iPhone and iPad",
     "Open the link in Safari and allow the download. Install it in Settings \u203a Profile Downloaded within "
     "8 minutes, then turn on full trust in Settings \u203a General \u203a About \u203a Certificate Trust Settings."),
    ("Windows",
     "Open the downloaded file, choose Install Certificate, and place it in \u201cTrusted Root Certification "
     "Authorities\u201d. As an administrator: certutil -addstore root FILE.crt"),
    ("macOS",
     "Open the downloaded file in Keychain Access, then open the certificate and set \u201cWhen using this "
     "certificate\u201d to Always Trust."),
    ("Firefox",
     "Settings \u203a Privacy & Security \u203a Certificates \u203a View Certificates \u203a Authorities \u203a "
     "Import, then tick \u201cTrust this CA to identify websites\u201d."),
    ("Linux",
     "Convert and install the downloaded file: openssl x509 -inform der -in FILE.crt -out "
     "/usr/local/share/ca-certificates/FILE.crt && update-ca-certificates"),
)

RESULT_PAGE = string.Template("""<h1>$heading</h1>
<section>
<p class="muted">Install link</p>
<p class="link"><a href="$url">$url</a></p>
<p>Works until $expires (for $remaining).</p>
$reachable_html
</section>
<section>
<h2>What you uploaded</h2>
$facts_html
<p class="muted">Before trusting the certificate on a device, compare its SHA-256 or SHA-1 fingerprint with
the one above: the link is plain HTTP, and the fingerprint is what proves the file was not swapped.</p>
</section>
<section>
<h2>How to install it</h2>
$steps_html
</section>
<p><a href="$home">Share another certificate</a></p>
""")

REACHABLE_NOTE = string.Template("""<div class="warn"><p><strong>Phones cannot open this link:</strong> $host
is this server's own loopback name. $advice_html</p></div>""")


def render_facts(certificate: Certificate) -> str:
    rows = (
        ("Name", certificate.name),
        ("Subject", certificate.subject),
        ("Issuer", certificate.issuer),
        ("Valid from", format_time(certificate.not_before.timestamp())),
        ("Valid until", format_time(certificate.not_after.timestamp())),
        ("Serial", certificate.serial_hex),
        ("SHA-256", colon_hex(certificate.sha256)),
        ("SHA-1", colon_hex(certificate.sha1)),
    )
    cells = "".join(f'<tr><th>{esc(label)}</th><td class="{"fp" if label.startswith("SHA") else ""}">'
                    f"{esc(value)}</td></tr>" for label, value in rows)
    return f"<table>{cells}</table>"


def render_reachable_note(url: str, port: str) -> str:
    """Return the warning shown when *url* points at loopback, with the link on the machine's name if known."""
    parts = urllib.parse.urlsplit(url)
    if not is_loopback_host(parts.hostname or ""):
        return ""
    base = reachable_base(f"{parts.scheme}://{parts.netloc}", port)
    if base:
        other = base + parts.path
        advice = f'Use this link instead: <a href="{esc(other)}">{esc(other)}</a>'
    else:
        advice = "Open this page by the server's name or address, or set public_url in certdrop.ini."
    return render(REACHABLE_NOTE, host=parts.hostname, advice_html=advice)


def render_result(entry: Entry, url: str, port: str, created: bool, now: float, home: str) -> bytes:
    steps = "".join(f"<h3>{esc(family)}</h3><p>{esc(text)}</p>" for family, text in INSTALL_STEPS)
    body = render(
        RESULT_PAGE,
        heading="Your install link" if created else "This certificate already has a link",
        url=url,
        expires=format_time(entry.expires),
        remaining=format_duration(entry.expires - now),
        reachable_html=render_reachable_note(url, port),
        facts_html=render_facts(entry.certificate),
        steps_html=steps,
        home=home,
    )
    return render_page(f"Link for {entry.certificate.name}", body)


ERROR_PAGE = string.Template("""<h1>$title</h1>
<section class="error"><p>$message</p></section>
<p><a href="$home">Back to the upload page</a></p>
""")


###############################################################################
# HTTP plumbing ###############################################################
###############################################################################


@dataclasses.dataclass(frozen=True)
class Request:
    """What certdrop uses of one WSGI request; the body is read only by handlers that want it."""

    environ: dict
    method: str
    path: str
    query: dict[str, str]

    @classmethod
    def from_environ(cls, environ: dict) -> "Request":
        method = environ.get("REQUEST_METHOD", "GET").upper()
        query = dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True))
        return cls(environ, method, environ.get("PATH_INFO", "") or "/", query)

    def header(self, name: str) -> str:
        return self.environ.get("HTTP_" + name.upper().replace("-", "_"), "")

    @property
    def user_agent(self) -> str:
        return self.header("User-Agent")

    @property
    def script_name(self) -> str:
        return self.environ.get("SCRIPT_NAME", "").rstrip("/")

    def read_body(self, limit: int) -> bytes:
        """Return the request body; raise PayloadTooLarge past *limit* bytes without reading it."""
        declared = self.environ.get("CONTENT_LENGTH") or ""
        if declared and not declared.isdigit():
            raise BadRequest("The Content-Length header is not a number.")
        too_large = PayloadTooLarge(f"The upload is larger than the limit of {format_size(limit)}. "
                                    "A CA certificate is a few kilobytes: check that you chose the right file.")
        length = int(declared or 0)
        if length > limit:
            raise too_large
        stream = self.environ["wsgi.input"]
        if not declared:  # chunked bodies carry no length; read at most one byte past the limit
            body = stream.read(limit + 1) if self.environ.get("wsgi.input_terminated") else b""
            if len(body) > limit:
                raise too_large
            return body
        body = stream.read(length)
        if len(body) < length:
            raise BadRequest("The request body ended before its declared length.")
        return body


@dataclasses.dataclass(frozen=True)
class Response:
    """What to send: status, body and headers. Only :func:`send` turns it into WSGI calls."""

    body: bytes
    status: int = 200
    content_type: str = MIME_HTML
    headers: tuple[tuple[str, str], ...] = ()


def send(response: Response, start_response: Callable, head: bool = False) -> list[bytes]:
    """Start the WSGI response and return its body (empty for HEAD, with the same Content-Length)."""
    headers = [("Content-Type", response.content_type), ("Content-Length", str(len(response.body))),
               ("X-Content-Type-Options", "nosniff"), *response.headers]
    for name, value in headers:
        if "\r" in value or "\n" in value or "\0" in value:
            raise ValueError(f"control character in header {name}")
    start_response(STATUS_LINES[response.status], headers)
    return [b""] if head else [response.body]


def response_format(request: Request) -> str:
    """Return "json", "text" or "html": what this client wants for pages and errors."""
    accept = request.header("Accept").lower()
    if "application/json" in accept and "text/html" not in accept:
        return "json"
    agent = request.user_agent.lower()
    if agent.startswith(TEXT_AGENTS) or ("text/plain" in accept and "text/html" not in accept):
        return "text"
    return "html"


def render_error(request: Request, error: HTTPError, home: str) -> Response:
    title = HTTPStatus(error.status).phrase
    fmt = response_format(request)
    headers = (("Vary", "Accept, User-Agent"), ("Cache-Control", "no-store"), *error.headers)
    if fmt == "json":
        body = json.dumps({"error": {"status": error.status, "message": error.message}}).encode()
        return Response(body, error.status, MIME_JSON, headers)
    if fmt == "text":
        return Response(f"{error.status} {title}: {error.message}\n".encode(), error.status, MIME_TEXT, headers)
    page = render_page(title, render(ERROR_PAGE, title=title, message=error.message, home=home))
    return Response(page, error.status, MIME_HTML, headers + HTML_HEADERS)


def format_size(size: int) -> str:
    return f"{size // (1024 * 1024)} MiB" if size % (1024 * 1024) == 0 else f"{size // 1024} KiB"


def parse_form(request: Request, limit: int) -> dict[str, bytes]:
    """Return the fields of a posted form (multipart or urlencoded) as bytes; raise an HTTPError for anything else."""
    content_type = request.environ.get("CONTENT_TYPE", "")
    body = request.read_body(limit)
    mime, _, params = content_type.partition(";")
    mime = mime.strip().lower()
    if mime == "application/x-www-form-urlencoded":
        pairs = urllib.parse.parse_qsl(body.decode("latin-1"), keep_blank_values=True)
        return {name: value.encode("latin-1") for name, value in pairs}
    if mime != "multipart/form-data":
        raise UnsupportedMediaType("Send the certificate with the upload form (multipart/form-data).")
    return _parse_multipart(body, params, limit)


def _parse_multipart(body: bytes, params: str, limit: int) -> dict[str, bytes]:
    import multipart

    boundary = multipart.parse_options_header("multipart/form-data;" + params)[1].get("boundary")
    if not boundary:
        raise BadRequest("The form data has no boundary.")
    # Limits as large as the body itself keep every part in memory: uploads never touch the disk.
    parser = multipart.MultipartParser(io.BytesIO(body), boundary, len(body), part_limit=16,
                                       spool_limit=limit + 1, memory_limit=limit + 1, disk_limit=0)
    fields = {}
    try:
        for part in parser:
            fields.setdefault(part.name, part.raw)
    except multipart.MultipartError as error:
        raise BadRequest(f"The form data could not be read: {error}.") from None
    return fields


###############################################################################
# Devices #####################################################################
###############################################################################


@functools.lru_cache(maxsize=4096)
def is_s60(user_agent: str) -> bool:
    """Return whether *user_agent* is a Nokia Symbian S60 browser, whose installer wants bare DER."""
    return bool(S60_RE.search(user_agent)) and not ANDROID_RE.search(user_agent)


def allowed_ttl_choices(config: Config) -> list[tuple[str, str]]:
    """Return the lifetime choices of the upload form that the configured maximum allows."""
    return [(value, label) for value, label in TTL_CHOICES
            if config.max_ttl is None or (value != "cert" and ttl_seconds_for(value) <= config.max_ttl)]


def ttl_seconds_for(value: str) -> int | None:
    """Return the seconds of a lifetime choice, or None for "until the certificate expires"."""
    return None if value == "cert" else parse_duration(value)


def link_expiry(config: Config, certificate: Certificate, ttl: str, now: float) -> float:
    """Return when a new link for *certificate* expires; raise CertificateError for a lifetime not allowed."""
    try:
        seconds = config.default_ttl if not ttl else ttl_seconds_for(ttl.strip().lower())
    except ValueError as error:
        raise CertificateError(f"The lifetime {error}.") from None
    if seconds is None:
        if config.max_ttl is not None:
            raise CertificateError(f"Links may live at most {format_duration(config.max_ttl)} on this server.")
        expires = certificate.not_after.timestamp()
        if expires <= now:
            raise CertificateError(f"This certificate expired on {format_time(expires)}, so a link "
                                   "\u201cuntil the certificate expires\u201d would never work. Choose a lifetime.")
        return expires
    if config.max_ttl is not None and seconds > config.max_ttl:
        raise CertificateError(f"Links may live at most {format_duration(config.max_ttl)} on this server.")
    return now + seconds


def certificate_response(entry: Entry, user_agent: str) -> Response:
    """Return the certificate as the device behind *user_agent* installs it."""
    headers = [("Cache-Control", "private, no-transform"), ("Vary", "User-Agent")]
    if not is_s60(user_agent):
        # S60's installer takes the body only without an attachment header; everyone else saves a named file.
        headers.append(("Content-Disposition", f'attachment; filename="{entry.certificate.file_stem}.crt"'))
    return Response(entry.der, 200, MIME_CA_CERT, tuple(headers))


###############################################################################
# Application #################################################################
###############################################################################


class App:
    """The certdrop WSGI application: routes requests to handlers and turns every failure into a clear answer."""

    def __init__(self, config: Config, store: Store, clock: Callable[[], float] = time.time):
        self.config = config
        self.store = store
        self.clock = clock

    def __call__(self, environ: dict, start_response: Callable) -> list[bytes]:
        request = Request.from_environ(environ)
        try:
            response = self.dispatch(request)
        except HTTPError as error:
            response = render_error(request, error, home=request.script_name + "/")
        except Exception:
            log.exception("error while answering %s %r", request.method, request.path)
            response = Response(b"500 Internal Server Error: the error has been logged.\n", 500, MIME_TEXT)
        return send(response, start_response, head=request.method == "HEAD")

    def dispatch(self, request: Request) -> Response:
        handler, arguments = match_route(request.method, request.path)
        try:
            return handler(self, request, **arguments)
        except CertdropError as error:
            raise http_error_for(error) from None

    def base_url(self, request: Request) -> str:
        """Return the URL that links start with: ``public_url``, else built from the request's Host."""
        if self.config.public_url:
            return self.config.public_url
        scheme = request.environ.get("wsgi.url_scheme", "http")
        host_header = request.header("Host") or request.environ.get("SERVER_NAME", "localhost")
        host, port = split_host(host_header)
        if (scheme, port) in (("http", ":80"), ("https", ":443")):
            port = ""
        return f"{scheme}://{host.lower()}{port}{request.script_name}"

    # -- handlers, named after what they show ------------------------------------------------------------------

    def upload_form(self, request: Request) -> Response:
        page = render_upload_form(self.config, action=request.script_name + "/")
        return Response(page, headers=HTML_HEADERS)

    def upload(self, request: Request) -> Response:
        fields = parse_form(request, self.config.max_upload)
        data = choose_upload(fields)
        certificate = read_upload(data)
        now = self.clock()
        ttl = fields.get("ttl", b"").decode("ascii", "replace")
        entry, created = self.store.add(certificate, link_expiry(self.config, certificate, ttl, now))
        log.info("%s link %s for %r until %s", "new" if created else "existing", entry.token, certificate.name,
                 format_time(entry.expires))
        base = self.base_url(request)
        url = install_url(base, entry.token)
        port = split_host(request.header("Host") or "x")[1]
        page = render_result(entry, url, port, created, now, home=request.script_name + "/")
        return Response(page, 201 if created else 200, MIME_HTML,
                        HTML_HEADERS + (("Cache-Control", "no-store"), ("Location", url)))

    def install(self, request: Request, token: str) -> Response:
        entry = self.store.get(token)
        return certificate_response(entry, request.user_agent)


def choose_upload(fields: dict[str, bytes]) -> bytes:
    """Return the certificate bytes from the form: the file, or else the pasted text."""
    file_data, pasted = fields.get("cert", b""), fields.get("pem", b"")
    if file_data.strip() and pasted.strip():
        raise BadRequest("Choose a file or paste the certificate text, not both.")
    return file_data if file_data.strip() else pasted


#: (path pattern, {method: handler}); HEAD is answered by the GET handler.
ROUTES = (
    (r"/", {"GET": App.upload_form, "POST": App.upload}),
    (r"/c/(?P<token>[^/]+)/?", {"GET": App.install}),
)
COMPILED_ROUTES = tuple((re.compile(pattern), handlers) for pattern, handlers in ROUTES)


def match_route(method: str, path: str) -> tuple[Callable, dict[str, str]]:
    """Return the handler and path arguments for a request; raise NotFound or MethodNotAllowed."""
    for pattern, handlers in COMPILED_ROUTES:
        match = pattern.fullmatch(path)
        if not match:
            continue
        handler = handlers.get("GET" if method == "HEAD" else method)
        if handler is None:
            allowed = sorted(set(handlers) | ({"HEAD"} if "GET" in handlers else set()))
            raise MethodNotAllowed(allowed)
        arguments = match.groupdict()
        if "token" in arguments and not TOKEN_RE.fullmatch(arguments["token"].lower()):
            raise NotFound()  # malformed tokens never reach the store or the disk
        return handler, arguments
    raise NotFound()


def make_store(config: Config, clock: Callable[[], float] = time.time) -> Store:
    return Store(config.data_dir, token_length=config.token_length, cache_entries=config.cache_entries,
                 tombstone_ttl=config.tombstone_ttl, clock=clock)


def make_app(config: Config, store: Store | None = None, clock: Callable[[], float] = time.time) -> App:
    """Return the WSGI application for *config*; tests pass their own store and clock."""
    return App(config, store or make_store(config, clock), clock)


###############################################################################
# Command line ################################################################
###############################################################################


def cli_base_url(config: Config) -> str:
    """Return the start of links printed by the command line, which has no request to take a Host from."""
    if config.public_url:
        return config.public_url
    port = "" if config.port == 80 else f":{config.port}"
    return f"http://{machine_name() or 'localhost'}{port}"


def cmd_serve(args, config: Config) -> int:
    from waitress import create_server

    if args.host:
        config = dataclasses.replace(config, host=args.host)
    if args.port is not None:
        config = dataclasses.replace(config, port=args.port)
    app = make_app(config)
    # Waitress keeps bodies in memory up to inbuf_overflow; set both above our own limit, so that certdrop
    # answers oversize uploads with its own message and no body is spooled to disk.
    body_limit = 2 * config.max_upload + 65536
    server = create_server(app, host=config.host, port=config.port, threads=config.threads, ident="certdrop",
                           max_request_body_size=body_limit, inbuf_overflow=body_limit + 1)
    stop = threading.Event()
    if config.sweep_interval:
        threading.Thread(target=sweep_forever, args=(app.store, config.sweep_interval, stop), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    log.info("certdrop %s serving on http://%s:%s/ with data in %s", __version__, server.effective_host,
             server.effective_port, config.data_dir)
    try:
        server.run()  # returns after SIGTERM or Ctrl-C, once waitress has closed its sockets and threads
    finally:
        stop.set()
    log.info("certdrop stopped")
    return 0


def sweep_forever(store: Store, interval: float, stop: threading.Event) -> None:
    """Sweep *store* every *interval* seconds until *stop* is set; log and carry on after errors."""
    while not stop.wait(interval):
        try:
            counts = store.sweep()
        except OSError as error:
            log.error("sweep failed: %s", error)
            continue
        if any(counts.values()):
            log.info("sweep: %(expired)d expired, %(deleted)d deleted, %(temporary)d temporary files", counts)


def cmd_add(args, config: Config) -> int:
    try:
        data = Path(args.file).read_bytes() if args.file != "-" else sys.stdin.buffer.read()
    except OSError as error:
        raise CertdropError(f"cannot read {args.file}: {error.strerror}") from None
    if len(data) > config.max_upload:
        raise CertdropError(f"{args.file} is larger than max_upload ({format_size(config.max_upload)})")
    certificate = read_upload(data)
    now = time.time()
    store = make_store(config)
    entry, created = store.add(certificate, link_expiry(config, certificate, args.ttl or "", now))
    url = install_url(cli_base_url(config), entry.token)
    print(url)
    print(f"  {'new link' if created else 'existing link'} for {certificate.name}, works until "
          f"{format_time(entry.expires)}")
    print(f"  SHA-256 {colon_hex(certificate.sha256)}")
    print(f"  SHA-1   {colon_hex(certificate.sha1)}")
    if is_loopback_host(urllib.parse.urlsplit(url).hostname or ""):
        print("  Phones cannot reach localhost: set public_url in certdrop.ini to this server's name.")
    return 0


def cmd_list(args, config: Config) -> int:
    now = time.time()
    for entry in make_store(config).entries():
        gone = entry.gone(now)
        state = gone.reason if gone else "live"
        name = entry.certificate.name if entry.der is not None else "-"
        print(f"{entry.token}  {state:<7}  {format_time(gone.since if gone else entry.expires)}  {name}")
    return 0


def cmd_show(args, config: Config) -> int:
    entry = make_store(config).lookup(args.token)
    gone = entry.gone(time.time())
    print(f"link      {install_url(cli_base_url(config), entry.token)}")
    print(f"state     {gone if gone else 'live until ' + format_time(entry.expires)}")
    print(f"created   {format_time(entry.created)}")
    if entry.der is None:
        return 0
    certificate = entry.certificate
    for label, value in (("name", certificate.name), ("subject", certificate.subject),
                         ("issuer", certificate.issuer), ("valid", f"{format_time(certificate.not_before.timestamp())}"
                                                                   f" to {format_time(certificate.not_after.timestamp())}"),
                         ("serial", certificate.serial_hex), ("SHA-256", colon_hex(certificate.sha256)),
                         ("SHA-1", colon_hex(certificate.sha1))):
        print(f"{label:<9} {value}")
    return 0


def cmd_revoke(args, config: Config) -> int:
    entry = make_store(config).revoke(args.token)
    print(f"revoked {entry.token}: it answers 410 Gone from now on")
    return 0


def cmd_gc(args, config: Config) -> int:
    counts = make_store(config).sweep()
    print(f"{counts['expired']} expired, {counts['deleted']} deleted, {counts['temporary']} temporary files removed")
    return 0


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="certdrop.py", description="Share a CA certificate with one short link.")
    parser.add_argument("-c", "--config", help="ini file (default: $CERTDROP_CONFIG, else certdrop.ini beside "
                                               "certdrop.py, else built-in defaults)")
    parser.add_argument("--version", action="version", version=f"certdrop {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the web server")
    serve.add_argument("--host", help="address to listen on (overrides the config)")
    serve.add_argument("--port", type=int, help="port to listen on; 0 picks a free one")
    serve.set_defaults(func=cmd_serve)
    add = commands.add_parser("add", help="store a certificate and print its link")
    add.add_argument("file", help="certificate file, or - for standard input")
    add.add_argument("--ttl", help="lifetime: 12h, 7d, 30d ... or cert (until the certificate expires)")
    add.set_defaults(func=cmd_add)
    commands.add_parser("list", help="list every link").set_defaults(func=cmd_list)
    show = commands.add_parser("show", help="show one link and its certificate")
    show.add_argument("token")
    show.set_defaults(func=cmd_show)
    revoke = commands.add_parser("revoke", help="stop a link now (it answers 410 Gone)")
    revoke.add_argument("token")
    revoke.set_defaults(func=cmd_revoke)
    commands.add_parser("gc", help="remove expired certificates and old tombstones").set_defaults(func=cmd_gc)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"certdrop: {error}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args, config)
    except UnknownToken as error:
        print(f"certdrop: no link {str(error)!r}", file=sys.stderr)
    except CertdropError as error:
        print(f"certdrop: {error}", file=sys.stderr)
    except OSError as error:
        print(f"certdrop: {error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
