"""certdrop: put a private CA certificate onto phones and laptops with one short link.

An administrator uploads the CA certificate once, in any format (on the page at ``/`` or with ``add``), and gets
a link ``http://host/c/<token>``. The certificate doctor says what was uploaded and refuses private keys. Each
device that opens the link gets what it can install: raw DER as ``application/x-x509-ca-cert`` for Nokia Symbian
S60, a WAP page with the hashed certificate for Nokia Series 40, a configuration profile for iOS, and a page with
the right file and steps for Android, Windows, macOS, Linux, Firefox and the rest. ``/admin`` lists every link
with its state and downloads, and revokes or extends it.

Usage::

    .venv/bin/python certdrop.py serve                 # run the web server under waitress
    .venv/bin/python certdrop.py add ca.pem --ttl 7d   # store the CA certificates of a file, print their links
    .venv/bin/python certdrop.py check ca.p7b          # diagnose a file without storing anything
    .venv/bin/python certdrop.py list [--json] | show TOKEN | revoke TOKEN | gc | upload-key

Configuration comes from ``-c/--config PATH``, else ``$CERTDROP_CONFIG``, else ``certdrop.ini`` beside this
file, else the built-in defaults of :class:`Config`. Every key is documented in ``certdrop.ini``.
"""

import atexit
import base64
import binascii
import codecs
import configparser
import contextlib
import contextvars
import dataclasses
import email.message
import email.utils
import errno
import functools
import gettext
import hashlib
import hmac
import html
import io
import ipaddress
import itertools
import json
import logging
import math
import operator
import os
import plistlib
import re
import secrets
import shlex
import shutil
import signal
import smtplib
import socket
import ssl
import stat
import string
import sys
import threading
import time
import typing
import unicodedata
import urllib.parse
import uuid
import warnings
from collections import OrderedDict, deque
from itertools import islice
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from http import HTTPStatus
from pathlib import Path



def missing_dependency(error: ModuleNotFoundError) -> str:
    """Return one line saying which package is missing and how to install what certdrop needs."""
    return (f"certdrop: the Python package {error.name!r} is missing. Install certdrop's dependencies with "
            "'python3 -m venv .venv && .venv/bin/pip install -r requirements.txt', then run "
            "'.venv/bin/python certdrop.py ...'.")


try:
    import multipart
    import segno
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.utils import CryptographyDeprecationWarning
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
    from cryptography.hazmat.primitives.serialization import pkcs7, pkcs12
    from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID
except ModuleNotFoundError as missing:
    if __name__ != "__main__":  # imported by a WSGI server or a test: its own traceback says enough
        raise
    sys.exit(missing_dependency(missing))

try:
    import fcntl
except ImportError:  # Windows: msvcrt.locking instead
    fcntl = None
try:
    import msvcrt
except ImportError:  # POSIX: fcntl.flock instead
    msvcrt = None

__version__ = "0.3.0"

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

#: Temporary files older than this are leftovers of a crashed writer (a write takes milliseconds); the sweep and
#: the server's start remove them.
STALE_TEMP_SECONDS = 60

#: The generated upload key, in the data directory, readable by its owner only.
UPLOAD_KEY_FILE = "upload.key"

#: The longest upload key file read: a generated key is 23 characters, one chosen by hand a line of typing.
MAX_KEY_BYTES = 1024

MIME_CA_CERT = "application/x-x509-ca-cert"
MIME_HTML = "text/html; charset=utf-8"
MIME_TEXT = "text/plain; charset=utf-8"
MIME_JSON = "application/json"

STATUS_LINES = {status.value: f"{status.value} {status.phrase}" for status in HTTPStatus}

#: Lifetimes offered on the upload form, shortest first; "cert" means until the certificate expires. The form
#: names them in words (see allowed_ttl_choices).
TTL_CHOICES = ("1h", "1d", "7d", "30d", "90d", "365d", "cert")

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

#: The longest duration any setting or lifetime may name: past it, dates stop being printable.
MAX_DURATION = 100 * 365 * 86400

#: The shortest lifetime of a link.
MIN_TTL = 60

#: Stored times outside this range (1970 to the end of year 9999) are damage, not dates.
MAX_TIMESTAMP = 253402300799

#: Characters that XML 1.0 cannot carry even escaped; certificate names may hold them.
XML_INVALID_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")

#: Characters that steer a terminal or reorder what it shows: C0 and C1 controls (ESC starts colour and cursor
#: codes; CR and LF forge lines), DEL, bidi controls (U+202E shows text backwards), line separators, BOM.
TERMINAL_UNSAFE_RE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff"
                                "\ud800-\udfff]")  # lone surrogates: a file name's undecodable bytes, unprintable

#: Unicode categories that a page shows escaped (see esc): format characters (bidi controls, zero-width spaces
#: and joiners, soft hyphens, tags), line and paragraph separators, and controls (C1 ones: C0 ones are all ASCII).
INVISIBLE_CATEGORIES = frozenset({"Cf", "Zl", "Zp", "Cc"})
NON_ASCII_RE = re.compile(r"[^\x00-\x7f]")

#: Line breaks and bidi controls, which a one-line display name (a profile's, say) drops.
LINE_BREAKS_RE = re.compile("[\r\n\x0b\x0c\x85\u2028\u2029]+")
BIDI_CONTROLS_RE = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")

#: Command-line HTTP clients, which get plain text instead of HTML (PowerShell names itself after a Mozilla/5.0).
TEXT_AGENT_RE = re.compile(r"^(?:curl|wget|httpie|python-requests|python-urllib)/|PowerShell/", re.IGNORECASE)

#: The version of certdrop's JSON answers; it changes only when a field changes meaning or goes away.
JSON_VERSION = 1


###############################################################################
# Words #######################################################################
###############################################################################
# Every sentence a person reads (pages, steps, errors, mails) goes through _() or ngettext(), whole, with named
# placeholders, so that a language is a gettext catalog added beside this file and no code is rewritten: the
# message ids are the English sentences. A constant made at import is marked with N_() and translated where it is
# used, since a _() at import would freeze the English. The translations live in a context variable, so that each
# request (and each of waitress's threads) may speak its reader's language; in_language() sets it for a block.

TRANSLATIONS: contextvars.ContextVar = contextvars.ContextVar("certdrop_translations",
                                                              default=gettext.NullTranslations())


def _(message: str) -> str:
    """Return *message*, an English sentence, in the language of the current translations."""
    return TRANSLATIONS.get().gettext(message)


def ngettext(singular: str, plural: str, count: int) -> str:
    """Return the sentence for *count* things (*singular* or *plural* in English) in the current language."""
    return TRANSLATIONS.get().ngettext(singular, plural, count)


def N_(message: str) -> str:
    """Return *message* as it is: marks a sentence kept in a constant, which _() translates where it is used."""
    return message


@contextlib.contextmanager
def in_language(translations: gettext.NullTranslations) -> Iterator[None]:
    """Speak with *translations* (a gettext.NullTranslations or one of its kind) inside the block."""
    token = TRANSLATIONS.set(translations)
    try:
        yield
    finally:
        TRANSLATIONS.reset(token)


#: The languages certdrop speaks, each by its own name (the picker shows them so): English is the code's own,
#: the rest are gettext catalogs in locale/<code>/LC_MESSAGES/certdrop.mo beside this file (locale/update makes them).
LANGUAGES = {"en": "English", "de": "Deutsch", "nl": "Nederlands", "fr": "Fran\u00e7ais", "es": "Espa\u00f1ol",
             "pl": "Polski", "ru": "\u0420\u0443\u0441\u0441\u043a\u0438\u0439"}

#: Where the catalogs are read from, once, when this module is imported; without it certdrop speaks English only.
LOCALE_DIR = MODULE_DIR / "locale"
GETTEXT_DOMAIN = "certdrop"


def load_catalogs(locale_dir: Path) -> dict[str, gettext.NullTranslations]:
    """Return the translations of every language whose catalog in *locale_dir* reads, English included; a missing
    or broken catalog leaves its language out (English is spoken instead) with one log line."""
    catalogs: dict[str, gettext.NullTranslations] = {"en": gettext.NullTranslations()}
    if not locale_dir.is_dir():
        return catalogs  # certdrop.py copied alone: English
    for code in LANGUAGES:
        if code == "en":
            continue
        path = locale_dir / code / "LC_MESSAGES" / f"{GETTEXT_DOMAIN}.mo"
        try:
            with path.open("rb") as file:
                translations = gettext.GNUTranslations(file)
            translations.plural(2)  # a Plural-Forms that cannot be worked out fails here, not on a page
        except Exception as error:  # OSError, a corrupt file, a bad header: whatever it is, English serves
            log.warning("the %s catalog %s cannot be used (%s): pages in %s are sent in English", LANGUAGES[code],
                        path, error, code)
            continue
        translations.language = code
        catalogs[code] = translations
    return catalogs


#: The translations of every language spoken, read once at start (see load_catalogs).
CATALOGS = load_catalogs(LOCALE_DIR)


def translations_for(language: str) -> gettext.NullTranslations:
    """Return the translations of *language*; English for one certdrop does not speak."""
    return CATALOGS.get(language) or CATALOGS["en"]


def speaking(language: str) -> contextlib.AbstractContextManager:
    """Speak *language* inside the block; English leaves the current translations as they are (English unless a
    test set a pseudo-language)."""
    return contextlib.nullcontext() if language == "en" else in_language(translations_for(language))


def current_language() -> str:
    """Return the code of the language spoken now: the lang of a page."""
    return getattr(TRANSLATIONS.get(), "language", "en")



###############################################################################
# Errors ######################################################################
###############################################################################


class CertdropError(Exception):
    """An error whose message is written for the person who caused it."""


class ConfigError(CertdropError):
    """The configuration file is missing, unreadable or holds a bad value."""


class CertificateError(CertdropError):
    """The upload is not something certdrop will store."""

    def __init__(self, message: str, code: str = "refused"):
        super().__init__(message)
        #: stable name of the refusal for scripts: "private-key", "csr", "server-certificate", ...
        self.code = code


class UnknownToken(CertdropError):
    """No link with this token exists (or its entry is unreadable)."""


class DamagedEntry(UnknownToken):
    """The entry file exists but cannot be read; it is reported and served as unknown."""


class LifetimeError(CertdropError):
    """The lifetime asked for a link is not one this server allows."""


class MailError(CertdropError):
    """The SMTP server could not be reached or did not take the message."""


class StorageError(CertdropError):
    """The data directory cannot be written: full, read-only or not ours. Nothing was stored."""

    @classmethod
    def from_os_error(cls, error: OSError) -> "StorageError":
        return cls(storage_cause(error, REFUSED))


#: Which sentence of STORAGE_CAUSES to say: an upload refused for the cause, /healthz after a write failed for it,
#: /healthz's own probe meeting it.
REFUSED, FAILED, PROBED = range(3)

#: Why a write to the data directory failed, by errno, in whole sentences (see REFUSED); None: any other cause.
STORAGE_CAUSES = {
    errno.ENOSPC: (
        N_("The server's data directory is full, so nothing was stored. Existing links keep working; uploads work "
           "again by themselves once that is fixed."),
        N_("The data directory is full: the last write failed, and none has worked since."),
        N_("The data directory is full.")),
    errno.EDQUOT: (
        N_("The server's data directory is over its disk quota, so nothing was stored. Existing links keep working; "
           "uploads work again by themselves once that is fixed."),
        N_("The data directory is over its disk quota: the last write failed, and none has worked since."),
        N_("The data directory is over its disk quota.")),
    errno.EROFS: (
        N_("The server's data directory is on a read-only file system, so nothing was stored. Existing links keep "
           "working; uploads work again by themselves once that is fixed."),
        N_("The data directory is on a read-only file system: the last write failed, and none has worked since."),
        N_("The data directory is on a read-only file system.")),
    errno.EACCES: (
        N_("The server's data directory may not be written by the user certdrop runs as, so nothing was stored. "
           "Existing links keep working; uploads work again by themselves once that is fixed."),
        N_("The data directory may not be written by the user certdrop runs as: the last write failed, and none has "
           "worked since."),
        N_("The data directory may not be written by the user certdrop runs as.")),
    None: (
        N_("The server's data directory cannot be written ({reason}), so nothing was stored. Existing links keep "
           "working; uploads work again by themselves once that is fixed."),
        N_("The data directory cannot be written ({reason}): the last write failed, and none has worked since."),
        N_("The data directory cannot be written ({reason}).")),
}
STORAGE_CAUSES[errno.EPERM] = STORAGE_CAUSES[errno.EACCES]


def storage_cause(error: OSError, which: int) -> str:
    """Return the sentence *which* (REFUSED, FAILED or PROBED) that says why a write to the data directory failed."""
    sentences = STORAGE_CAUSES.get(error.errno) or STORAGE_CAUSES[None]
    return _(sentences[which]).format(reason=error.strerror or error)


class LinkGone(CertdropError):
    """The link existed but was revoked or has expired."""

    def __init__(self, reason: str, since: float):
        #: "revoked" or "expired"
        self.reason = reason
        #: Unix time of the revocation or expiry
        self.since = since
        message = _("This link was revoked on {date}.") if reason == "revoked" else _("This link expired on {date}.")
        super().__init__(message.format(date=format_time(since)))


class HTTPError(Exception):
    """An answer other than success, with a status and a message for people."""

    status = 500
    code = "server-error"  # stable, for scripts: JSON errors carry it
    message = N_("Something went wrong on the server. The error has been logged.")  # translated when raised

    def __init__(self, message: str | None = None, headers: tuple = (), code: str | None = None):
        self.message = message or _(self.message)
        self.headers = tuple(headers)
        self.code = code or self.code
        #: more of the HTML page, after the message: the upload form again, say
        self.extra_html = ""
        super().__init__(self.message)


class BadRequest(HTTPError):
    status = 400
    code = "bad-request"
    message = N_("The request could not be understood.")


class NotFound(HTTPError):
    status = 404
    code = "not-found"
    message = N_("Nothing has this address. Check it for typing mistakes.")


class MethodNotAllowed(HTTPError):
    status = 405
    code = "method-not-allowed"

    def __init__(self, allowed: list[str]):
        super().__init__(_("This address accepts only {methods}.").format(methods=", ".join(allowed)),
                         headers=(("Allow", ", ".join(allowed)),))


class Gone(HTTPError):
    status = 410
    code = "gone"


class PayloadTooLarge(HTTPError):
    status = 413
    code = "too-large"


class URITooLong(HTTPError):
    status = 414
    code = "too-long"


class UnsupportedMediaType(HTTPError):
    status = 415
    code = "unsupported-type"


class Unprocessable(HTTPError):
    status = 422
    code = "refused"


class Unauthorized(HTTPError):
    status = 401
    code = "unauthorized"
    message = N_("Uploading needs the upload key. Sign in, or send it with HTTP Basic ({command}).")

    def __init__(self, message: str | None = None):
        super().__init__(message or _(self.message).format(command="curl -u certdrop:KEY"))


class Forbidden(HTTPError):
    status = 403
    code = "forbidden"


class TooManyRequests(HTTPError):
    status = 429
    code = "rate-limited"

    def __init__(self, retry_after: float, message: str = ""):
        #: the whole seconds to wait, as Retry-After says them
        self.seconds = max(1, math.ceil(retry_after))
        super().__init__(message or ngettext("Too many requests from your address. Try again in {seconds} second.",
                                             "Too many requests from your address. Try again in {seconds} seconds.",
                                             self.seconds).format(seconds=self.seconds),
                         headers=(("Retry-After", str(self.seconds)),))


class BadGateway(HTTPError):
    status = 502
    code = "mail-failed"


class ServiceUnavailable(HTTPError):
    status = 503
    code = "unavailable"


def http_error_for(error: CertdropError) -> HTTPError:
    """Return the HTTP answer for a domain error raised by the doctor or the store."""
    if isinstance(error, CertificateError):
        return Unprocessable(str(error), code=error.code)
    if isinstance(error, LifetimeError):
        return BadRequest(str(error), code="lifetime")
    if isinstance(error, StorageError):
        return ServiceUnavailable(str(error), code="storage")
    if isinstance(error, MailError):
        return BadGateway(str(error))
    if isinstance(error, LinkGone):
        return Gone(str(error))
    if isinstance(error, UnknownToken):
        return NotFound()
    return HTTPError()


###############################################################################
# Configuration ###############################################################
###############################################################################


def parse_duration(text: str) -> int:
    """Return seconds for ``"90s"``, ``"45m"``, ``"12h"``, ``"7d"``, ``"2w"`` or a bare number of seconds."""
    match = re.fullmatch(r"\s*(\d{1,12})\s*([smhdw]?)\s*", text.lower())
    if not match or int(match[1]) == 0:
        raise ValueError(f"{text[:40]!r} is not a duration like 90m, 12h, 7d or 2w")
    seconds = int(match[1]) * DURATION_UNITS.get(match[2] or "s")
    if seconds > MAX_DURATION:
        raise ValueError(f"{text[:40]!r} is longer than 100 years")
    return seconds


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
    if seconds >= 365 * 86400:
        years = seconds // (365 * 86400)
        return ngettext("{count} year", "{count} years", years).format(count=years)
    if seconds >= 86400:
        return ngettext("{count} day", "{count} days", seconds // 86400).format(count=seconds // 86400)
    if seconds >= 3600:
        return ngettext("{count} hour", "{count} hours", seconds // 3600).format(count=seconds // 3600)
    if seconds >= 60:
        return ngettext("{count} minute", "{count} minutes", seconds // 60).format(count=seconds // 60)
    return ngettext("{count} second", "{count} seconds", seconds).format(count=seconds)


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


def _parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return value

    return parse


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("yes", "no", "true", "false", "on", "off", "1", "0"):
        raise ValueError(f"{text!r} is not yes or no")
    return value in ("yes", "true", "on", "1")


def _parse_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise ValueError(f"{value} is not between {low} and {high}")
        return value

    return parse


def _parse_networks(text: str) -> tuple:
    networks = tuple(ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())
    if not networks:
        raise ValueError("name at least one network, e.g. 0.0.0.0/0, ::/0 for anywhere")
    return networks


def _parse_proxy_headers(text: str) -> tuple:
    names = tuple(text.lower().replace(",", " ").split())
    known = ("x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port", "x-forwarded-by",
             "forwarded")
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ValueError(f"{' '.join(unknown) or 'nothing'}: name some of {', '.join(known)}")
    return names


def _parse_hosts(text: str) -> tuple:
    """Return the host names (or addresses) of an allowed_hosts line, in lower case, without ports."""
    hosts = tuple(part.strip("[]").lower().rstrip(".") for part in text.replace(",", " ").split())
    bad = [host for host in hosts if host_of(f"[{host}]" if ":" in host else host) != host]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a host name or address (name hosts without a port or scheme)")
    return hosts


def _parse_proxy(text: str) -> str:
    text = text.strip()
    return text if text in ("", "*") else str(ipaddress.ip_address(text))


#: Loopback, private and link-local ranges: uploads come from the administrator's own network by default.
DEFAULT_UPLOAD_NETWORKS = _parse_networks("127.0.0.0/8, ::1/128, 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, "
                                          "169.254.0.0/16, fc00::/7, fe80::/10")


#: The subject of mails when the [mail] section names none; translated where it is used (see mail_subject).
DEFAULT_MAIL_SUBJECT = N_("Install the CA certificate {name}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting, with the built-in defaults; ``certdrop.ini`` documents each key."""

    host: str = "0.0.0.0"  # address to listen on; 0.0.0.0 = all IPv4 interfaces
    port: int = 8080  # TCP port
    public_url: str = ""  # e.g. https://intranet.example.com/certdrop; empty = from the request's Host
    allowed_hosts: tuple = ()  # names pages may be asked by besides public_url's host and this machine's own
    data_dir: Path = MODULE_DIR / "data"  # where entries live; relative paths are relative to the ini file
    profile_signer_certificate: Path | None = None  # PEM: the certificate profiles are signed with, its intermediates
    profile_signer_key: Path | None = None  # PEM: its private key (RSA or EC, no password); None = unsigned profiles
    token_length: int = 8  # characters in a new token (31 symbols each, about 5 bits)
    default_ttl: int = 7 * 86400  # seconds a link lives when the uploader does not choose
    max_ttl: int | None = None  # longest lifetime allowed, seconds; None = up to the certificate's expiry
    tombstone_ttl: int = 30 * 86400  # seconds an expired or revoked link keeps answering 410
    sweep_interval: int = 3600  # seconds between expiry sweeps in the server; 0 = never
    max_upload: int = 1024 * 1024  # bytes in one upload request
    cache_entries: int = 10000  # entries kept in memory
    cache_size: int = 24 * 1024 * 1024  # bytes those entries may take, about
    answer_cache_size: int = 16 * 1024 * 1024  # bytes the answers kept to answer requests again may take, about
    threads: int = 4  # waitress worker threads
    connection_limit: int = 1000  # open connections waitress holds at once; past it, new ones wait to be accepted
    client_connections: int = 64  # open connections one client (IPv6: one /64) may hold; 0 = no cap
    header_timeout: int = 10  # seconds a request's line and headers may take to arrive, however steadily
    channel_timeout: int = 30  # seconds a connection may stay silent (idle, or a request sent too slowly)
    use_poll: bool = True  # poll() instead of select(), which fails past 1,024 open sockets
    access_log: bool = True  # one line per request on standard error
    log_level: str = "INFO"  # debug, info, warning or error
    s60_delivery: str = "file"  # what S60 phones get at /c/<token>: file, page or redirect (to <name>.cer)
    s60_attachment: bool = False  # send the S60 file with Content-Disposition: attachment
    s40_delivery: str = "page"  # what Series 40 phones get at /c/<token>: page, der, whc or whc-alt
    whc_layout: str = "der-direct"  # the default hashed-certificate layout: der-direct or length-prefixed
    whc_charset: int = 106  # IANA MIBenum of the hashed certificate's display name: 106 UTF-8, 4 ISO-8859-1, 3 ASCII
    upload_auth: str = "remote"  # who needs the upload key: remote (all but direct loopback), always, none
    upload_password: str = ""  # the upload key; empty = a random one kept in data_dir/upload.key
    upload_networks: tuple = DEFAULT_UPLOAD_NETWORKS  # where uploads may come from at all
    trusted_proxy: str = ""  # address of a reverse proxy in front of certdrop, or *; its requests never count as loopback
    trusted_proxy_count: int = 1  # proxies in a row in front of certdrop whose X-Forwarded-For entries count
    trusted_proxy_headers: tuple = ("x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port")
    lookup_limit: int = 30  # unknown-token lookups a minute per client (IPv6: per /64); 0 = no limit
    upload_limit: int = 20  # uploads a minute per client; 0 = no limit
    contact: str = ""  # whom to ask, as the printed card says it ("IT help desk, room 12, ext. 4711"); empty = none
    count_interval: int = 30  # seconds between writes of the download counts (at most this much is lost on a crash)
    admin_mail: str = ""  # the address the daily "needs attention" warning is mailed to; empty = logged only
    # [mail]: how "e-mail this link" sends; without a host the page offers a mailto: link instead
    mail_host: str = ""  # SMTP server; empty = no sending from certdrop
    mail_port: int = 0  # 0 = the usual port for mail_security: 25, 587 (starttls) or 465 (tls)
    mail_security: str = "starttls"  # none, starttls or tls
    mail_user: str = ""  # SMTP login; empty = none
    mail_password: str = ""
    mail_sender: str = ""  # From: address; empty = certdrop@ this machine's name
    mail_subject: str = DEFAULT_MAIL_SUBJECT  # {name}: the first certificate's name
    mail_cafile: str = ""  # CA file to verify the SMTP server's certificate with; empty = the system's
    mail_recipients: int = 10  # addresses one message may go to
    mail_per_hour: int = 30  # messages the whole server sends in an hour, whoever asks; 0 = no limit
    mail_timeout: int = 20  # seconds to wait for the SMTP server

    @classmethod
    def from_ini(cls, path: Path) -> "Config":
        """Read *path*; raise ConfigError naming the file and key for anything unknown or malformed."""
        parser = configparser.ConfigParser(interpolation=None)
        try:
            with open(path, encoding="utf-8") as file:
                parser.read_file(file)
        except (OSError, UnicodeDecodeError, configparser.Error) as error:
            raise ConfigError(f"cannot read {path}: {error}") from None
        unknown_sections = set(parser.sections()) - set(CONFIG_SECTIONS)
        if unknown_sections:
            raise ConfigError(f"unknown section [{sorted(unknown_sections)[0]}] in {path}")
        values = {}
        for section, (prefix, parsers) in CONFIG_SECTIONS.items():
            for key, text in parser.items(section) if parser.has_section(section) else ():
                if key not in parsers:
                    raise ConfigError(f"unknown setting {key!r} in [{section}] of {path}")
                try:
                    values[prefix + key] = parsers[key](text)
                except ValueError as error:
                    raise ConfigError(f"bad value for {key!r} in [{section}] of {path}: {error}") from None
        for key in ("data_dir", "profile_signer_certificate", "profile_signer_key"):
            if values.get(key) is not None:
                values[key] = (path.parent / values[key]).resolve()
        if (values.get("profile_signer_certificate") is None) != (values.get("profile_signer_key") is None):
            raise ConfigError(f"profile_signer_certificate and profile_signer_key go together: {path} sets one only")
        if values.get("max_ttl") and values["max_ttl"] < values.get("default_ttl", cls.default_ttl):
            raise ConfigError(f"bad value for 'max_ttl' in {path}: it is shorter than default_ttl")
        return cls(**values)


CONFIG_PARSERS: dict[str, Callable[[str], object]] = {
    "host": str.strip,
    "port": _parse_int(0, 65535),
    "public_url": _parse_public_url,
    "allowed_hosts": _parse_hosts,
    "data_dir": lambda text: Path(text.strip()).expanduser(),
    "profile_signer_certificate": lambda text: Path(text.strip()).expanduser() if text.strip() else None,
    "profile_signer_key": lambda text: Path(text.strip()).expanduser() if text.strip() else None,
    "token_length": _parse_int(6, 32),
    "default_ttl": parse_duration,
    "max_ttl": _parse_max_ttl,
    "tombstone_ttl": parse_duration,
    "sweep_interval": lambda text: 0 if text.strip() == "0" else parse_duration(text),
    "max_upload": parse_size,
    "cache_entries": _parse_int(1, 10_000_000),
    "cache_size": parse_size,
    "answer_cache_size": parse_size,
    "threads": _parse_int(1, 256),
    "connection_limit": _parse_int(10, 100_000),
    "client_connections": _parse_int(0, 100_000),
    "header_timeout": parse_duration,
    "channel_timeout": parse_duration,
    "use_poll": _parse_bool,
    "access_log": _parse_bool,
    "log_level": _parse_log_level,
    "s60_delivery": _parse_choice("file", "page", "redirect"),
    "s60_attachment": _parse_bool,
    "s40_delivery": _parse_choice("page", "der", "whc", "whc-alt"),
    "whc_layout": _parse_choice("der-direct", "length-prefixed"),
    "whc_charset": lambda text: int(_parse_choice("106", "4", "3")(text)),
    "upload_auth": _parse_choice("remote", "always", "none"),
    "upload_password": str.strip,
    "upload_networks": _parse_networks,
    "trusted_proxy": _parse_proxy,
    "trusted_proxy_count": _parse_int(1, 16),
    "trusted_proxy_headers": _parse_proxy_headers,
    "lookup_limit": _parse_int(0, 100_000),
    "upload_limit": _parse_int(0, 100_000),
    "contact": lambda text: LINE_BREAKS_RE.sub(" ", text.strip())[:200],
    "count_interval": lambda text: _parse_int(5, 86400)(str(parse_duration(text))),
    "admin_mail": lambda text: "" if not text.strip() else parse_addresses(text, 1)[0],
}


MAIL_PARSERS: dict[str, Callable[[str], object]] = {
    "host": str.strip,
    "port": _parse_int(0, 65535),
    "security": _parse_choice("none", "starttls", "tls"),
    "user": str.strip,
    "password": str.strip,
    "sender": lambda text: "" if not text.strip() else parse_addresses(text, 1)[0],
    "subject": lambda text: LINE_BREAKS_RE.sub(" ", text.strip())[:200],
    "cafile": str.strip,
    "recipients": _parse_int(1, 100),
    "per_hour": _parse_int(0, 100_000),
    "timeout": parse_duration,
}

#: Sections of the ini file: (prefix of the Config fields, parsers of the keys).
CONFIG_SECTIONS = {"certdrop": ("", CONFIG_PARSERS), "mail": ("mail_", MAIL_PARSERS)}


def load_config(path: str | None = None) -> Config:
    """Return the configuration from *path*, ``$CERTDROP_CONFIG``, ``certdrop.ini`` beside the module, or defaults."""
    path = path or os.environ.get("CERTDROP_CONFIG")
    if path:
        return Config.from_ini(Path(path).resolve())
    default = MODULE_DIR / "certdrop.ini"
    return Config.from_ini(default) if default.exists() else Config()


#: How a public key is compared with another: its DER SubjectPublicKeyInfo.
PUBLIC_KEY_DER = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_profile_signer(config: Config) -> "ProfileSigner | None":
    """Return the signer the settings name, or None; raise ConfigError if it cannot be used."""
    certificate_path, key_path = config.profile_signer_certificate, config.profile_signer_key
    if certificate_path is None or key_path is None:
        return None
    certificates = read_signer_certificates(certificate_path)
    key = read_signer_key(key_path)
    if key.public_key().public_bytes(*PUBLIC_KEY_DER) != certificates[0].public_key().public_bytes(*PUBLIC_KEY_DER):
        raise ConfigError(f"the key in {key_path} (profile_signer_key) does not match the certificate in "
                          f"{certificate_path} (profile_signer_certificate, its first certificate)")
    return ProfileSigner(certificates[0], certificates[1:], key)


def read_signer_certificates(path: Path) -> list[x509.Certificate]:
    """Return the certificates in the PEM file *path*: the signer's, then its intermediates."""
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as error:
        raise ConfigError(f"cannot read {path} (profile_signer_certificate): {error.strerror or error}") from None
    except ValueError:
        raise ConfigError(f"{path} (profile_signer_certificate) holds no PEM certificate") from None


def read_signer_key(path: Path):
    """Return the private key in the PEM file *path*; its text is not kept."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as error:
        raise ConfigError(f"cannot read {path} (profile_signer_key): {error.strerror or error}") from None
    except TypeError:  # the library's way of saying the key is encrypted
        raise ConfigError(f"the key in {path} (profile_signer_key) has a password: certdrop reads keys without one "
                          "(keep the file readable by certdrop alone, see README)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{path} (profile_signer_key) holds no PEM private key") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise ConfigError(f"the key in {path} (profile_signer_key) is neither RSA nor EC")
    return key


###############################################################################
# Bounded memory ##############################################################
###############################################################################
# Whatever certdrop keeps across requests is bounded by bytes (README's "Memory" table adds them up), and what a
# client chooses (a path, a header) is never kept when it is longer than MAX_KEPT_FIELD.

#: The longest text a kept result may be keyed by: a User-Agent or Accept header, a path.
MAX_KEPT_FIELD = 1024


def kept_for_short_arguments(maxsize: int) -> Callable[[Callable], Callable]:
    """Decorate a pure function of strings so that its results are kept (the *maxsize* most recent) for arguments
    of at most MAX_KEPT_FIELD characters each; longer arguments are worked out every time and never kept."""
    def decorate(function: Callable) -> Callable:
        kept = functools.lru_cache(maxsize)(function)

        @functools.wraps(function)
        def keep_if_short(*arguments):
            for argument in arguments:  # a loop, not any(...): this runs on every request and a generator costs
                if isinstance(argument, str) and len(argument) > MAX_KEPT_FIELD:
                    return function(*arguments)
            return kept(*arguments)
        keep_if_short.cache_clear = kept.cache_clear
        return keep_if_short
    return decorate


class BoundedMap:
    """A dict that holds at most *max_bytes*, as its callers count their items; the first put go first.

    Lookups are plain dict lookups (the hot path's), so "first put" stands in for "least recently used": an item
    forgotten while still asked for is made again and put back at the end. Keys over *max_bytes* are never kept.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.items: dict = {}
        self._sizes: dict = {}
        self._lock = threading.Lock()
        self.get = self.items.get

    def put(self, key: typing.Hashable, value: object, size: int) -> list:
        """Keep *value* by *key*, counted as *size* bytes; return the (key, value) pairs forgotten to make room."""
        if size > self.max_bytes:
            return []
        forgotten = []
        with self._lock:
            self.bytes += size - self._sizes.pop(key, 0)
            self.items[key] = value
            self._sizes[key] = size
            while self.bytes > self.max_bytes:
                oldest = next(iter(self._sizes))
                self.bytes -= self._sizes.pop(oldest)
                forgotten.append((oldest, self.items.pop(oldest)))
        return forgotten

    def pop(self, key: typing.Hashable) -> None:
        with self._lock:
            if key in self._sizes:
                self.bytes -= self._sizes.pop(key)
                del self.items[key]

    def clear(self) -> None:
        with self._lock:
            self.items.clear()
            self._sizes.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self.items)


###############################################################################
# Certificate doctor ##########################################################
###############################################################################
# Pure functions: bytes in, facts and findings out. Nothing here touches the disk, the clock or a request.

#: At most this many certificates in one upload (Mozilla's whole bundle is about 150).
MAX_CERTIFICATES = 300

#: An upload with more CAs than this that devices already trust is a public trust store: asked to confirm.
PUBLIC_ROOTS_ALLOWED = 3

#: Without a system trust store to compare with, this many self-signed CAs in one upload make a public bundle.
BUNDLE_SHAPE_ROOTS = 20

#: Device notes that matter only for old Nokia WAP phones; pages and the command line group them apart.
OLD_NOKIA_CODES = ("s40-key-size", "wap-algorithm")

#: The heading of that group.
OLD_NOKIA_HEADING = N_("Only for old Nokia phones (Series 40 and older WAP browsers): skip this if nobody uses one")

#: Refusals that the uploader may override: "force" on the form, --force on the command line.
FORCEABLE = ("server-certificate", "public-bundle")

#: Where systems keep the public roots they trust (Debian, RHEL, Alpine and BSD, SUSE).
SYSTEM_TRUST_STORES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem",
                       "/etc/ssl/ca-bundle.pem")

#: Links are for certificates that sign others; a leaf issued by a CA is left out unless forced.
INSTALLABLE_ROLES = ("root", "intermediate", "self-signed leaf")

PEM_BLOCK_RE = re.compile(rb"-----BEGIN ([A-Z0-9 #]+)-----(.*?)-----END \1-----", re.DOTALL)
PEM_PRIVATE_KEY_RE = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----")
PEM_CERTIFICATE_TYPES = (b"CERTIFICATE", b"X509 CERTIFICATE", b"TRUSTED CERTIFICATE")
PEM_PKCS7_TYPES = (b"PKCS7", b"PKCS #7 SIGNED DATA", b"CMS")
BASE64_RE = re.compile(rb"[A-Za-z0-9+/]+={0,2}")
OID_SIGNED_DATA = bytes.fromhex("06092a864886f70d010702")  # 1.2.840.113549.1.7.2, DER-encoded

#: What the library raises when it parses a field of a hostile certificate lazily, on first access.
FIELD_ERRORS = (ValueError, TypeError, OverflowError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType,
                x509.InvalidVersion, UnsupportedAlgorithm)

PRIVATE_KEY_MESSAGE = N_(
    "This upload contains a private key. A CA's private key must never leave the CA: devices need only its "
    "certificate. Nothing was stored. Export the certificate alone (DER or Base-64 .cer) and upload that."
)


@dataclasses.dataclass(frozen=True)
class Certificate:
    """The facts about one X.509 certificate that certdrop shows, checks and serves."""

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
    version: int  # 1 or 3
    is_ca: bool  # basicConstraints cA=TRUE, or a self-signed v1 certificate
    self_signed: bool  # issuer == subject and the signature verifies with its own key
    has_basic_constraints: bool
    key_cert_sign: bool | None  # None when there is no keyUsage extension
    key_type: str  # "RSA", "EC", "Ed25519", ...
    key_bits: int
    signature_hash: str | None  # "sha256", "sha1", "md5", ... None for Ed25519/Ed448
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    ca_issuers: tuple[str, ...]  # AIA caIssuers URLs: where the issuer's certificate is published
    #: the library's object, which the doctor orders chains with; None for a certificate read from the store
    parsed: x509.Certificate | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        """Return what people call this certificate: its first CN, else its O, else "CA"."""
        if self.common_names:
            return self.common_names[0]
        return self.organization or "CA"

    @property
    def role(self) -> str:
        """Return "root", "intermediate", "self-signed leaf" or "leaf"."""
        if self.is_ca:
            return "root" if self.self_signed else "intermediate"
        return "self-signed leaf" if self.self_signed else "leaf"

    @functools.cached_property
    def file_stem(self) -> str:
        """Return a file name (no extension) made only of safe characters: accents dropped (Ü is U); a name with
        letters that have no such spelling (Cyrillic, Greek, Chinese) ends with the first 8 hex digits of the
        SHA-256 as well, since install commands name the file after it and two such CAs must not overwrite each
        other (both were "ca" before)."""
        decomposed = "".join(c for c in unicodedata.normalize("NFKD", self.name) if not unicodedata.combining(c))
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", decomposed).strip("._-")[:64]
        if any(character.isalnum() and not character.isascii() for character in decomposed):
            return f"{stem or 'ca'}-{self.sha256.hex()[:8]}"
        return stem or "ca"

    @property
    def serial_hex(self) -> str:
        """Return the serial number in colon hex; negative ones (forbidden, yet real) with a minus sign."""
        magnitude = abs(self.serial)
        text = colon_hex(magnitude.to_bytes((magnitude.bit_length() + 7) // 8 or 1, "big"))
        return f"-{text}" if self.serial < 0 else text

    @property
    def server_name(self) -> str:
        """Return the host name a server certificate is for: its first DNS name, else its CN."""
        return (self.dns_names or self.common_names or (self.name,))[0]


@dataclasses.dataclass(frozen=True)
class Finding:
    """Something the doctor noticed: a warning, or a device note that does not make the upload worse."""

    code: str  # stable, for scripts: "several-cn", "expired", ...
    message: str  # one line for people
    certificate: str | None = None  # the name of the certificate it is about
    note: bool = False  # a device note rather than a warning


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """What an upload holds and what certdrop will do with it."""

    source: str  # what the upload was: "PEM", "DER", "PKCS#7", "PKCS#12", ...
    certificates: tuple[Certificate, ...]  # chain order, roots first
    installable: tuple[Certificate, ...]  # one link each, roots first
    left_out: tuple[tuple[Certificate, str], ...]  # (certificate, why it gets no link)
    findings: tuple[Finding, ...]

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(finding for finding in self.findings if not finding.note)

    @property
    def notes(self) -> tuple[Finding, ...]:
        return tuple(finding for finding in self.findings if finding.note)

    @property
    def device_notes(self) -> tuple[Finding, ...]:
        """Return the notes that matter beyond old Nokia phones."""
        return tuple(finding for finding in self.notes if finding.code not in OLD_NOKIA_CODES)

    @property
    def old_nokia_notes(self) -> tuple[Finding, ...]:
        """Return the notes that matter only for Series 40 and older WAP phones, which readers may skip."""
        return tuple(finding for finding in self.notes if finding.code in OLD_NOKIA_CODES)


def colon_hex(data: bytes) -> str:
    """Return bytes as colon-separated upper-case hex, the way Windows and phones show fingerprints."""
    return data.hex(":").upper()


def refuse(code: str, message: str) -> CertificateError:
    return CertificateError(message, code=code)


def quiet_library_warnings() -> None:
    """Keep the library's notes about odd certificates (a negative serial number in a real Mozilla root, a CN
    longer than 64 characters) out of the users' output and the log; they say nothing an administrator can act on.

    Called by ``make_app`` and ``main`` rather than on import, and narrowed to warnings raised from this module.
    A filter, unlike ``catch_warnings``, is safe with waitress's threads.
    """
    warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning, module=r"(certdrop|__main__)\Z")
    # Real certificates exceed X.509's length bounds (a CN over 64 characters); the library says so on parsing.
    warnings.filterwarnings("ignore", message=r"Attribute's length must be", category=UserWarning)


# -- facts of one certificate -----------------------------------------------------------------------------------


def _name_values(name: x509.Name, oid: x509.ObjectIdentifier) -> tuple[str, ...]:
    return tuple(str(attribute.value) for attribute in name.get_attributes_for_oid(oid))


def _extension(cert: x509.Certificate, kind: type):
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _key_facts(cert: x509.Certificate) -> tuple[str, int]:
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return "unknown", 0
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA", key.key_size
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "EC", key.curve.key_size
    if isinstance(key, dsa.DSAPublicKey):
        return "DSA", key.key_size
    return type(key).__name__.replace("PublicKey", "").lstrip("_"), 0


def _signature_hash(cert: x509.Certificate) -> str | None:
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return "unknown"
    return algorithm.name if algorithm else None


def is_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Return whether *issuer*'s key made *cert*'s signature.

    Unlike ``verify_directly_issued_by`` this accepts SHA-1 and MD5 signatures, which many real CAs (Windows SBS,
    old certsrv, part of Mozilla's bundle) still carry, so old chains order correctly too.
    """
    try:
        key = issuer.public_key()
        hash_algorithm = cert.signature_hash_algorithm
        if isinstance(key, rsa.RSAPublicKey):
            # The library gives no parameters for md5WithRSAEncryption; PKCS#1 v1.5 is what that OID means.
            parameters = cert.signature_algorithm_parameters or padding.PKCS1v15()
            key.verify(cert.signature, cert.tbs_certificate_bytes, parameters, hash_algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hash_algorithm))
        elif isinstance(key, dsa.DSAPublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, hash_algorithm)
        elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    if _signature_hash(cert) == "unknown":  # MD2 and the like: nobody checks a root's own signature, the name decides
        return True
    return is_signed_by(cert, cert)


def inspect_certificate(cert: x509.Certificate) -> Certificate:
    """Return the facts certdrop needs from a parsed certificate."""
    der = cert.public_bytes(serialization.Encoding.DER)
    constraints = _extension(cert, x509.BasicConstraints)
    key_usage = _extension(cert, x509.KeyUsage)
    names = _extension(cert, x509.SubjectAlternativeName)
    access = _extension(cert, x509.AuthorityInformationAccess) or ()
    organizations = _name_values(cert.subject, NameOID.ORGANIZATION_NAME)
    version = 1 if cert.version == x509.Version.v1 else 3
    self_signed = _is_self_signed(cert)
    key_type, key_bits = _key_facts(cert)
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
        version=version,
        is_ca=bool(constraints and constraints.ca) or (version == 1 and self_signed),
        self_signed=self_signed,
        has_basic_constraints=constraints is not None,
        key_cert_sign=None if key_usage is None else key_usage.key_cert_sign,
        key_type=key_type,
        key_bits=key_bits,
        signature_hash=_signature_hash(cert),
        dns_names=tuple(names.get_values_for_type(x509.DNSName)) if names else (),
        ip_addresses=tuple(str(ip) for ip in names.get_values_for_type(x509.IPAddress)) if names else (),
        ca_issuers=tuple(str(item.access_location.value) for item in access
                         if item.access_method == AuthorityInformationAccessOID.CA_ISSUERS
                         and isinstance(item.access_location, x509.UniformResourceIdentifier)),
        parsed=cert,
    )


def load_der(der: bytes) -> Certificate:
    """Return the facts of a DER certificate; raise CertificateError if it is not one."""
    try:
        return inspect_certificate(parse_der(der))
    except FIELD_ERRORS:
        raise refuse("not-a-certificate", _("This is not a readable DER certificate.")) from None


# -- reading whatever was uploaded ------------------------------------------------------------------------------


class BerElement(typing.NamedTuple):
    tag: int
    start: int  # first byte of the tag
    content_start: int
    content_end: int
    end: int  # one past the last byte, end-of-contents marker included


def ber_element(data: bytes, offset: int = 0, depth: int = 0) -> BerElement:
    """Return the BER element at *offset*.

    Handles the indefinite lengths that Windows and ``openssl crl2pkcs7`` may write, and raises ValueError on
    anything malformed, so hostile input ends in a clean refusal.
    """
    if depth > 32 or offset + 2 > len(data):
        raise ValueError("truncated or too deeply nested")
    start, tag, position = offset, data[offset], offset + 1
    if tag & 0x1F == 0x1F:  # high tag number form: skip its continuation bytes
        while position < len(data) and data[position] & 0x80:
            position += 1
        position += 1
    if position >= len(data):
        raise ValueError("truncated")
    first, position = data[position], position + 1
    if first == 0x80:  # indefinite length: children up to an end-of-contents marker
        end = position
        while data[end:end + 2] != b"\0\0":
            end = ber_element(data, end, depth + 1).end
        return BerElement(tag, start, position, end, end + 2)
    length = first
    if first & 0x80:
        count = first & 0x7F
        if not 0 < count <= 4 or position + count > len(data):
            raise ValueError("bad length")
        length, position = int.from_bytes(data[position:position + count], "big"), position + count
    if position + length > len(data):
        raise ValueError("truncated")
    return BerElement(tag, start, position, position + length, position + length)


def ber_children(data: bytes, parent: BerElement) -> list[BerElement]:
    children, position = [], parent.content_start
    while position < parent.content_end and data[position:position + 2] != b"\0\0":
        children.append(ber_element(data, position))
        position = children[-1].end
    return children


def first_der_element(data: bytes) -> bytes:
    """Return the first complete element of *data*: a TRUSTED CERTIFICATE is a certificate followed by trust data."""
    return data[:ber_element(data).end]


def pkcs7_certificates(data: bytes) -> list[bytes]:
    """Return the DER certificates inside a PKCS#7 SignedData (``.p7b``/``.p7c``), DER or BER encoded.

    Read by hand because the library warns, and may one day refuse, when certsrv or ``openssl crl2pkcs7`` write
    an unsorted SET OF; the certificates inside are plain DER either way. Raises ValueError if it is not one.
    """
    content_info = ber_children(data, ber_element(data))
    if len(content_info) < 2 or data[content_info[0].start:content_info[0].end] != OID_SIGNED_DATA:
        raise ValueError("not PKCS#7 signed data")
    signed_data = ber_element(data, content_info[1].content_start)  # inside [0] EXPLICIT
    for field in ber_children(data, signed_data):
        if field.tag == 0xA0:  # certificates [0] IMPLICIT SET OF Certificate
            return [data[cert.start:cert.end] for cert in ber_children(data, field)]
    return []


def looks_like_pkcs12(data: bytes) -> bool:
    """Return whether *data* is shaped like a PFX: SEQUENCE { INTEGER 3, ContentInfo, ... }."""
    try:
        first = ber_children(data, ber_element(data))[0]
    except (ValueError, IndexError):
        return False
    return data[first.start:first.end] == b"\x02\x01\x03"


def _as_text_bytes(data: bytes) -> tuple[bytes, str]:
    """Return *data* with UTF-16 (as Windows Notepad saves) turned into UTF-8, and a word on the encoding."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    elif b"-\0-\0-\0-\0-\0" in data[:4096]:
        encoding = "utf-16-le"
    elif b"\0-\0-\0-\0-\0-" in data[:4096]:
        encoding = "utf-16-be"
    else:
        return data, ""
    try:
        return data.decode(encoding).encode("utf-8"), "UTF-16 "
    except UnicodeDecodeError:
        return data, ""


def read_certificates(data: bytes) -> tuple[str, list[x509.Certificate]]:
    """Return (what the upload was, its certificates) for any certificate file; refuse anything else.

    Accepts PEM (bundles, any text around the blocks, CRLF, BOM, TRUSTED/X509 CERTIFICATE armour), DER, base64 DER
    without armour, UTF-16 text, PKCS#7 and certificate-only PKCS#12. Raises CertificateError, with a message
    saying what the upload looks like instead, for private keys and everything that is no certificate.
    """
    if not data.strip(b" \t\r\n\0\xef\xbb\xbf\xff\xfe"):
        raise refuse("empty", _("The upload is empty. Choose the CA certificate file or paste its text."))
    text, encoding = _as_text_bytes(data)
    if PEM_PRIVATE_KEY_RE.search(text):
        raise refuse("private-key", _(PRIVATE_KEY_MESSAGE))
    if b"-----BEGIN " in text:
        try:
            source, certs = _read_pem(text)
        except CertificateError:
            if is_html(text):  # a saved page that quotes an armour line (certdrop's own form, say)
                raise html_refusal() from None
            raise
        return encoding + source, certs
    if data[:1] == b"\x30" or (not encoding and is_binary(data)):
        return _read_binary(data)
    return _read_text(text)


def is_html(text: bytes) -> bool:
    lowered = text[:2048].lower().lstrip()
    return lowered.startswith((b"<!doctype html", b"<html")) or b"<html" in lowered or b"<body" in lowered


def is_binary(data: bytes) -> bool:
    """Return whether *data* is no text: NUL bytes, bytes that are not UTF-8, or many control characters."""
    sample = data[:1024]
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(sample) - 3:  # not merely a character cut at the sample's end
            return True
    controls = sum(byte < 32 and byte not in b"\t\r\n\f" for byte in sample)
    return b"\0" in sample or controls > len(sample) // 20


def _read_pem(text: bytes) -> tuple[str, list[x509.Certificate]]:
    certs, kinds = [], []
    for kind, body in PEM_BLOCK_RE.findall(text):
        kinds.append(kind)
        if kind not in PEM_CERTIFICATE_TYPES + PEM_PKCS7_TYPES:
            continue
        try:
            der = base64.b64decode(b"".join(body.split()), validate=True)
            if kind in PEM_PKCS7_TYPES:
                certs.extend(_load_ders(pkcs7_certificates(der)))
            else:
                certs.append(parse_der(first_der_element(der)))
        except (ValueError, binascii.Error):
            raise refuse("damaged-pem", _("A {kind} block in the text is damaged: its base64 does not decode to a "
                                          "certificate. Copy it again from the original file.").format(
                                              kind=kind.decode())) from None
    if certs:
        return ("PKCS#7 PEM" if set(kinds) & set(PEM_PKCS7_TYPES) else "PEM"), certs
    raise _refusal_for_pem_kinds(kinds)


def _refusal_for_pem_kinds(kinds: list[bytes]) -> CertificateError:
    csr = ("csr", N_("This is a certificate signing request (CSR), which asks a CA for a certificate. Upload the CA "
                     "certificate itself (-----BEGIN CERTIFICATE-----, or a .cer/.crt/.der file)."))
    public_key = ("public-key", N_("This is a bare public key, without the name and signature of a certificate. "
                                   "Upload the CA certificate itself (-----BEGIN CERTIFICATE-----, or a .cer/.crt/.der "
                                   "file)."))
    described = {
        b"CERTIFICATE REQUEST": csr,
        b"NEW CERTIFICATE REQUEST": csr,
        b"X509 CRL": ("crl", N_("This is a certificate revocation list (CRL), which lists withdrawn certificates. "
                                "Upload the CA certificate itself (-----BEGIN CERTIFICATE-----, or a .cer/.crt/.der "
                                "file).")),
        b"PUBLIC KEY": public_key,
        b"RSA PUBLIC KEY": public_key,
    }
    for kind in kinds:
        if kind in described:
            code, message = described[kind]
            return refuse(code, _(message))
    if kinds:
        return refuse("no-certificate", _("The text holds a {kind} block but no certificate. Upload the CA certificate "
                                          "(-----BEGIN CERTIFICATE-----).").format(
                                              kind=kinds[0].decode(errors="replace")))
    return refuse("damaged-pem", _("The PEM text is damaged: it has a -----BEGIN line but no complete block with its "
                                   "matching END line. Copy it again from the original file."))


def parse_der(der: bytes) -> x509.Certificate:
    """Return the certificate in *der*; raise ValueError for anything the library cannot read."""
    try:
        return x509.load_der_x509_certificate(der)
    except x509.InvalidVersion as error:  # not a ValueError, yet just another malformed input
        raise ValueError(str(error)) from None


def _load_ders(ders: list[bytes]) -> list[x509.Certificate]:
    return [parse_der(der) for der in ders]


def _read_binary(data: bytes) -> tuple[str, list[x509.Certificate]]:
    with contextlib.suppress(ValueError):
        return "DER", [parse_der(data)]
    with contextlib.suppress(ValueError):
        element = ber_element(data)
        if not data[element.end:].strip(b" \t\r\n\0"):  # DER plus a trailing newline some tools add
            return "DER", [parse_der(data[:element.end])]
    with contextlib.suppress(ValueError, IndexError):
        certs = pkcs7_certificates(data)
        if not certs:
            raise refuse("no-certificate", _("This PKCS#7 file holds no certificate. Export it again with "
                                             "\u201cInclude all certificates in the certification path\u201d."))
        return "PKCS#7", _load_ders(certs)
    if looks_like_pkcs12(data):
        return "PKCS#12", _read_pkcs12(data)
    if _is_der_private_key(data):
        raise refuse("private-key", _(PRIVATE_KEY_MESSAGE))
    raise _refusal_for_der(data)


def _read_pkcs12(data: bytes) -> list[x509.Certificate]:
    try:
        bundle = pkcs12.load_pkcs12(data, None)
    except (ValueError, UnsupportedAlgorithm):
        raise refuse("pkcs12-password", _("This is a password-protected PKCS#12 (.pfx/.p12) file, which is what "
                                          "Windows writes when it exports a private key. Export the certificate "
                                          "alone instead: DER or Base-64 encoded .cer, without the private "
                                          "key.")) from None
    if bundle.key is not None:
        raise refuse("private-key", _(PRIVATE_KEY_MESSAGE))
    certs = ([bundle.cert] if bundle.cert else []) + list(bundle.additional_certs)
    if not certs:
        raise refuse("no-certificate", _("This PKCS#12 file holds no certificate."))
    return [item.certificate for item in certs]


def _is_der_private_key(data: bytes) -> bool:
    try:
        serialization.load_der_private_key(data, password=None)
    except TypeError:  # "password was not given but private key is encrypted": an encrypted PKCS#8 key
        return True
    except (ValueError, UnsupportedAlgorithm):
        return False
    return True


def _refusal_for_der(data: bytes) -> CertificateError:
    for loader, code, message in (
        (x509.load_der_x509_csr, "csr", N_("This is a certificate signing request (CSR), which asks a CA for a "
                                           "certificate. Upload the CA certificate itself (a .cer, .crt or .der "
                                           "file).")),
        (x509.load_der_x509_crl, "crl", N_("This is a certificate revocation list (CRL), which lists withdrawn "
                                           "certificates. Upload the CA certificate itself (a .cer, .crt or .der "
                                           "file).")),
        (serialization.load_der_public_key, "public-key", N_("This is a bare public key, without a certificate around "
                                                             "it. Upload the CA certificate itself (a .cer, .crt or "
                                                             ".der file).")),
    ):
        with contextlib.suppress(ValueError, UnsupportedAlgorithm):
            loader(data)
            return refuse(code, _(message))
    return refuse("not-a-certificate", _("This binary file is not a certificate (nor PKCS#7 or PKCS#12). Upload the "
                                         "CA certificate as a .cer, .crt, .der or .pem file."))


def html_refusal() -> CertificateError:
    return refuse("html", _("This is a web page, not a certificate: the download probably saved a login or error "
                            "page. Download the CA certificate again, or open the file and copy the "
                            "-----BEGIN CERTIFICATE----- block."))


def _read_text(text: bytes) -> tuple[str, list[x509.Certificate]]:
    if is_html(text):
        raise html_refusal()
    compact = b"".join(text.split())
    if len(compact) >= 64 and BASE64_RE.fullmatch(compact):
        try:
            source, certs = _read_binary(base64.b64decode(compact, validate=True))
            return f"base64 {source}", certs
        except binascii.Error:
            pass
        except CertificateError as error:
            if error.code == "private-key":  # a key stays a key, however it is wrapped
                raise
    raise refuse("not-a-certificate", _("This text holds no certificate. A PEM certificate starts with "
                                        "-----BEGIN CERTIFICATE-----; upload that, or the .cer/.crt/.der file."))


# -- putting a bundle in order ---------------------------------------------------------------------------------


def issuers_within(certificates: list[Certificate]) -> dict[bytes, Certificate]:
    """Return, by SHA-256, the issuer of each certificate found among *certificates* (verified by signature)."""
    by_subject: dict[x509.Name, list[Certificate]] = {}
    for certificate in certificates:
        by_subject.setdefault(certificate.parsed.subject, []).append(certificate)
    issuers = {}
    for certificate in certificates:
        if certificate.self_signed:
            continue
        for candidate in by_subject.get(certificate.parsed.issuer, ()):
            if candidate is not certificate and is_signed_by(certificate.parsed, candidate.parsed):
                issuers[certificate.sha256] = candidate
                break
    return issuers


def chain_order(certificates: list[Certificate], issuers: dict[bytes, Certificate]) -> list[Certificate]:
    """Return *certificates* roots first, each below its issuer; unrelated certificates keep their order."""
    def depth(certificate: Certificate) -> int:
        seen = set()
        while certificate.sha256 in issuers and certificate.sha256 not in seen:
            seen.add(certificate.sha256)
            certificate = issuers[certificate.sha256]
        return len(seen)

    return sorted(certificates, key=depth)


def chains_within(certificates: list[Certificate]) -> dict[bytes, tuple[Certificate, ...]]:
    """Return, by SHA-256, the chain each of *certificates* (roots first) belongs to: every one of them below the
    same topmost issuer found among them, in their order, so a root and its intermediates share one chain."""
    issuers = issuers_within(certificates)

    def top(certificate: Certificate) -> bytes:
        seen = set()
        while certificate.sha256 in issuers and certificate.sha256 not in seen:
            seen.add(certificate.sha256)
            certificate = issuers[certificate.sha256]
        return certificate.sha256

    tops = {certificate.sha256: top(certificate) for certificate in certificates}
    members: dict[bytes, list[Certificate]] = {}
    for certificate in certificates:
        members.setdefault(tops[certificate.sha256], []).append(certificate)
    return {sha256: tuple(members[tops[sha256]]) for sha256 in tops}


# -- the diagnosis ---------------------------------------------------------------------------------------------


def diagnose(data: bytes, *, now: float, host: str = "", force: bool = False,
             public_roots: frozenset[bytes] = frozenset()) -> Diagnosis:
    """Return what *data* holds, which certificates get links, and what is worth knowing about them.

    Raises CertificateError when nothing in it can be installed: private keys, things that are no certificate,
    and (unless *force*) a server certificate without its CA or a public trust store. *public_roots* are the
    SHA-256 digests of the CAs devices already trust (the system's store, see :func:`system_trust_store`).
    """
    source, parsed = read_certificates(data)
    if len(parsed) > MAX_CERTIFICATES:
        raise refuse("too-many", ngettext("This upload holds {count} certificate; the limit is {limit}.",
                                          "This upload holds {count} certificates; the limit is {limit}.",
                                          len(parsed)).format(count=len(parsed), limit=MAX_CERTIFICATES))
    unique = list({certificate.sha256: certificate for certificate in map(_inspect_uploaded, parsed)}.values())
    issuers = issuers_within(unique)
    ordered = chain_order(unique, issuers)
    installable = [certificate for certificate in ordered if certificate.role in INSTALLABLE_ROLES]
    leaves = [certificate for certificate in ordered if certificate.role == "leaf"]
    if not installable and not force:
        raise _refusal_for_leaf(leaves[0])
    left_out = () if not installable else tuple(
        (leaf, _("The server certificate for {host} gets no link: devices need the CA that issued it, not the server "
                 "certificate.").format(host=leaf.server_name)) for leaf in leaves)
    installable = installable or leaves
    public = public_among(installable, public_roots)
    if public > PUBLIC_ROOTS_ALLOWED and not force:
        raise refuse("public-bundle", ngettext(
            "This looks like a public trust store: {public} of its {total} CAs is one phones and computers already "
            "trust, so a link for it would help nobody. Upload your own CA alone.",
            "This looks like a public trust store: {public} of its {total} CAs are ones phones and computers already "
            "trust, so links for them would help nobody. Upload your own CA alone.",
            public).format(public=public, total=len(installable)))
    findings = [*check_certificates(ordered, installable, issuers, now), *check_host(host, ordered)]
    if public == 1 and len(installable) == 1:  # ISRG Root X1, say: often taken for "the CA" of a Let's Encrypt site
        findings.append(Finding("public-root", _(
            "Devices already trust this CA: {name} is a public one, in the trust stores of phones and computers. You "
            "probably meant your own CA, the one that issued your server's certificate.").format(
                name=installable[0].name), installable[0].name))
    if public > PUBLIC_ROOTS_ALLOWED:
        findings.append(Finding("public-bundle", ngettext(
            "{count} of these CAs is a public one that devices already trust; it got a link because you chose to "
            "install it anyway.",
            "{count} of these CAs are public ones that devices already trust; they got links because you chose to "
            "install them anyway.", public).format(count=public)))
    return Diagnosis(source, tuple(ordered), tuple(installable), left_out, tuple(findings))


def public_among(installable: list[Certificate], public_roots: frozenset[bytes]) -> int:
    """Return how many of *installable* devices already trust: those in *public_roots*, or, with no store to
    compare with, every self-signed one when there are more than a company would ever upload."""
    if public_roots:
        return sum(certificate.sha256 in public_roots for certificate in installable)
    roots = sum(certificate.self_signed for certificate in installable)
    return roots if roots > BUNDLE_SHAPE_ROOTS else 0


@functools.cache
def system_trust_store() -> frozenset[bytes]:
    """Return the SHA-256 digests of the certificates in this system's public trust store (empty if none).

    Read once, without parsing a certificate: the digest of the DER inside each PEM block is all that is needed.
    """
    for path in SYSTEM_TRUST_STORES:
        try:
            text = Path(path).read_bytes()
        except OSError:
            continue
        digests = set()
        for kind, body in PEM_BLOCK_RE.findall(text):
            with contextlib.suppress(binascii.Error, ValueError):
                if kind in PEM_CERTIFICATE_TYPES:
                    digests.add(hashlib.sha256(first_der_element(base64.b64decode(b"".join(body.split())))).digest())
        if digests:
            return frozenset(digests)
    return frozenset()


def _inspect_uploaded(cert: x509.Certificate) -> Certificate:
    # Every field a page, profile, file name or CLI line shows is read here, once: the library parses names,
    # extensions and the serial lazily, so a crafted certificate fails now, before anything is stored, or never.
    try:
        return inspect_certificate(cert)
    except FIELD_ERRORS as error:
        raise refuse("damaged-certificate", _("A certificate in the upload is damaged: its fields cannot be read "
                                              "({error}). Export it again from the original source.").format(
                                                  error=error)) from None


def _refusal_for_leaf(leaf: Certificate) -> CertificateError:
    issuer = leaf.parsed.issuer
    issuer_name = (_name_values(issuer, NameOID.COMMON_NAME) or (leaf.issuer,))[0]
    if leaf.ca_issuers:
        message = _("This is the server certificate for {host}. Phones need the CA that issued it, "
                    "\u201c{issuer}\u201d: upload that instead. The issuer's certificate is published at {url} "
                    "(certdrop does not fetch it).")
    else:
        message = _("This is the server certificate for {host}. Phones need the CA that issued it, "
                    "\u201c{issuer}\u201d: upload that instead.")
    return refuse("server-certificate", message.format(host=leaf.server_name, issuer=issuer_name,
                                                       url=leaf.ca_issuers[0] if leaf.ca_issuers else ""))


def check_certificates(ordered: list[Certificate], installable: list[Certificate],
                       issuers: dict[bytes, Certificate], now: float) -> Iterator[Finding]:
    """Yield the warnings and device notes for each certificate of an upload."""
    links = {certificate.sha256 for certificate in installable}
    for certificate in ordered:
        yield from _check_validity(certificate, now)
        yield from _check_strength(certificate)
        if certificate.sha256 in links:
            yield from _check_installable(certificate, certificate.sha256 in issuers)


def _finding(code: str, certificate: Certificate, message: str, note: bool = False, **values: object) -> Finding:
    """Return a finding about *certificate*: *message*, translated, names it as {name} and *values* by theirs."""
    return Finding(code, message.format(name=certificate.name, **values), certificate.name, note)


def _check_validity(certificate: Certificate, now: float) -> Iterator[Finding]:
    not_before, not_after = certificate.not_before.timestamp(), certificate.not_after.timestamp()
    if now >= not_after:
        yield _finding("expired", certificate, _("\u201c{name}\u201d expired on {date}; devices will reject it."),
                       date=format_time(not_after))
    elif now < not_before:
        yield _finding("not-yet-valid", certificate, _("\u201c{name}\u201d is not valid before {date}; devices with "
                                                       "the right time reject it until then."),
                       date=format_time(not_before))
    elif not_after - now < 30 * 86400:
        yield _finding("expires-soon", certificate, _("\u201c{name}\u201d expires on {date}, in {duration}."),
                       date=format_time(not_after), duration=format_duration(not_after - now))


def _check_strength(certificate: Certificate) -> Iterator[Finding]:
    if certificate.signature_hash in ("md5", "sha1", "md2", "md4") and not certificate.self_signed:
        yield _finding("weak-signature", certificate, _("\u201c{name}\u201d is signed with {hash}, which current "
                                                        "devices reject. (A root's own signature would not matter; the "
                                                        "signature on this certificate does.)"),
                       hash=certificate.signature_hash.upper())
    if certificate.key_type == "RSA" and certificate.key_bits < 2048:
        yield _finding("weak-key", certificate, _("\u201c{name}\u201d has a {bits}-bit RSA key; current devices "
                                                  "require at least 2048 bits."), bits=certificate.key_bits)


def _check_installable(certificate: Certificate, issuer_uploaded: bool) -> Iterator[Finding]:
    if len(certificate.common_names) > 1:
        yield _finding("several-cn", certificate, ngettext(
            "\u201c{name}\u201d has {count} CN entry; Nokia phones show only the first.",
            "\u201c{name}\u201d has {count} CN entries; Nokia phones show only the first.",
            len(certificate.common_names)), count=len(certificate.common_names))
    if not certificate.common_names:
        yield _finding("no-cn", certificate, _("\u201c{name}\u201d has no CN (common name); iPhones list it with a "
                                               "blank name."))
    if certificate.version == 3 and not certificate.is_ca:
        yield _finding("not-a-ca", certificate, _("\u201c{name}\u201d is not marked as a CA (no basicConstraints "
                                                  "CA:TRUE): S60 phones save it as a site certificate and Android "
                                                  "refuses it as a CA."))
    if certificate.is_ca and certificate.key_cert_sign is False:
        yield _finding("no-keycertsign", certificate, _("\u201c{name}\u201d has a keyUsage without keyCertSign, so "
                                                        "devices may not accept it as the issuer of other "
                                                        "certificates."))
    if certificate.role == "intermediate" and not issuer_uploaded:
        yield _finding("intermediate", certificate, _("\u201c{name}\u201d is an intermediate CA, issued by {issuer}. "
                                                      "Devices also need that root (upload it too), and the Nokia S40 "
                                                      "hashed format needs a self-signed root."),
                       issuer=certificate.issuer)
    if certificate.key_type == "RSA" and certificate.key_bits > 1024:
        yield _finding("s40-key-size", certificate, _("\u201c{name}\u201d has a {bits}-bit key; some Nokia Series 40 "
                                                      "phones accept only 1024-bit CAs."),
                       note=True, bits=certificate.key_bits)
    if certificate.key_type != "RSA" or certificate.signature_hash not in ("sha1", "md5"):
        yield _finding("wap-algorithm", certificate, _("\u201c{name}\u201d is not an RSA CA signed with SHA-1 or MD5; "
                                                       "old WAP browsers (Series 40 and older) may fail to install "
                                                       "it."), note=True)


def check_host(host: str, certificates: list[Certificate]) -> Iterator[Finding]:
    """Yield a warning when *host* (what users type to reach the server) matches no server certificate uploaded."""
    host = host.strip().lower().rstrip(".")
    if not host:
        return
    servers = [certificate for certificate in certificates if certificate.role in ("leaf", "self-signed leaf")]
    if not servers:
        yield Finding("host-unchecked", _("No server certificate was uploaded, so {host} could not be checked; only a "
                                          "server certificate names the hosts it serves.").format(host=host), note=True)
    elif not any(matches_host(host, certificate) for certificate in servers):
        names = ", ".join(servers[0].dns_names or servers[0].common_names)
        message = _("{host} matches no name of the server certificate ({names}); devices will warn about the name "
                    "even once the CA is trusted.") if names else _(
                    "{host} matches no name of the server certificate, which names none; devices will warn about the "
                    "name even once the CA is trusted.")
        yield Finding("host-mismatch", message.format(host=host, names=names), servers[0].name)


def matches_host(host: str, certificate: Certificate) -> bool:
    """Return whether *host* is one of *certificate*'s DNS names, IP addresses or CNs (``*.`` wildcards too)."""
    with contextlib.suppress(ValueError):
        host = str(ipaddress.ip_address(host.strip("[]")))
    for name in (*certificate.dns_names, *certificate.ip_addresses, *certificate.common_names):
        name = name.lower().rstrip(".")
        wildcard = name.startswith("*.") and "." in name[2:] and host.partition(".")[2] == name[2:]
        if name == host or wildcard:
            return True
    return False


###############################################################################
# Device formats ##############################################################
###############################################################################
# Pure: who is asking (headers in, a device class out) and what each device installs (a certificate in, bytes
# out). research/device-formats.md in the project's notes has the sources for every rule here.

MIME_PEM = "application/x-pem-file"
MIME_PROFILE = "application/x-apple-aspen-config"
MIME_HASHED = "application/vnd.wap.hashed-certificate"
MIME_XHTML_MP = "application/vnd.wap.xhtml+xml; charset=utf-8"
MIME_XHTML = "application/xhtml+xml; charset=utf-8"
MIME_WML = "text/vnd.wap.wml; charset=utf-8"

#: Request headers in which proxy browsers (Opera Mini, UC Browser) pass on the handset's own User-Agent.
HANDSET_HEADERS = ("X-OperaMini-Phone-UA", "X-UCBrowser-Device-UA", "Device-Stock-UA")

#: The request headers that say who is asking: what /c/<token> sends, and in which format errors go.
CLIENT_HEADERS = ("User-Agent", "Accept", *HANDSET_HEADERS)

#: The request headers the language of an answer comes from (reader_language).
LANGUAGE_HEADERS = ("Accept-Language", "Cookie")

#: Every request header the answer at /c/<token> depends on.
VARY = ", ".join((*CLIENT_HEADERS, *LANGUAGE_HEADERS))

#: The request headers a file or QR code at /c/<token> depends on: it has no words, so the reader's language is not one.
FILE_VARY = ", ".join(CLIENT_HEADERS)

#: Nokia's S60 handsets, from 1st edition to Belle, for browsers that name only the handset (i-mode
#: "portalmmm/2.0 N73(...)", Opera Mini "Opera Mini/NokiaN95", truncated WAP headers). Keys are the model tokens
#: as UAs write them, suffix included: Nokia reused numbers across platforms (the 2000 WAP 6210 and the 2008
#: Symbian 6210 Navigator, the S40 6260 slide "6260s" and the S60 6260), so ambiguous bare numbers are left out.
S60_MODELS = frozenset("""
    3230 3250 3600 3620 3650 3660 5228 5230 5233 5235 5250 5320 5320d 5500 5500d 5530 5630 5630d 5700 5730 5730s
    5800 5800d 5800i 6110 6120 6120c 6120ci 6121 6121c 6122 6122c 6124 6124c 6220c 6260 6290 6600 6620 6630 6638
    6650d 6670 6680 6681 6682 6700s 6710s 6720c 6730c 6760s 6788 6788i 6790 6790s 7610 7650 500 600 603 700 701
    702 808 C5 C6 C7 E5 E50 E51 E52 E55 E6 E60 E61 E61i E62 E63 E65 E66 E7 E70 E71 E72 E73 E75 E90 N-Gage N70
    N71 N72 N73 N75 N76 N77 N78 N79 N8 N80 N81 N82 N85 N86 N90 N91 N92 N93 N93i N95 N96 N97 T7 X6 X7
""".split())

#: The S60 handsets that Nokia sold under a number and a name ("5800 XpressMusic", "6210 Navigator"), as
#: nokia_model spells them. The name is part of the model: the same number with another name, or none, can be
#: another phone on another platform (the 3600 of 2003 is S60 1st edition, the 3600 slide of 2008 Series 40; the
#: 6700 slide is S60, the 6700 classic Series 40); a named Nokia not listed here is Series 40. Sources: Wikipedia,
#: "Nokia 3650" (the 3600 is its North American name, Series 60 1.2); the device list of "S60 (software
#: platform)" for the named S60 phones; WURFL's UA lists for the spellings ("Nokia 5800 XpressMusic/RM-356",
#: Series60/5.0; "Nokia5310XpressMusic/2.0 (07.01) Profile/MIDP-2.1", Series 40).
S60_NAMED_MODELS = frozenset({
    "3250 xpressmusic", "5320 xpressmusic", "5630 xpressmusic", "5700 xpressmusic", "5730 xpressmusic",
    "5800 xpressmusic", "6110 navigator", "6120 classic", "6121 classic", "6124 classic", "6210 navigator",
    "6220 classic", "6650 fold", "6700 slide", "6710 navigator", "6760 slide", "6790 slide", "6790 surge",
    "808 pureview"})

#: The names Nokia put after a model number with a space ("Nokia7610 Supernova/2.0", "Nokia 5800 XpressMusic/RM-356"
#: in WURFL's UA lists); written straight after the number ("Nokia5310XpressMusic/2.0", "Nokia3600slide/2.0") any
#: word of letters is taken for one.
NOKIA_MODEL_NAMES = ("XpressMusic", "classic", "slide", "fold", "Supernova", "Navigator", "PureView", "Surge",
                     "Prism", "Scrolling", "twist", "Sirocco", "Arte", "Luna", "Mural", "Intrigue")

#: A Nokia model token as UAs write it, in any case ("Nokia6230", "NOKIA-6236i", "nokia6680", "Nokia 6230" inside
#: Opera Mini's UA, i-mode's bare "N73"): a number, a suffix of up to two letters ("6600s", "E61i", "6120ci"), or a
#: name (NOKIA_MODEL_NAMES). It ends at a delimiter, so that no model is read out of the start of a longer word.
NOKIA_MODEL_RE = re.compile(r"(?:^Nokia[ -]?|^portalmmm/[\d.]+ |Opera Mini/Nokia|[\s(;]Nokia[ -]?)"
                            r"(N-Gage|[A-Z]?\d{1,4})(?:([a-z]{0,2})|[ _]?(%s)|([a-z]{3,}))"
                            r"(?=[-/();,_\[]|\s+[^A-Za-z]|\s*$)" % "|".join(NOKIA_MODEL_NAMES), re.IGNORECASE)
S60_RE = re.compile(r"Symbian|Series ?60|\bS60(?:V\d)?\b|SymbOS|Series80", re.IGNORECASE)
S40_RE = re.compile(r"Series40\b|S40OviBrowser|Opera Mini/Nokia", re.IGNORECASE)
ANDROID_RE = re.compile(r"\bAndroid\b")
WINDOWS_MOBILE_RE = re.compile(r"Windows Phone|Windows CE|Windows Mobile|IEMobile|WPDesktop")
BLACKBERRY_RE = re.compile(r"BlackBerry|\bBB10\b|RIM Tablet OS|PlayBook")
IOS_RE = re.compile(r"iPhone|iPad|iPod")
WINDOWS_RE = re.compile(r"Windows NT|Win64|WOW64|Windows 10|Windows 11")
MAC_RE = re.compile(r"Macintosh|Mac OS X")
UNIX_RE = re.compile(r"X11|Linux|FreeBSD|OpenBSD|NetBSD")
PROXY_BROWSER_RE = re.compile(r"Opera Mini|UCBrowser|UCWEB|UC Browser", re.IGNORECASE)
CHROME_OS_RE = re.compile(r"\bCrOS\b")
CERTIFICATE_TYPES = ("application/x-x509-ca-cert", "application/pkix-cert", "application/x-pem-file")

#: IANA MIBenum -> Python codec, for the display name of a WAP hashed certificate.
WAP_CHARSETS = {3: "ascii", 4: "latin-1", 106: "utf-8"}

class Browser(typing.NamedTuple):
    """A row of BROWSERS: an app or browser its User-Agent names, and whether it can install what the page offers."""

    name: str  # shown on the page as it is: a product's name, the same in every language
    marker: re.Pattern  # searched for in the User-Agent
    installs: bool  # False: a configuration profile (iOS) or a certificate (Android) cannot be installed from it
    below: int = 0  # when the marker captures a major version: versions below this cannot install


#: Apps whose built-in web view opens links, and browsers that cannot install a configuration profile on iOS,
#: one row each, first match wins. Rows name the source of their marker, a real User-Agent quoted there. Their
#: pages lead with the way out (Safari on iOS, Chrome on Android) and the link as text to copy. Not recognisable
#: (they send Safari's own User-Agent, so every iOS page says "Nothing happened? Open this link in Safari"):
#: Twitter/X, Slack and Discord on iOS (zenn.dev/kecy/articles/f51851e42c4243, iOS 14.5), Telegram on iOS
#: (TelegramMessenger/Telegram-iOS#736), Brave on iOS (brave/brave-ios#5351), Firefox for iOS 116 and later,
#: which dropped FxiOS (mozilla-mobile/firefox-ios#15938), and Gmail, Outlook and Teams, whose link views show
#: Safari's User-Agent too (issue 20; no User-Agent of theirs found that names them).
BROWSERS = (
    # "[FBAN/FBIOS;FBAV/96.0.0.45.70;...]" on iOS 10.3, "[FB_IAB/FB4A;FBAV/127.0.0.22.69;]" on Android 7:
    # github.com/allinurl/goaccess/issues/804; "[FB_IAB/Orca-Android;...]" is Messenger: matomo-org/device-detector#6867
    Browser("Messenger", re.compile(r"\[FB_IAB/Orca|FBAN/Messenger"), False),
    Browser("Facebook", re.compile(r"FBAN/|FBAV/|FB_IAB/"), False),
    # "Mobile/15D60 Instagram 31.0.0.14.97 (iPhone9,1; iOS 11_2_5; ...)" and "... Instagram 30.0.0.12.95 Android
    # (24/7.0; ...)": github.com/DamonOehlman/detect-browser/issues/56
    Browser("Instagram", re.compile(r"\bInstagram \d"), False),
    # "Mobile/15E148 MicroMessenger/8.0.22(0x18001626) NetType/WIFI" on iOS 15.5: foroco/php-browser-detection#16;
    # "...; wv) ... MicroMessenger/6.2.0.16_r1138404.543" on Android 5.1: faisalman/ua-parser-js#115
    Browser("WeChat", re.compile(r"MicroMessenger/"), False),
    # "Mobile/13D15 Safari Line/5.10.0" on iOS 9.2: matomo-org/device-detector#5457; "Line/6.5.0/IAB" on Android:
    # matomo-org/device-detector#5530
    Browser("LINE", re.compile(r"\bLine/\d"), False),
    # "... Mobile Safari/537.36 Telegram-Android/11.2.1 (...)": intoli/user-agents#78
    Browser("Telegram", re.compile(r"Telegram-Android/"), False),
    # "Mobile/15E5189f Snapchat/10.26.1.0 (iPhone10,6; iOS 11.3; gzip)": browscap/browscap#1843; since 11.0 it adds
    # "(like Safari/604.1)": donatj/PhpUserAgent#67
    Browser("Snapchat", re.compile(r"Snapchat/"), False),
    # "Mobile/15E148 Safari/604.1 musical_ly_41.9.0" on iOS 18.6.2: shalanah/inapp-spy#55; "BytedanceWebview" on
    # Android: shalanah/inapp-spy#56
    Browser("TikTok", re.compile(r"musical_ly|BytedanceWebview|\bTikTok\b"), False),
    # "(KHTML, like Gecko) LinkedIn/9.11.908.1 Version/10.0 Mobile/15C153 Safari/602.1" on iOS 11.2:
    # browscap/browscap#1707; "Mobile/15E148 [LinkedInApp]": serbanghita/Mobile-Detect#832
    Browser("LinkedIn", re.compile(r"LinkedInApp|\bLinkedIn/\d"), False),
    # "(KHTML, like Gecko) FxiOS/18.2b15817 Mobile/15E148 Safari/605.1.15" on iOS 12.4: WoltLab/WCF#3051
    Browser("Firefox", re.compile(r"FxiOS/"), False),
    # "(KHTML, like Gecko) Focus/3.2 Mobile/14D27" on iOS 10.2: browscap/browscap#1533 (later Focus sends FxiOS:
    # mozilla-mobile/focus-ios#1753)
    Browser("Firefox Focus", re.compile(r"\bFocus/\d[^ ]* Mobile/"), False),
    # "Mobile/15E148 DuckDuckGo/7 Safari/605.1.15": duckduckgo/iOS#656; "Mobile/15E148 Safari/604.1 Ddg/19.0":
    # duckduckgo/apple-browsers#2009
    Browser("DuckDuckGo", re.compile(r"DuckDuckGo/|\bDdg/"), False),
    # "Mobile/15E148 Safari/604.1 OPT/4.6.1" on iOS 17.4: pixu1980/detector-js#25; "OPiOS/8.0.0.78129" (Opera
    # Mini for iOS): arouel/uadetector#87
    Browser("Opera", re.compile(r"\bOPT/|OPiOS/"), False),
    # "EdgiOS/125.0.2535.87 Version/17.0 Mobile/15E148 Safari/604.1" on iOS 17.5: medama-io/go-useragent#23. Not
    # known to install profiles, so its page leads with Safari and keeps the download below.
    Browser("Microsoft Edge", re.compile(r"EdgiOS/"), False),
    # "CriOS/120.0.6099.119 Mobile/15E148 Safari/604.1": Chrome for iOS installs profiles from version 95 (issue
    # 20); older ones are sent to Safari.
    Browser("Chrome", re.compile(r"CriOS/(\d+)"), True, below=95),
)

#: An iOS User-Agent without "Safari/" is a web view inside an app (WKWebView leaves it out):
#: github.com/atomantic/is-ua-webview data/rules.js; so is an Android one with "; wv)" (Android 5 and later).
ANDROID_WEB_VIEW_RE = re.compile(r";\s*wv\)")

#: A fixed namespace, so a profile's UUIDs follow from the certificate alone.
PROFILE_NAMESPACE = uuid.UUID("6f0b9c1e-7a43-5d2e-9c55-2f1b0d8e4a17")


class Client(typing.NamedTuple):
    """Who is asking at /c/<token>."""

    device: str  # "s60", "s40", "ios", "android", "windows-mobile", "blackberry", "firefox", "macos", "windows",
    #              "linux" or "other"
    via_proxy: bool  # Opera Mini or UC Browser: the file reaches their server, not the phone's installer
    app: str = ""  # the app or browser (BROWSERS) that cannot install, when its User-Agent names it
    installs: bool = True  # False in a web view or a browser that cannot install: the page leads with the way out
    system: str = ""  # Linux and Firefox pages: the distribution the User-Agent names (LINUX_SYSTEMS), else ""
    phone: bool = False  # an "other" device whose User-Agent says it is a phone (PHONE_RE): no QR code to scan

    @property
    def desktop(self) -> bool:
        """Whether the page may offer a QR code for a phone and the developer page: a computer's."""
        return self.device in DESKTOP_DEVICES and not self.phone


def nokia_model(user_agent: str) -> str | None:
    """Return the Nokia model *user_agent* names, spelt as in S60_MODELS ("6600", "N95", "E61i") or, for a model
    with a name, S60_NAMED_MODELS ("5800 xpressmusic", "3600 slide"); else None."""
    match = NOKIA_MODEL_RE.search(user_agent)
    if not match:
        return None
    number = "N-Gage" if match[1].lower() == "n-gage" else match[1].upper()
    name = match[3] or match[4]
    return f"{number} {name.lower()}" if name else number + (match[2] or "").lower()


def nokia_class(user_agent: str) -> str | None:
    """Return "s60" or "s40" when *user_agent* is a Nokia phone's (or a proxy browser's naming one), else None.

    "s60" covers every Symbian browser (Series 80 Communicators too): their installers take DER. It is tested
    first, because S60 WAP browsers also send "Nokia.../x (fw) ... Profile/MIDP".
    """
    model, lowered = nokia_model(user_agent), user_agent.lower()
    if S60_RE.search(user_agent) or model in S60_MODELS or model in S60_NAMED_MODELS:
        return "s60"
    if S40_RE.search(user_agent) or lowered.startswith("nokia"):
        # Native S40 browsers carry no Series40 token, and older Nokia WAP phones (3330, 6210) are best served by
        # the same WAP page.
        return "s40"
    if model and ((lowered.startswith("mozilla/") and "profile/midp" in lowered) or "opera mini" in lowered):
        # Series 40 WebKit browsers lead with Mozilla/5.0 and name the phone later; Opera Mini names the phone it
        # runs on. Another maker's phone that merely mentions a Nokia model ("LG-CU920 ... Nokia6233") is neither.
        return "s40"
    return None


@kept_for_short_arguments(1024)
def classify(user_agent: str) -> str:
    """Return the device class of a User-Agent string; each distinct string is worked out once."""
    if WINDOWS_MOBILE_RE.search(user_agent):  # before Android and iOS: Windows Phone 8.1+ claims both
        return "windows-mobile"
    android = ANDROID_RE.search(user_agent)  # Android phones named "S60" (Cat, Lenovo) are Android
    nokia = None if android else nokia_class(user_agent)
    if nokia:
        return nokia
    if BLACKBERRY_RE.search(user_agent):
        return "blackberry"
    if android:
        return "android"
    if IOS_RE.search(user_agent):
        return "ios"
    if CHROME_OS_RE.search(user_agent):
        return "chromeos"
    windows, mac, unix = WINDOWS_RE.search(user_agent), MAC_RE.search(user_agent), UNIX_RE.search(user_agent)
    if "Firefox/" in user_agent and unix and not (windows or mac):
        return "firefox"  # Firefox on Windows and macOS trusts the system store, so it gets that system's page
    if windows:
        return "windows"
    if mac:
        return "macos"  # iPadOS Safari too, by default: the macOS page offers the profile first for that reason
    if unix:
        return "linux"
    return "other"


@kept_for_short_arguments(1024)
def identify(user_agent: str, handset_agent: str, proxied: bool) -> Client:
    """Return the client behind a request's User-Agent and the handset UA a browser passed on.

    *proxied* says the handset UA came from Opera Mini's or UC Browser's own header. Device-Stock-UA alone is no
    sign of a proxy: ordinary browsers (Opera for Android) send it too.
    """
    agent = handset_agent or user_agent
    device, via_proxy = classify(agent), proxied or bool(PROXY_BROWSER_RE.search(user_agent))
    phone = device == "other" and bool(PHONE_RE.search(agent))
    if via_proxy:  # the proxy's own note says where to go instead
        return Client(device, via_proxy, phone=phone)
    system = linux_system(agent) if device in ("linux", "firefox") else ""
    return Client(device, via_proxy, *browser_of(agent, device), system=system, phone=phone)


#: What a phone the device classes do not know says in its User-Agent: "Mobile" (MDN, "Browser detection using the
#: user agent": Mozilla's and most browsers' mark of a phone), "KAIOS" (KaiOS 2.5 on the Nokia 8110 4G sends
#: "Mozilla/5.0 (Mobile; Nokia_8110_4G; rv:48.0) Gecko/48.0 Firefox/48.0 KAIOS/2.5"), "J2ME/MIDP" (Opera Mini 4 on
#: Java phones: "Opera/9.80 (J2ME/MIDP; Opera Mini/4.2.14912/870; U; id) Presto/2.4.15").
PHONE_RE = re.compile(r"\bMobile\b|\bKAIOS/|\bJ2ME/MIDP\b", re.IGNORECASE)


#: Linux distributions whose browsers say so in their User-Agent, and the LINUX_SYSTEMS row each picks. Firefox as
#: Ubuntu and Fedora build it sends "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:131.0) ..." and "(X11; Fedora; Linux
#: x86_64; rv:126.0) ..." (User-Agent tables in public test suites, Firefox 126-131 on Ubuntu and Fedora 40); Chrome
#: everywhere and most other builds send "X11; Linux x86_64" alone, so their pages list every distribution. The other
#: markers are the distributions' own names, for the browsers that add them.
LINUX_MARKERS = (
    (re.compile(r"\b(?:Ubuntu|Debian|Kubuntu|Xubuntu|Raspbian|Linux Mint)\b"), "debian"),
    (re.compile(r"\b(?:Fedora|Red Hat|CentOS|Rocky|AlmaLinux)\b"), "fedora"),
    (re.compile(r"\b(?:Arch Linux|Manjaro)\b"), "arch"),
    (re.compile(r"\b(?:openSUSE|SUSE)\b"), "suse"),
    (re.compile(r"\bAlpine\b"), "alpine"),
)


def linux_system(user_agent: str) -> str:
    """Return the LINUX_SYSTEMS key of the distribution *user_agent* names, or "" when it names none."""
    return next((system for marker, system in LINUX_MARKERS if marker.search(user_agent)), "")


def browser_of(user_agent: str, device: str) -> tuple[str, bool]:
    """Return the app or browser on an iPhone, iPad or Android phone that cannot install (its name, or "" when the
    User-Agent does not say), and whether this browser can install: ("", True) for Safari and the like."""
    if device not in ("ios", "android"):
        return "", True
    for row in BROWSERS:
        match = row.marker.search(user_agent)
        if match:
            if row.installs and not (row.below and int(match[1]) < row.below):
                return "", True
            return row.name, False
    if device == "ios":
        return "", "Safari/" in user_agent
    return "", not ANDROID_WEB_VIEW_RE.search(user_agent)


@kept_for_short_arguments(1024)
def accept_qualities(accept: str) -> dict[str, float]:
    """Return the media ranges of an Accept header with their q-values ("*/*" and "type/*" included)."""
    qualities = {}
    for item in accept.lower().split(","):
        media, *params = (part.strip() for part in item.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    quality = min(1.0, max(0.0, float(value)))
                except ValueError:
                    quality = 0.0
        if media:
            qualities[media] = max(quality, qualities.get(media, 0.0))
    return qualities


def accept_quality(accept: str, media: str, *, wildcards: bool = True) -> float:
    """Return the q-value *accept* gives *media*: its own range first, then "type/*" and "*/*" (q=0: refused)."""
    qualities = accept_qualities(accept)
    if media in qualities:
        return qualities[media]
    if not wildcards:
        return 0.0
    return qualities.get(media.partition("/")[0] + "/*", qualities.get("*/*", 0.0))


def accepts_only_certificates(accept: str) -> bool:
    """Return whether an Accept header asks for a certificate type and refuses HTML."""
    wants_certificate = any(accept_quality(accept, kind, wildcards=False) > 0 for kind in CERTIFICATE_TYPES)
    return wants_certificate and accept_quality(accept, "text/html") == 0


def nokia_page_type(accept: str) -> str:
    """Return the Content-Type for a Nokia page: the page type the phone names with the highest q, else text/html.

    Only types the Accept header names count: gateways often add text/html or */* for WAP 1.x phones, which does
    not make them XHTML browsers.
    """
    candidates = ((MIME_XHTML_MP, "application/vnd.wap.xhtml+xml"), (MIME_XHTML, "application/xhtml+xml"),
                  (MIME_WML, "text/vnd.wap.wml"), (MIME_WML, "application/vnd.wap.wmlc"))
    best, best_quality = MIME_HTML, 0.0
    for content_type, media in candidates:
        quality = accept_quality(accept, media, wildcards=False)
        if quality > best_quality:
            best, best_quality = content_type, quality
    return best


# -- the files ---------------------------------------------------------------------------------------------------


def pem_bytes(certificate: Certificate) -> bytes:
    """Return the certificate as PEM with standard 64-column armour."""
    text = base64.b64encode(certificate.der)
    lines = b"".join(text[start:start + 64] + b"\n" for start in range(0, len(text), 64))
    return b"-----BEGIN CERTIFICATE-----\n" + lines + b"-----END CERTIFICATE-----\n"


def _plist_text(text: str) -> str:
    # A hostile CN must not make the profile unbuildable (plistlib refuses what XML cannot carry), nor forge lines
    # or reverse text in the install dialog.
    return XML_INVALID_RE.sub("\ufffd", BIDI_CONTROLS_RE.sub("", LINE_BREAKS_RE.sub(" ", text)))


def apple_profile(*chain: Certificate, language: str = "", signed: bool = False) -> bytes:
    """Return an unsigned configuration profile (``.mobileconfig``) that installs *chain*: its root (or topmost CA)
    first, then the intermediates below it, one payload each.

    The PayloadIdentifier follows from the chain's first certificate, so installing the profile again (a longer
    chain, another language, signed or not) replaces the earlier install instead of adding one, and a renewed CA
    with the same name installs beside the old one. The PayloadUUID follows from the profile's content (its
    payloads, the *language* of its words, and whether it is *signed*), so each distinct profile has its own; the
    bytes are the unsigned profile either way, which ProfileSigner.sign then wraps.
    """
    top = chain[0]
    fingerprint = top.sha256.hex()
    name = _plist_text(top.name)
    payloads = [{
        "PayloadType": "com.apple.security.root" if certificate.self_signed else "com.apple.security.pkcs1",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"certdrop.{certificate.sha256.hex()}.certificate",
        "PayloadUUID": str(uuid.uuid5(PROFILE_NAMESPACE, f"{certificate.sha256.hex()}/certificate")).upper(),
        "PayloadDisplayName": _plist_text(certificate.name),
        "PayloadCertificateFileName": f"{certificate.file_stem}.cer",
        "PayloadContent": certificate.der,
    } for certificate in chain]
    content = hashlib.sha256(plistlib.dumps(payloads, fmt=plistlib.FMT_BINARY, sort_keys=True)).hexdigest()
    values = {"name": name, "fingerprint": colon_hex(top.sha256)}
    description = ngettext(
        "Installs the CA certificate {name} (SHA-256 {fingerprint}) and {count} intermediate CA below it.",
        "Installs the CA certificate {name} (SHA-256 {fingerprint}) and {count} intermediate CAs below it.",
        len(chain) - 1).format(count=len(chain) - 1, **values) if len(chain) > 1 else _(
        "Installs the CA certificate {name} (SHA-256 {fingerprint}).").format(**values)
    # iOS and macOS show ConsentText before they install: where people can compare the fingerprint with the one
    # they were given. Apple's Configuration Profile Reference: a dictionary by language code, "default" for any.
    consent = _("This profile installs the CA certificate {name}. Install it only if its SHA-256 fingerprint is "
                "{fingerprint}, as the person who sent you this link gave it to you.").format(**values)
    profile = {
        "PayloadType": "Configuration",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"certdrop.{fingerprint}",
        "PayloadUUID": str(uuid.uuid5(PROFILE_NAMESPACE, f"{content}/{language}/{signed}")).upper(),
        "PayloadDisplayName": name,
        "PayloadDescription": description,
        "ConsentText": {"default": consent},
        "PayloadRemovalDisallowed": False,
        "PayloadContent": payloads,
    }
    if top.organization:
        profile["PayloadOrganization"] = _plist_text(top.organization)
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML, sort_keys=False)


#: Bytes of signed profiles a ProfileSigner keeps: a root and an intermediate make a profile of about 5 KB, signed
#: with a signer's chain of two about 8 KB, so some 500 profiles (links times languages).
SIGNED_PROFILES_BYTES = 4 * 1024 * 1024


class ProfileSigner:
    """The administrator's signing certificate, its intermediates and its private key, read from their files at start.

    Only the key object is kept, never its PEM text; it is never served, logged or copied. Signatures differ on
    every run (a signing time, and ECDSA's random numbers), so each profile is signed once and its signed bytes kept
    by the unsigned profile's SHA-256: within a process the same profile always gets the same bytes.
    """

    def __init__(self, certificate: x509.Certificate, intermediates: list[x509.Certificate], key):
        self.certificate, self.intermediates, self._key = certificate, intermediates, key
        self.name = inspect_certificate(certificate).name
        self.not_before = certificate.not_valid_before_utc.timestamp()
        self.not_after = certificate.not_valid_after_utc.timestamp()
        self._signed = BoundedMap(SIGNED_PROFILES_BYTES)
        self._lock = threading.Lock()

    def is_valid_at(self, now: float) -> bool:
        return self.not_before <= now < self.not_after

    def sign(self, profile: bytes) -> bytes:
        """Return *profile* as PKCS#7 SignedData (DER) holding it byte for byte: signed once, then kept."""
        digest = hashlib.sha256(profile).digest()
        signed = self._signed.get(digest)
        if signed is not None:
            return signed
        builder = pkcs7.PKCS7SignatureBuilder().set_data(profile).add_signer(self.certificate, self._key,
                                                                             hashes.SHA256())
        for intermediate in self.intermediates:
            builder = builder.add_certificate(intermediate)
        # Binary: the content is signed as it is; without it, the library rewrites line ends to CRLF first
        signed = builder.sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
        with self._lock:  # two threads that signed the same profile at once: both send the first one kept
            kept = self._signed.get(digest)
            if kept is not None:
                return kept
            self._signed.put(digest, signed, len(signed) + len(digest) + ANSWER_OVERHEAD)
        return signed


def wap_display_name(name: str, charset: int) -> bytes:
    """Return *name* in the MIBenum *charset*, cut on a character boundary to the format's 255 bytes."""
    encoded = name.encode(WAP_CHARSETS[charset], "replace")[:255]
    return encoded.decode(WAP_CHARSETS[charset], "ignore").encode(WAP_CHARSETS[charset]) or b"CA"


def hashed_certificate(certificate: Certificate, *, charset: int = 106, length_prefixed: bool = False) -> bytes:
    """Return the WAP WPKI TrustedCAInfo (``application/vnd.wap.hashed-certificate``) for a self-signed CA.

    Layout: version 1, charset (uint16 BE), name length and name, format 2 (X.509), the DER (after a uint16 BE
    length in the *length_prefixed* layout), then an empty CA-info URL and hash algorithm 0 (SHA-1) as ``00 00``.
    The handset stacks disagree on that length; the one that installs X.509 CAs this way takes the DER directly.
    """
    name = wap_display_name(certificate.name, charset)
    length = len(certificate.der).to_bytes(2, "big") if length_prefixed else b""
    return (b"\x01" + charset.to_bytes(2, "big") + bytes([len(name)]) + name + b"\x02" + length
            + certificate.der + b"\x00\x00")


def file_body(certificate: Certificate, kind: str, charset: int = 106) -> tuple[bytes, str]:
    """Return the bytes and Content-Type of file *kind*: "der", "pem", "mobileconfig", "whc-direct", "whc-length"."""
    if kind == "der":
        return certificate.der, MIME_CA_CERT
    if kind == "pem":
        return pem_bytes(certificate), MIME_PEM
    if kind == "mobileconfig":
        return apple_profile(certificate), MIME_PROFILE
    return hashed_certificate(certificate, charset=charset, length_prefixed=kind == "whc-length"), MIME_HASHED


def _check_digit(digits: str) -> int:
    total = 0
    for position, digit in enumerate(map(int, digits)):
        if position % 2 == 0:  # the 1st, 3rd and 5th digits are doubled, two-digit results summed
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return (10 - total % 10) % 10


def hashed_certificate_code(body: bytes) -> str:
    """Return the 30-digit code a phone asks for before it installs the hashed certificate *body*.

    Five groups of six digits: each is the big-endian uint16 of two bytes of the body's SHA-1, in five decimal
    digits, followed by a check digit.
    """
    digest = hashlib.sha1(body).digest()
    groups = []
    for index in range(5):
        digits = f"{int.from_bytes(digest[2 * index:2 * index + 2], 'big'):05d}"
        groups.append(f"{digits}{_check_digit(digits)}")
    return " ".join(groups)


###############################################################################
# Store #######################################################################
###############################################################################

#: The entry format written now. Format 1 (certdrop 0.1.0 and 0.2) is still read: it keeps only the DER, which is
#: then parsed, and its self-signature verified, when the entry is first loaded. An entry is rewritten in the new
#: format whenever it changes (its expiry moves, it is revoked or swept).
ENTRY_FORMAT = 2

#: An expiry moves only when an upload lengthens it by at least this many seconds, so that uploading the same
#: bundle again writes nothing.
EXPIRY_STEP = 60

#: Tokens remembered as having no entry file, so that a repeated unknown token costs no file system call. Like a
#: cached entry, each is looked for again after REVALIDATE_SECONDS, so links made by other processes appear.
MAX_ABSENT_TOKENS, ABSENT_TOKEN_BYTES = 4096, 150

#: Bytes a cached entry takes beyond its DER, and a built answer beyond its body: the byte limits of the store's
#: cache and of the AnswerCache count these. Measured with tracemalloc over 1,000 entries and their S60 and Android
#: answers: 3,692 and 1,124 bytes.
ENTRY_OVERHEAD, ANSWER_OVERHEAD = 3700, 1100
#: Bytes an item of an entry's report holds besides its strings (a dict of four), measured so: 440 with 100 characters.
REPORT_ITEM_OVERHEAD = 350

#: Bytes of a typical entry file: /healthz writes a probe this large, as an upload writes an entry. The largest
#: of the 150 roots in Debian's ca-certificates makes a format-2 entry of 3,590 bytes (the median one 2,380), and
#: file systems give every file whole 4 KiB blocks.
ENTRY_FILE_BYTES = 4096

#: Free bytes /healthz asks of the data directory's file system: what an upload of a root and its intermediate
#: writes, an entry file and an index file for each: two blocks for each entry, which also records the other's DER
#: (its chain), one for each index.
UPLOAD_FREE_BYTES = 6 * ENTRY_FILE_BYTES

#: The facts of a certificate that an entry file keeps beside its DER, with their JSON types. A cold lookup builds
#: the Certificate from them instead of parsing the DER and verifying its signature again.
STORED_FACTS = {
    "subject": str, "issuer": str, "common_names": list, "organization": (str, type(None)), "serial": str,
    "not_before": str, "not_after": str, "version": int, "is_ca": bool, "self_signed": bool,
    "has_basic_constraints": bool, "key_cert_sign": (bool, type(None)), "key_type": str, "key_bits": int,
    "signature_hash": (str, type(None)), "dns_names": list, "ip_addresses": list, "ca_issuers": list,
}


def certificate_facts(certificate: Certificate) -> dict:
    """Return the facts of *certificate* that its entry file keeps, as JSON values."""
    facts = {name: list(getattr(certificate, name)) if kind is list else getattr(certificate, name)
             for name, kind in STORED_FACTS.items()}
    facts["serial"] = format(certificate.serial, "x")  # hex: JSON integers have a digit limit in Python
    facts["not_before"] = certificate.not_before.isoformat()
    facts["not_after"] = certificate.not_after.isoformat()
    return facts


def certificate_from_facts(der: bytes, facts: object) -> Certificate:
    """Return the Certificate that an entry file's facts describe; raise ValueError if they are damaged."""
    if not isinstance(facts, dict) or not all(is_stored(facts.get(name), kind) for name, kind in STORED_FACTS.items()):
        raise ValueError("damaged certificate facts")
    values = {name: tuple(facts[name]) if kind is list else facts[name] for name, kind in STORED_FACTS.items()}
    if not all(isinstance(item, str) for name, kind in STORED_FACTS.items() if kind is list for item in values[name]):
        raise ValueError("damaged certificate facts")
    if not re.fullmatch("-?[0-9a-f]+", facts["serial"]):  # as certificate_facts writes it; int() takes more
        raise ValueError("damaged serial number")
    values.update(serial=int(facts["serial"], 16), not_before=datetime.fromisoformat(facts["not_before"]),
                  not_after=datetime.fromisoformat(facts["not_after"]))
    if values["not_before"].tzinfo is None or values["not_after"].tzinfo is None:
        raise ValueError("damaged certificate dates")
    return Certificate(der=der, sha256=hashlib.sha256(der).digest(), sha1=hashlib.sha1(der).digest(), **values)


def is_stored(value: object, kind: type | tuple[type, ...]) -> bool:
    """Return whether *value*, read from JSON, is of *kind*; JSON's true is no integer here, as Python's is."""
    if isinstance(value, bool):
        return kind is bool or isinstance(kind, tuple) and bool in kind
    return isinstance(value, kind)


class Remembered(typing.NamedTuple):
    """What a tombstone keeps of its certificate, so that people can still tell which one it was."""

    name: str
    sha256: bytes
    not_before: float
    not_after: float

    @classmethod
    def of(cls, certificate: Certificate) -> "Remembered":
        return cls(certificate.name, certificate.sha256, certificate.not_before.timestamp(),
                   certificate.not_after.timestamp())

    def to_record(self) -> dict:
        return {"name": self.name, "sha256": self.sha256.hex(), "not_before": self.not_before,
                "not_after": self.not_after}

    @classmethod
    def from_record(cls, record: object) -> "Remembered":
        if not isinstance(record, dict) or not isinstance(record.get("name"), str) or len(record["name"]) > 100_000:
            raise ValueError("damaged memory of the certificate")
        if not isinstance(record.get("sha256"), str) or not re.fullmatch("[0-9a-f]{64}", record["sha256"]):
            raise ValueError("damaged fingerprint of the certificate")
        return cls(record["name"], bytes.fromhex(record["sha256"]), _stored_time(record["not_before"]),
                   _stored_time(record["not_after"]))


@dataclasses.dataclass(frozen=True)
class Entry:
    """One link: its token, lifetime and certificate. Without DER it is a tombstone that answers 410."""

    token: str
    created: float
    expires: float
    der: bytes | None = None
    revoked: float | None = None
    was: Remembered | None = None  # a tombstone's memory of its certificate (none in tombstones of before 0.2)
    revoke_hash: str | None = None  # SHA-256 (hex) of the secret that removes this link from the web; never the secret
    #: the certificate's facts as its entry file keeps them (certificate_facts); None in entries of format 1
    facts: dict | None = dataclasses.field(default=None, compare=False, repr=False)
    #: the DER of every certificate of the chain its upload made (root first, this one among them), when the upload
    #: held more than this certificate of the chain; None in older entries and for a lone certificate. The DER
    #: itself, not the other links' tokens: a profile is built from this entry alone (build_answer), so an answer
    #: kept by its key cannot depend on other entries, which expire, are revoked or change on their own. They are
    #: public certificates, a few KB.
    chain: tuple[bytes, ...] | None = dataclasses.field(default=None, compare=False, repr=False)
    #: the server name the upload gave (its "host" field), and the doctor's report of that upload (report_record):
    #: optional fields of format 2, absent in older entries, which the administrator's page shows as not recorded
    host: str | None = dataclasses.field(default=None, compare=False, repr=False)
    report: tuple[dict, ...] | None = dataclasses.field(default=None, compare=False, repr=False)
    #: until when the link answers with its certificate: its expiry, or 0 once revoked or a tombstone
    serves_until: float = dataclasses.field(init=False, compare=False, repr=False)

    def __post_init__(self):
        live = self.revoked is None and self.der is not None
        object.__setattr__(self, "serves_until", self.expires if live else 0.0)  # frozen: set once, here

    def gone(self, now: float) -> LinkGone | None:
        """Return why this link no longer serves at *now*, or None while it is live."""
        if self.revoked is not None:
            return LinkGone("revoked", self.revoked)
        if now >= self.expires or self.der is None:
            return LinkGone("expired", self.expires)
        return None

    @functools.cached_property
    def certificate(self) -> Certificate:
        """Return the certificate's facts: from the entry file where it keeps them, else parsed from the DER."""
        if self.facts is None:
            return load_der(self.der)
        return certificate_from_facts(self.der, self.facts)

    def with_certificate(self) -> "Entry":
        """Return this entry with its certificate (and chain) built, so that damage shows when read, not served."""
        if self.der is not None:
            _ = self.certificate, self.chain_certificates
        return self

    @functools.cached_property
    def chain_certificates(self) -> tuple[Certificate, ...]:
        """Return the chain this link's profile installs: the recorded one, else this certificate alone."""
        if not self.chain:
            return (self.certificate,)
        return tuple(self.certificate if der == self.der else load_der(der) for der in self.chain)

    @property
    def remembered(self) -> Remembered | None:
        """Return which certificate this link is or was for, when known."""
        return Remembered.of(self.certificate) if self.der is not None else self.was

    def tombstone(self, revoked: float | None = None) -> "Entry":
        """Return this entry without its certificate (revoked at *revoked*, if given), remembering which it was."""
        return dataclasses.replace(self, der=None, facts=None, chain=None, report=None,
                                   revoked=self.revoked if revoked is None else revoked, was=self.remembered)

    def to_json(self) -> bytes:
        record = {"format": ENTRY_FORMAT, "token": self.token, "created": self.created, "expires": self.expires,
                  "revoked": self.revoked}
        if self.der is not None:
            record["sha256"] = hashlib.sha256(self.der).hexdigest()
            record["der"] = base64.b64encode(self.der).decode("ascii")
            record["certificate"] = self.facts or certificate_facts(self.certificate)
            if self.chain:  # this entry's own certificate is null there: it is "der" already
                record["chain"] = [None if der == self.der else base64.b64encode(der).decode("ascii")
                                   for der in self.chain]
        elif self.was is not None:
            record["was"] = self.was.to_record()
        if self.host:
            record["host"] = self.host
        if self.report is not None:
            record["report"] = list(self.report)
        if self.revoke_hash:
            record["revoke_sha256"] = self.revoke_hash
        return json.dumps(record, indent=1).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, token: str, data: bytes) -> "Entry":
        """Return the entry stored in *data* (format 1 or 2); raise ValueError if it is damaged or another token's.

        The certificate itself is built from its facts (or parsed) only when first used. Files are read through
        Store._decode, which turns whatever else damage makes this raise into DamagedEntry.
        """
        record = cls.record_of(token, data)
        # JSON's \ud800 escapes make lone surrogates, which pass every type check and then fail the page's encoding
        json.dumps(record, ensure_ascii=False).encode("utf-8")
        der = None
        if "der" in record:
            if not isinstance(record["der"], str):
                raise ValueError("damaged certificate")
            der = base64.b64decode(record["der"], validate=True)
            if hashlib.sha256(der).hexdigest() != record.get("sha256"):
                raise ValueError("certificate does not match its checksum")
        revoked, was, revoke_hash = record.get("revoked"), record.get("was"), record.get("revoke_sha256")
        if revoke_hash is not None and not (isinstance(revoke_hash, str) and re.fullmatch("[0-9a-f]{64}", revoke_hash)):
            raise ValueError("damaged revocation hash")
        return cls(token, _stored_time(record["created"]), _stored_time(record["expires"]), der,
                   None if revoked is None else _stored_time(revoked),
                   None if was is None else Remembered.from_record(was), revoke_hash,
                   record.get("certificate") if der is not None else None,
                   stored_chain(record.get("chain"), der) if der is not None else None,
                   stored_host(record.get("host")), stored_report(record.get("report")))

    @staticmethod
    def record_of(token: str, data: bytes) -> dict:
        """Return the JSON record of *token*'s entry file; raise ValueError if it is none, or another token's."""
        record = json.loads(data)
        version = record.get("format") if isinstance(record, dict) else None
        if type(version) is not int or version not in (1, ENTRY_FORMAT):  # in Python, JSON's true and 2.0 are 1 and 2
            raise ValueError("wrong format")
        if record.get("token") != token:
            raise ValueError("another token's entry")
        return record

    @staticmethod
    def has_ended(record: dict, now: float) -> bool:
        """Return whether the entry that *record* holds no longer serves at *now*, as gone() says; its times are
        checked, and nothing else is read: the sweep asks this of every entry."""
        _stored_time(record["created"])
        expires = _stored_time(record["expires"])
        if record.get("revoked") is not None:
            _stored_time(record["revoked"])  # a damaged time is damage, even in an entry that ended
            return True
        return now >= expires or "der" not in record

    def may_be_revoked_with(self, secret: str) -> bool:
        """Return whether *secret* is the one made with this link (compared in constant time)."""
        return bool(self.revoke_hash) and hmac.compare_digest(revoke_hash(secret), self.revoke_hash)

    def memory_size(self) -> int:
        """Return about how many bytes this entry holds in memory (its answers are the AnswerCache's): each entry of
        a bundle keeps its upload's whole report, which can outweigh the rest a hundred times."""
        report = sum(REPORT_ITEM_OVERHEAD + len(item["code"]) + len(item["message"]) + len(item["certificate"] or "")
                     for item in self.report or ())
        return (ENTRY_OVERHEAD + len(self.der or b"") + report
                + sum(len(der) for der in self.chain or () if der != self.der))


def stored_chain(value: object, der: bytes) -> tuple[bytes, ...] | None:
    """Return the chain an entry file records for the certificate *der* (None when it records none, as entries
    written before chains were recorded do); raise ValueError if it is damaged or leaves out *der*.

    The file lists the chain's certificates in base64, root first, with null where *der* itself stands."""
    if value is None:
        return None
    if not isinstance(value, list) or not 1 < len(value) <= MAX_CERTIFICATES or not all(
            item is None or isinstance(item, str) for item in value):
        raise ValueError("damaged chain")
    if value.count(None) != 1:
        raise ValueError("a chain without its own certificate")
    return tuple(der if item is None else base64.b64decode(item, validate=True) for item in value)


#: The most findings an entry's report keeps: the doctor finds a few per certificate, of at most MAX_CERTIFICATES.
MAX_REPORT_ITEMS = 2000

#: The longest entry file read: the largest an upload writes (a long chain, a full report) is under a megabyte.
#: And of an index file (sha256/...), which holds one token; of a count file, and of the administrator's index.
MAX_ENTRY_BYTES, MAX_INDEX_BYTES = 4 * 1024 * 1024, 1024
MAX_COUNTS_BYTES = MAX_ADMIN_INDEX_BYTES = 256 * 1024 * 1024

#: The fields of one item of an entry's report, with their JSON types (a Finding, or a certificate left out).
REPORT_FIELDS = {"code": str, "message": str, "certificate": (str, type(None)), "note": bool}


def report_record(diagnosis: "Diagnosis") -> tuple[dict, ...]:
    """Return the doctor's report of an upload as its entries keep it: each finding, then each certificate left
    out (code "left-out"), as JSON values."""
    return tuple([dataclasses.asdict(finding) for finding in diagnosis.findings]
                 + [{"code": "left-out", "message": reason, "certificate": certificate.name, "note": False}
                    for certificate, reason in diagnosis.left_out])


def stored_report(value: object) -> tuple[dict, ...] | None:
    """Return the report an entry file keeps (None when it keeps none); raise ValueError if it is damaged."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_REPORT_ITEMS or not all(
            isinstance(item, dict) and set(item) == set(REPORT_FIELDS)
            and all(is_stored(item[name], kind) for name, kind in REPORT_FIELDS.items()) for item in value):
        raise ValueError("damaged report")
    return tuple(value)


def stored_host(value: object) -> str | None:
    """Return the server name an entry file keeps (None when it keeps none); raise ValueError if it is damaged."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 256:
        raise ValueError("damaged server name")
    return value


def revoke_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()


def _stored_time(value: object) -> float:
    """Return a Unix time read from an entry file; raise ValueError for anything no date can be printed for."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_TIMESTAMP:
        raise ValueError(f"time out of range: {value!r:.40}")
    return float(value)


class WriteFailure(typing.NamedTuple):
    """A write to the data directory that failed: in which directory, and why (storage_cause says it)."""

    directory: Path
    cause: OSError


class CachedEntry:
    """An entry in the store's memory, with its file's signature when read and when that was last checked, and
    whether it was asked for again since it was read or last passed over by eviction (EntryMemory._evict)."""

    __slots__ = ("entry", "signature", "checked", "size", "asked_again")

    def __init__(self, entry: Entry, signature: tuple, checked: float):
        self.entry, self.signature, self.checked = entry, signature, checked
        self.size = entry.memory_size()
        self.asked_again = False


class EntryMemory:
    """The store's memory of entries: at most *cache_entries* entries and about *cache_bytes* bytes (their answers
    are the AnswerCache's), each with its file's signature, looked at again at most every *revalidate_after*
    seconds; and the tokens lately seen to have no file.

    Past a limit the oldest entry goes first, but one asked for again since it was read gets a second chance (it
    goes to the back, its mark cleared), so that tokens asked for once, by guessers or people who open a link one
    time, go before the links in steady use.
    """

    def __init__(self, cache_entries: int, cache_bytes: int, revalidate_after: float):
        self.cache_entries = cache_entries
        self.cache_bytes = cache_bytes
        self.revalidate_after = revalidate_after
        self._cache: OrderedDict[str, CachedEntry] = OrderedDict()
        self._cached_bytes = 0
        #: token -> when it was last seen to have no file (monotonic)
        self._absent = BoundedMap(MAX_ABSENT_TOKENS * ABSENT_TOKEN_BYTES)
        #: Called with the token (under the lock, so quick) whenever memory replaces or drops an entry: whoever
        #: keeps answers made from that entry (the AnswerCache) forgets them.
        self.watchers: list[Callable[[str], None]] = []
        self._lock = threading.Lock()

    def fresh(self, token: str) -> Entry | None:
        """Return *token*'s entry if memory holds it and its file was checked within revalidate_after, else None.

        The hot path's lookup: no lock, no file system call, no clock but the monotonic one.
        """
        item = self._cache.get(token)
        if item is None or time.monotonic() - item.checked >= self.revalidate_after:
            return None
        item.asked_again = True
        return item.entry

    def checked(self, token: str, signature: Callable[[], tuple]) -> Entry | None:
        """Return *token*'s entry: fresh, or looked at again now if *signature* (its file's, now) is the one it was
        read with; None if memory has none, or the file changed (then memory forgets it)."""
        entry = self.fresh(token)
        if entry is not None:
            return entry
        item = self._cache.get(token)
        if item is None:
            return None
        if signature() != item.signature:
            self.forget(token)
            return None
        item.checked = time.monotonic()
        item.asked_again = True
        return item.entry

    def memory_of(self, entry: Entry) -> CachedEntry | None:
        """Return where memory holds *entry*, if it still does: the hot path marks it asked for again there."""
        item = self._cache.get(entry.token)
        return item if item is not None and item.entry is entry else None

    def fresh_for(self, entry: Entry) -> float:
        """Return for how many more seconds fresh() returns *entry* (until a look at its file is due), 0 if it no
        longer does: memory has dropped or replaced it."""
        item = self._cache.get(entry.token)
        if item is None or item.entry is not entry:
            return 0.0
        return max(0.0, item.checked + self.revalidate_after - time.monotonic())

    def is_absent(self, token: str) -> bool:
        """Return whether *token* was seen to have no entry file within revalidate_after."""
        seen = self._absent.get(token)
        return seen is not None and time.monotonic() - seen < self.revalidate_after

    def absent_for(self, token: str) -> float:
        """Return for how many more seconds is_absent(*token*) holds, 0 if it does not."""
        seen = self._absent.get(token)
        return 0.0 if seen is None else max(0.0, seen + self.revalidate_after - time.monotonic())

    def mark_absent(self, token: str) -> None:
        self._absent.put(token, time.monotonic(), ABSENT_TOKEN_BYTES)

    def remember(self, entry: Entry, signature: tuple) -> None:
        with self._lock:
            self._absent.pop(entry.token)
            old = self._cache.pop(entry.token, None)
            if old is not None:
                self._cached_bytes -= old.size
            # whatever was kept for the token goes: its old entry's answers, or a 404 given while it had no file
            # (also when that token has since left _absent, which holds the last 4,096 only)
            self._dropped(entry.token)
            item = self._cache[entry.token] = CachedEntry(entry, signature, time.monotonic())
            self._cached_bytes += item.size
            self._evict()

    def forget(self, token: str) -> None:
        with self._lock:
            item = self._cache.pop(token, None)
            if item is not None:
                self._cached_bytes -= item.size
                self._dropped(token)

    def _evict(self) -> None:
        """Drop entries while over a limit, giving those asked for again a second chance; the newest stays."""
        newest = next(reversed(self._cache), None)
        chances = 2 * len(self._cache)
        while len(self._cache) > 1 and (len(self._cache) > self.cache_entries or self._cached_bytes > self.cache_bytes):
            token, item = next(iter(self._cache.items()))
            if (item.asked_again or token == newest) and chances > 0:
                chances -= 1
                item.asked_again = False
                self._cache.move_to_end(token)
                continue
            if token == newest:
                token, item = next(islice(self._cache.items(), 1, None))
            del self._cache[token]
            self._cached_bytes -= item.size
            self._dropped(token)

    def _dropped(self, token: str) -> None:
        for forget in self.watchers:
            forget(token)


class Store:
    """Entries on disk, one JSON file per token, with its EntryMemory in front.

    Files are replaced atomically and made durable before an upload is acknowledged, so a crash never leaves
    a half-written entry to serve. Several processes may share the directory: writers take a file lock, and a
    cached entry (or a token known to be unknown) is checked against the disk at most every REVALIDATE_SECONDS.
    """

    def __init__(self, directory: Path, *, token_length: int = 8, cache_entries: int = 10000,
                 cache_bytes: int = 32 * 1024 * 1024, tombstone_ttl: float = 30 * 86400,
                 clock: Callable[[], float] = time.time, revalidate_after: float = REVALIDATE_SECONDS):
        self.directory = Path(directory)
        self.token_length = token_length
        self.tombstone_ttl = tombstone_ttl
        self.clock = clock
        self._root = str(self.directory)
        self.memory = EntryMemory(cache_entries, cache_bytes, revalidate_after)
        # the hot path's calls, bound once (see EntryMemory)
        self.fresh, self.fresh_for, self.memory_of = self.memory.fresh, self.memory.fresh_for, self.memory.memory_of
        self.is_absent, self.absent_for = self.memory.is_absent, self.memory.absent_for
        self.watchers = self.memory.watchers
        self._writing = threading.Lock()  # threads of this process; the lock file keeps other processes out
        self._owner: tuple[int, int] | None = None  # whom files made by root belong to: the directory's owner
        #: The last write that failed, until a write (or /healthz's probe) there works again: /healthz says so.
        self._failure: WriteFailure | None = None

    # -- paths: derived only from tokens that match TOKEN_RE -------------------------------------------------

    def has_entry_file(self, token: str) -> bool:
        """Return whether *token* has an entry file on disk (a link's or its tombstone's), asking no cache."""
        try:
            return os.path.lexists(self._file(token))
        except UnknownToken:
            return False

    def path_for(self, token: str) -> Path:
        """Return the entry file of *token*; raise UnknownToken for anything that is not a token."""
        return Path(self._file(token))

    def _file(self, token: str) -> str:
        if not TOKEN_RE.fullmatch(token):
            raise UnknownToken(token)
        return f"{self._root}{os.sep}{token[:2]}{os.sep}{token}.json"

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
        """Return *token*'s entry from memory if its file has not changed since it was read (looked at again at
        most every revalidate_after), else None."""
        return self.memory.checked(token, lambda: _file_signature(self._file(token)))

    def _load(self, token: str) -> Entry:
        if self.is_absent(token):
            raise UnknownToken(token)
        try:
            entry, signature = self._read(token)
        except DamagedEntry:
            raise
        except UnknownToken:
            self.memory.mark_absent(token)
            raise
        self.memory.remember(entry, signature)
        return entry

    def _read(self, token: str) -> tuple[Entry, tuple]:
        """Return the entry stored for *token* and its file's signature, without touching the cache.

        Its certificate is built now, so that a damaged one is caught here, not while serving.
        """
        path, data, signature = self._read_file(token)
        return self._decode(path, lambda: Entry.from_json(token, data).with_certificate()), signature

    def _has_ended(self, token: str, now: float) -> bool:
        """Return whether *token*'s entry no longer serves at *now*, reading only its times."""
        path, data, _ = self._read_file(token, signature=False)
        return self._decode(path, lambda: Entry.has_ended(Entry.record_of(token, data), now))

    @classmethod
    def _decode(cls, path: str, decode: Callable[[], typing.Any]) -> typing.Any:
        """Return decode(), which makes values of the bytes of the entry file *path*; raise DamagedEntry for
        anything it raises.

        The one place where a file's content becomes values. Decoding is pure, so what it raises comes from the
        bytes: RecursionError from JSON nested 100,000 deep, ValueError from a 100,000-digit number, TypeError or
        KeyError from a field of the wrong kind, and whatever damage no one foresaw makes the parser or a check
        raise. MemoryError counts too: what one file's decoding asks for comes from its size or shape, the
        verdict is not kept (the next read tries again), and a sweep must go on to the other files.
        """
        try:
            return decode()
        except Exception as error:
            raise cls._damaged(path, error) from None

    def _read_file(self, token: str, signature: bool = True) -> tuple[str, bytes, tuple]:
        """Return the path, bytes and (with *signature*) signature of *token*'s entry file; raise UnknownToken if
        there is none, DamagedEntry if it is no file certdrop can read. Plain system calls: the sweep reads every
        file, a cold lookup one."""
        path = self._file(token)
        try:
            data, status = read_regular_file(path, MAX_ENTRY_BYTES)
        except FileNotFoundError:
            raise UnknownToken(token) from None
        except (PermissionError, NotARegularFile) as error:  # another user's (root's, say), or no file at all
            raise self._damaged(path, error) from None
        if len(data) > MAX_ENTRY_BYTES:
            raise self._damaged(path, ValueError(f"longer than the {MAX_ENTRY_BYTES:,} bytes an entry can take"))
        return path, data, _signature_of(status) if signature else ()

    @staticmethod
    def _damaged(path: str, error: Exception) -> DamagedEntry:
        # a damaged field can be megabytes long, and some errors quote it whole
        reason = f"{type(error).__name__}: {error}"[:200]
        log.warning("entry %s is damaged and is not served: %s", path, reason)
        return DamagedEntry(f"the entry file {path} is damaged: {reason}")

    def entries(self) -> Iterator[tuple[str, Entry | None]]:
        """Yield (token, entry) for every entry file on disk, live or gone; entry is None for a damaged file."""
        for token in sorted(self._stored_tokens()):
            try:
                yield token, self.lookup(token)
            except DamagedEntry:
                yield token, None
            except UnknownToken:  # removed meanwhile, or a stray file whose name is no token
                continue

    def _stored_tokens(self) -> Iterator[str]:
        """Yield the name of every entry file (``??/*.json``), read with one directory listing per shard."""
        with contextlib.suppress(FileNotFoundError), os.scandir(self._root) as shards:
            for shard in shards:
                if len(shard.name) != 2 or not shard.is_dir():
                    continue
                with contextlib.suppress(FileNotFoundError), os.scandir(shard.path) as files:
                    yield from (file.name[:-5] for file in files
                                if file.name.endswith(".json") and not file.name.startswith("."))

    # -- writing ------------------------------------------------------------------------------------------

    def add(self, certificate: Certificate, expires: float, revoke_secret: str | None = None) -> tuple[Entry, bool]:
        """Store *certificate* until *expires*; return its entry and whether the link is new (see add_all)."""
        return self.add_all([(certificate, expires, revoke_secret)])[0]

    def add_all(self, wanted: list[tuple[Certificate, float, str | None]],
                chains: dict[bytes, tuple[Certificate, ...]] | None = None, host: str | None = None,
                report: tuple[dict, ...] | None = None) -> list[tuple[Entry, bool]]:
        """Store each (certificate, expiry, revoke secret); return (entry, whether the link is new) for each.

        A certificate that already has a live link keeps it, and the link's expiry moves to the later of the two
        once that is at least EXPIRY_STEP later. A new link keeps the hash of its secret, which removes it from
        the web. Each entry records the chain *chains* gives for its certificate (by SHA-256) when it holds more
        than that certificate; a live link records a new one too, and keeps the one it has when the upload brings
        none. A new link records the upload's server name *host* and the doctor's *report* when given. Every file
        is synced before its rename, and each directory once after all of them: every link
        returned survives a power loss.
        """
        results = []
        with self._exclusive():
            unsynced: set[Path] = set()
            for certificate, expires, secret in wanted:
                chain = (chains or {}).get(certificate.sha256, ())
                ders = tuple(member.der for member in chain) if len(chain) > 1 else None
                results.append(self._add(certificate, expires, secret, unsynced, ders, host or None, report))
            for directory in sorted(unsynced, key=lambda path: len(path.parts), reverse=True):
                _fsync_directory(directory)  # a new shard first, then the data directory that names it
        return results

    def _add(self, certificate: Certificate, expires: float, secret: str | None, unsynced: set[Path],
             chain: tuple[bytes, ...] | None = None, host: str | None = None,
             report: tuple[dict, ...] | None = None) -> tuple[Entry, bool]:
        existing = self.live_entry_for(certificate.sha256)
        if existing is not None:
            new_chain = chain is not None and chain != existing.chain
            if expires < existing.expires + EXPIRY_STEP and not new_chain:
                return existing, False
            later = expires >= existing.expires + EXPIRY_STEP
            entry = dataclasses.replace(existing, expires=expires if later else existing.expires,
                                        chain=chain if new_chain else existing.chain)
            self._write(entry, unsynced=unsynced)
            return entry, False
        entry = Entry(self._new_token(), self.clock(), expires, certificate.der,
                      revoke_hash=revoke_hash(secret) if secret else None, facts=certificate_facts(certificate),
                      chain=chain, host=host, report=report)
        index = self._index_path(certificate.sha256)
        # The index first: if the entry then cannot be written, the index names no file and is simply stale.
        _write_atomically(index, entry.token.encode("ascii"), owner=self._owner, unsynced=unsynced)
        try:
            self._write(entry, unsynced=unsynced)
        except OSError:
            index.unlink(missing_ok=True)
            raise
        return entry, True

    def upload_key(self, *, replace: bool = False) -> tuple[str, bool]:
        """Return the upload key kept in the data directory and whether it was made just now (made if missing)."""
        path = self.directory / UPLOAD_KEY_FILE
        key = self._stored_key(path)
        if key and not replace:
            return key, False
        with self._exclusive():
            key = self._stored_key(path)  # again, under the lock: another process may have made one meanwhile
            if key and not replace:
                return key, False
            key = "-".join("".join(secrets.choice(TOKEN_ALPHABET) for _ in range(5)) for _ in range(4))
            _write_atomically(path, key.encode("ascii") + b"\n", mode=0o600, owner=self._owner)
        return key, True

    @staticmethod
    def _stored_key(path: Path) -> str:
        """Return the key kept in *path*; "" if there is none, or only a damaged one, which a new key replaces."""
        try:
            data = read_regular_file(path, MAX_KEY_BYTES)[0]
        except FileNotFoundError:
            return ""
        except NotARegularFile:
            data = b""  # damaged: a new key replaces it
        key = data.strip()
        if len(data) > MAX_KEY_BYTES or not key.isascii() or not key.decode("ascii").isprintable():
            # one line that people type or paste; anything else is a damaged file, not a key anyone can use
            log.warning("the upload key file %s is damaged: a new key replaces it", path)
            return ""
        return key.decode("ascii")

    def revoke(self, token: str) -> Entry:
        """Revoke *token* now, keeping a tombstone; raise UnknownToken or LinkGone if it is not live."""
        with self._exclusive():
            entry = self._load(token.lower())
            gone = entry.gone(self.clock())
            if gone:
                raise gone
            self._drop_index(entry)
            tombstone = entry.tombstone(revoked=self.clock())
            self._write(tombstone)
            return tombstone

    def extend(self, token: str, expires: float) -> Entry:
        """Move live *token*'s expiry to *expires*, which must be later; raise UnknownToken, LinkGone, or
        LifetimeError when that would not lengthen it."""
        with self._exclusive():
            entry = self._load(token.lower())
            gone = entry.gone(self.clock())
            if gone:
                raise gone
            if expires <= entry.expires:
                raise LifetimeError(_("This link already works until {date}, no sooner than the lifetime chosen; "
                                      "nothing was changed.").format(date=format_time(entry.expires)))
            extended = dataclasses.replace(entry, expires=expires)
            self._write(extended)
            return extended

    def sweep(self) -> dict[str, int]:
        """Turn expired entries into tombstones, delete old tombstones and stale temporary files; return counts.

        Every file is read once, for its times only, without the write lock; only the entries that ended are read
        whole, under the lock, and changed. Reads go around the cache: a sweep must not push out the hot entries.
        """
        counts = {"expired": 0, "deleted": 0, "temporary": 0, "damaged": 0}
        now = self.clock()
        ended = []
        for token in self._stored_tokens():
            try:
                if self._has_ended(token, now):
                    ended.append(token)
            except DamagedEntry:
                counts["damaged"] += 1  # kept for a person to look at: the sweep deletes only what it understands
            except UnknownToken:
                continue
        with self._exclusive():
            unsynced: set[Path] = set()
            for token in ended:
                outcome = self._sweep_entry(token, now, unsynced)
                if outcome:
                    counts[outcome] += 1
            for directory in unsynced:
                _fsync_directory(directory)
            counts["temporary"] = self._remove_stale_temporary()
        return counts

    def check_health(self) -> str | None:
        """Return why an upload would fail now (the data directory missing, unreadable, full, read-only), or None.

        Looks for room for an upload, then writes, syncs and removes a probe the size of an entry file, as an
        upload would; it creates nothing else. After a write failed, the probe goes where that write went, and
        until it works there (or a real write does) the answer names that failure.
        """
        if not self.directory.is_dir():
            return _("The data directory {directory} is missing.").format(directory=self.directory)
        failure = self._failure
        if failure is not None:
            if self._probe(failure.directory if failure.directory.is_dir() else self.directory):
                return storage_cause(failure.cause, FAILED)
            with self._writing:
                if self._failure is failure:  # not one that failed meanwhile
                    self._failure = None
        return self._probe(self.directory)

    def _probe(self, directory: Path) -> str | None:
        """Return why an entry file could not be written in *directory* now, or None."""
        probe = directory / f".healthz.{secrets.token_hex(4)}.tmp"
        try:
            os.listdir(directory)
            free = shutil.disk_usage(directory).free  # statvfs's f_bavail on POSIX, GetDiskFreeSpaceEx on Windows
            if free < UPLOAD_FREE_BYTES:  # room for the probe may still be no room for an upload
                return _("The data directory is full: {free} KiB free, and an upload needs {needed} KiB.").format(
                    free=f"{free // 1024:,}", needed=f"{UPLOAD_FREE_BYTES // 1024:,}")
            with open(probe, "xb") as file:
                file.write(os.urandom(ENTRY_FILE_BYTES))  # random: a compressing file system stores it whole
                file.flush()
                os.fsync(file.fileno())
        except OSError as error:
            return storage_cause(error, PROBED)
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
        return None

    def remove_stale_temporary(self) -> int:
        """Remove what writers killed mid-write left behind; return how many files. The server does this at start."""
        with self._exclusive():
            return self._remove_stale_temporary()

    def _remove_stale_temporary(self) -> int:
        removed = 0
        for path in (*self.directory.glob(".*.tmp"), *self.directory.glob("*/.*.tmp")):
            with contextlib.suppress(FileNotFoundError):
                status = path.lstat()
                if not stat.S_ISREG(status.st_mode):  # no writer of certdrop's made it: left for a person
                    continue
                if time.time() - status.st_mtime > STALE_TEMP_SECONDS:
                    path.unlink()
                    removed += 1
        return removed

    def _sweep_entry(self, token: str, now: float, unsynced: set[Path]) -> str | None:
        try:  # again, under the lock: an upload may have renewed it since the first look
            entry, _ = self._read(token)
        except DamagedEntry:  # its times could be read, the rest cannot: left for a person to look at
            return "damaged"
        except UnknownToken:  # removed meanwhile
            return None
        gone = entry.gone(now)
        if gone is None:
            return None
        if now >= gone.since + self.tombstone_ttl:
            self._drop_index(entry)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._file(token))
            unsynced.add(self.path_for(token).parent)
            self.memory.forget(token)
            return "deleted"
        if entry.der is not None:
            self._drop_index(entry)
            self._write(entry.tombstone(), remember=False, unsynced=unsynced)
            self.memory.forget(token)
            return "expired"
        return None

    def live_entry_for(self, sha256: bytes) -> Entry | None:
        """Return the live entry of the certificate with SHA-256 *sha256*, if it has one."""
        try:
            token = read_regular_file(self._index_path(sha256), MAX_INDEX_BYTES)[0].decode("ascii").strip()
            entry = self._load(token)
        except (FileNotFoundError, NotARegularFile, UnknownToken, UnicodeDecodeError):
            return None
        return None if entry.gone(self.clock()) else entry

    def _drop_index(self, entry: Entry) -> None:
        if entry.der is None:
            return
        index = self._index_path(hashlib.sha256(entry.der).digest())
        with contextlib.suppress(FileNotFoundError, NotARegularFile, UnicodeDecodeError):
            if read_regular_file(index, MAX_INDEX_BYTES)[0].decode("ascii").strip() == entry.token:
                index.unlink()

    def _new_token(self) -> str:
        while True:
            token = "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(self.token_length))
            if not os.path.exists(self._file(token)):
                return token

    def _write(self, entry: Entry, remember: bool = True, unsynced: set[Path] | None = None) -> None:
        path = self.path_for(entry.token)
        _write_atomically(path, entry.to_json(), owner=self._owner, unsynced=unsynced)
        self._failure = None  # an entry file was written: whatever failed before works again
        if remember:
            self.memory.remember(entry, _file_signature(path))

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the directory's write lock, shared with every other process using it.

        A write that fails for want of space or permission raises StorageError, having changed nothing.
        """
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._owner = owner_for_root(self.directory)
            lock_file = open(self.directory / ".lock", "a+b")
            if self._owner:
                os.chown(self.directory / ".lock", *self._owner)
        except OSError as error:
            raise self._failed(error) from None
        with self._writing, lock_file, locked(lock_file):
            try:
                yield
            except OSError as error:
                raise self._failed(error) from None

    def _failed(self, error: OSError) -> StorageError:
        """Remember the write that failed with *error*, for /healthz; return the StorageError to raise."""
        where = Path(error.filename).parent if isinstance(error.filename, (str, os.PathLike)) else self.directory
        self._failure = WriteFailure(where if where.is_relative_to(self.directory) else self.directory,
                                     error)
        return StorageError.from_os_error(error)


class SignOuts:
    """The browser sessions signed out before their end, in data_dir/signed-out, one "<id> <expires>" a line.

    A session cookie is signed with the upload key, so every process checks it without shared state; ending one
    early needs a record that every process sees. Each process reads the file again when its size or time changed,
    looking at most every REVALIDATE_SECONDS, so a sign-out holds everywhere within 2 s and across restarts. Lines
    of sessions that have ended by themselves are dropped whenever the file is written.
    """

    FILE = "signed-out"

    def __init__(self, store: "Store"):
        self.store = store
        self.path = store.directory / self.FILE
        self._ids: frozenset[str] = frozenset()
        self._every_until = 0  # every session that ends by then is out (a "*" line; see _lines)
        self._signature: tuple | None = None
        self._checked = -math.inf  # time.monotonic() of the last look at the file

    def add(self, session_id: str, expires: int) -> None:
        """Record that session *session_id* (ending at *expires*) is signed out; durable when this returns."""
        now = self.store.clock()
        with self.store._exclusive():
            lines = [line for line in self._lines() if line[1] > now] + [(session_id, expires)]
            text = "".join(f"{sid} {until}\n" for sid, until in lines).encode("ascii")
            _write_atomically(self.path, text, owner=self.store._owner)
        self._checked = -math.inf

    def has(self, session_id: str, expires: int) -> bool:
        """Return whether the session *session_id* that ends at *expires* has been signed out."""
        if time.monotonic() - self._checked >= REVALIDATE_SECONDS:
            self._reload()
        return session_id in self._ids or expires <= self._every_until

    def _reload(self) -> None:
        signature = _file_signature(self.path)
        if signature != self._signature:
            lines = self._lines()
            self._ids = frozenset(sid for sid, _ in lines)
            self._every_until = max((until for sid, until in lines if sid == EVERY_SESSION), default=0)
            self._signature = signature
        self._checked = time.monotonic()

    def _lines(self) -> list[tuple[str, int]]:
        """Return (session id, end) of every well-formed line; a damaged line names no session.

        A file past MAX_SIGNED_OUT_BYTES is never read in part, which could revive a session: it counts as one
        "*" line that ends every session made until now (each ends SESSION_SECONDS after it was made).
        """
        try:
            data = read_regular_file(self.path, MAX_SIGNED_OUT_BYTES)[0]
        except FileNotFoundError:
            return []
        except OSError as error:
            raise StorageError.from_os_error(error) from None
        if len(data) > MAX_SIGNED_OUT_BYTES:
            return [(EVERY_SESSION, int(self.store.clock()) + SESSION_SECONDS)]
        return [(sid, int(until)) for sid, until in SIGNED_OUT_LINE_RE.findall(data.decode("ascii", "replace"))]


#: A line of data_dir/signed-out, and how much of the file is read: 23,000 sign-outs within a session's 12 hours.
SIGNED_OUT_LINE_RE = re.compile(r"^([0-9a-f]{32}|\*) ([0-9]{1,12})$", re.MULTILINE)
MAX_SIGNED_OUT_BYTES = 1024 * 1024
EVERY_SESSION = "*"


@contextlib.contextmanager
def locked(file: typing.BinaryIO) -> Iterator[None]:
    """Hold an exclusive lock on *file* against other processes: flock on POSIX, msvcrt.locking on Windows."""
    if fcntl is not None:
        fcntl.flock(file, fcntl.LOCK_EX)  # released when the file is closed
        yield
        return
    file.seek(0)
    while True:
        try:  # LK_LOCK gives up after ten tries a second apart; a writer waits as long as another one writes
            msvcrt.locking(file.fileno(), msvcrt.LK_LOCK, 1)
            break
        except OSError:
            continue
    try:
        yield
    finally:
        file.seek(0)
        msvcrt.locking(file.fileno(), msvcrt.LK_UNLCK, 1)


def _file_signature(path: Path | str) -> tuple:
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return ()
    return (status.st_ino, status.st_size, status.st_mtime_ns)


def _signature_of(status: os.stat_result) -> tuple:
    return (status.st_ino, status.st_size, status.st_mtime_ns)


def owner_for_root(directory: Path) -> tuple[int, int] | None:
    """Return (uid, gid) of *directory* when root writes into a directory that belongs to someone else, else None.

    The command line run as root (sudo certdrop.py add ...) must leave files the service's own user can read,
    replace and remove, so what root makes there takes the directory's owner.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    status = directory.stat()
    return None if status.st_uid == 0 else (status.st_uid, status.st_gid)


def _write_atomically(path: Path, data: bytes, mode: int = 0o666, owner: tuple[int, int] | None = None,
                      unsynced: set[Path] | None = None) -> None:
    """Write *data* to *path* so that readers see the old file or the whole new one, even after power loss.

    With *owner*, the file and any directory made for it belong to that (uid, gid). With *unsynced*, the
    directories to sync are added to that set instead, for the caller to sync each once after all its writes.
    """
    directories = {path.parent}
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        directories.add(path.parent.parent)  # which now names the new directory
        if owner:
            os.chown(path.parent, *owner)
    temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode),
                  "wb") as file:
            if owner:
                os.fchown(file.fileno(), *owner)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if unsynced is not None:
        unsynced.update(directories)
        return
    for directory in sorted(directories, key=lambda directory: len(directory.parts), reverse=True):
        _fsync_directory(directory)


class NotARegularFile(OSError):
    """A directory, FIFO, socket or device where certdrop keeps a file of its own (read_regular_file)."""


def read_regular_file(path: Path | str, limit: int) -> tuple[bytes, os.stat_result]:
    """Return the bytes of the file at *path*, at most *limit* + 1 of them (more than *limit*: it is longer), and its
    status. Raise FileNotFoundError, NotARegularFile, or another OSError.

    Every file of the data directory is read so: open() alone would wait for ever for a writer on a FIFO put under
    a file's name (with the store's lock held, every process's writes behind it), and read() would take in a file
    of any size whole.
    """
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        status = os.fstat(descriptor)  # before reading: a file changed in place meanwhile is read again later
        if not stat.S_ISREG(status.st_mode):
            raise NotARegularFile(f"{path} is not a regular file")
        chunks = [os.read(descriptor, min(65536, limit + 1))]
        while len(chunks[-1]) == 65536 and (read := sum(map(len, chunks))) <= limit:  # most files take one read
            chunks.append(os.read(descriptor, min(65536, limit + 1 - read)))
        return b"".join(chunks), status
    finally:
        os.close(descriptor)


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":  # Windows cannot open a directory; NTFS journals the rename itself
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


###############################################################################
# Links and lifetimes #########################################################
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


#: Interfaces no phone reaches this server by, so their addresses lead no link: container and VM bridges and their
#: veth ends (Docker's docker0 and br-<id>, libvirt's virbr0), VPN tunnels (OpenVPN's tun/tap, WireGuard's wg).
VIRTUAL_INTERFACES = ("docker", "br-", "veth", "virbr", "tun", "tap", "wg")

#: Where the kernel is asked which address its default route leaves by: a documentation address (RFC 5737), so a
#: connected UDP socket only picks its source address; no packet is sent.
ROUTE_PROBE = ("192.0.2.1", 9)


def order_addresses(addresses: dict[str, str], default: str | None = None) -> tuple[str, ...]:
    """Return the IPv4 addresses other devices may reach among *addresses* (address -> the name of its interface,
    "" when not known), best first: *default*, the address the default route leaves by, then the others, private
    before public, in numeric order. No loopback or link-local address, none of a VIRTUAL_INTERFACES one."""
    def usable(address: str | None) -> ipaddress.IPv4Address | None:
        parsed = parse_address(address) if address else None
        if parsed is None or parsed.version != 4 or parsed.is_loopback or parsed.is_link_local or parsed.is_unspecified:
            return None
        return None if addresses.get(address, "").startswith(VIRTUAL_INTERFACES) else parsed

    lead = usable(default)
    rest = {parsed for address in addresses if (parsed := usable(address)) is not None and parsed != lead}
    ordered = ([lead] if lead else []) + sorted(rest, key=lambda parsed: (not parsed.is_private, parsed))
    return tuple(str(parsed) for parsed in ordered)


@functools.cache
def machine_addresses() -> tuple[str, ...]:
    """Return this machine's IPv4 addresses that other devices may reach, best first (order_addresses)."""
    return order_addresses(local_addresses(), default_route_address())


@functools.cache
def local_addresses() -> dict[str, str]:
    """Return this machine's IPv4 addresses, each with the name of its interface ("" when not known)."""
    found = {}
    for name in {socket.gethostname(), socket.getfqdn()}:
        with contextlib.suppress(OSError, UnicodeError):
            found.update((info[4][0], "") for info in socket.getaddrinfo(name, None, socket.AF_INET))
    with contextlib.suppress(OSError):  # Linux knows every local address, also those no name resolves to
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
        found.update((lines[number - 1].split()[-1], "") for number, line in enumerate(lines)
                     if "/32 host LOCAL" in line)
    found.update(interface_addresses())
    return found


def interface_addresses() -> dict[str, str]:
    """Return each network interface's IPv4 address (its first), by asking the kernel (Linux's SIOCGIFADDR)."""
    try:
        import fcntl  # Unix only
        names = socket.if_nameindex()
    except (ImportError, OSError):
        return {}
    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _index, name in names:
            with contextlib.suppress(OSError, ValueError):  # OSError: the interface has no IPv4 address
                asked = fcntl.ioctl(probe.fileno(), 0x8915, name.encode()[:15].ljust(40, b"\0"))  # SIOCGIFADDR
                found[socket.inet_ntoa(asked[20:24])] = name  # struct ifreq: the name, then a sockaddr_in
    return found


def default_route_address() -> str | None:
    """Return the address the kernel sends from by its default route (the source it picks), or None if none."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(ROUTE_PROBE)
            return probe.getsockname()[0]
    except OSError:
        return None


@functools.cache
def machine_fqdn() -> str | None:
    """Return this machine's fully qualified name when it has one that resolves, else None."""
    name = socket.getfqdn().rstrip(".").lower()
    if "." not in name or is_loopback_host(name):
        return None
    try:
        socket.getaddrinfo(name, None)
    except (OSError, UnicodeError):
        return None
    return name


def host_of(host_header: str) -> str | None:
    """Return the host a Host header names, in lower case without port, brackets or final dot; None if it names
    none (see split_host)."""
    parts = split_host(host_header)
    return parts[0].strip("[]").lower().rstrip(".") if parts else None


@functools.cache
def machine_names() -> frozenset[str]:
    """Return the names and addresses this machine is asked by: its host names and every address of its own.

    Loopback names are not listed: is_machine_host asks is_loopback_host for those.
    """
    names = {socket.gethostname().lower(), socket.getfqdn().lower().rstrip("."), *local_addresses()}
    with contextlib.suppress(OSError):  # Linux lists its IPv6 addresses here, 32 hex digits first on each line
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            digits = line.split()[0]
            names.add(str(ipaddress.IPv6Address(int(digits, 16))))
    return frozenset(name for name in names if name)


def is_machine_host(host: str) -> bool:
    """Return whether *host* (as host_of gives it) is this machine: a loopback name or one of machine_names."""
    return is_loopback_host(host) or host in machine_names()


def is_single_label(host: str) -> bool:
    """Return whether *host* is a bare name such as "server", which phones on Wi-Fi often cannot resolve."""
    return bool(host) and "." not in host and parse_address(host.strip("[]")) is None


def unreachable_host(url: str) -> str | None:
    """Return *url*'s host when phones cannot open it (loopback, or a single-label name), else None."""
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    return host if is_loopback_host(host) or is_single_label(host) else None


def reachable_links(url: str, addresses: tuple[str, ...] | None = None,
                    fqdn: str | None = "") -> list[tuple[str, str]]:
    """Return (link, its host) for *url* on names phones can reach, best first; [] if *url* is fine.

    When *url*'s host is loopback or a single-label name: the machine's IPv4 addresses first, then its fully
    qualified name if it resolves. *addresses* and *fqdn* default to this machine's (tests pass their own).
    """
    host = unreachable_host(url)
    if host is None:
        return []
    parts = urllib.parse.urlsplit(url)
    addresses = machine_addresses() if addresses is None else addresses
    fqdn = machine_fqdn() if fqdn == "" else fqdn
    port = f":{parts.port}" if parts.port else ""
    links = [(urllib.parse.urlunsplit(parts._replace(netloc=address + port)), address) for address in addresses]
    if fqdn and fqdn != host:
        links.append((urllib.parse.urlunsplit(parts._replace(netloc=fqdn + port)), fqdn))
    return links


def lead_url(url: str, bound: str = "", public: bool = False) -> str:
    """Return the link to hand out for *url* (see offer_link)."""
    return offer_link(url, bound, public).url


class LinkOffer(typing.NamedTuple):
    """A link as certdrop hands it out: the same on the result page, the card, the QR code, the text and JSON
    answers, the mail and the command line, because all of them get it from offer_link."""

    url: str  # the link to hand out
    note: str  # whole sentences when *asked* cannot reach phones: why, and what leads instead; "" when it can
    alternatives: tuple[tuple[str, str], ...]  # (link, its host): more links that reach this server, best first
    asked: str  # the link on the name it was asked by (a loopback one opens on this machine only)


def offer_link(url: str, bound: str = "", public: bool = False) -> LinkOffer:
    """Return the link to hand out for *url* (the link on the name it was asked by), with its note.

    The one rule for every link certdrop writes: a link on a name phones can open leads as it is. One on a loopback
    or single-label name leads with this machine's first address on the same port (reachable_links), and the rest
    follow as alternatives. *bound* is the address the server listens on (``host``): a loopback one means no other
    device reaches it at all, so no machine address is offered, and the note says why. A link on public_url
    (*public*) always leads: the administrator chose that name; the note says when phones cannot open it.
    """
    host = unreachable_host(url)
    if host is None:
        return LinkOffer(url, "", (), url)
    if is_loopback_host(host):
        why = _("Phones cannot open {host}: it is this server's own loopback name.")
    else:
        why = _("Phones cannot open {host}: it is a short name that phones often cannot look up.")
    if bound and is_loopback_host(bound):
        what = _("This server listens only on {address}, which no other device can reach: set host = 0.0.0.0 in "
                 "certdrop.ini (or public_url, behind a proxy).").format(address=bound)
        return LinkOffer(url, f"{why.format(host=host)} {what}", (), url)
    addresses = None
    if bound and not is_wildcard_address(bound) and parse_address(bound.strip("[]")) is not None:
        addresses = (bound,) if ":" not in bound else (f"[{bound.strip('[]')}]",)  # only it reaches the server
    links = reachable_links(url, addresses, None if addresses is not None else "")
    if not links:
        what = _("Open certdrop by this server's name or address, or set public_url in certdrop.ini.")
        return LinkOffer(url, f"{why.format(host=host)} {what}", (), url)
    if public:
        what = _("It is public_url in certdrop.ini, so it leads all the same: set public_url to a name phones can "
                 "open, such as {link}.").format(link=links[0][0].removesuffix(urllib.parse.urlsplit(url).path))
        return LinkOffer(url, f"{why.format(host=host)} {what}", tuple(links), url)
    first = links[0][1]
    what = (_("This link uses this server's address {host} instead.") if parse_address(first.strip("[]"))
            else _("This link uses its full name {host} instead."))
    return LinkOffer(links[0][0], f"{why.format(host=host)} {what.format(host=first)}", tuple(links[1:]), url)


def is_wildcard_address(host: str) -> bool:
    """Return whether *host* is an address that listens on every interface (0.0.0.0, ::), or names none."""
    return host.strip("[]") in ("", "0.0.0.0", "::")


#: A Host header: a name of at most 253 characters (DNS's limit, which also keeps a link short enough for a QR
#: code) or an address, IPv6 in brackets; then maybe a port.
HOST_RE = re.compile(r"(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,253})(?::([0-9]{1,5}))?")
#: A host name or IPv4 address: labels joined by single dots, and perhaps a final dot.
HOST_NAME_RE = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.?")


def split_host(host_header: str) -> tuple[str, str] | None:
    """Return (host, ":port" or "") from a Host header, or None if it is not a host name or address and a port.

    urlsplit, which every link goes through later, raises for a port past 65535 and for brackets around anything
    but an IPv6 address, and segno for a link too long for a QR code: such a Host is turned away here, once.
    """
    match = HOST_RE.fullmatch(host_header)
    if not match or (match[2] and not 0 < int(match[2]) <= 65535):
        return None
    if match[1].startswith("[") and not is_ipv6_address(match[1][1:-1]):
        return None
    if not match[1].startswith("[") and not HOST_NAME_RE.fullmatch(match[1]):
        return None  # only dots, or an empty label: no name, which would pass for this server's own empty one
    return match[1], f":{int(match[2])}" if match[2] else ""


def is_ipv6_address(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def server_host(name: str, port: str) -> tuple[str, str]:
    """Return (host, ":port" or "") from the server's SERVER_NAME and SERVER_PORT, or localhost when they name none.

    Behind a trusted proxy, waitress sets both from X-Forwarded-Host, so they are checked like a Host header.
    """
    return split_host(f"{name}:{port}" if port else name) or split_host(name) or ("localhost", "")


def install_url(base: str, token: str) -> str:
    return f"{base}/c/{token}"


#: One e-mail address, and nothing a header could be made of: no spaces, no line breaks, no angle brackets.
ADDRESS_RE = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+")


def parse_addresses(text: str, limit: int) -> list[str]:
    """Return the e-mail addresses in *text* (separated by commas, semicolons or spaces); raise ValueError for
    anything else, more than *limit* of them, or none."""
    addresses = [part for part in re.split(r"[,;\s]+", text.strip()) if part]
    bad = [part for part in addresses if not ADDRESS_RE.fullmatch(part)]
    if bad or any(char in text for char in "\r\n\0"):
        raise ValueError(_("\u201c{address}\u201d is not an e-mail address.").format(address=(bad or [text])[0][:60]))
    if not addresses:
        raise ValueError(_("No e-mail address was given."))
    if len(addresses) > limit:
        raise ValueError(ngettext("{count} address was given; one message goes to {limit} at most.",
                                  "{count} addresses were given; one message goes to {limit} at most.",
                                  len(addresses)).format(count=len(addresses), limit=limit))
    return list(dict.fromkeys(address.lower() for address in addresses))


def allowed_ttl_choices(config: Config) -> list[tuple[str, str]]:
    """Return the lifetime choices of the upload form that the configured maximum allows, the default included."""
    choices = [(value, ttl_label(value)) for value in TTL_CHOICES
               if config.max_ttl is None or (value != "cert" and ttl_seconds_for(value) <= config.max_ttl)]
    if all(ttl_seconds_for(value) != config.default_ttl for value, _ in choices):
        choices.append((f"{config.default_ttl}s", format_duration(config.default_ttl)))
        choices.sort(key=lambda choice: ttl_seconds_for(choice[0]) or float("inf"))
    return choices


def ttl_label(value: str) -> str:
    """Return a lifetime choice in words: "7 days", "until the certificate expires"."""
    return _("until the certificate expires") if value == "cert" else format_duration(ttl_seconds_for(value))


def ttl_seconds_for(value: str) -> int | None:
    """Return the seconds of a lifetime choice, or None for "until the certificate expires"."""
    return None if value == "cert" else parse_duration(value)


def lifetime_seconds(config: Config, ttl: str) -> int | None:
    """Return the seconds of the lifetime *ttl* (None: until the certificate expires); raise LifetimeError.

    A lifetime is one of the form's choices or a duration from one minute up to ``max_ttl``.
    """
    longest = config.max_ttl or MAX_DURATION
    refusal = LifetimeError(_(
        "\u201c{ttl}\u201d is not a lifetime this server allows. Choose {choices}, or a duration such as 90m, 12h or "
        "2w from 1 minute to {longest}.").format(
        ttl=ttl.strip()[:40], choices=", ".join(value for value, _ in allowed_ttl_choices(config)),
        longest=format_duration(longest)))
    try:
        seconds = config.default_ttl if not ttl.strip() else ttl_seconds_for(ttl.strip().lower())
    except ValueError:
        raise refusal from None
    if (seconds is None and config.max_ttl is not None) or (seconds is not None and not MIN_TTL <= seconds <= longest):
        raise refusal
    return seconds


def link_expiry(config: Config, certificate: Certificate, ttl: str, now: float) -> tuple[float, bool]:
    """Return when a new link for *certificate* expires, and whether that was cut short to the certificate's end.

    A link never outlives its certificate; a certificate that has already expired keeps the chosen lifetime (its
    pages say it expired). Raise LifetimeError for a lifetime not allowed.
    """
    seconds = lifetime_seconds(config, ttl)
    not_after = certificate.not_after.timestamp()
    if seconds is None:
        if not_after <= now:
            raise LifetimeError(_("This certificate expired on {date}, so a link \u201cuntil the certificate "
                                  "expires\u201d would never work. Choose a lifetime.").format(
                                      date=format_time(not_after)))
        return not_after, False
    if now < not_after < now + seconds:
        return not_after, True
    return now + seconds, False


###############################################################################
# Rendering ###################################################################
###############################################################################

CSS = """
body{font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2430;background:#f4f6f9}
main{max-width:46rem;margin:0 auto;padding:1.25rem}
h1{font-size:1.6rem;margin:.5rem 0 1rem}h2{font-size:1.15rem;margin:1.75rem 0 .5rem}
section,form{background:#fff;border:1px solid #dde3ea;border-radius:8px;padding:1rem 1.25rem;margin:1rem 0}
label{display:block;font-weight:600;margin:.75rem 0 .25rem}label.plain{font-weight:400}
input[type=text],input[type=password]{width:100%;box-sizing:border-box;font:inherit;padding:.3rem}
button.quiet{background:#fff;color:#1f5fbf;border:1px solid #1f5fbf;padding:.2rem .8rem;font-weight:400}
textarea{width:100%;box-sizing:border-box;min-height:8rem;font:13px/1.3 ui-monospace,monospace}
button{font:inherit;font-weight:600;padding:.55rem 1.4rem;border:0;border-radius:6px;background:#1f5fbf;color:#fff}
.link{font-size:1.7rem;font-weight:700;word-break:break-all;margin:.25rem 0}
.link a{color:#1f5fbf}
.copy{font:15px/1.4 ui-monospace,monospace;word-break:break-all;-webkit-user-select:all;user-select:all}
p.copy{background:#f4f6f9;border:1px solid #dde3ea;border-radius:4px;padding:.4rem .6rem}
.way-out{background:#eef4ff;border-color:#9bb8e8}
.qr svg{display:block;margin:.5rem 0;max-width:100%;height:auto}
.card-link{font-size:2rem}table.card-steps th{padding-right:1rem}
@media print{body{background:#fff;font-size:11pt}main{max-width:none;padding:0}footer{display:none}
section,form{border:0;padding:0}.qr svg{width:45mm;height:45mm}}
@page{margin:12mm}
.warn{background:#fff6e0;border-color:#f0c36d}p.warn{padding:.5rem .75rem;border:1px solid #f0c36d;border-radius:6px}
.error{background:#fdecec;border-color:#e8a3a3}
table{border-collapse:collapse;width:100%}th,td{text-align:left;vertical-align:top;padding:.3rem .5rem .3rem 0}
th{white-space:nowrap;color:#556}td{overflow-wrap:anywhere}
code,.fp{font:13px/1.4 ui-monospace,monospace}td.fp{overflow-wrap:normal}
li,p{overflow-wrap:anywhere}
code.cmd{display:block;overflow-x:auto;white-space:pre;background:#f4f6f9;border:1px solid #dde3ea;border-radius:4px;
padding:.3rem .5rem;margin:.3rem 0}
.muted,footer{color:#667;font-size:.9rem}footer{text-align:center;padding:1rem}
section>h2:first-child{margin-top:0}
a.button{display:inline-block;background:#1f5fbf;color:#fff;padding:.75rem 1.25rem;border-radius:6px;
font-weight:600;text-decoration:none;margin:.25rem 0}
form.action{border:0;padding:0;margin:.5rem 0;background:none}form.action select{max-width:100%}
form.action button{margin-top:.25rem}
"""

#: Pages carry no script at all; the one inline style block is allowed by its hash.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; "
    f"style-src 'sha256-{base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()}'; "
    "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

HTML_HEADERS = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Frame-Options", "DENY"),
)


def page_headers(content_type: str) -> tuple[tuple[str, str], ...]:
    """Return the security headers of a page: HTML and XHTML-MP get the policy, WML decks have nothing to guard."""
    return () if content_type == MIME_WML else HTML_HEADERS

# Pages are polyglot HTML5: they are also well-formed XML, so tests can parse them and old XHTML browsers cope.
LAYOUT = string.Template("""<!DOCTYPE html>
<html xmlns="http://www.w3.org/1999/xhtml" lang="$lang" xml:lang="$lang">
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
<footer>$picker_html<p>certdrop $version</p></footer>
</body>
</html>
""")


def qr_svg(url: str) -> str:
    """Return a QR code of *url* as inline SVG, for a phone's camera pointed at the screen (no script, no image)."""
    return _qr_svg(url, _("QR code of the link"))


@functools.lru_cache(maxsize=64)  # pages that show one are kept in the AnswerCache
def _qr_svg(url: str, title: str) -> str:
    return segno.make(url, error="m").svg_inline(scale=4, border=2, title=title)


def qr_file(url: str, kind: str) -> bytes:
    """Return a QR code of *url* as a standalone "svg" or "png" file."""
    buffer = io.BytesIO()
    segno.make(url, error="m").save(buffer, kind=kind, scale=4 if kind == "svg" else 8, border=4)
    return buffer.getvalue()


def esc(value: object) -> str:
    """Return *value* as text safe inside HTML and XML, attribute values included: invisible characters shown
    escaped, as term() shows them."""
    text = html.escape(str(value), quote=True)
    if not text.isascii():
        text = NON_ASCII_RE.sub(_shown_if_invisible, text)
    return XML_INVALID_RE.sub("\ufffd", text)


def _shown_if_invisible(match: re.Match) -> str:
    # A certificate's name must not reorder the page around it (U+202E shows the rest backwards, the fingerprint
    # too), break a line where none is, or hide characters between look-alike names.
    char = match[0]
    return ascii(char)[1:-1] if unicodedata.category(char) in INVISIBLE_CATEGORIES else char


def term(value: object) -> str:
    """Return *value* as one safe terminal line: control, bidi and line-separator characters shown escaped."""
    text = str(value)
    if text.isascii() and text.isprintable():  # the common case, and no character to escape
        return text
    return TERMINAL_UNSAFE_RE.sub(lambda match: ascii(match[0])[1:-1], text)


def with_markup(text: str, **markup_html: str) -> str:
    """Return *text*, a translated sentence, escaped for HTML, with the markup certdrop made (a link, code, emphasis)
    put in its placeholders: a translation is data, escaped like any other."""
    return esc(text).format(**markup_html)


def code_html(text: str) -> str:
    """Return *text* (a command, a file name, a setting) as a code element."""
    return f"<code>{esc(text)}</code>"


def render(template: string.Template, **values: object) -> str:
    """Fill *template*, escaping every value except those whose name ends in ``_html``."""
    return template.substitute({key: value if key.endswith("_html") else esc(value) for key, value in values.items()})


def render_page(title: str, body_html: str, home: str = "/", here: str = "") -> bytes:
    """Return a page in the language spoken now, with the language picker; *home* is the upload page's address
    (the prefix and a slash), *here* the page's own path, where the picker comes back to (*home* if not given)."""
    return render(LAYOUT, lang=current_language(), title=title, css_html=CSS, body_html=body_html,
                  picker_html=render_picker(home, here or home), version=__version__).encode("utf-8")


def render_picker(home: str, here: str, escape: Callable[[object], str] = esc) -> str:
    """Return the language picker: a line of links, each language by its own name, to /lang/<code>?next=*here*
    (App.choose_language); the language spoken now is named without a link."""
    spoken, next_query = current_language(), escape(urllib.parse.urlencode({"next": here}))
    links = [f'<b lang="{code}">{escape(name)}</b>' if code == spoken else
             f'<a href="{escape(home)}lang/{code}?{next_query}" hreflang="{code}" lang="{code}">{escape(name)}</a>'
             for code, name in LANGUAGES.items()]
    return f'<nav><p>{" | ".join(links)}</p></nav>'


# The templates hold markup only; their words are filled in with _() as each page is rendered.
UPLOAD_PAGE = string.Template("""<h1>$heading</h1>
<p>$intro</p>
$form_html
<section>
<h2>$which_file</h2>
<p>$issuer_html</p>
<ul>
<li>$certsrv_html</li>
<li>$windows_html</li>
<li>$openssl_html</li>
</ul>
</section>
$account_html""")

UPLOAD_FORM = string.Template("""<form method="post" action="$action" enctype="multipart/form-data">
<label for="cert">$file_label</label>
<input type="file" id="cert" name="cert" />
<label for="pem">$pem_label</label>
<textarea id="pem" name="pem" rows="8" cols="64" placeholder="-----BEGIN CERTIFICATE-----">$pem</textarea>
<label for="ttl">$ttl_label</label>
<select id="ttl" name="ttl">$options_html</select>
<label for="host">$host_label</label>
<input type="text" id="host" name="host" maxlength="253" placeholder="mail.example.com" value="$host" />
<p class="muted">$host_note</p>
$refused_html<p$force_class_html><label class="plain"><input type="checkbox" name="force" value="1"$forced_html />
$force_label</label>
$force_reason $force_note</p>
<p><button type="submit">$submit</button></p>
</form>
""")

SIGN_OUT_FORM = string.Template("""<form method="post" action="$action"><p class="muted">$signed_in
<button class="quiet" type="submit">$sign_out</button></p></form>
""")

SIGN_IN_PAGE = string.Template("""<h1>$heading</h1>
$message_html
<form method="post" action="$action">$next_html
<label for="key">$key_label</label>
<input type="password" id="key" name="key" autocomplete="current-password" required="required" />
<p><button type="submit">$submit</button></p>
</form>
<section>
<h2>$where</h2>
<p>$where_html</p>
<p>$no_key</p>
</section>
""")

#: Markup that sentences put around words of their own: {em}...{em_end}, {strong}...{strong_end}.
EMPHASIS_HTML = {"em": "<em>", "em_end": "</em>", "strong": "<strong>", "strong_end": "</strong>"}


def render_upload_form(config: Config, action: str, signed_in: bool = False) -> bytes:
    account = render(SIGN_OUT_FORM, action=f"{action}signout", signed_in=_("You are signed in with the upload key."),
                     sign_out=_("Sign out")) if signed_in else ""
    body = render(
        UPLOAD_PAGE,
        heading=_("Share a CA certificate"),
        intro=_("Upload your CA certificate once and get a short link. Open the link on each phone or laptop: it gets "
                "the certificate in the form that device installs."),
        form_html=render_form(config, action),
        which_file=_("Which file?"),
        issuer_html=with_markup(_("Phones need the certificate of the {strong}CA that issued{strong_end} your "
                                  "server's certificate, not the server certificate itself."), **EMPHASIS_HTML),
        certsrv_html=with_markup(_("Windows certificate services: open {address}, choose {em}Download a CA "
                                   "certificate, certificate chain, or CRL{em_end}, then {em}Download CA "
                                   "certificate{em_end} (DER or Base 64, either works)."),
                                 address=code_html("http://your-ca-server/certsrv"), **EMPHASIS_HTML),
        windows_html=with_markup(_("On Windows, from a server certificate: open it, go to {em}Certification "
                                   "Path{em_end}, select the {strong}top{strong_end} entry, {em}View "
                                   "Certificate{em_end}, then {em}Details{em_end} and {em}Copy to File{em_end}."),
                                 **EMPHASIS_HTML),
        openssl_html=with_markup(_("OpenSSL or step-ca: upload the root certificate file (often {ca} or {root_ca}), "
                                   "never a file with a private key."),
                                 ca=code_html("ca.crt"), root_ca=code_html("root_ca.crt")),
        account_html=f'<p><a href="{esc(action)}admin">{esc(_("Every link, its downloads and what needs attention"))}'
                     f'</a></p>{account}',
    )
    return render_page("certdrop", body, home=action)


def render_form(config: Config, action: str, *, pem: str = "", ttl: str = "", host: str = "",
                force_reason: str = "", refused: str = "", forced: bool = False) -> str:
    """Return the upload form, filled in again after a refusal; *force_reason* says why "install it anyway" is the
    way on, and *refused* (PEM) carries the refused certificates back for it."""
    again = _("The certificates you sent come with this form: you need not choose the file again.")
    refused_html = (f'<input type="hidden" name="refused" value="{esc(refused)}" />\n'
                    f'<p class="muted">{esc(again)}</p>\n' if refused else "")
    chosen = ttl.strip().lower()
    known = any(value == chosen for value, _ in allowed_ttl_choices(config))
    options = []
    for value, label in allowed_ttl_choices(config):
        selected = value == chosen if known else ttl_seconds_for(value) == config.default_ttl
        marked = ' selected="selected"' if selected else ""
        options.append(f'<option value="{esc(value)}"{marked}>{esc(label)}</option>')
    return render(
        UPLOAD_FORM, action=action, pem=pem, host=host, options_html="".join(options), refused_html=refused_html,
        forced_html=' checked="checked"' if forced else "",
        file_label=_("Certificate file (.cer, .crt, .der, .pem, .p7b, .p7c, .p12 or .pfx)"),
        pem_label=_("or paste the certificate text (PEM, or base64)"),
        ttl_label=_("Link lifetime"),
        host_label=_("Server name people connect to (optional)"),
        host_note=_("When the upload includes the server certificate (a full chain, a .p7b), certdrop checks that "
                    "this name is in it."),
        force_class_html=' class="warn"' if force_reason else "", force_label=_("Install it anyway."),
        force_reason=force_reason,
        force_note=_("Only for a self-made server certificate that devices must trust directly, or a bundle of public "
                     "CAs you really mean to hand out: certdrop refuses both otherwise."),
        submit=_("Get the link"))


def render_signin(home: str, message: str, next_page: str = "") -> bytes:
    """Return the sign-in page; *home* is the upload page's address, *message* why the visitor is here, *next_page*
    where signing in leads ("admin"; else the upload page)."""
    message_html = f'<section class="error"><p>{esc(message)}</p></section>' if message else ""
    next_html = f'<input type="hidden" name="next" value="{esc(next_page)}" />' if next_page else ""
    body = render(
        SIGN_IN_PAGE, action=f"{home}signin", message_html=message_html, next_html=next_html,
        heading=_("Sign in to share a CA certificate"), key_label=_("Upload key"), submit=_("Sign in"),
        where=_("Where is the key?"),
        where_html=with_markup(_("certdrop printed it when it first started. On the server, {command} shows it, "
                                 "unless the administrator set {setting} in certdrop.ini. Scripts send it with HTTP "
                                 "Basic: {curl} and the address of this server."),
                               command=code_html("certdrop.py upload-key"), setting=code_html("upload_password"),
                               curl=code_html("curl -u certdrop:KEY -F cert=@ca.pem")),
        no_key=_("Phones and laptops need no key: they only open the links you hand out."))
    return render_page(_("Sign in \u2014 certdrop"), body, home=home)


#: What each role of Certificate.role is called on pages.
ROLE_LABELS = {
    "root": N_("Root CA"),
    "intermediate": N_("Intermediate CA"),
    "self-signed leaf": N_("Self-signed certificate"),
    "leaf": N_("Server certificate (installed anyway)"),
}


class Link(typing.NamedTuple):
    entry: Entry
    url: str
    created: bool  # False when the certificate already had this link
    cut: bool = False  # the chosen lifetime would have outlived the certificate, so the link ends with it
    revoke_secret: str | None = None  # only for a new link, only on the answer that made it
    offer: "LinkOffer | None" = None  # the link to hand out, with its note (offer_link); None: *url* as it is

    @property
    def lead(self) -> str:
        """Return the link to hand out (offer_link): what every page, answer, mail and command shows."""
        return self.offer.url if self.offer else self.url


#: The administrator's page, in the order people hand things out: the link and its QR code, the mail, then the
#: steps for devices, with everything only old Nokia phones need last.
RESULT_PAGE = string.Template("""<h1>$heading</h1>
$order_html
$links_html
$mail_html
$findings_html
<p class="muted">$compare</p>
<section>
<h2>$how</h2>
$steps_html
</section>
$nokia_html
<p><a href="$home">$another</a></p>
""")

LINK_SECTION = string.Template("""<section>
<h2>$heading</h2>
<p class="link"><a href="$lead">$lead</a></p>
<div class="qr">$qr_html</div>
$reachable_html
<p>$card_html</p>
<p>$status$cut</p>
$facts_html
$revoke_html
</section>
""")

REVOKE_FORM = string.Template("""<form method="post" action="$url/revoke"><input type="hidden" name="secret"
value="$secret" /><p class="muted">$text_html
<button class="quiet" type="submit">$remove</button></p></form>""")

MAIL_SENT_PAGE = string.Template("""<h1>$heading</h1>
<p>$text</p>
<p><a href="$home">$another</a></p>
""")

REVOKED_PAGE = string.Template("""<h1>$heading</h1>
<p>$text</p>
<p><a href="$home">$another</a></p>
""")

REACHABLE_NOTE = string.Template("""<p class="warn">$text_html</p>""")


def render_order_note(links: list[Link]) -> str:
    """Return which links to hand out first, said for what the upload really holds (roots, intermediates)."""
    roles = [link.entry.certificate.role for link in links]
    roots = sum(role != "intermediate" for role in roles)
    intermediates = len(roles) - roots
    if len(links) < 2:
        return ""
    if intermediates == 0:
        text = ngettext("This upload gives {count} link, one for each root CA in it. Each is a CA of its own: hand "
                        "out the ones your devices need.",
                        "This upload gives {count} links, one for each root CA in it. Each is a CA of its own: hand "
                        "out the ones your devices need.", roots)
    elif roots <= 1:
        text = _("This upload gives several links. {strong}Hand out the first one (the root CA) first{strong_end}: it "
                 "is what devices must trust. The others are intermediate CAs; install them too on devices that "
                 "complain about a missing intermediate (Nokia phones, some Android versions).")
    else:
        text = ngettext("This upload gives {count} link: {roots} for root CAs and {intermediates} for intermediate "
                        "CAs. {strong}Hand out the roots first{strong_end}: they are what devices must trust. Install "
                        "the intermediates too on devices that complain about a missing intermediate (Nokia phones, "
                        "some Android versions).",
                        "This upload gives {count} links: {roots} for root CAs and {intermediates} for intermediate "
                        "CAs. {strong}Hand out the roots first{strong_end}: they are what devices must trust. Install "
                        "the intermediates too on devices that complain about a missing intermediate (Nokia phones, "
                        "some Android versions).", len(links))
    count = roots if intermediates == 0 else len(links)
    text_html = with_markup(text, count=count, roots=roots, intermediates=intermediates, **EMPHASIS_HTML)
    return f"<section><p>{text_html}</p></section>"


def hex_html(text: str) -> str:
    """Return colon hex that wraps only between bytes ("12:04", never "12:0" / "4"), in a narrow column too."""
    return esc(text).replace(":", ":<wbr />")


def render_table(rows: Iterable[tuple[str, str]]) -> str:
    """Return a facts table of (label, value) rows, the labels N_() message ids; colon-hex values get the fingerprint
    style."""
    cells = "".join(f'<tr><th>{esc(_(label))}</th><td class="fp">{hex_html(value)}</td></tr>'
                    if label in ("SHA-256", "SHA-1", "Serial")
                    else f"<tr><th>{esc(_(label))}</th><td>{esc(value)}</td></tr>" for label, value in rows)
    return f"<table>{cells}</table>"


def render_facts(certificate: Certificate) -> str:
    return render_table((
        (N_("Name"), certificate.name),
        (N_("Subject"), certificate.subject),
        (N_("Issuer"), certificate.issuer),
        (N_("Valid from"), format_time(certificate.not_before.timestamp())),
        (N_("Valid until"), format_time(certificate.not_after.timestamp())),
        (N_("Serial"), certificate.serial_hex),
        (N_("SHA-256"), colon_hex(certificate.sha256)),
        (N_("SHA-1"), colon_hex(certificate.sha1)),
    ))


def link_html(url: str) -> str:
    """Return a link to *url* that shows *url* itself."""
    return f'<a href="{esc(url)}">{esc(url)}</a>'


def render_reachable_note(offer: LinkOffer) -> str:
    """Return the note shown when the link was asked for on a loopback or bare name (offer_link): its sentences,
    then the other links that reach this server."""
    if not offer.note:
        return ""
    sentences = [esc(offer.note)]
    for link, host in offer.alternatives:
        text = (_("Also: {link} (this server's address {host}).") if parse_address(host.strip("[]"))
                else _("Also: {link} (its full name {host})."))
        sentences.append(with_markup(text, link=link_html(link), host=esc(host)))
    if offer.url != offer.asked:
        sentences.append(with_markup(_("Opened on this machine it is {link}."), link=link_html(offer.asked)))
    return render(REACHABLE_NOTE, text_html=" ".join(sentences))


def render_findings(diagnosis: Diagnosis) -> str:
    """Return the doctor's warnings, left-out certificates and device notes as HTML sections (empty if none); the
    notes only old Nokia phones need are render_old_nokia's."""
    parts = []
    for title, items, css in (
        (_("What needs attention"), [f"{f.message} [{f.code}]" for f in diagnosis.warnings], "warn"),
        (_("Left out"), [reason for _, reason in diagnosis.left_out], ""),
        (_("Device notes"), [f"{f.message} [{f.code}]" for f in diagnosis.device_notes], ""),
    ):
        if items:
            rows = "".join(f"<li>{esc(item)}</li>" for item in items)
            parts.append(f'<section class="{css}"><h2>{esc(title)}</h2><ul>{rows}</ul></section>')
    return "\n".join(parts)


def render_old_nokia(certificate: Certificate, diagnosis: Diagnosis) -> str:
    """Return what only old Nokia phones need, grouped under one heading to skip: the doctor's notes for them and
    their install steps."""
    notes = "".join(f"<li>{esc(f'{f.message} [{f.code}]')}</li>" for f in diagnosis.old_nokia_notes)
    return (f'<section class="muted"><h2>{esc(_(OLD_NOKIA_HEADING))}</h2>{f"<ul>{notes}</ul>" if notes else ""}'
            f"{render_result_steps(certificate, RESULT_PAGE_NOKIA_FAMILIES)}</section>")


CUT_NOTE = N_("That is sooner than the lifetime you chose: a link never outlives its certificate, which expires "
              "then.")


def lead_link(link: Link) -> str:
    """Return the link *link* is handed out as (its offer's), which the result page's commands download from."""
    return (link.offer or LinkOffer(link.url, "", (), link.url)).url


def render_link(link: Link, now: float) -> str:
    certificate = link.entry.certificate
    offer = link.offer or LinkOffer(link.url, "", (), link.url)
    lead = offer.url
    if link.created:
        status = _("New link, works until {date} (for {duration}).")
    else:
        status = _("This certificate already had this link; it works until {date} (for {duration}).")
    revoke_html = ""
    if link.revoke_secret:
        text_html = with_markup(_("This page alone can remove the link before it ends: this link's secret is {secret} "
                                  "(from a script: {command})."), secret=code_html(link.revoke_secret),
                                command=code_html(f"curl -d secret={link.revoke_secret} {lead}/revoke"))
        revoke_html = render(REVOKE_FORM, url=link.url, secret=link.revoke_secret, text_html=text_html,
                             remove=_("Remove this link now"))
    return render(LINK_SECTION, lead=lead, qr_html=qr_svg(lead), reachable_html=render_reachable_note(offer),
                  heading=_("{role}: {name}").format(role=_(ROLE_LABELS[certificate.role]), name=certificate.name),
                  card_html=with_markup(_("{link}A printable card{link_end} with this link, its QR code and short "
                                          "steps."), link=f'<a href="{esc(link.url)}/card">', link_end="</a>"),
                  status=status.format(date=format_time(link.entry.expires),
                                       duration=format_duration(link.entry.expires - now)),
                  cut=f" {_(CUT_NOTE)}" if link.cut else "", facts_html=render_facts(certificate),
                  revoke_html=revoke_html)


def render_result_steps(certificate: Certificate, families: tuple[str, ...] = (), url: str = "") -> str:
    """Return the install steps of the device *families* (default RESULT_PAGE_FAMILIES), to pass on with the link
    *url* (commands download from it)."""
    parts = []
    der_url = f"{url}/{certificate.file_stem}.crt" if url else ""
    for device in families or RESULT_PAGE_FAMILIES:
        guide = DEVICE_GUIDES[device]
        file_name = f"{certificate.file_stem}{FILE_KINDS[guide.first].extension}".replace(".pem", ".crt")
        steps = "".join(f"<li>{step_html(step)}</li>" for step in guide_steps(device, certificate, file_name, der_url))
        parts.append(f"<h3>{esc(_(guide.label))}</h3><ol>{steps}</ol>")
    if der_url:
        parts.append(render_commands_note(certificate))
    return "".join(parts)


MAIL_FORM = string.Template("""<form method="post" action="$action">
<h2>$heading</h2>
<input type="hidden" name="tokens" value="$tokens" />
<label for="to">$to_label</label>
<input type="text" id="to" name="to" placeholder="someone@example.com" />
<p class="muted">$note</p>
<p><button type="submit">$send</button></p>
</form>""")

MAILTO_NOTE = string.Template("""<section><h2>$heading</h2><p>$text_html</p></section>""")


def render_mail_offer(config: Config, links: list[Link], home: str, whc: tuple[str, int]) -> str:
    """Return the result page's "e-mail this link": a form when certdrop can send, else a mailto: link."""
    count = len(links)
    heading = ngettext("E-mail this link", "E-mail these links", count)
    if config.mail_host:
        return render(MAIL_FORM, action=f"{home}mail", tokens=" ".join(link.entry.token for link in links),
                      heading=heading, send=_("Send"),
                      to_label=ngettext("To (up to {count} address, separated by commas)",
                                        "To (up to {count} addresses, separated by commas)",
                                        config.mail_recipients).format(count=config.mail_recipients),
                      note=ngettext("A plain-text message with this link, the fingerprints and when it ends; no "
                                    "attachment, which mail systems mangle.",
                                    "A plain-text message with these links, the fingerprints and when they end; no "
                                    "attachment, which mail systems mangle.", count))
    pairs = [(link.lead, link.entry) for link in links]
    query = urllib.parse.urlencode({"subject": mail_subject(config, pairs),
                                    "body": mail_text(pairs, whc, [link.offer for link in links])},
                                   quote_via=urllib.parse.quote)
    text = ngettext("{link}Write an e-mail with this link, the fingerprints and when it ends{link_end} (opens your "
                    "mail program: this server sends no mail).",
                    "{link}Write an e-mail with these links, the fingerprints and when they end{link_end} (opens your "
                    "mail program: this server sends no mail).", count)
    return render(MAILTO_NOTE, heading=heading,
                  text_html=with_markup(text, link=f'<a href="{esc(f"mailto:?{query}")}">', link_end="</a>"))


def mail_subject(config: Config, links: list[tuple[str, Entry]]) -> str:
    """Return the subject of a message with *links*: the configured one, or the default in the reader's language."""
    subject = _(DEFAULT_MAIL_SUBJECT) if config.mail_subject == DEFAULT_MAIL_SUBJECT else config.mail_subject
    return header_text(subject.replace("{name}", header_text(links[0][1].certificate.name)[:100]))


def header_text(value: str) -> str:
    """Return *value* fit for a mail header: line breaks as spaces; every other control, format (bidi) and
    separator character removed. Python's e-mail library folds headers at \\x1c-\\x1e too, and fails on them."""
    return "".join(char for char in LINE_BREAKS_RE.sub(" ", value)
                   if unicodedata.category(char) not in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"))


def mail_text(links: list[tuple[str, Entry]], whc: tuple[str, int], offers: Iterable[LinkOffer | None] = ()) -> str:
    """Return the plain-text message that carries *links*: (url, entry) pairs. *whc*: (default layout, charset).
    *offers*, one for each link, add its note and alternatives (offer_link) under it."""
    lines = []
    for (url, entry), offer in zip(links, [*offers, *[None] * len(links)]):
        certificate = entry.certificate
        lines += [_("Install the CA certificate \u201c{name}\u201d from:").format(name=certificate.name), f"  {url}",
                  *link_note_lines(offer), f"  SHA-256 {colon_hex(certificate.sha256)}",
                  f"  SHA-1   {colon_hex(certificate.sha1)}"]
        if certificate.self_signed:
            body = hashed_certificate(certificate, charset=whc[1], length_prefixed=whc[0] == "whc-length")
            lines.append("  " + _("Nokia Series 40 code: {code}").format(code=hashed_certificate_code(body)))
        lines += ["  " + _("The link works until {date}.").format(date=format_time(entry.expires)), ""]
    lines.append(_("To install: open the link on the phone or computer itself; the page there shows the steps for "
                   "that device. Before you trust the certificate, compare its fingerprint with the one above."))
    return "\n".join(term(line) for line in lines) + "\n"


def render_result(links: list[Link], diagnosis: Diagnosis, now: float, home: str, mail_html: str = "") -> bytes:
    steps = render_result_steps(links[0].entry.certificate, url=lead_link(links[0]))
    heading = ngettext("Your install link", "Your install links", len(links))
    if not any(link.created for link in links):
        heading = ngettext("This certificate already has a link", "These certificates already have links", len(links))
    body = render(
        RESULT_PAGE,
        heading=heading,
        order_html=render_order_note(links),
        links_html="".join(render_link(link, now) for link in links),
        findings_html=render_findings(diagnosis),
        compare=_("Before trusting a certificate on a device, compare its SHA-256 or SHA-1 fingerprint with the one "
                  "shown here: the link is plain HTTP, and the fingerprint is what proves the file was not swapped."),
        how=_("How to install it"),
        steps_html=steps + f"<p>{render_developer_note(lead_link(links[0]))}</p>",
        nokia_html=render_old_nokia(links[0].entry.certificate, diagnosis),
        home=home,
        another=_("Share another certificate"),
        mail_html=mail_html,
    )
    return render_page(_("Link for {name}").format(name=links[0].entry.certificate.name), body, home=home)


# Install commands. Each downloads the DER certificate from the link itself, installs it only if its SHA-256
# fingerprint is the one the command names, and says so (on standard error, with a non-zero status) when it is not.
# The page asks the reader to compare that fingerprint with the card or the mail: over plain HTTP the page could be
# swapped as well as the file, so the out-of-band fingerprint is the check, as with step-ca's `bootstrap
# --fingerprint`. URLs and names go through shlex.quote (POSIX shells) or ps_quote (PowerShell) as they enter.

#: Where the developer page's commands keep the checked CA and the bundle of the system's CAs with it.
DEV_DIR = "$HOME/.local/share/certdrop"

#: System CA bundles, the first that exists starts a bundle: Debian, Ubuntu, Arch and Alpine; Fedora and RHEL;
#: openSUSE (paths from Go's crypto/x509 root_linux.go); macOS's /etc/ssl/cert.pem last.
SYSTEM_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/ca-bundle.pem",
                  "/etc/ssl/cert.pem")


def refusal_text(sha256: bytes) -> str:
    """Return what a command says when the file it downloaded is not the certificate it names (kept in English, like
    the command itself)."""
    return f"certdrop: nothing installed: the download failed or its SHA-256 fingerprint is not {sha256.hex()}"


def posix_fetch(url: str, sha256: bytes, digest: str = "sha256sum", download: str = "curl -fsSL -o") -> str:
    """Return POSIX shell that downloads the DER certificate at *url* to "$d/ca.der" and fails, saying so, unless its
    SHA-256 is *sha256*; what follows it with ``&&`` runs only after the check passed."""
    return (f'd="$(mktemp -d)" && {download} "$d/ca.der" {shlex.quote(url)} && '
            f'[ "$({digest} <"$d/ca.der" | cut -c1-64)" = {sha256.hex()} ] '
            f"|| {{ echo {shlex.quote(refusal_text(sha256))} >&2; false; }}")


def pem_after(fetch: str) -> str:
    """Return *fetch* followed by the checked file's PEM copy, "$d/ca.pem", for the tools that want PEM."""
    return f'{fetch} && openssl x509 -inform der -in "$d/ca.der" -out "$d/ca.pem"'


def ps_quote(text: str) -> str:
    """Return *text* as a PowerShell single-quoted string: PowerShell takes the typographic single quotes for quotes
    too, so each of them is doubled like "'"."""
    return "'" + re.sub("['\u2018\u2019\u201a\u201b]", lambda match: match[0] * 2, text) + "'"


def ps_install(url: str, sha256: bytes, store: str) -> str:
    """Return a PowerShell line that downloads *url*, checks its SHA-256 and only then imports it into *store*.

    Invoke-WebRequest -UseBasicParsing works without Internet Explorer's engine (Windows PowerShell 5.1 on Server
    Core); certutil -urlcache, the other built-in downloader, is what antivirus flags.
    """
    return (f"$f = Join-Path $env:TEMP 'certdrop-ca.cer'\nInvoke-WebRequest -UseBasicParsing -ErrorAction Stop "
            f"-Uri {ps_quote(url)} -OutFile $f\nif ((Get-FileHash -Algorithm SHA256 $f).Hash -eq "
            f"'{sha256.hex().upper()}') {{ Import-Certificate -FilePath $f -CertStoreLocation {store} }} "
            f"else {{ Write-Error {ps_quote(refusal_text(sha256))} }}")


def command_lines(command: str) -> str:
    """Return *command* as shown: a line a step after each " && ", so the part that differs is in view without
    scrolling. No quoted word holds " && ": URLs are made of a checked Host, prefix and file stem (link_base)."""
    return command.replace(" && ", " &&\n")


def command_values(certificate: Certificate, der_url: str) -> dict[str, str]:
    """Return the values install commands are made from: the checked downloads of *der_url* and the quoted names."""
    sha256, root = certificate.sha256, certificate.self_signed
    get = posix_fetch(der_url, sha256)
    dev_get = posix_fetch(der_url, sha256, digest="{ sha256sum || shasum -a 256; } 2>/dev/null")
    stem = certificate.file_stem
    # NSS nicknames and keytool aliases are the file stem, safe characters only: a name's bidi controls could make a
    # command read otherwise than it runs, however it is quoted.
    nickname = shlex.quote(stem)
    pem, bundle = f'"{DEV_DIR}/"{shlex.quote(stem + ".pem")}', f'"{DEV_DIR}/"{shlex.quote(stem + "-bundle.pem")}'
    system_bundle = f'"$(ls {" ".join(SYSTEM_BUNDLES)} 2>/dev/null | head -n 1)"'
    return {
        "get": get, "get_pem": pem_after(get),
        "get_wget_pem": pem_after(posix_fetch(der_url, sha256, download="wget -qO")),
        "get_mac": posix_fetch(der_url, sha256, digest="shasum -a 256"),
        "crt": shlex.quote(f"certdrop-{stem}.crt"), "nickname": nickname,
        "ps_machine": ps_install(der_url, sha256, "Cert:\\LocalMachine\\" + ("Root" if root else "CA")),
        "ps_user": ps_install(der_url, sha256, "Cert:\\CurrentUser\\" + ("Root" if root else "CA")),
        "certutil_store": "Root" if root else "CA",
        # The developer page: the checked CA as PEM in DEV_DIR, and a bundle of the system's CAs with it for the
        # variables and options that replace a tool's whole store.
        "save": (f'{pem_after(dev_get)} && mkdir -p "{DEV_DIR}" && cp "$d/ca.pem" {pem} && '
                 f"cat {system_bundle} {pem} > {bundle}"),
        "pem": pem, "bundle": bundle,
    }


class LinuxSystem(typing.NamedTuple):
    label: str  # N_() message id naming {command}
    command: str  # made from command_values


#: The system store of each Linux distribution family, in the order pages list them when the User-Agent names none
#: (LINUX_MARKERS). "$d/ca.pem" is the checked certificate as PEM; {crt} its file name there.
LINUX_SYSTEMS = {
    # update-ca-certificates(8), ca-certificates 20230311 (Debian 12; Ubuntu 24.04 has the same): reads PEM files
    # named .crt under /usr/local/share/ca-certificates and writes /etc/ssl/certs/ca-certificates.crt.
    "debian": LinuxSystem(N_("Debian, Ubuntu, Linux Mint: {command}"),
                          '{get_pem} && sudo cp "$d/ca.pem" /usr/local/share/ca-certificates/{crt} && '
                          "sudo update-ca-certificates"),
    # update-ca-trust(8), Fedora 40 and RHEL 9: PEM or DER files under /etc/pki/ca-trust/source/anchors.
    "fedora": LinuxSystem(N_("Fedora, RHEL, CentOS Stream, Rocky, AlmaLinux: {command}"),
                          '{get_pem} && sudo cp "$d/ca.pem" /etc/pki/ca-trust/source/anchors/{crt} && '
                          "sudo update-ca-trust"),
    # ArchWiki, "Transport Layer Security", Add a certificate to a trust store: trust(1) of p11-kit takes DER or PEM.
    "arch": LinuxSystem(N_("Arch Linux, Manjaro: {command}"), '{get} && sudo trust anchor --store "$d/ca.der"'),
    # SUSE's documentation (SLES 15, openSUSE Leap 15.6 and Tumbleweed): PEM files in /etc/pki/trust/anchors, then
    # update-ca-certificates (p11-kit's, not Debian's).
    "suse": LinuxSystem(N_("openSUSE, SUSE Linux Enterprise: {command}"),
                        '{get_pem} && sudo cp "$d/ca.pem" /etc/pki/trust/anchors/{crt} && sudo update-ca-certificates'),
    # Alpine wiki and ca-certificates' update-ca-certificates (Alpine 3.20): PEM files in
    # /usr/local/share/ca-certificates; busybox has wget and sha256sum but no curl, and containers run as root.
    "alpine": LinuxSystem(N_("Alpine Linux, as root, after apk add ca-certificates openssl: {command}"),
                          '{get_wget_pem} && cp "$d/ca.pem" /usr/local/share/ca-certificates/{crt} && '
                          "update-ca-certificates"),
}

#: A guide step that stands for the LINUX_SYSTEMS rows a page shows: the one its User-Agent names, else all.
LINUX_SYSTEMS_STEP = "{linux_systems}"

COMMANDS_NOTE = N_("Each command downloads the certificate from this link and installs it only if its SHA-256 "
                   "fingerprint is {fingerprint}; otherwise it stops and installs nothing. Compare that fingerprint "
                   "with the one on the card or in the mail you were given before you run it: this page comes over "
                   "plain HTTP, so it could have been changed too.")


class Guide(typing.NamedTuple):
    """How one device family installs a CA: its name, the file to offer first, and the steps.

    Names and steps are N_() message ids. A step may name {file}, {cer}, {name}, {store} and {bits}/{key_type},
    and the commands of *commands* by their names: a command is shown as code to copy, the same in every language,
    made from command_values (checked downloads, quoted names and URLs). A step given as
    (condition, text) applies only to the certificates *condition* accepts.
    """

    label: str
    first: str  # a key of FILE_KINDS
    steps: tuple
    commands: dict[str, str] | None = None  # placeholder name -> command


class FileKind(typing.NamedTuple):
    description: str  # what it is and who takes it, for the list of every format
    extension: str
    button: str  # the words on a page's main button when it is the device's first file


#: The explicit files every page offers; descriptions and buttons are N_() message ids.
FILE_KINDS = {
    "crt": FileKind(N_("Certificate, DER (.crt): Android, Windows, most devices"), ".crt",
                    N_("Download the certificate (DER, .crt)")),
    "cer": FileKind(N_("Certificate, DER (.cer): Windows, Nokia, BlackBerry"), ".cer",
                    N_("Download the certificate (DER, .cer)")),
    "pem": FileKind(N_("Certificate, PEM text (saved as .crt): Linux"), ".pem",
                    N_("Download the certificate (PEM, saved as .crt)")),
    "mobileconfig": FileKind(N_("Configuration profile (.mobileconfig): iPhone, iPad, Mac"), ".mobileconfig",
                             N_("Download the configuration profile")),
    "whc": FileKind(N_("WAP hashed certificate (.whc): old Nokia Series 40"), ".whc",
                    N_("Download the WAP hashed certificate")),
    "whc-alt": FileKind(N_("WAP hashed certificate, other layout (.alt.whc)"), ".alt.whc",
                        N_("Download the WAP hashed certificate (other layout)")),
}


def is_root(certificate: Certificate) -> bool:
    return certificate.self_signed


def is_intermediate(certificate: Certificate) -> bool:
    return not certificate.self_signed


def is_not_small_rsa(certificate: Certificate) -> bool:
    return not (certificate.key_type == "RSA" and certificate.key_bits <= 1024)


def has_key_size(certificate: Certificate) -> bool:
    return is_not_small_rsa(certificate) and certificate.key_bits > 0


def has_no_key_size(certificate: Certificate) -> bool:
    return is_not_small_rsa(certificate) and certificate.key_bits == 0

DEVICE_GUIDES = {
    "s60": Guide(N_("Nokia Symbian (S60)"), "cer", (
        N_("Open the link in the phone's own browser (not Opera Mini or UC Browser) and choose Save."),
        N_("Give the certificate a name and tick the trust entry for Internet connections (\u201cInternet\u201d on "
           "3rd edition; the name varies by release)."),
        N_("If the phone still warns about the server, restart it."))),
    "s40": Guide(N_("Nokia Series 40"), "cer", (
        N_("Open the link in the phone's own browser and choose the certificate file first."),
        (is_root, N_("If the phone says the format is not supported, go back and choose the hashed certificate: the "
                     "phone asks for the code printed above it. Type it exactly.")),
        (has_key_size, N_("Some Series 40 phones accept only CAs with a 1024-bit RSA key; this one has a {bits}-bit "
                          "{key_type} key.")),
        (has_no_key_size, N_("Some Series 40 phones accept only CAs with a 1024-bit RSA key; this one has an "
                             "{key_type} key.")))),
    # iOS 17 and later: "Profile Downloaded" at the top of Settings, else General > VPN & Device Management (issue
    # 20); full trust for roots: https://support.apple.com/102390 ("Trust manually installed certificate profiles
    # in iOS and iPadOS"), a list that shows roots only.
    "ios": Guide(N_("iPhone and iPad"), "mobileconfig", (
        # Translators: name buttons and menus as iOS itself labels them in your language (German: Einstellungen >
        # Allgemein > VPN und Geräteverwaltung); where you could not check a label, say so in the catalog.
        N_("Tap the button and choose Allow."),
        N_("Open Settings and tap \u201cProfile Downloaded\u201d at the top, then Install, within 8 minutes: iOS "
           "discards a profile that waits longer. Not there? Look in Settings \u203a General \u203a VPN & Device "
           "Management."),
        (is_root, N_("Turn on full trust: Settings \u203a General \u203a About \u203a Certificate Trust Settings, "
                     "switch on \u201c{name}\u201d. Without this step iOS does not trust it for websites.")),
        (is_intermediate, N_("This is an intermediate CA: it needs no trust switch, and Certificate Trust Settings "
                             "lists roots only. Install the root CA that issued it too, and turn on full trust for "
                             "that root.")))),
    # Android 13-16 on Pixel: Settings > Security & privacy > More security & privacy > Encryption & credentials >
    # Install a certificate > CA certificate (the path of issue 21 and of Google's Pixel help "Add & remove
    # certificates"; that page could not be opened from here to re-check it). Samsung: "Install from device storage"
    # (its manuals' words since the Galaxy S4), under Security and privacy > More security settings on One UI 5 and
    # later, Biometrics and security > Other security settings on One UI 1-4 (from memory of those releases: not
    # checked against a Samsung page). Android 11 and 12 and other makers: Security > (Advanced >) Encryption &
    # credentials. Android 11 took away installing a CA from the browser or a file manager (developer.android.com,
    # Android 11 behaviour changes: KeyChain.createInstallIntent no longer installs CA certificates).
    "android": Guide(N_("Android"), "crt", (
        N_("Tap the button: {file} is saved to Downloads."),
        N_("Pixel and most phones with Android 13 or later: Settings \u203a Security & privacy \u203a More security & "
           "privacy \u203a Encryption & credentials \u203a Install a certificate \u203a CA certificate, tap Install "
           "anyway and pick {file}."),
        N_("Samsung (One UI): Settings \u203a Security and privacy \u203a More security settings \u203a Install from "
           "device storage \u203a CA certificate (older One UI: Biometrics and security \u203a Other security "
           "settings)."),
        N_("Android 11 and 12, and other makers: Settings \u203a Security (\u203a Advanced) \u203a Encryption & "
           "credentials \u203a Install a certificate \u203a CA certificate. Not there? Search Settings for "
           "\u201cCA certificate\u201d."),
        N_("Android 11 and later install a CA only from Settings, never from the browser, and need a screen lock "
           "(PIN, pattern or password)."),
        (is_intermediate, N_("This is an intermediate CA: Android trusts it only once the root CA that issued it is "
                             "installed too. Install that root first; ask whoever sent you this link for it.")),
        # developer.android.com/privacy-and-security/security-config: apps targeting API 24 (Android 7) or later
        # trust user-added CAs only if their network security configuration says so.
        N_("Chrome and most browsers then trust the CA. Apps ignore CAs you install unless their makers opted in "
           "(Android's network security configuration), so some apps may still refuse the server."),
        # Firefox for Android keeps Mozilla's store; the switch that makes it read the user's CAs:
        # mozilla-mobile/fenix#22906 (steps), fork-maintainers/iceraven-browser#610 (tap the logo 5 times). Firefox
        # 120's release notes (bug 1848815) say user-added roots are imported by default on Android too, so the step
        # is for when Firefox still refuses.
        N_("Firefox for Android still refusing the server? Turn on its own switch: Settings \u203a About Firefox, tap "
           "the Firefox logo five times, then Settings \u203a Secret Settings \u203a \u201cUse third party CA "
           "certificates\u201d."))),
    # Windows 10 and 11: the Local Machine stores need an administrator; Current User's Root store asks the user to
    # confirm and trusts for that account only. Import-Certificate (PKI module, Windows 8 / Server 2012 and later,
    # learn.microsoft.com/powershell/module/pki/import-certificate); certutil -addstore [-user] -f (learn.microsoft
    # .com/windows-server/administration/windows-commands/certutil). Firefox 120 and later imports user-added roots
    # of the Windows and macOS stores by default (security.enterprise_roots.enabled; mozilla/release-notes
    # firefox-120.0-release.json, bug 1848815).
    "windows": Guide(N_("Windows"), "cer", (
        N_("Download {file} and open it, then choose Install Certificate and Local Machine (all users; Windows asks "
           "for an administrator). Without an administrator choose Current User: it then works for your account "
           "only."),
        N_("Choose \u201cPlace all certificates in the following store\u201d and pick \u201c{store}\u201d: letting "
           "Windows choose the store automatically puts a root in the wrong one."),
        N_("Or in PowerShell run as administrator: {ps_machine}"),
        N_("Without an administrator, for your account only (Windows asks you to confirm): {ps_user}"),
        N_("In either line, {certutil} (or {certutil_user}) can stand in for Import-Certificate."),
        N_("Chrome and Edge use this store. Firefox 120 and later trusts it too; in an older Firefox set "
           "security.enterprise_roots.enabled to true in about:config.")),
        {"ps_machine": "{ps_machine}", "ps_user": "{ps_user}",
         "certutil": "certutil -addstore -f {certutil_store} $f",
         "certutil_user": "certutil -user -addstore -f {certutil_store} $f"}),
    # Mac User-Agents are frozen at 10_15_7, so both places of Profiles are shown, each with its versions (macOS 13
    # and 14: Privacy & Security > Profiles; 15 and later: General > Device Management; issue 20). Apple asks for a
    # trust step after a manual
    # profile install only on iPhone and iPad (https://support.apple.com/102390); on a Mac the profile's root is
    # installed into the System keychain trusted, so no "Always Trust" is needed (README, "iPhone, iPad and Mac").
    # security(1), macOS 14: add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain; shasum ships
    # with every macOS, sha256sum only with recent ones.
    "macos": Guide(N_("Mac"), "mobileconfig", (
        N_("Download the profile, then install it in System Settings (an administrator's password is needed):"),
        N_("macOS 15 and later: System Settings \u203a General \u203a Device Management, double-click the profile, "
           "Install."),
        N_("macOS 13 and 14: System Settings \u203a Privacy & Security \u203a Profiles, double-click the profile, "
           "Install. Older macOS: System Preferences \u203a Profiles."),
        (is_root, N_("Nothing more to do: a root installed by a profile is trusted on a Mac, with no \u201cAlways "
                     "Trust\u201d in Keychain Access (Apple asks for a trust step only on iPhone and iPad: "
                     "support.apple.com/102390).")),
        (is_root, N_("Or download {cer}, open it in Keychain Access (System keychain), open the certificate and set "
                     "Trust \u203a \u201cWhen using this certificate\u201d to Always Trust: a certificate opened "
                     "this way, unlike a profile, is not trusted until then.")),
        (is_root, N_("Administrators can install it from Terminal instead: {security}")),
        (is_intermediate, N_("This is an intermediate CA: install the root CA that issued it too. A Mac trusts the "
                             "intermediate once that root is trusted.")),
        (is_intermediate, N_("Administrators can add it from Terminal instead: {security_ca}")),
        N_("Safari and Chrome use the system's keychains. Firefox 120 and later trusts them too; in an older Firefox "
           "set security.enterprise_roots.enabled to true in about:config.")),
        {"security": '{get_mac} && sudo security add-trusted-cert -d -r trustRoot -k '
                     '/Library/Keychains/System.keychain "$d/ca.der"',
         "security_ca": '{get_mac} && sudo security add-certificates -k /Library/Keychains/System.keychain '
                        '"$d/ca.der"'}),
    # Chromium's docs/linux/cert_management.md: Chrome on Linux reads the NSS shared database, $HOME/.pki/nssdb, or
    # $HOME/.local/share/pki/nssdb from Chrome 146 when the old one does not exist; certutil comes in libnss3-tools
    # (Debian, Ubuntu), nss-tools (Fedora), mozilla-nss-tools (openSUSE).
    "linux": Guide(N_("Linux"), "pem", (
        N_("For the system's store, which curl, Python, git and most programs use, run the line for your "
           "distribution:"),
        LINUX_SYSTEMS_STEP,
        N_("Chrome and Chromium read their own database in your home folder: {nssdb} (certutil comes in "
           "libnss3-tools on Debian and Ubuntu, nss-tools on Fedora, mozilla-nss-tools on openSUSE)."),
        N_("Firefox on Linux keeps its own store: Settings \u203a Privacy & Security \u203a Certificates \u203a View "
           "Certificates \u203a Authorities \u203a Import, tick \u201cTrust this CA to identify websites\u201d.")),
        {"nssdb": '{get} && db="$HOME/.pki/nssdb" && {{ [ -d "$db" ] || db="$HOME/.local/share/pki/nssdb"; }} && '
                  'mkdir -p "$db" && certutil -d "sql:$db" -A -t C,, -n {nickname} -i "$d/ca.der"'}),
    # Firefox's "Downloading Certificate" dialog opens for a DER CA sent as application/x-x509-ca-cert (file_answer).
    # On Linux Firefox reads no system store; its profiles are ~/.mozilla/firefox/* (the Snap's under
    # ~/snap/firefox/common), and certutil must not touch a database Firefox has open.
    "firefox": Guide(N_("Firefox"), "crt", (
        N_("Click the button: Firefox opens its own \u201cDownloading Certificate\u201d dialog."),
        N_("Tick \u201cTrust this CA to identify websites\u201d and choose OK."),
        N_("Or close Firefox and add it to every Firefox profile from a terminal (certutil, from libnss3-tools): "
           "{profiles}"),
        N_("Firefox keeps its own store on Linux: the rest of the system needs the certificate too, as below.")),
        {"profiles": '{get} && for p in "$HOME"/.mozilla/firefox/*/cert9.db "$HOME"/snap/firefox/common/.mozilla/'
                     'firefox/*/cert9.db; do [ ! -f "$p" ] || certutil -d "sql:${{p%/cert9.db}}" -A -t C,, '
                     '-n {nickname} -i "$d/ca.der"; done'}),
    # Chrome's certificate manager from Chrome 131 (ChromeOS too): Manage certificates > Local certificates > Custom >
    # Installed by you > Trusted certificates > Import (chromium's certificate_manager/local_certs_section.ts; the
    # path as written in wardenenv/docs#41, October 2025). Older ChromeOS: Manage certificates > Authorities.
    "chromeos": Guide(N_("ChromeOS"), "crt", (
        N_("Tap the button: {file} is saved to Downloads."),
        N_("Open Settings \u203a Privacy and security \u203a Security \u203a Manage certificates \u203a Local "
           "certificates \u203a Custom \u203a Installed by you \u203a Trusted certificates \u203a Import, and pick "
           "{file}."),
        N_("Older ChromeOS: Settings \u203a Privacy and security \u203a Security \u203a Manage certificates \u203a "
           "Authorities \u203a Import, pick {file} and tick \u201cTrust this certificate for identifying "
           "websites\u201d."))),
    "windows-mobile": Guide(N_("Windows Phone and Windows Mobile"), "cer", (
        N_("Tap the button and open {file}: the certificate installer asks whether to install it."),
        N_("Company-managed phones may refuse certificates their company did not provision."))),
    "blackberry": Guide(N_("BlackBerry"), "cer", (
        N_("Open the link in the BlackBerry browser and choose Import Certificate (BlackBerry 10 opens it directly)."),
        N_("Confirm that you trust it; it appears under Security \u203a Certificates."))),
    "other": Guide(N_("Other devices"), "crt", (
        N_("Download {file} and import it as a trusted CA (root) certificate in the device's or browser's "
           "certificate settings."),
        N_("If your device is one of those named under Other formats, pick the file named for it."))),
}

#: The device families the result page explains, in this order.
RESULT_PAGE_FAMILIES = ("ios", "android", "windows", "macos", "linux", "firefox", "chromeos")

#: ... and the old Nokia phones', which go last, together with the notes only they need.
RESULT_PAGE_NOKIA_FAMILIES = ("s60", "s40")

#: One install step: (text, is a command) pieces.
Step = tuple[tuple[str, bool], ...]


def guide_steps(device: str, certificate: Certificate, file_name: str, der_url: str = "",
                system: str = "") -> list[Step]:
    """Return the install steps for *device* that apply to *certificate*, translated, names and stores filled in.

    The certificate's name fills only prose; commands get it shell-quoted, with the checked download of *der_url*
    (the link's DER file, absolute), so nothing from a certificate lands unquoted in a command a reader pastes. With
    no *der_url* the steps that hold commands are left out. *system* picks the one LINUX_SYSTEMS row to show.
    """
    root = certificate.self_signed
    values = {
        "file": file_name, "cer": f"{certificate.file_stem}.cer", "name": certificate.name,
        "bits": certificate.key_bits,
        "key_type": certificate.key_type,
        "store": _("Trusted Root Certification Authorities") if root else _("Intermediate Certification Authorities"),
    }
    commands = {name: command_lines(template.format(**command_values(certificate, der_url)))
                for name, template in (DEVICE_GUIDES[device].commands or {}).items()} if der_url else {}
    steps = []
    for step in DEVICE_GUIDES[device].steps:
        if isinstance(step, tuple):
            applies, step = step
            if not applies(certificate):
                continue
        if step == LINUX_SYSTEMS_STEP:
            steps += linux_system_steps(certificate, der_url, system) if der_url else []
            continue
        named = re.findall(r"\{(\w+)\}", step)
        if any(name in (DEVICE_GUIDES[device].commands or {}) and name not in commands for name in named):
            continue  # a step built around a command, on a page that has no link to download from
        steps.append(split_step(_(step), commands, values))
    return steps


def split_step(text: str, commands: dict[str, str], values: dict[str, object]) -> Step:
    """Return translated step *text* as pieces: its {command} placeholders as commands, the rest as prose."""
    pieces = re.split(r"\{(%s)\}" % "|".join(commands), text) if commands else [text]
    return tuple((commands[piece], True) if index % 2 else (piece.format(**values), False)
                 for index, piece in enumerate(pieces) if piece)


def linux_system_steps(certificate: Certificate, der_url: str, system: str) -> list[Step]:
    """Return the system-store line of the distribution *system*, or of every one when the User-Agent named none."""
    values = command_values(certificate, der_url)
    rows = [LINUX_SYSTEMS[system]] if system in LINUX_SYSTEMS else list(LINUX_SYSTEMS.values())
    return [split_step(_(row.label), {"command": command_lines(row.command.format(**values))}, {}) for row in rows]


def step_text(step: Step) -> str:
    return "".join(text for text, _ in step)


def step_html(step: Step) -> str:
    """Return *step* as HTML: a command is code that scrolls in its own box rather than breaking mid-flag."""
    return "".join(f'<code class="cmd">{esc(text)}</code>' if command else esc(text) for text, command in step)


def file_kinds_for(certificate: Certificate) -> list[str]:
    """Return the file kinds offered for *certificate*: hashed certificates exist only for self-signed ones."""
    return [kind for kind in FILE_KINDS if certificate.self_signed or not kind.startswith("whc")]


LANDING_PAGE = string.Template("""<h1>$heading</h1>
<p class="muted">$role_for_device $proxy_note $not_yours $ends</p>
$way_out_html
<p><a class="button" href="$first_url">$first_label</a></p>
$nothing_html
$steps_html
<section>
<h2>$check</h2>
$facts_html
<p class="muted">$compare</p>
</section>
$qr_html
<section>
<h2>$other</h2>
<ul>$formats_html</ul>
</section>
""")

WAY_OUT = string.Template("""<section class="way-out">
<h2>$heading</h2>
<p>$which $how</p>
<p class="copy">$link_html</p>
</section>""")


class DevicePage(typing.NamedTuple):
    """How a device's page is titled and which guides it shows, each under its own heading when there are two."""

    title: str  # N_() message id naming {name}
    label: str  # N_() message id: the device, in "{role} for {device}."
    parts: tuple[str, ...]  # keys of DEVICE_GUIDES


#: Pages that differ from the default (their guide's label, one guide). iPadOS Safari sends a Mac's User-Agent by
#: default ("desktop mode"), so the Mac page is as much an iPad's: the profile first, both guides equally visible.
DEVICE_PAGES = {
    "macos": DevicePage(N_("Install \u201c{name}\u201d on a Mac or an iPad"), N_("a Mac or an iPad"),
                        ("macos", "ios")),
    # Only Firefox on Linux gets the Firefox page (classify): Firefox's own store first, then the system's.
    "firefox": DevicePage(N_("Install \u201c{name}\u201d"), N_("Firefox on Linux"), ("firefox", "linux")),
}


class WayOut(typing.NamedTuple):
    """What a page opened where nothing can be installed leads with (N_() message ids)."""

    heading: str
    named: str  # when the User-Agent names the app or browser: {app}
    unnamed: str  # a web view that does not say whose
    how: str


#: The way out of an app's web view, or of a browser that cannot install, to the browser that can.
WAYS_OUT = {
    "ios": WayOut(
        N_("Open this page in Safari"),
        N_("This page is open in {app}, which cannot install configuration profiles."),
        N_("This page is open inside an app, which cannot install configuration profiles."),
        N_("Look in its menu (\u2026 or the share button) for \u201cOpen in Safari\u201d or \u201cOpen in "
           "browser\u201d, or copy this link, open Safari and paste it into the address bar:")),
    "android": WayOut(
        N_("Open this page in Chrome"),
        N_("This page is open in {app}, which cannot save a certificate for Android to install."),
        N_("This page is open inside an app, which cannot save a certificate for Android to install."),
        N_("Look in its menu (\u22ee) for \u201cOpen in Chrome\u201d or \u201cOpen in browser\u201d, or copy "
           "this link, open Chrome (or the phone's own browser) and paste it into the address bar:")),
}

#: Devices whose pages say, under the button, where to go when nothing happened: Gmail, Outlook, Slack and Teams
#: open links in views that send Safari's own User-Agent (see BROWSERS), so no page can tell.
NOTHING_HAPPENED_DEVICES = ("ios", "macos")

PHONE_QR = string.Template("""<section>
<h2>$heading</h2>
<p>$point_html</p>
<div class="qr">$qr_html</div>
<p>$card_html</p>
</section>""")

CARD_PAGE = string.Template("""<h1>$heading</h1>
<p class="link card-link">$link</p>
<div class="qr">$qr_html</div>
<p><strong>$ends</strong> $contact $open_text</p>
$facts_html
<table class="card-steps">$steps_html</table>
""")

#: Two short lines a device family, for the printable card (N_() message ids).
CARD_STEPS = (
    (N_("iPhone, iPad"), N_("Open the link in Safari, allow the profile, install it in Settings within 8 minutes."),
     N_("Then Settings \u203a General \u203a About \u203a Certificate Trust Settings: switch it on.")),
    (N_("Android"), N_("Open the link, tap the button: the certificate is saved to Downloads."),
     # the paths of DEVICE_GUIDES["android"], shortened to what a card holds
     N_("Settings \u203a Security (& privacy) \u203a \u2026 \u203a Install a certificate \u203a CA certificate, or "
        "search Settings for \u201cCA certificate\u201d.")),
    (N_("Windows"), N_("Open the link, download the .cer, open it: Install Certificate, Local Machine."),
     N_("Place it in \u201cTrusted Root Certification Authorities\u201d (not automatically).")),
    (N_("macOS"), N_("Open the link, install the profile in System Settings \u203a General \u203a Device "
                     "Management (macOS 13, 14: Privacy & Security \u203a Profiles)."),
     N_("Or open the .cer in Keychain Access and set it to Always Trust.")),
    (N_("Linux, ChromeOS"), N_("Open the link and follow the page: it names the commands or settings for you."),
     N_("Firefox keeps its own store: it asks to trust the CA when you click the button.")),
    (N_("Nokia"), N_("Open the link in the phone's own browser (not Opera Mini) and choose Save or Install."),
     N_("Series 40 phones may ask for the code shown on their page: type it exactly.")),
)


#: The card's second line for a family whose trust step is for roots only, when the link is an intermediate's.
CARD_INTERMEDIATE_LINES = {
    N_("iPhone, iPad"): N_("It is an intermediate CA: no trust switch for it; install its root CA too."),
}


def render_card(certificate: Certificate, link: str, ends: float | None = None, contact: str = "",
                home: str = "/") -> bytes:
    """Return the printable hand-out of a link; it fits one A4 or Letter page. It says when the link ends, and
    whom to ask (the contact setting)."""
    intermediate = {} if certificate.self_signed else CARD_INTERMEDIATE_LINES
    steps = "".join(f"<tr><th>{esc(_(family))}</th><td>{esc(_(first))}<br />"
                    f"{esc(_(intermediate.get(family, second)))}</td></tr>" for family, first, second in CARD_STEPS)
    body = render(CARD_PAGE, heading=_("Install the certificate \u201c{name}\u201d").format(name=certificate.name),
                  link=link, qr_html=qr_svg(link), facts_html=render_fingerprints(certificate), steps_html=steps,
                  ends=_(ENDS_NOTE).format(date=format_time(ends)) if ends else "",
                  contact=_("Questions, or a new link: ask {contact}.").format(contact=contact) if contact else "",
                  open_text=_("Open the link on each phone or computer (or point its camera at the code) and follow "
                              "the steps there. Before trusting the certificate, compare its fingerprint with this "
                              "one:"))
    return render_page(_("Install {name}").format(name=certificate.name), body, home=home,
                       here=urllib.parse.urlsplit(link).path + "/card" if link else "")


ENDS_NOTE = N_("The link works until {date}.")

PROXY_NOTE = N_("Opera Mini and UC Browser cannot hand a certificate to the phone: open this link in its own "
                "browser.")


def render_fingerprints(certificate: Certificate) -> str:
    return render_table(((N_("Name"), certificate.name), (N_("SHA-256"), colon_hex(certificate.sha256)),
                         (N_("SHA-1"), colon_hex(certificate.sha1))))


def render_profile_signature_note(signed: bool) -> str:
    """Return what iOS and macOS say of the profile's signature (*signed*: by the administrator's signer) and what
    it means, for the Apple pages: "Verified" names who signed the file, which is no reason to trust the CA in it."""
    if signed:
        text = _("Your device calls this profile “Verified” because it knows who signed the file; that does not "
                 "make the certificate inside it trustworthy, so compare its SHA-256 fingerprint with the one you were "
                 "given.")
    else:
        text = _("Your device calls this profile “Not Verified” in red because nobody it knows signed the file, "
                 "as is usual for a company's own CA; compare its SHA-256 fingerprint with the one you were given.")
    return f'<p class="muted">{esc(text)}</p>'


def render_landing(certificate: Certificate, client: Client, base_path: str, link: str = "",
                   ends: float | None = None, signed: bool = False, root_name: str | None = None) -> bytes:
    """Return the HTML page for *client* at /c/<token>: the right file first, its steps, then every format.

    *base_path* is the link's path (``/prefix/c/<token>``); file links hang below it. *link* is the link itself:
    a phone's page shows it as text to copy into Safari or Chrome, a desktop's page as a QR code too, so a person
    at a laptop can point a phone at the screen. *ends* is when the link ends (the entry's expiry). Pages that
    lead with the configuration profile say what the device will call its signature (*signed*: by the signer).
    An intermediate's page whose upload held its root (*root_name*) sends the reader to the root's link first.
    """
    guide = DEVICE_GUIDES[client.device]
    page = DEVICE_PAGES.get(client.device) or DevicePage(N_("Install \u201c{name}\u201d"), guide.label,
                                                         (client.device,))
    stem = certificate.file_stem
    first_name = f"{stem}{FILE_KINDS[guide.first].extension}".replace(".pem", ".crt")
    formats = "".join(f'<li><a href="{esc(base_path)}/{esc(stem + FILE_KINDS[kind].extension)}">'
                      f"{esc(_(FILE_KINDS[kind].description))}</a></li>" for kind in file_kinds_for(certificate))
    qr_html = render(
        PHONE_QR, heading=_("For a phone"), qr_html=qr_svg(link),
        point_html=with_markup(_("Point the phone's camera at this code: it opens {link} there."),
                               link=link_html(link)),
        card_html=with_markup(_("{link}A printable card{link_end} with the link, this code and short steps, for a "
                                "notice board."), link=f'<a href="{esc(base_path)}/card">', link_end="</a>"),
    ) if link and client.desktop else ""
    nothing = with_markup(_("Nothing happened? Open this link in Safari: {link}"), link=copy_html(link)) if (
        link and client.device in NOTHING_HAPPENED_DEVICES and client.installs) else ""
    body = render(
        LANDING_PAGE,
        heading=_(page.title).format(name=certificate.name),
        role_for_device=_("{role} for {device}.").format(role=_(ROLE_LABELS[certificate.role]), device=_(page.label)),
        proxy_note=_(PROXY_NOTE) if client.via_proxy else "",
        not_yours=_("Not your device? Every format is listed below."),
        ends=_(ENDS_NOTE).format(date=format_time(ends)) if ends else "",
        way_out_html=render_way_out(client, link) + render_root_first(root_name, base_path),
        first_url=f"{base_path}/{stem}{FILE_KINDS[guide.first].extension}",
        first_label=_(FILE_KINDS[guide.first].button),
        nothing_html=(f'<p class="muted">{nothing}</p>' if nothing else "") + (
            render_profile_signature_note(signed) if guide.first == "mobileconfig" else ""),
        steps_html=render_guides(page.parts, certificate, first_name, f"{link}/{stem}.crt" if link else "",
                                 client.system) + render_developer_link(client, base_path),
        check=_("Check before you trust"),
        facts_html=render_fingerprints(certificate),
        compare=_("Compare these fingerprints with the ones your administrator gave you. This page comes over plain "
                  "HTTP; the fingerprint is what proves the certificate was not swapped on the way."),
        other=_("Other formats"),
        formats_html=formats,
        qr_html=qr_html,
    )
    return render_page(_(page.title).format(name=certificate.name), body,
                       home=base_path.rpartition("/c/")[0] + "/", here=base_path)


def render_developer_link(client: Client, base_path: str) -> str:
    """Return, on a desktop's page, the way to the developer page (DeveloperAnswer)."""
    if not client.desktop:
        return ""
    return f'<p>{render_developer_note(base_path)}</p>'


def render_developer_note(base_path: str) -> str:
    return with_markup(_("For Python, Node, Java, git, Docker, curl and wget, and scripts: {link}the developer "
                         "page{link_end}."), link=f'<a href="{esc(base_path)}/dev">', link_end="</a>")


def render_root_first(root_name: str | None, base_path: str) -> str:
    """Return, for an intermediate CA whose root is known, the note that sends the reader to the root's link."""
    if root_name is None:
        return ""
    note = with_markup(_("This is an intermediate CA. Install the root CA that issued it first: {link}open the link "
                         "of \u201c{root}\u201d{link_end}, then come back to this page."),
                       link=f'<a href="{esc(base_path)}/root">', link_end="</a>", root=esc(root_name))
    return f'<p class="warn">{note}</p>'


def copy_html(link: str) -> str:
    """Return *link* as plain text to select and copy: not a link, which would open in the same app again."""
    return f'<span class="copy">{esc(link)}</span>'


def render_way_out(client: Client, link: str) -> str:
    """Return what a page opened where nothing can be installed leads with: which app, how out, the link."""
    way_out = WAYS_OUT.get(client.device)
    if client.installs or way_out is None or not link:
        return ""
    which = _(way_out.named).format(app=client.app) if client.app else _(way_out.unnamed)
    return render(WAY_OUT, heading=_(way_out.heading), which=which, how=_(way_out.how), link_html=copy_html(link))


def render_guides(devices: tuple[str, ...], certificate: Certificate, first_name: str, der_url: str = "",
                  system: str = "") -> str:
    """Return the steps of each guide in *devices*, each under its label when there are more than one; where they
    hold commands, what those commands check (COMMANDS_NOTE)."""
    parts, commands = [], False
    for device in devices:
        steps = guide_steps(device, certificate, first_name, der_url, system)
        commands = commands or any(command for step in steps for _text, command in step)
        heading = f"<h2>{esc(_(DEVICE_GUIDES[device].label))}</h2>" if len(devices) > 1 else ""
        parts.append(heading + "<ol>" + "".join(f"<li>{step_html(step)}</li>" for step in steps) + "</ol>")
    if commands:
        parts.append(render_commands_note(certificate))
    return "".join(parts)


def render_commands_note(certificate: Certificate) -> str:
    note = _(COMMANDS_NOTE).format(fingerprint=colon_hex(certificate.sha256))
    return f'<p class="muted commands-note">{esc(note)}</p>'


class DeveloperTool(typing.NamedTuple):
    """One tool of the developer page: its name and what to run (N_() message ids; the text names {command})."""

    label: str
    text: str
    command: str  # made from command_values: starts with {save}, the checked download kept in DEV_DIR


#: The developer page's tools. Variables and options that replace a tool's whole store (SSL_CERT_FILE,
#: REQUESTS_CA_BUNDLE, http.sslCAInfo, curl's cacert, wget's ca_certificate) get the bundle of the system's CAs with
#: this one ({bundle}), so other sites keep working; those that add to it (NODE_EXTRA_CA_CERTS) get the CA alone.
DEVELOPER_TOOLS = (
    # curl(1) --cacert and ~/.curlrc (curl 8); wget(1) ca_certificate in ~/.wgetrc (wget 1.21)
    DeveloperTool(N_("curl and wget"),
                  N_("Both read a file in your home folder, so this works for every later call: {command}"),
                  '{save} && printf \'cacert = "%s"\\n\' {bundle} >> "$HOME/.curlrc" && '
                  'printf \'ca_certificate = %s\\n\' {bundle} >> "$HOME/.wgetrc"'),
    # docs.python.org/3/library/ssl.html (load_default_certs reads OpenSSL's SSL_CERT_FILE); requests' docs, "CA
    # Certificates": REQUESTS_CA_BUNDLE, else certifi's list (requests 2.32)
    DeveloperTool(N_("Python"),
                  N_("Python's ssl module and urllib read SSL_CERT_FILE; requests reads REQUESTS_CA_BUNDLE and "
                     "otherwise trusts certifi's list only. For this shell (add the export to ~/.profile to keep "
                     "it): {command}"),
                  "{save} && export SSL_CERT_FILE={bundle} REQUESTS_CA_BUNDLE={bundle}"),
    # nodejs.org/api/cli.html#node_extra_ca_certsfile: added to the bundled CAs, read once at start (Node 18-22)
    DeveloperTool(N_("Node.js"),
                  N_("NODE_EXTRA_CA_CERTS adds to Node's own list, so it names the CA alone. For this shell (add the "
                     "export to ~/.profile to keep it): {command}"),
                  "{save} && export NODE_EXTRA_CA_CERTS={pem}"),
    # docs.oracle.com/en/java/javase/21/docs/specs/man/keytool.html: -cacerts (JDK 9 and later), password changeit
    DeveloperTool(N_("Java"),
                  N_("Into the JDK's own cacerts store (JDK 9 and later; an administrator owns it): {command}"),
                  "{save} && sudo keytool -importcert -noprompt -cacerts -storepass changeit -alias {nickname} "
                  "-file {pem}"),
    # git-config(1) http.sslCAInfo (git 2.39-2.47): replaces the list curl would use
    DeveloperTool(N_("git"),
                  N_("For every repository of your user: {command} Git for Windows can use the Windows store "
                     "instead, once the certificate is installed there: git config --global http.sslBackend "
                     "schannel."),
                  "{save} && git config --global http.sslCAInfo {bundle}"),
    # docs.docker.com/engine/security/certificates/: /etc/docker/certs.d/<host>:<port>/ca.crt, read per pull; the
    # daemon's other connections use the system store
    DeveloperTool(N_("Docker"),
                  N_("For one registry (put its name and port first): {command} Docker's other connections use the "
                     "system's store: install the certificate there with your system's steps on the link's own "
                     "page, then restart Docker (sudo systemctl restart docker)."),
                  "reg=registry.example.com:5000 && {save} && sudo mkdir -p \"/etc/docker/certs.d/$reg\" && "
                  "sudo cp {pem} \"/etc/docker/certs.d/$reg/ca.crt\""),
)

DEVELOPER_PAGE = string.Template("""<h1>$heading</h1>
<p>$intro_html</p>
$facts_html
<p class="muted commands-note">$note</p>
$tools_html
<p class="muted">$back_html</p>
""")


def render_developer_page(certificate: Certificate, link: str) -> bytes:
    """Return the page at /c/<token>/dev: the line that makes each developer tool trust the CA, each downloading it
    from *link* and checking its fingerprint first."""
    der_url = f"{link}/{certificate.file_stem}.crt"
    values = command_values(certificate, der_url)
    tools = "".join(
        f"<section><h2>{esc(_(tool.label))}</h2><p>"
        f"{step_html(split_step(_(tool.text), {'command': command_lines(tool.command.format(**values))}, {}))}"
        "</p></section>"
        for tool in DEVELOPER_TOOLS)
    heading = _("\u201c{name}\u201d for developers and scripts").format(name=certificate.name)
    body = render(
        DEVELOPER_PAGE, heading=heading, facts_html=render_fingerprints(certificate), tools_html=tools,
        intro_html=with_markup(_("Each line saves the certificate, checked, as {pem} and a bundle of the system's "
                                 "CAs with it as {bundle}, then points one tool at them. Tools whose setting "
                                 "replaces their whole list get the bundle, so other sites keep working."),
                               pem=code_html(f"~/.local/share/certdrop/{certificate.file_stem}.pem"),
                               bundle=code_html(f"~/.local/share/certdrop/{certificate.file_stem}-bundle.pem")),
        note=_(COMMANDS_NOTE).format(fingerprint=colon_hex(certificate.sha256)),
        back_html=with_markup(_("To install the certificate for the whole system or a browser, follow the steps on "
                                "{link}."), link=link_html(link)),
    )
    path = urllib.parse.urlsplit(link).path  # the prefix, /c/ and the token, on whichever name the link is
    return render_page(heading, body, home=path.rpartition("/c/")[0] + "/", here=path + "/dev")


# Nokia pages: XHTML Mobile Profile, or the same content as a WML 1.1 deck for WAP 1.x browsers. No script, no
# style sheet, no image, short lines: they must stay small (S40 gateways) and readable 176 pixels wide.
XHTML_MP_PAGE = string.Template("""<?xml version="1.0" encoding="utf-8"?>
<!DOCTYPE html PUBLIC "-//WAPFORUM//DTD XHTML Mobile 1.0//EN" "http://www.wapforum.org/DTD/xhtml-mobile10.dtd">
<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="$lang"><head><title>$title_html</title></head><body>
$content_html
</body></html>
""")

WML_DECK = string.Template("""<?xml version="1.0" encoding="utf-8"?>
<!DOCTYPE wml PUBLIC "-//WAPFORUM//DTD WML 1.1//EN" "http://www.wapforum.org/DTD/wml_1.1.xml">
<wml xml:lang="$lang"><card id="ca" title="$title_html">
$content_html
</card></wml>
""")


NO_HASHED_NOTE = N_("No hashed certificate: this is an intermediate CA, and that format needs a self-signed root. "
                     "Use the file above.")
OLD_WAP_NOTE = N_("Old WAP phones may take only RSA CAs signed with SHA-1 or MD5: a SHA-256 or ECDSA CA may fail "
                  "there even with the right code.")
COMPARE_NOTE = N_("Compare a fingerprint with the one your administrator gave you before you trust it.")


def wml_esc(value: object) -> str:
    """Return *value* escaped for WML, where ``$`` starts a variable reference."""
    return esc(value).replace("$", "$$")


def render_nokia_page(certificate: Certificate, client: Client, base_path: str, content_type: str,
                      whc_kinds: tuple[str, str], charset: int, ends: float | None = None) -> bytes:
    """Return the small page for Nokia phones: the DER link, then (on S40) both hashed certificates with codes."""
    escape = wml_esc if content_type == MIME_WML else esc
    stem = certificate.file_stem
    # The first action comes first: at 176x220 the name and two fingerprints alone fill the first screen.
    parts = [f"<p>{escape(_(PROXY_NOTE))}</p>"] if client.via_proxy else []
    install = _("Install the certificate (.cer)")
    parts.append(f'<p>1. <a href="{escape(base_path)}/{escape(stem)}.cer">{escape(install)}'
                 "</a></p>")
    if client.device == "s40":
        parts.append(_render_hashed_links(certificate, base_path, whc_kinds, charset, escape))
    steps = "<br/>".join(escape(step_text(step)) for step in guide_steps(client.device, certificate, f"{stem}.cer"))
    parts.append(f"<p>{steps}</p>")
    parts.append(f"<p><b>{escape(certificate.name)}</b><br/>SHA-1:<br/>{_short_lines(certificate.sha1)}<br/>"
                 f"SHA-256:<br/>{_short_lines(certificate.sha256)}</p>")
    parts.append(f"<p>{escape(_(COMPARE_NOTE))}</p>")
    if ends:
        parts.append(f"<p>{escape(_(ENDS_NOTE).format(date=format_time(ends)))}</p>")
    template = WML_DECK if content_type == MIME_WML else XHTML_MP_PAGE
    return render(template, lang=current_language(), title_html=escape(_("CA certificate")),
                  content_html="\n".join(parts)).encode("utf-8")


def render_nokia_message(title: str, message: str, content_type: str) -> bytes:
    """Return a one-paragraph Nokia page (XHTML-MP or WML, as *content_type* says) with *title* and *message*."""
    escape = wml_esc if content_type == MIME_WML else esc
    template = WML_DECK if content_type == MIME_WML else XHTML_MP_PAGE
    return render(template, lang=current_language(), title_html=escape(_("CA certificate")),
                  content_html=f"<p><b>{escape(title)}</b><br/>{escape(message)}</p>").encode("utf-8")


def _short_lines(fingerprint: bytes) -> str:
    # Five bytes a line: a colon-separated fingerprint has nowhere to wrap on a 176-pixel screen.
    return "<br/>".join(colon_hex(fingerprint[index:index + 5]) for index in range(0, len(fingerprint), 5))


def _render_hashed_links(certificate: Certificate, base_path: str, whc_kinds: tuple[str, str], charset: int,
                         escape: Callable[[object], str]) -> str:
    if not certificate.self_signed:
        return f"<p>{escape(_(NO_HASHED_NOTE))}</p>"
    parts = []
    for number, kind in enumerate(whc_kinds, start=2):
        body = hashed_certificate(certificate, charset=charset, length_prefixed=kind == "whc-length")
        groups = hashed_certificate_code(body).split()
        label = _("Hashed certificate. Code:") if number == 2 else _("Hashed certificate, other layout. Code:")
        extension, install = (".whc" if number == 2 else ".alt.whc"), _("Install")
        parts.append(f"<p>{number}. {escape(label)}<br/>{' '.join(groups[:3])}<br/>{' '.join(groups[3:])}"
                     f'<br/><a href="{escape(base_path)}/{escape(certificate.file_stem)}{extension}">'
                     f"{escape(install)}</a></p>")
    parts.append(f"<p>{escape(_(OLD_WAP_NOTE))}</p>")
    return "\n".join(parts)


ERROR_PAGE = string.Template("""<h1>$title</h1>
<section class="error"><p>$message</p></section>
$extra_html
""")

#: What happened, in plain words, for each status: pages lead with this rather than the HTTP phrase.
ERROR_TITLES = {
    400: N_("That did not work"),
    401: N_("Sign in first"),
    403: N_("Not allowed from here"),
    404: N_("No such page or link"),
    405: N_("Not at this address"),
    410: N_("This link has ended"),
    413: N_("That upload is too large"),
    414: N_("That address is too long"),
    415: N_("That was not an upload"),
    422: N_("certdrop cannot use this upload"),
    429: N_("Too many tries"),
    500: N_("Something went wrong"),
    502: N_("The message was not sent"),
    503: N_("Nothing can be stored right now"),
}

#: For people who were sent a link: the upload page is not theirs to use.
ENDED_LINK_ADVICE = N_("Ask whoever sent you this link for a new one.")


###############################################################################
# HTTP plumbing ###############################################################
###############################################################################


class Request:
    """What certdrop uses of one WSGI request; the query and the body are read only by handlers that want them."""

    def __init__(self, environ: dict):
        self.environ = environ
        self.method = environ.get("REQUEST_METHOD", "GET").upper()
        self.path = environ.get("PATH_INFO", "") or "/"
        #: set when the token asked for has no link, or the client is limited for asking about too many
        self.refused_lookup = False

    @functools.cached_property
    def query(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(self.environ.get("QUERY_STRING", ""), keep_blank_values=True))

    def header(self, name: str) -> str:
        return self.environ.get(_environ_key(name), "")

    @functools.cached_property
    def language(self) -> str:
        """Return the language to answer in (reader_language)."""
        return reader_language(self.header("Accept-Language"), self.header("Cookie"))

    @property
    def user_agent(self) -> str:
        return self.header("User-Agent")

    @property
    def script_name(self) -> str:
        return self.environ.get("SCRIPT_NAME", "").rstrip("/")

    @property
    def remote_addr(self) -> str:
        return self.environ.get("REMOTE_ADDR", "")

    @property
    def forwarded(self) -> bool:
        """Return whether a proxy passed this request on, as the app saw it before any header was cleared."""
        decided = self.environ.get("certdrop.forwarded")  # by App.__call__, before any header was cleared
        return was_forwarded(self.environ) if decided is None else decided

    def read_body(self, limit: int) -> bytes:
        """Return the request body; raise PayloadTooLarge past *limit* bytes without reading it."""
        declared = self.environ.get("CONTENT_LENGTH") or ""
        if declared and not re.fullmatch(r"[0-9]{1,20}", declared):  # str.isdigit() takes "²" too
            raise BadRequest(_("The Content-Length header is not a number."))
        too_large = payload_too_large(limit)
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
            raise BadRequest(_("The request body ended before its declared length."))
        return body


def token_path(path: str) -> tuple[str, str] | None:
    """Return (the token in lower case, the rest after /c/<token>/) of a path under /c/, else None."""
    if not path.startswith("/c/"):
        return None
    token, _, rest = path[3:].partition("/")
    return token.lower(), rest


#: The longest path and query certdrop reads (414 past it, before any cache or limit sees the request), and the
#: longest request line and headers waitress takes (431 past it, from waitress itself: serve sets it).
MAX_TARGET = 8 * 1024
MAX_REQUEST_HEADERS = 32 * 1024


class RequestKey(typing.NamedTuple):
    """Every value of a request that its answer under /c/ and its access log line are made from, as the request
    sent it: the hot path's key (request_key reads it, field by field, on every request).

    The rule for this key and every key made from it (Signature, BuiltKey, RefusalKey, ErrorPage): it holds all that
    what it keeps was made from. Whatever decides or renders a kept answer reads only its key's fields (decide,
    build_answer and render_error take nothing else), so an answer cannot depend on something its key leaves out.
    Besides their keys, decide and build_answer read the settings, fixed for the app's life, and the profile signer
    read from them: whether it is valid now (decide's *signing*) is the one thing that changes, and when it does
    App.check_signer forgets everything kept (AnswerCache.clear).
    The reader's language is one of the things an answer is made from: this key holds the Accept-Language and Cookie
    headers as sent (a hot hit parses nothing), Signature and ErrorPage the language worked out from them
    (reader_language), and an Answer with words its language, in which build_answer speaks.
    A request whose key is longer than MAX_KEPT_KEY characters is answered, never kept.
    """

    path: str | None
    method: str | None
    query: str | None
    user_agent: str | None
    accept: str | None
    opera_mini_phone_ua: str | None  # the handset behind Opera Mini's proxy
    uc_browser_device_ua: str | None  # the handset behind UC Browser's proxy
    device_stock_ua: str | None  # the handset's own browser, as some proxies and browsers pass it on
    accept_language: str | None  # what Signature.language, the reader's language, is made from
    cookie: str | None  # the whole Cookie header, as sent: its certdrop_lang (the picker's choice) wins over that
    host: str | None
    server_name: str | None
    server_port: str | None
    scheme: str | None
    script_name: str | None


def request_values(environ: dict) -> tuple:
    """Return the values of a request's RequestKey fields, in RequestKey's order, as a plain tuple: the hot path's
    lookup key. A RequestKey equals, and hashes as, the plain tuple of its values, so the RequestKeys kept in the
    answer cache are found by it; making the RequestKey as well costs a second tuple, which the hot path skips.
    Spelt out, field by field, since it runs on every request."""
    get = environ.get
    return (get("PATH_INFO"), get("REQUEST_METHOD"), get("QUERY_STRING"), get("HTTP_USER_AGENT"), get("HTTP_ACCEPT"),
            get("HTTP_X_OPERAMINI_PHONE_UA"), get("HTTP_X_UCBROWSER_DEVICE_UA"), get("HTTP_DEVICE_STOCK_UA"),
            get("HTTP_ACCEPT_LANGUAGE"), get("HTTP_COOKIE"), get("HTTP_HOST"), get("SERVER_NAME"), get("SERVER_PORT"),
            get("wsgi.url_scheme"), get("SCRIPT_NAME"))


def request_key(environ: dict) -> RequestKey:
    """Return the RequestKey of a request."""
    return _new_tuple(RequestKey, request_values(environ))


_new_tuple = tuple.__new__  # RequestKey from a tuple of its values, without the Python frame of RequestKey(...)


#: Keys longer than this (all their fields, in characters) are never kept: a client chooses them.
MAX_KEPT_KEY = 4096


def key_length(key: RequestKey) -> int:
    """Return how many characters *key*'s fields hold together."""
    return sum(len(value) for value in key if value)


class Signature(typing.NamedTuple):
    """What a request under /c/<token> is decided by, whatever the token: its RequestKey without the path and the
    method, with the path after /c/<token>/, and what is worked out once from the key's fields.

    Two requests with one signature get the same answer for any token (see decide).
    """

    rest: str  # the path after /c/<token>/: "", "card", "dev", "qr.svg", a file name
    query: str
    user_agent: str
    accept: str
    opera_mini_phone_ua: str
    uc_browser_device_ua: str
    device_stock_ua: str
    host: str  # the Host header as sent; links use it only when host_accepted
    server_name: str
    server_port: str
    scheme: str
    script_name: str
    host_accepted: bool  # whether host names this server (App.is_our_name)
    language: str  # the reader's language, from the key's accept_language and cookie (reader_language)

    @classmethod
    def of(cls, key: RequestKey, rest: str, host_accepted: bool) -> "Signature":
        return cls(rest, key.query or "", key.user_agent or "", key.accept or "", key.opera_mini_phone_ua or "",
                   key.uc_browser_device_ua or "", key.device_stock_ua or "", key.host or "", key.server_name or "",
                   key.server_port or "", key.scheme or "http", key.script_name or "", host_accepted,
                   reader_language(key.accept_language or "", key.cookie or ""))


#: The cookie that holds the language chosen on a page's picker (App.choose_language): it wins over Accept-Language.
LANGUAGE_COOKIE = "certdrop_lang"
LANGUAGE_COOKIE_RE = re.compile(rf"(?:^|[;,])\s*{LANGUAGE_COOKIE}=\"?([A-Za-z]{{2}})\"?\s*(?:[;,]|$)")

#: The part of an Accept-Language header read (a real one is some 50 characters), and of its ranges.
MAX_ACCEPT_LANGUAGE, MAX_LANGUAGE_RANGES = 512, 32
LANGUAGE_RANGE_RE = re.compile(r"\s*([A-Za-z]{1,8})(?:-[A-Za-z0-9]{1,8})*\s*|\s*\*\s*")
QUALITY_RE = re.compile(r"\s*q\s*=\s*(0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)\s*", re.IGNORECASE)


def reader_language(accept_language: str, cookie: str = "") -> str:
    """Return the language to answer in: the one the picker's cookie names, else the best the Accept-Language
    header accepts (RFC 9110 12.5.4: the highest q, the first of equals; "de-AT" finds "de"; q=0 rules one out),
    else English. Only languages whose catalogs read count; any header at all gives an answer."""
    return negotiate_language(accept_language, cookie, frozenset(CATALOGS))


@kept_for_short_arguments(1024)
def negotiate_language(accept_language: str, cookie: str, spoken: frozenset[str]) -> str:
    """Return reader_language's answer with the languages *spoken*."""
    chosen = LANGUAGE_COOKIE_RE.search(cookie[:MAX_TARGET]) if LANGUAGE_COOKIE in cookie else None
    if chosen and chosen[1].lower() in spoken:
        return chosen[1].lower()
    best, best_quality = "en", 0.0
    for item in accept_language[:MAX_ACCEPT_LANGUAGE].split(",")[:MAX_LANGUAGE_RANGES]:
        language_range, _, parameter = item.partition(";")
        matched = LANGUAGE_RANGE_RE.fullmatch(language_range)
        quality = QUALITY_RE.fullmatch(parameter) if parameter else None
        if not matched or (parameter and not quality):
            continue  # garbage: skipped, the rest still counts
        weight = float(quality[1]) if quality else 1.0
        language = (matched[1] or "en").lower()  # "*": any language, so the code's own
        if language in spoken and weight > best_quality:
            best, best_quality = language, weight
    return best


def was_forwarded(environ: dict) -> bool:
    """Return whether a proxy says it passed this request on (X-Forwarded-*, Forwarded, X-Real-IP)."""
    return any(key.startswith("HTTP_X_FORWARDED_") or key in ("HTTP_FORWARDED", "HTTP_X_REAL_IP") for key in environ)


#: A path prefix a proxy may forward: segments of URL-safe characters, short enough to leave room in a QR code.
PREFIX_RE = re.compile(r"(/[A-Za-z0-9._~-]+)+")
MAX_PREFIX = 256


@functools.cache
def _environ_key(header_name: str) -> str:
    return "HTTP_" + header_name.upper().replace("-", "_")


def payload_too_large(limit: int) -> "PayloadTooLarge":
    return PayloadTooLarge(_("The upload is larger than the limit of {size}. A CA certificate is a few kilobytes: "
                             "check that you chose the right file.").format(size=format_size(limit)))


@dataclasses.dataclass(frozen=True)
class Response:
    """What to send: status, body and headers. :func:`prepare` turns it into what start_response takes."""

    body: bytes
    status: int = 200
    content_type: str = MIME_HTML
    headers: tuple[tuple[str, str], ...] = ()


class Prepared:
    """A response as start_response and the server take it, checked once: kept and served again as it is.

    A class with slots, as HotAnswer is: serve reads its fields on every request.
    """

    __slots__ = ("code", "status", "headers", "body", "etag", "not_modified")

    def __init__(self, code: int, status: str, headers: list[tuple[str, str]], body: list[bytes], etag: str = "",
                 not_modified: list[tuple[str, str]] | None = None):
        self.code = code
        self.status = status  # the status line, "200 OK"
        self.headers = headers
        self.body = body  # the WSGI body: one string of bytes
        self.etag = etag  # for answers of an entry, which If-None-Match may name
        self.not_modified = not_modified  # the headers of the 304 that answers a matching If-None-Match


def referrer_policy(path: str) -> str:
    """Return the Referrer-Policy for an answer at *path*.

    An address that holds a token must never travel on as a Referer. Elsewhere (the upload, result and sign-in
    pages) "same-origin" keeps addresses at home yet lets their forms send a real Origin: under "no-referrer",
    browsers send "Origin: null" on a form post, which the cross-site check must refuse.
    """
    return "no-referrer" if path.startswith("/c/") else "same-origin"


def prepare(response: Response, referrer: str = "no-referrer") -> Prepared:
    """Return *response* ready for start_response: its header list built and checked for control characters."""
    headers = [("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", referrer), *response.headers]
    if response.status not in (204, 304):  # they carry no body, so no entity headers either (RFC 9110)
        headers[:0] = [("Content-Type", response.content_type), ("Content-Length", str(len(response.body)))]
    for name, value in headers:
        if "\r" in value or "\n" in value or "\0" in value:
            raise ValueError(f"control character in header {name}")
    # in the order waitress writes them (it capitalises each word of a name, "ETag" as "Etag", which moves none of
    # certdrop's, and sorts by name, keeping the order of headers of one name), so that its sort of every answer
    # finds them sorted but for the Date and Server it appends: the least work it can do (task.py
    # build_response_header, waitress 3.0)
    headers.sort(key=operator.itemgetter(0))
    return Prepared(response.status, STATUS_LINES[response.status], headers, [response.body])


def prepare_answer(response: Response) -> Prepared:
    """Return an entry's answer prepared to be kept: with an ETag from its body, and its 304 built too."""
    if response.status != 200:
        return prepare(response)
    etag = f'"{hashlib.sha256(response.body).hexdigest()[:24]}"'
    tagged = prepare(dataclasses.replace(response, headers=response.headers + (("ETag", etag),)))
    vary = next((value for name, value in response.headers if name == "Vary"), VARY)
    not_modified = prepare(Response(b"", 304, "", (("ETag", etag), ("Vary", vary),
                                                   ("Cache-Control", "private, no-transform"))))
    return Prepared(tagged.code, tagged.status, tagged.headers, tagged.body, etag, not_modified.headers)


def serve(prepared: Prepared, environ: dict, start_response: Callable) -> tuple[int, list[bytes]]:
    """Start the WSGI response; return its status and body (304 for a matching If-None-Match, empty for HEAD).

    The one function that talks to start_response, with App.serve_hot's copy of what it does for a GET without an
    If-None-Match.
    """
    if_none_match = environ.get("HTTP_IF_NONE_MATCH")
    if if_none_match and prepared.etag and etag_matches(if_none_match, prepared.etag):
        start_response(STATUS_LINES[304], prepared.not_modified)
        return 304, [b""]
    start_response(prepared.status, prepared.headers)
    return prepared.code, [b""] if environ.get("REQUEST_METHOD") == "HEAD" else prepared.body


def etag_matches(if_none_match: str, etag: str) -> bool:
    """Return whether an If-None-Match header names *etag* (weak or strong) or is ``*``."""
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


def client_of(request: Request) -> Client:
    """Return who is asking, from the User-Agent and any handset UA a proxy browser passed on."""
    handset = next((request.header(name) for name in HANDSET_HEADERS if request.header(name)), "")
    proxied = bool(request.header("X-OperaMini-Phone-UA") or request.header("X-UCBrowser-Device-UA"))
    return identify(request.user_agent, handset, proxied)


def response_format(request: Request) -> str:
    """Return "json", "text", "nokia" (XHTML-MP or WML) or "html": what this client wants for errors."""
    return answer_format(request.header("Accept"), request.user_agent, client_of(request))


@kept_for_short_arguments(1024)
def answer_format(accept: str, user_agent: str, client: Client) -> str:
    """Return the format of answers for these headers (see response_format); each combination is worked out once."""
    html = accept_quality(accept, "text/html", wildcards=False)
    if accept_quality(accept, "application/json", wildcards=False) > html:
        return "json"
    if TEXT_AGENT_RE.search(user_agent) or accept_quality(accept, "text/plain", wildcards=False) > html:
        return "text"
    if client.device in ("s60", "s40"):
        return "nokia"
    return "html"


class ErrorPage(typing.NamedTuple):
    """Everything an error answer is made of (render_error reads nothing else): the key it is kept by."""

    status: int
    code: str
    message: str
    headers: tuple[tuple[str, str], ...]
    format: str  # "json", "text", "nokia" or "html" (response_format)
    content_type: str  # of a Nokia page (nokia_page_type); "" for the rest
    under_c: bool  # asked for a link: the page tells device users to ask whoever sent it
    home: str  # the upload page's address
    language: str = "en"
    admin: bool = False  # asked on the administrator's pages: the way back (and after signing in) is /admin

    @classmethod
    def of(cls, request: Request, error: HTTPError, home: str) -> "ErrorPage":
        fmt = response_format(request)
        content_type = nokia_page_type(request.header("Accept")) if fmt == "nokia" else ""
        return cls(error.status, error.code, error.message, error.headers, fmt, content_type,
                   request.path.startswith("/c/"), home, request.language,
                   request.path == "/admin" or request.path.startswith("/admin/"))


def render_error(page: ErrorPage, extra_html: str = "") -> Response:
    """Return the answer for an error: a page, a Nokia page, a line of text or JSON, as *page* says, in its language.

    *extra_html* (a refused upload's form) goes on HTML pages outside /c/; answers with it are never kept.
    """
    with speaking(page.language):
        return render_error_words(page, extra_html)


def render_error_words(page: ErrorPage, extra_html: str) -> Response:
    title = _(ERROR_TITLES[page.status]) if page.status in ERROR_TITLES else HTTPStatus(page.status).phrase
    headers = (("Vary", VARY), ("Cache-Control", "no-store"), ("Content-Language", page.language), *page.headers)
    if page.status == 401:  # scripts answer a Basic challenge; browsers get the sign-in form instead of a dialog
        headers += (("WWW-Authenticate", 'Basic realm="certdrop uploads", charset="UTF-8"' if page.format != "html"
                     else 'Form realm="certdrop uploads"'),)
    if page.format == "nokia":  # a mistyped token on a WAP phone must still get a page that phone can show
        message = f"{page.message} {_(ENDED_LINK_ADVICE)}" if page.under_c else page.message
        return Response(render_nokia_message(title, message, page.content_type), page.status, page.content_type,
                        headers + page_headers(page.content_type))
    if page.format == "json":
        body = json.dumps({"version": JSON_VERSION, "error": {"status": page.status, "code": page.code,
                                                              "message": page.message}}).encode()
        return Response(body, page.status, MIME_JSON, headers)
    if page.format == "text":
        line = f"{title}: {page.message} [{page.code}] ({page.status} {HTTPStatus(page.status).phrase})"
        return Response(f"{term(line)}\n".encode(), page.status, MIME_TEXT, headers)
    if page.status == 401:
        return Response(render_signin(page.home, page.message, next_page="admin" if page.admin else ""), 401,
                        MIME_HTML, headers + HTML_HEADERS)
    if page.under_c:
        extra_html = f"<p>{esc(_(ENDED_LINK_ADVICE))}</p>"
    elif page.admin:
        extra_html = extra_html or f'<p><a href="{esc(page.home)}admin">{esc(_("Back to all links"))}</a></p>'
    else:
        back = _("Back to the upload page")
        extra_html = extra_html or f'<p><a href="{esc(page.home)}">{esc(back)}</a></p>'
    body = render_page(title, render(ERROR_PAGE, title=title, message=page.message, extra_html=extra_html),
                       home=page.home)
    return Response(body, page.status, MIME_HTML, headers + HTML_HEADERS)


def answer_for(request: Request, status: int, data: dict, text: str, page: Callable[[], bytes],
               headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """Return a handler's answer in the format the client wants (response_format): *data* as versioned JSON, *text*
    (already safe for a terminal) for scripts, or the HTML *page*, made only when it is wanted. Never kept."""
    headers = (("Cache-Control", "no-store"), *headers)
    fmt = response_format(request)
    if fmt == "json":
        body = json.dumps({"version": JSON_VERSION, **data}, indent=1).encode("utf-8") + b"\n"
        return Response(body, status, MIME_JSON, headers)
    if fmt == "text":
        return Response(text.encode("utf-8"), status, MIME_TEXT, headers)
    return Response(page(), status, MIME_HTML, HTML_HEADERS + headers)


def format_size(size: int) -> str:
    return f"{size // (1024 * 1024)} MiB" if size % (1024 * 1024) == 0 else f"{size // 1024} KiB"


#: The upload's fields: a file or pasted text, and the options.
FORM_FIELDS = ("cert", "pem", "ttl", "host", "force", "refused")

#: The options of an upload, which may come in its address too (with_query_options).
UPLOAD_OPTIONS = ("ttl", "host", "force")

#: Types of a request body that is the certificate file itself (curl --data-binary, PowerShell -InFile); the
#: options then come in the query string.
RAW_UPLOAD_TYPES = ("application/pkix-cert", "application/x-x509-ca-cert", "application/x-x509-user-cert",
                    "application/pkcs7-mime", "application/x-pkcs7-certificates", "application/pkcs12",
                    "application/x-pkcs12", "application/x-pem-file", "text/plain", "application/octet-stream", "")


def parse_form(request: Request, limit: int, fields: tuple[str, ...] = FORM_FIELDS) -> dict[str, bytes]:
    """Return the upload's fields as bytes: from a form (multipart or urlencoded), or a body that is the file.

    wget --post-file and PowerShell send a file as application/x-www-form-urlencoded: a body with none of the
    form's fields is taken as the file itself. Raise an HTTPError for anything else.
    """
    content_type = request.environ.get("CONTENT_TYPE", "")
    body = request.read_body(limit)
    mime, _semicolon, params = content_type.partition(";")
    mime = mime.strip().lower()
    if mime == "multipart/form-data":
        return _parse_multipart(body, params, limit)
    takes_a_file = "cert" in fields
    if not takes_a_file and not body and not mime:  # a form posted empty: no field at all
        return {}
    if mime == "application/x-www-form-urlencoded":
        # Latin-1 both ways maps each byte to one character and back: a value comes out as the bytes it was sent
        # as (a key typed with é, €, Cyrillic), as multipart's raw parts do, whatever their encoding
        pairs = urllib.parse.parse_qsl(body.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
        if not takes_a_file or any(name in fields for name, _ in pairs):
            return {name: value.encode("latin-1") for name, value in pairs}
    elif not takes_a_file:
        raise UnsupportedMediaType(_("certdrop cannot read a {type} body here: send form fields "
                                     "(application/x-www-form-urlencoded or multipart/form-data), as curl -d "
                                     "ttl=30d does.").format(type=mime[:60]))
    elif mime not in RAW_UPLOAD_TYPES:
        raise UnsupportedMediaType(_("certdrop cannot read a {type} body. Send the certificate file itself "
                                     "(application/pkix-cert, application/octet-stream, text/plain, ...) or the "
                                     "upload form (multipart/form-data).").format(type=mime[:60]))
    return {"cert": body}  # the options are in the query string: with_query_options


def _parse_multipart(body: bytes, params: str, limit: int) -> dict[str, bytes]:
    boundary = multipart.parse_options_header("multipart/form-data;" + params)[1].get("boundary")
    if not boundary:
        raise BadRequest(_("The form data has no boundary."))
    # Limits as large as the body itself keep every part in memory: uploads never touch the disk.
    parser = multipart.MultipartParser(io.BytesIO(body), boundary, len(body), part_limit=16,
                                       spool_limit=limit + 1, memory_limit=limit + 1, disk_limit=0)
    fields = {}
    try:
        for part in parser:
            fields.setdefault(part.name, part.raw)
    except multipart.MultipartError as error:
        raise BadRequest(_("The form data could not be read: {error}.").format(error=error)) from None
    return fields


@functools.lru_cache(maxsize=4096)
def parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Return the client address in REMOTE_ADDR (an IPv4-mapped IPv6 address as IPv4), or None if it is none."""
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    return getattr(address, "ipv4_mapped", None) or address


@functools.lru_cache(maxsize=4096)
def client_key(text: str) -> str:
    """Return who a rate limit counts: the IPv4 address, or the /64 of an IPv6 one (one household or host)."""
    address = parse_address(text)
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address) if address else text


class RateLimiter:
    """Per-client token buckets: *per_minute* requests a minute, at most *burst* at once; 0 turns it off.

    Checking a client that is not limited costs one dict truthiness test while nobody is, and one lookup of the
    client while somebody is, so the check can sit on the hot path. The table holds at most MAX_CLIENTS clients
    (about 200 bytes each): past it, full buckets are forgotten first, then those counted longest ago, but never a
    client that is being limited; when every one is, newcomers share one bucket.
    """

    MAX_CLIENTS = 16384
    #: Who newcomers are counted as while the table is full of limited clients.
    OVERFLOW = "newcomers while the table is full"

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = per_minute / 60
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when counted)
        #: client -> when its next token is there; empty while nobody is limited, which the hot path checks alone
        self.blocked: dict[str, float] = {}
        self._room_at = -math.inf  # a full table of limited clients has no room before this
        self._lock = threading.Lock()

    def retry_after(self, address: str) -> float:
        """Return the seconds *address* must wait before its next request counts, 0 if it may go ahead."""
        if not self.blocked:
            return 0.0
        key = client_key(address)
        until = self.blocked.get(key)
        if until is None:
            return 0.0
        wait = until - self.clock()
        if wait <= 0:
            self.blocked.pop(key, None)
            return 0.0
        return wait

    def spend(self, address: str) -> float:
        """Count one request of *address*; return 0 if it is within the limit, else the seconds to wait."""
        if not self.rate:
            return 0.0
        key, now = client_key(address), self.clock()
        with self._lock:
            if key not in self._buckets and len(self._buckets) >= self.MAX_CLIENTS:
                if now >= self._room_at:
                    self._make_room(now)
                if len(self._buckets) >= self.MAX_CLIENTS:  # every one limited: look again when the first is free
                    key = self.OVERFLOW
                    self._room_at = min(self.blocked.values(), default=now)
            tokens, then = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            if tokens < 1:
                return (1 - tokens) / self.rate
            tokens -= 1
            self._buckets[key] = (tokens, now)
            if tokens < 1:
                self.blocked[key] = now + (1 - tokens) / self.rate
        return 0.0

    def _make_room(self, now: float) -> None:
        """Forget clients whose buckets are full again, then, if that is not a quarter of the table, those counted
        longest ago; never one that is limited (in blocked)."""
        for key, until in list(self.blocked.items()):
            if until <= now:
                self.blocked.pop(key, None)
        refilled = self.burst / self.rate
        for key, (_, then) in list(self._buckets.items()):
            if now - then >= refilled and key not in self.blocked:
                del self._buckets[key]
        if len(self._buckets) > self.MAX_CLIENTS * 3 // 4:
            idle = sorted((then, key) for key, (_, then) in self._buckets.items() if key not in self.blocked)
            for _, key in idle[:len(self._buckets) - self.MAX_CLIENTS * 3 // 4]:
                del self._buckets[key]


def mail_client(address: str) -> str:
    """Return who the mail limits count for a client address: every loopback address (127.0.0.1, 127.9.9.9, ::1)
    is this one machine, not a crowd of clients each with a budget of its own."""
    parsed = parse_address(address)
    return "127.0.0.1" if parsed is not None and parsed.is_loopback else address


def address_in(text: str, networks: tuple) -> bool:
    address = parse_address(text)
    return address is not None and any(address in network for network in networks)


def origin_of(url: str) -> str:
    """Return the origin of *url* as browsers send it: scheme://host[:port], default ports left out."""
    try:
        parts = urllib.parse.urlsplit(url.strip().lower())
        port = parts.port
    except ValueError:  # a "[" alone, brackets around no IPv6 address, a port past 65535: no origin at all
        return ""
    default = {"http": 80, "https": 443}.get(parts.scheme)
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


def basic_password(request: Request) -> str | None:
    """Return the password of an HTTP Basic Authorization header (the user name is not checked), else None."""
    scheme, _, encoded = request.header("Authorization").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        return base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")[2]
    except ValueError:  # not base64 (binascii.Error), not ASCII to begin with, or not UTF-8 once decoded
        return ""


def cookie_value(request: Request, name: str) -> str | None:
    for pair in request.header("Cookie").split(";"):
        key, _, value = pair.strip().partition("=")
        if key == name:
            return value.strip()
    return None


def send_mail(config: Config, recipients: list[str], subject: str, text: str) -> list[str]:
    """Send a plain-text message through the [mail] SMTP server; return the recipients it took (the others it
    refused); raise MailError saying why it did not go."""
    message = email.message.EmailMessage()
    sender = config.mail_sender or f"certdrop@{machine_fqdn() or socket.gethostname() or 'localhost'}"
    message["From"], message["To"], message["Subject"] = sender, ", ".join(recipients), subject
    message["Date"] = email.utils.formatdate()
    message["Message-ID"] = email.utils.make_msgid(domain=sender.rpartition("@")[2])
    message.set_content(text)
    port = config.mail_port or {"none": 25, "starttls": 587, "tls": 465}[config.mail_security]
    try:
        context = ssl.create_default_context(cafile=config.mail_cafile or None)
    except (OSError, ssl.SSLError) as error:  # [mail] cafile is not there, or holds no certificate
        raise MailError(mail_failure(OSError(f"{config.mail_cafile}: {error.strerror or error}"), config.mail_host,
                                     port)) from None
    try:
        if config.mail_security == "tls":
            smtp = smtplib.SMTP_SSL(config.mail_host, port, timeout=config.mail_timeout, context=context)
        else:
            smtp = smtplib.SMTP(config.mail_host, port, timeout=config.mail_timeout)
        with smtp:
            if config.mail_security == "starttls":
                smtp.starttls(context=context)
            if config.mail_user:
                smtp.login(config.mail_user, config.mail_password)
            refused = smtp.send_message(message)
    except (smtplib.SMTPException, OSError, ValueError) as error:
        raise MailError(mail_failure(error, config.mail_host, port)) from None
    return [recipient for recipient in recipients if recipient not in refused]


def mail_failure(error: Exception, host: str, port: int) -> str:
    """Return in plain words why the SMTP exchange with *host*:*port* failed."""
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        codes = {code for code, _ in error.recipients.values()}
        return _("The mail server at {host} refused the addresses ({codes}).").format(
            host=host, codes=", ".join(map(str, sorted(codes))))
    if isinstance(error, smtplib.SMTPResponseException):
        reply = error.smtp_error.decode("utf-8", "replace") if isinstance(error.smtp_error, bytes) else error.smtp_error
        return _("The mail server at {host} answered {code} {reply}.").format(host=host, code=error.smtp_code,
                                                                             reply=reply[:200])
    if isinstance(error, TimeoutError) or "timed out" in str(error):  # smtplib may wrap the timeout
        return _("The mail server at {host}:{port} did not answer in time.").format(host=host, port=port)
    if isinstance(error, ConnectionRefusedError):
        return _("Nothing answers at {host}:{port}: is the mail server running, and is the port right?").format(
            host=host, port=port)
    if isinstance(error, ssl.SSLError):
        return _("The TLS connection to {host}:{port} failed ({reason}).").format(host=host, port=port,
                                                                                 reason=error.reason or error)
    return _("The mail server at {host}:{port} could not be used ({error}).").format(host=host, port=port, error=error)


class AccessLog:
    """One line per request, formatted and written by a background thread in batches.

    A request queues the facts of its line as one tuple, with the deque's own append (thread-safe, no lock, it wakes
    nobody); the writer turns each batch into lines. Formatting the line in the request thread cost more than all
    the rest of the hot path, and waking a writer for each request would cost more than the request itself. Line:
    time, client address, method, path and query (percent-encoded, so it is one safe terminal line), status, bytes,
    device class, duration.
    """

    #: The writer looks every INTERVAL seconds and writes once BATCH lines wait or the oldest has waited MAX_WAIT
    #: seconds: a batch costs about as much as fifty lines, so a quiet server writes a line within a second and a
    #: busy one within a tenth, in batches of hundreds. At most MAX_PENDING lines (about 200 bytes each) wait.
    INTERVAL, BATCH, MAX_WAIT, MAX_PENDING = 0.1, 256, 1.0, 32768

    def __init__(self, stream: typing.TextIO | None = None):
        self.stream = stream  # None: standard error as it is when the line is written
        #: at most MAX_PENDING lines wait: past that (a standard error that blocks), the oldest are dropped
        self._pending: deque = deque(maxlen=self.MAX_PENDING)
        #: Queue one request: (time.perf_counter() when it began, when it ended, client address, access_tail).
        self.record = self._pending.append
        self._writer: threading.Thread | None = None
        self._lock = threading.Lock()

    def request(self, environ: dict, status: int, size: int, device: str, started: float) -> None:
        """Queue the line of a request that began at *started* (time.perf_counter()) and has been answered."""
        get = environ.get
        tail = access_tail(get("REQUEST_METHOD", ""), get("SCRIPT_NAME", ""), get("PATH_INFO", ""),
                           get("QUERY_STRING", ""), status, size, device)
        self.record((started, time.perf_counter(), get("REMOTE_ADDR", ""), tail))

    def start(self) -> None:
        """Start the thread that writes the queued lines, unless it runs already; what waits at exit is written."""
        with self._lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_forever, name="certdrop-access-log", daemon=True)
                self._writer.start()
                atexit.register(self.flush, 1.0)  # a writer stuck on a standard error must not hold up the exit

    def flush(self, wait: float = -1) -> None:
        """Write every line recorded so far, now; or nothing if the writer is still busy writing after *wait*
        seconds (-1: wait however long it takes)."""
        if not self._lock.acquire(timeout=wait):
            return
        try:
            batch = [self._pending.popleft() for _ in range(len(self._pending))]
            if not batch:
                return
            try:
                text = access_lines(batch)
            except Exception:  # a line that cannot be written must not stop the lines after it
                log.exception("could not write %d access log lines", len(batch))
                return
            stream = self.stream or sys.stderr
            with contextlib.suppress(OSError, ValueError):  # a closed or full stderr must not stop the server
                stream.write(text)
                stream.flush()
        finally:
            self._lock.release()

    def _write_forever(self) -> None:
        while True:
            time.sleep(self.INTERVAL)
            with self._lock:  # only flush pops, under this lock: the oldest line is there while this holds it
                pending = self._pending
                oldest = pending[0][0] if pending else math.inf  # when its request began (time.perf_counter())
                due = len(pending) >= self.BATCH or time.perf_counter() - oldest >= self.MAX_WAIT
            if due:
                self.flush()


def access_lines(batch: list[tuple]) -> str:
    """Return the log lines of the requests that AccessLog.record queued.

    Runs once for every request the server answers, so it does per line only what differs from the line before:
    the time stamp and the address are formatted again only when they change, and durations come ready-made.
    """
    wall = time.time() - time.perf_counter()  # read now: the wall clock may have been set since the last batch
    parts: list[str] = []
    add = parts.extend  # each line as three parts, joined once at the end: no string made per line
    start = end = -math.inf  # the second of the stamp, on perf_counter's clock: [start, end)
    address = head = None
    for started, ended, client, tail in batch:
        if not start <= started < end:
            second = int(started + wall)
            start, end, stamp, address = second - wall, second + 1 - wall, log_time(second), None
        if client != address:
            address, head = client, f"{stamp} {log_address(client[:64])} "
        tenths = int((ended - started) * 10000 + 0.5)
        add((head, tail, DURATIONS[tenths] if tenths < DURATION_COUNT else f" {tenths / 10}ms\n"))
    return "".join(parts)


#: " 0.0ms\n" to " 99.9ms\n": how every line ends for almost every request, written without formatting a float.
DURATIONS = tuple(f" {tenths // 10}.{tenths % 10}ms\n" for tenths in range(1000))
DURATION_COUNT = len(DURATIONS)


@functools.lru_cache(maxsize=1024)
def log_address(address: str) -> str:
    return term(address or "-")[:64]


def access_tail(method: str, script_name: str, path: str, query: str, status: int, size: int, device: str) -> str:
    """Return the access log line after the client's address: method, path and query, status, bytes, device.

    Safe for a terminal: the path and query are percent-encoded where they are not plain URL characters. Kept for
    short paths, so that a client asking again costs no formatting (and long paths cost no memory).
    """
    key = (method, script_name, path, query, status, size, device)
    tail = ACCESS_TAILS.get(key)
    if tail is None:
        target = script_name.rstrip("/") + path
        # WSGI gives the request's bytes as Latin-1 characters: encoded back so, the log names the bytes sent. The
        # path comes decoded (a "%" in it was sent as %25); the query comes as sent, its escapes left as they are
        if not URL_SAFE_RE.fullmatch(target):
            target = urllib.parse.quote(target, safe=URL_SAFE, encoding="latin-1")
        if query:
            target += "?" + (query if URL_SAFE_RE.fullmatch(query)
                             else urllib.parse.quote(query, safe=URL_SAFE + "?%", encoding="latin-1"))
        tail = f"{term(method)[:16]} {target[:2048]} {status} {size} {device}"
        if len(target) <= 512:
            ACCESS_TAILS.put(key, tail, len(target) + len(tail) + KEY_OVERHEAD)
    return tail


#: Recent access_tail answers, by what they are made of, and how many are kept.
ACCESS_TAILS = BoundedMap(2 * 1024 * 1024)


@functools.lru_cache(maxsize=4)
def log_time(second: int) -> str:
    return datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


#: Characters an access log line keeps as they are in a path; the rest are percent-encoded.
URL_SAFE = "/:@!$&'()*+,;=-._~"
URL_SAFE_RE = re.compile(r"[A-Za-z0-9/:@!$&'()*+,;=._~=-]*")

#: The access log of every app that make_app builds without one of its own.
ACCESS_LOG = AccessLog()


###############################################################################
# Answers under /c/ ###########################################################
###############################################################################
# What a request for a link gets: decided from its Signature alone (decide), whatever the token, and built from the
# entry and that decision alone (build_answer). Both are pure, so what they make may be kept by those keys.


class FileAnswer(typing.NamedTuple):
    kind: str  # "der", "pem", "mobileconfig", "whc" or "whc-alt"
    name: str  # the file name; one that starts with "." follows the certificate's own name (its file stem)
    inline: bool  # False: sent with Content-Disposition: attachment
    der_instead: bool = False  # an intermediate CA, which has no hashed certificate, sends its DER instead
    language: str = ""  # the language of a profile's description, which iOS shows; "" for the other files
    signed: bool = False  # a profile signed by the administrator's signer (ProfileSigner), while it is valid


class PageAnswer(typing.NamedTuple):
    client: Client
    content_type: str  # HTML for browsers; XHTML-MP, WML or text/html for Nokia pages
    prefix: str  # the path every address on the page starts with
    base: str = ""  # the address the link the page shows (as text, and on desktops as a QR code) is made from
    language: str = "en"  # the language of the page's words
    signed: bool = False  # the page's profile is signed: Apple pages say what "Verified" means


class QrAnswer(typing.NamedTuple):
    kind: str  # "svg" or "png"
    base: str  # the address the link is made from


class CardAnswer(typing.NamedTuple):
    base: str
    language: str = "en"


class DeveloperAnswer(typing.NamedTuple):
    """The developer page (render_developer_page). Its third field keeps it from equalling a CardAnswer of the same
    base and language: answers are kept by value (BuiltKey)."""

    base: str
    language: str = "en"
    page: str = "dev"


class RedirectAnswer(typing.NamedTuple):
    name: str  # as FileAnswer.name
    base: str


Answer = FileAnswer | PageAnswer | RedirectAnswer | QrAnswer | CardAnswer | DeveloperAnswer


class Decision(typing.NamedTuple):
    """What a request under /c/<token> gets, whatever the token: kept by the request's Signature."""

    answer: Answer
    device: str  # for the access log: the device class, or "-"


#: Devices whose page is seen on a screen a phone can be pointed at: their pages show the link as a QR code.
DESKTOP_DEVICES = ("windows", "macos", "linux", "firefox", "chromeos", "other")

#: ``?format=`` values that name a file, and the extension of its file name.
PUBLIC_FORMATS = {"der": ".crt", "pem": ".pem", "mobileconfig": ".mobileconfig",
                  "mobileconfig-unsigned": ".unsigned.mobileconfig", "whc": ".whc", "whc-alt": ".alt.whc"}

#: File name endings under /c/<token>/, longest first.
FILE_SUFFIXES = ((".alt.whc", "whc-alt"), (".whc", "whc"), (".unsigned.mobileconfig", "mobileconfig-unsigned"),
                 (".mobileconfig", "mobileconfig"), (".pem", "pem"),
                 (".cer", "der"), (".crt", "der"), (".der", "der"))


def decide(signature: Signature, config: Config, signing: bool = False) -> Decision:
    """Return what a request with *signature* gets for any live token: the page or file its device installs (or
    the format ``?format=`` names), the file its name asks for, the card, or the QR code. Profiles are signed when
    *signing*: the settings name a signer and it is valid now (App.check_signer keeps what this decided only while
    that holds)."""
    rest = signature.rest
    if rest in ("qr.svg", "qr.png"):
        return Decision(QrAnswer(rest[3:], link_base(signature, config)), "-")
    if rest == "card":
        return Decision(CardAnswer(link_base(signature, config), signature.language), "-")
    if rest == "dev":
        return Decision(DeveloperAnswer(link_base(signature, config), signature.language), "-")
    client = client_of_signature(signature)
    if rest:
        kind = next(kind for suffix, kind in FILE_SUFFIXES if rest.lower().endswith(suffix))
        return Decision(file_answer(kind, rest, client, config, signature.language, signing), client.device)
    chosen = dict(urllib.parse.parse_qsl(signature.query, keep_blank_values=True)).get("format")
    if chosen is None:
        return Decision(default_answer(signature, client, config, signing), client.device)
    if chosen == "page":
        return Decision(page_answer(signature, client, config, signing), client.device)
    if chosen not in PUBLIC_FORMATS:
        raise BadRequest(_("Unknown format {format}: choose der, pem, mobileconfig, mobileconfig-unsigned, whc, "
                           "whc-alt or page.").format(format=repr(chosen[:40])))
    return Decision(file_answer(chosen, PUBLIC_FORMATS[chosen], client, config, signature.language, signing),
                    client.device)


def client_of_signature(signature: Signature) -> Client:
    """Return who is asking, from the User-Agent and any handset UA a proxy browser passed on."""
    handset = signature.opera_mini_phone_ua or signature.uc_browser_device_ua or signature.device_stock_ua
    proxied = bool(signature.opera_mini_phone_ua or signature.uc_browser_device_ua)
    return identify(signature.user_agent, handset, proxied)


def default_answer(signature: Signature, client: Client, config: Config, signing: bool = False) -> Answer:
    """Return what /c/<token> sends *client* when it does not choose a format."""
    if client.device == "s60" and not client.via_proxy and config.s60_delivery != "page":
        if config.s60_delivery == "redirect":  # a saved file keeps an extension the installer knows
            return RedirectAnswer(".cer", link_base(signature, config))
        return FileAnswer("der", ".cer", inline=not config.s60_attachment)
    if client.device == "s40" and not client.via_proxy and config.s40_delivery != "page":
        kind = config.s40_delivery
        return FileAnswer(kind, ".cer" if kind == "der" else PUBLIC_FORMATS[kind], inline=True, der_instead=True)
    if client.device in ("s60", "s40"):
        return page_answer(signature, client, config)
    if accepts_only_certificates(signature.accept) or TEXT_AGENT_RE.search(signature.user_agent):
        return FileAnswer("der", ".crt", inline=False)
    return page_answer(signature, client, config, signing)


def page_answer(signature: Signature, client: Client, config: Config, signing: bool = False) -> PageAnswer:
    """Return the page for *client*: a small one for Nokia phones; desktops also show the link as a QR code."""
    prefix = link_prefix(signature, config)
    if client.device in ("s60", "s40"):
        return PageAnswer(client, nokia_page_type(signature.accept), prefix, language=signature.language)
    return PageAnswer(client, MIME_HTML, prefix, link_base(signature, config), signature.language, signing)


def file_answer(kind: str, name: str, client: Client, config: Config, language: str,
                signing: bool = False) -> FileAnswer:
    """Return the answer for file *kind* ("der", "pem", "mobileconfig", "mobileconfig-unsigned", "whc" or "whc-alt")
    named *name*; a profile says what it installs in the reader's *language*, and is signed when *signing*."""
    if kind == "der":
        # Nokia installers and Firefox's trust dialog take the body only without an attachment header.
        inline = client.device in ("s40", "firefox") or (client.device == "s60" and not config.s60_attachment)
        return FileAnswer("der", name, inline)
    if kind == "pem":  # update-ca-certificates reads only PEM files named .crt
        return FileAnswer("pem", re.sub(r"(?i)\.pem$", ".crt", name), inline=False)
    if kind in ("mobileconfig", "mobileconfig-unsigned"):
        return FileAnswer("mobileconfig", name, inline=False, language=language,
                          signed=signing and kind == "mobileconfig")
    return FileAnswer(kind, name, inline=True)


def link_base(signature: Signature, config: Config) -> str:
    """Return the URL links start with: ``public_url``, else made from the Host when it names this server
    (host_accepted), else from the server's own name and port.

    Outside /c/ any other Host was refused (400). Under /c/ a link someone was handed must open whatever a proxy,
    a CNAME or a phone's gateway made of the header, so there the server's own name stands in for it.
    """
    if config.public_url:
        return config.public_url
    given = split_host(signature.host) if signature.host and signature.host_accepted else None
    host, port = given or server_host(signature.server_name, signature.server_port)
    if (signature.scheme, port) in (("http", ":80"), ("https", ":443")):
        port = ""
    return f"{signature.scheme}://{host.lower()}{port}{signature.script_name.rstrip('/')}"


def link_prefix(signature: Signature, config: Config) -> str:
    """Return the path every address certdrop writes starts with: public_url's, else SCRIPT_NAME."""
    if config.public_url:
        return urllib.parse.urlsplit(config.public_url).path.rstrip("/")
    return signature.script_name.rstrip("/")


def whc_default(config: Config) -> tuple[str, int]:
    """Return the default hashed-certificate layout and its charset, for the Series 40 code in e-mails."""
    return whc_kinds(config)[0], config.whc_charset


def whc_kinds(config: Config) -> tuple[str, str]:
    """Return the hashed-certificate layouts as (default, other)."""
    direct = config.whc_layout == "der-direct"
    return ("whc-direct", "whc-length") if direct else ("whc-length", "whc-direct")


def build_answer(entry: Entry, answer: Answer, config: Config, signer: "ProfileSigner | None" = None) -> Response:
    """Return *answer* for *entry*, made from the two alone (and the settings, and the signer read from them), in
    the answer's own language: a page, a card and a profile say what they say in it. A file or QR code has none:
    one answer for every language, whose Vary leaves the language's headers out."""
    language = getattr(answer, "language", "")
    if not language:  # a file or a QR code: no words
        return build_words(entry, answer, config, signer, ())
    with speaking(language):
        return build_words(entry, answer, config, signer, (("Content-Language", language),))


def build_words(entry: Entry, answer: Answer, config: Config, signer: "ProfileSigner | None",
                language_headers: tuple[tuple[str, str], ...]) -> Response:
    certificate = entry.certificate
    headers = (("Cache-Control", "private, no-transform"), ("Vary", VARY if language_headers else FILE_VARY),
               *language_headers)
    if isinstance(answer, FileAnswer):
        chain = entry.chain_certificates if answer.kind == "mobileconfig" else (certificate,)
        return build_file(certificate, chain, answer, headers, config, signer)
    if isinstance(answer, PageAnswer) and answer.client.device in ("s60", "s40"):
        body = render_nokia_page(certificate, answer.client, f"{answer.prefix}/c/{entry.token}",
                                 answer.content_type, whc_kinds(config), config.whc_charset, entry.expires)
        return Response(body, 200, answer.content_type, headers + page_headers(answer.content_type))
    # the rest name the link itself, on the address the request came by
    link = offer_link(install_url(answer.base, entry.token), config.host, bool(config.public_url)).url \
        if answer.base else ""
    if isinstance(answer, RedirectAnswer):
        location = f"{answer.base}/c/{entry.token}/{file_name(certificate, answer.name)}"
        return Response(b"", 302, MIME_TEXT, (("Location", location), *headers))
    if isinstance(answer, PageAnswer):
        root = recorded_root(entry)
        return Response(render_landing(certificate, answer.client, f"{answer.prefix}/c/{entry.token}", link,
                                       entry.expires, answer.signed, root.name if root else None),
                        200, MIME_HTML, headers + HTML_HEADERS)
    if isinstance(answer, DeveloperAnswer):
        return Response(render_developer_page(certificate, link), 200, MIME_HTML, headers + HTML_HEADERS)
    if isinstance(answer, CardAnswer):
        return Response(render_card(certificate, link, entry.expires, config.contact,
                                    home=urllib.parse.urlsplit(answer.base).path + "/"), 200, MIME_HTML,
                        headers + HTML_HEADERS)
    content_type = "image/svg+xml" if answer.kind == "svg" else "image/png"
    return Response(qr_file(link, answer.kind), 200, content_type,
                    headers + (("Content-Security-Policy", "default-src 'none'"),))


def build_file(certificate: Certificate, chain: tuple[Certificate, ...], answer: FileAnswer, headers: tuple,
               config: Config, signer: "ProfileSigner | None" = None) -> Response:
    """Return file *answer* for *certificate*; a profile installs the whole *chain* it belongs to."""
    kind, name = answer.kind, answer.name
    if kind in ("whc", "whc-alt") and not certificate.self_signed:
        if not answer.der_instead:
            raise NotFound(_("There is no hashed certificate for an intermediate CA: the WAP format needs a "
                             "self-signed root. Use the .cer file instead."))
        kind, name = "der", ".cer"
    layout = whc_kinds(config)[kind == "whc-alt"] if kind in ("whc", "whc-alt") else kind
    if kind == "mobileconfig":
        body, content_type = apple_profile(*chain, language=answer.language, signed=answer.signed), MIME_PROFILE
        if answer.signed and signer is not None:
            body = signer.sign(body)
    else:
        body, content_type = file_body(certificate, layout, config.whc_charset)
    if not answer.inline:
        headers += (("Content-Disposition", f'attachment; filename="{file_name(certificate, name)}"'),)
    return Response(body, 200, content_type, headers)


def recorded_root(entry: Entry) -> Certificate | None:
    """Return the root CA of an intermediate's recorded chain (Entry.chain), if the upload held one."""
    if entry.der is None or entry.certificate.self_signed or not entry.chain:
        return None
    top = entry.chain_certificates[0]
    return top if top.self_signed else None


def file_name(certificate: Certificate, name: str) -> str:
    """Return the file name an answer names: *name*, or, for an extension alone, the certificate's own name with it."""
    return f"{certificate.file_stem}{name}" if name.startswith(".") else name


###############################################################################
# Answer cache ################################################################
###############################################################################
# Everything certdrop keeps across requests to answer them again without deciding, building or rendering has one
# owner, the AnswerCache: named keys (RequestKey and the keys made from it, whose rule RequestKey states), and one
# byte budget, answer_cache_size, shared out among its parts. Other things kept across requests have bounds of
# their own, listed in README's "Memory" table: the store's entries (cache_size), the rate limiters' tables, the
# access log's queue, the sign-outs.


class HotAnswer:
    """An answer the hot path serves as it is, kept by RequestKey while the app's clock reads in [since, until).

    *until* is when the entry ends or, sooner, when the store is due to look at its file again (a revocation by
    another process); a clock set back before *since* makes it look again too.
    A class with slots, not a NamedTuple: serve_hot reads its fields on every request, and Python 3.11 reads a slot
    in about half the time it takes to read a NamedTuple's field (a descriptor call). The status, headers, body and
    code of *prepared*, and the log tail of its status, are copied into its own slots, so that serving a GET (every
    hot answer is one) reads this object and no other.
    """

    __slots__ = ("status", "headers", "body", "code", "tail", "prepared", "tail_304", "token", "since", "until",
                 "memory", "tally", "spends")

    def __init__(self, prepared: Prepared, tail: str, tail_304: str = "", token: str = "", since: float = -math.inf,
                 until: float = math.inf, memory: "CachedEntry | NoEntry | None" = None,
                 tally: Callable[[], int] | None = None, spends: bool = False):
        self.status, self.headers, self.body, self.code = prepared.status, prepared.headers, prepared.body, prepared.code
        #: the access log line after the client's address (see access_tail), of this answer and of its 304
        self.tail, self.tail_304 = tail, tail_304
        self.prepared = prepared  # what serve answers an If-None-Match from (its ETag and its 304)
        self.token = token  # whose answer this is; "" for a refusal
        self.since, self.until = since, until
        #: where the store holds the entry: each hit marks it asked for again, as Store.fresh would (see Store._evict)
        self.memory = memory
        #: counts a download of this answer (DownloadCounts.bump_for); None: not counted (a refusal, a preview fetcher)
        self.tally = tally
        #: an unknown token's 404 while the lookup limit is on: each hit spends one lookup, as the full way does
        self.spends = spends


class NoEntry:
    """What a hot answer without an entry (an unknown token's 404) marks as asked for again: nothing reads it."""

    __slots__ = ("asked_again",)


#: The one NoEntry: serve_hot marks every hot answer's memory, whether it has an entry or not.
NO_ENTRY = NoEntry()


class BuiltKey(typing.NamedTuple):
    """An answer built for one entry (build_answer reads the entry and the answer, nothing else)."""

    token: str
    answer: Answer


class RefusalKey(typing.NamedTuple):
    """The 404 of an unknown token or the 429 of a limited client, the same for every token of a signature."""

    signature: Signature
    status: int
    seconds: int  # the Retry-After of a 429; 0 for a 404


class HotRefusalKey(typing.NamedTuple):
    """The same refusal, found by request key without making a signature."""

    key: RequestKey
    status: int
    seconds: int


def hot_tail(key: RequestKey, prepared: Prepared | None, device: str) -> str:
    """Return the access log tail of a GET with request key *key* answered with *prepared* (None: a 304)."""
    code, size = (prepared.code, len(prepared.body[0])) if prepared else (304, 0)
    return access_tail("GET", key.script_name or "", key.path or "", key.query or "", code, size, device)


#: Bytes the parts of a kept item take beyond what their keys' and bodies' lengths count, measured with
#: tracemalloc: a RequestKey and its HotAnswer, a Signature and its Decision, a key of an error page.
HOT_OVERHEAD, DECISION_OVERHEAD, KEY_OVERHEAD = 2000, 1500, 600

#: Answers kept per token: devices need about a dozen; the rest are file names clients made up.
MAX_ANSWERS_PER_TOKEN = 32


class AnswerCache:
    """What certdrop keeps to answer requests again without deciding, building or rendering (see the section).

    Its parts, each a BoundedMap with a share of *max_bytes*:
    - hot: RequestKey -> HotAnswer, a live token's answer found by one lookup (App.serve_hot);
    - unknown: RequestKey -> HotAnswer, an unknown token's 404, found by the next lookup; apart from hot, so that
      clients asking for tokens that do not exist cannot push live tokens' answers out;
    - decisions: Signature -> Decision, what a request gets whatever the token (decide);
    - built: BuiltKey -> Prepared, an answer built for one entry (build_answer);
    - refusals: RefusalKey -> Prepared and HotRefusalKey -> HotAnswer, the 404s and 429s of the lookup limit;
    - errors: ErrorPage -> Prepared, every other error answer (render_error).
    Forgetting one token (the store read, replaced or dropped its entry) forgets its hot, unknown and built answers
    only.
    """

    SHARES = {"hot": 0.2, "unknown": 0.05, "decisions": 0.1, "built": 0.45, "refusals": 0.1, "errors": 0.1}

    def __init__(self, max_bytes: int):
        self.hot, self.unknown, self.decisions, self.built, self.refusals, self.errors = (
            BoundedMap(int(max_bytes * share)) for share in self.SHARES.values())
        self._keys_of: dict[str, set] = {}  # token -> its keys in hot, unknown and built
        self._lock = threading.Lock()
        #: counts forget() calls: an answer found before one is not kept after it (see keep_hot)
        self.generation = 0

    def decision(self, signature: Signature, config: Config, signing: bool = False,
                 generation: int | None = None) -> Decision:
        """Return what requests with *signature* get: decided once, then kept until clear() (*signing* changed);
        not kept if the cache was cleared since *generation* was read, before *signing* was."""
        decision = self.decisions.get(signature)
        if decision is None:
            decision = decide(signature, config, signing)
            if signature_length(signature) <= MAX_KEPT_KEY:
                with self._lock:
                    if generation is None or generation == self.generation:
                        self.decisions.put(signature, decision, signature_length(signature) + DECISION_OVERHEAD)
        return decision

    def answer(self, entry: Entry, answer: Answer, config: Config, signer: "ProfileSigner | None" = None,
               generation: int | None = None) -> Prepared:
        """Return *answer* for *entry*: built once, then kept while the entry is; not kept if a token was forgotten
        since *generation* was read, before *entry* was (the entry may have been replaced meanwhile)."""
        key = BuiltKey(entry.token, answer)
        prepared = self.built.get(key)
        if prepared is None:
            prepared = prepare_answer(build_answer(entry, answer, config, signer))
            self._keep(entry.token, self.built, key, prepared, len(prepared.body[0]) + ANSWER_OVERHEAD, generation)
        return prepared

    def keep_hot(self, key: RequestKey, hot: HotAnswer, generation: int) -> None:
        """Keep *hot* by *key*, unless a token was forgotten since *generation* was read (its entry may be gone or,
        for an unknown token's 404, be there now)."""
        if key_length(key) <= MAX_KEPT_KEY:
            part = self.unknown if hot.memory is NO_ENTRY else self.hot
            self._keep(hot.token, part, key, hot, key_length(key) + HOT_OVERHEAD, generation)

    def _keep(self, token: str, part: BoundedMap, key: typing.Hashable, value: object, size: int,
              generation: int | None = None) -> None:
        with self._lock:
            keys = self._keys_of.get(token, set())
            built = sum(isinstance(kept, BuiltKey) for kept in keys) if part is self.built else 0
            if size > part.max_bytes or built >= MAX_ANSWERS_PER_TOKEN or generation not in (None, self.generation):
                return
            self._keys_of[token] = keys
            keys.add(key)
            for old_key, old_value in part.put(key, value, size):
                old_token = old_key.token if isinstance(old_key, BuiltKey) else old_value.token
                old_keys = self._keys_of.get(old_token, set())
                old_keys.discard(old_key)
                if not old_keys:
                    self._keys_of.pop(old_token, None)

    def forget(self, token: str) -> None:
        """Forget every answer kept for *token*: its entry was replaced or dropped."""
        with self._lock:
            self.generation += 1
            for key in self._keys_of.pop(token, ()):
                self.hot.pop(key)
                self.unknown.pop(key)
                self.built.pop(key)

    def clear(self) -> None:
        """Forget every decision and every answer: what they were made from changed for all (the signer's
        validity began or ended)."""
        with self._lock:
            self.generation += 1
            for part in self.parts():
                part.clear()
            self._keys_of.clear()

    def refusal(self, key: RequestKey, signature: Callable[[], Signature], status: int,
                seconds: int) -> HotAnswer | None:
        """Return the 404 or 429 (with *seconds* to wait) the full way gave a request like this, if it gave one;
        *signature* makes the request's signature, needed only the first time a request key is refused."""
        hot_key = _new_tuple(HotRefusalKey, (key, status, seconds))  # as request_key makes its key: no frame
        hot = self.refusals.get(hot_key)
        if hot is None:
            prepared = self.refusals.get(RefusalKey(signature(), status, seconds))
            if prepared is None:
                return None
            hot = HotAnswer(prepared, hot_tail(key, prepared, "-"))  # no ETag, so never a 304
            if key_length(key) <= MAX_KEPT_KEY:
                self.refusals.put(hot_key, hot, key_length(key) + HOT_OVERHEAD)
        return hot

    def keep_refusal(self, signature: Signature, status: int, seconds: int, prepared: Prepared) -> None:
        if signature_length(signature) <= MAX_KEPT_KEY:
            self.refusals.put(RefusalKey(signature, status, seconds), prepared,
                              signature_length(signature) + KEY_OVERHEAD)

    def error(self, page: "ErrorPage", referrer: str) -> Prepared:
        """Return the answer for error *page*: rendered once, then kept."""
        prepared = self.errors.get(page)
        if prepared is None:
            prepared = prepare(render_error(page), referrer)
            self.errors.put(page, prepared, len(prepared.body[0]) + len(page.message) + ANSWER_OVERHEAD)
        return prepared

    def parts(self) -> tuple[BoundedMap, ...]:
        return self.hot, self.unknown, self.decisions, self.built, self.refusals, self.errors

    def __len__(self) -> int:
        return sum(map(len, self.parts()))

    @property
    def bytes(self) -> int:
        return sum(part.bytes for part in self.parts())


def signature_length(signature: Signature) -> int:
    """Return how many characters *signature*'s text fields hold together."""
    return sum(len(value) for value in signature if isinstance(value, str))


###############################################################################
# Download counts #############################################################
###############################################################################
# How often each link was downloaded, per device class: counted in memory by the hot path with one atomic call,
# and added in the background to a file of this process's own under data_dir/counts, never to the entry files,
# so that processes sharing the directory add up instead of overwriting each other. No client address or
# User-Agent is kept: a count is a link, a device class, a number and about when the last one was.

#: Where the per-process count files live, under data_dir; one "<host>-<pid>.json" per server process.
COUNTS_DIRECTORY = "counts"
COUNTS_FORMAT = 1

#: The (link, device class) pairs counted since the last write that memory keeps. Each takes 252 bytes (a key
#: tuple, its Tally with its itertools.count, the dict's slot: tracemalloc over 16,384 of them), 310 with its
#: token's text once the store has let the entry go: 1.2 MiB in all. Past it a new pair is not counted until a
#: write drops the pairs that went quiet: a bound, not a limit that a real server meets (4,096 links and device
#: classes fetched within one count_interval).
MAX_TALLIES = 4096

#: Link-preview fetchers: chat and social apps fetch a pasted link to draw a preview card, which is no download
#: by a person. Matched in lower case anywhere in the User-Agent; these are the robots' own tokens, not the in-app
#: browsers of the same apps (Telegram-Android/, LinkedInApp, FBAN/), whose users do download.
LINK_PREVIEW_MARKERS = (
    "slackbot",  # "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)", api.slack.com/robots
    "slack-imgproxy",  # Slack's image proxy, same page
    "facebookexternalhit",  # Facebook, Messenger and iMessage previews; developers.facebook.com/docs/sharing/webmasters/web-crawlers
    "facebot",  # the same page
    "whatsapp/",  # "WhatsApp/2.23.20.0 A": WhatsApp's preview fetch (the app opens links in the system browser)
    "telegrambot",  # "TelegramBot (like TwitterBot)", core.telegram.org/bots/webapps (link previews)
    "twitterbot",  # X cards, developer.x.com/en/docs/x-for-websites/cards/guides/troubleshooting-cards
    "discordbot",  # "Mozilla/5.0 (compatible; Discordbot/2.0; +https://discordapp.com)"
    "linkedinbot",  # "LinkedInBot/1.0 (compatible; Mozilla/5.0; Apache-HttpClient +http://www.linkedin.com)"
    "skypeuripreview",  # Skype and old Teams: "... SkypeUriPreview Preview/0.5"
    "microsoftpreview",  # Teams and Outlook: "Mozilla/5.0 ... MicrosoftPreview/2.0 +https://aka.ms/MicrosoftPreview"
    "mattermost-bot",  # Mattermost's link previews: "Mattermost-Bot/1.1 +https://mattermost.com"
    "redditbot",  # "Mozilla/5.0 (compatible; redditbot/1.0; +http://www.reddit.com/feedback)"
    "pinterestbot",  # Pinterest's crawler, help.pinterest.com (Pinterestbot)
    "embedly",  # "Embedly/0.2 (+http://support.embed.ly/)", used by many apps for cards
    "iframely",  # "Iframely/1.3.1 (+https://iframely.com/docs/about)"
    "vkshare",  # VK: "Mozilla/5.0 (compatible; vkShare; +http://vk.com/dev/Share)"
    "viber",  # Viber's preview fetch sends "Viber" (the app itself opens links in the system browser)
    "google-pagerenderer",  # Google's link previews (Chat, Docs): developers.google.com/search/docs/crawling-indexing/google-special-case-crawlers
)
# Sources checked 2026-12: the vendors' pages named above; webmasterid.com and darkvisitors.com list the same tokens.


@kept_for_short_arguments(1024)
def is_link_preview(user_agent: str) -> bool:
    """Return whether *user_agent* is a chat or social app fetching a link to draw its preview."""
    agent = user_agent.lower()
    return any(marker in agent for marker in LINK_PREVIEW_MARKERS)


class Tally:
    """One (link, device class)'s downloads since the last write: bump() is itertools.count's __next__, one call
    that no thread can interleave with another's, so the hot path counts without a lock."""

    __slots__ = ("bump", "_next", "quiet")

    def __init__(self):
        self.bump = itertools.count().__next__
        self._next = 0  # what bump() would return had nobody bumped since the last take
        self.quiet = 0  # writes in a row that found nothing new

    def take(self) -> int:
        """Return the downloads since the last take; only the writer (DownloadCounts.write) takes."""
        value = self.bump()
        taken, self._next = value - self._next, value + 1
        return taken


def counts_host() -> str:
    """Return this machine's name as count files carry it."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", socket.gethostname())[:64] or "host"


def counts_file_name() -> str:
    """Return this process's count file name: this machine's name and the process id, which no other process
    sharing the directory has at the same time."""
    return f"{counts_host()}-{os.getpid()}.json"


#: Where the counts of this machine's stopped processes are kept together: "<host>-stopped.json".
STOPPED_COUNTS = "stopped"

#: How often a process's own count file is cleared of the links whose entry file is gone: a stat() a link.
COUNTS_PRUNE_SECONDS = 3600


def prune_counts(counts: "Counts", has_entry: Callable[[str], bool]) -> int:
    """Drop from *counts* the links with no entry file left (the sweep deleted their tombstone); return how many.
    Their downloads can no longer be shown anywhere, and count files would otherwise grow forever."""
    gone = [token for token in counts if not has_entry(token)]
    for token in gone:
        del counts[token]
    return len(gone)


def fold_stopped_counts(store: "Store") -> int:
    """Add the count files of this machine's processes that have stopped into one, "<host>-stopped.json", and
    remove them; return how many. serve does this at start, so that restarts do not pile up files; links whose
    entry file is gone leave that file then (prune_counts).

    Crash-safe: the folded file names what it took in, with each file's signature; a file it names that is still
    there as it was (a crash between the write and the removal) is removed without being added again, and one of
    the same name written since (a later process with the same id) is not. Only this machine's processes are looked at,
    and only on POSIX, where signal 0 asks whether a process is alive (on Windows, os.kill ends it).
    """
    if os.name != "posix":
        return 0
    directory = store.directory / COUNTS_DIRECTORY
    host = counts_host()
    archive = directory / f"{host}-{STOPPED_COUNTS}.json"
    with store._exclusive():
        try:
            record = json.loads(read_regular_file(archive, MAX_COUNTS_BYTES)[0])
            folded_before = [(item[0], tuple(item[1:])) for item in record.get("folded", [])
                             if isinstance(item, list) and item and isinstance(item[0], str)]
        except (OSError, ValueError, AttributeError):
            folded_before = []
        for name, signature in folded_before:  # taken in already: a crash came before their removal
            path = directory / Path(name).name
            if _file_signature(path) == signature:
                path.unlink(missing_ok=True)
        stopped = []
        for path in count_files(store.directory):
            match = re.fullmatch(rf"{re.escape(host)}-([0-9]{{1,10}})\.json", path.name)
            if match and int(match[1]) != os.getpid() and not is_running(int(match[1])):
                stopped.append(path)
        total = read_counts_file(archive) or {}
        pruned = prune_counts(total, store.has_entry_file)
        if not stopped and not pruned:
            return 0
        for path in stopped:
            add_counts(total, read_counts_file(path) or {})
        prune_counts(total, store.has_entry_file)
        folded = [[path.name, *_file_signature(path)] for path in stopped]
        text = json.dumps({"format": COUNTS_FORMAT, "folded": folded, "counts": {
            token: {device: list(pair) for device, pair in devices.items()} for token, devices in total.items()}},
            separators=(",", ":"))
        _write_atomically(archive, text.encode("ascii") + b"\n", owner=store._owner)
        for path in stopped:
            path.unlink(missing_ok=True)
    return len(stopped)


def is_running(pid: int) -> bool:
    """Return whether process *pid* exists on this machine (POSIX: signal 0 checks, sends nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or a number no process has: left alone
    return True


class DownloadCounts:
    """The one owner of the download counts in memory (at most MAX_TALLIES pairs) and of this process's count file.

    Downloads are counted per (token, device class) as they happen; write() adds them to the file every
    count_interval, and at shutdown. A pair quiet for two writes leaves memory; it is read once more at the next
    write, since a kept hot answer may still bump it meanwhile (a hot answer lives at most REVALIDATE_SECONDS).
    """

    def __init__(self, directory: Path, clock: Callable[[], float] = time.time,
                 owner: Callable[[], tuple[int, int] | None] = lambda: None,
                 has_entry: Callable[[str], bool] | None = None):
        self.path = Path(directory) / COUNTS_DIRECTORY / counts_file_name()
        self.clock = clock
        self.owner = owner
        self.has_entry = has_entry  # Store.has_entry_file: links without one leave the file (None: never)
        self._pruned = time.monotonic()  # the last prune_counts of this file
        self._tallies: dict[tuple[str, str], Tally] = {}
        self._retired: list[tuple[tuple[str, str], Tally]] = []
        self._unwritten: dict[tuple[str, str], int] = {}  # taken, but the write failed: for the next write
        self._lock = threading.Lock()  # new pairs; the writer takes it to take and drop
        self._writing = threading.Lock()  # the background writer and the one at shutdown
        self._full_warned = False
        #: called once, by the first download counted: App.start_background (None: nothing to call)
        self.first_count: Callable[[], None] | None = None

    def bump_for(self, token: str, device: str, user_agent: str | None) -> Callable[[], int] | None:
        """Return what counts one download of *token* by *device* (None: not counted: an answer made for no device,
        the card or a QR code, which are the administrator's; a link-preview fetcher; or memory full until the next
        write). Called once per answer kept, and by the full way per request."""
        if device == "-" or is_link_preview(user_agent or ""):
            return None
        key = (token, device)
        tally = self._tallies.get(key)
        if tally is None:
            with self._lock:
                tally = self._tallies.get(key)
                if tally is None:
                    if len(self._tallies) >= MAX_TALLIES:
                        if not self._full_warned:
                            self._full_warned = True
                            log.warning("download counts: %d links and device classes counted since the last write; "
                                        "more are not counted until the next", MAX_TALLIES)
                        return None
                    tally = self._tallies[key] = Tally()
            first, self.first_count = self.first_count, None  # a new pair, never a request's work on the hot path
            if first is not None:
                first()
        return tally.bump

    def taken(self) -> dict[tuple[str, str], int]:
        """Return the downloads of each pair since the last call, dropping pairs that went quiet."""
        counted, self._unwritten = self._unwritten, {}
        with self._lock:
            for key, tally in self._retired:
                counted[key] = counted.get(key, 0) + tally.take()
            self._retired = []
            for key, tally in list(self._tallies.items()):
                taken = tally.take()
                counted[key] = counted.get(key, 0) + taken
                tally.quiet = 0 if taken else tally.quiet + 1
                if tally.quiet >= 2:
                    del self._tallies[key]
                    self._retired.append((key, tally))
            self._full_warned = False
        return {key: value for key, value in counted.items() if value}

    def write(self) -> int:
        """Add the downloads since the last write to this process's file (atomically); return how many."""
        with self._writing:
            counted = self.taken()
            prune = self.has_entry is not None and time.monotonic() - self._pruned >= COUNTS_PRUNE_SECONDS
            if not counted and not prune:
                return 0
            now = self.clock()
            counts = read_counts_file(self.path) or {}
            for (token, device), value in counted.items():
                count, _last = counts.setdefault(token, {}).get(device, (0, 0.0))
                counts[token][device] = (count + value, now)
            if prune:
                self._pruned = time.monotonic()
                if not prune_counts(counts, self.has_entry) and not counted:
                    return 0
            record = {"format": COUNTS_FORMAT, "counts": {token: {device: list(pair) for device, pair in devices.items()}
                                                          for token, devices in counts.items()}}
            try:
                _write_atomically(self.path, json.dumps(record, separators=(",", ":")).encode("ascii") + b"\n",
                                  owner=self.owner())
            except OSError as error:
                log.error("download counts not written to %s: %s", self.path, error.strerror or error)
                self._unwritten = counted  # at most MAX_TALLIES pairs, written with the next
                return 0
            return sum(counted.values())


#: token -> device class -> (downloads, Unix time of about the last one)
Counts = dict[str, dict[str, tuple[int, float]]]


def read_counts_file(path: Path) -> Counts | None:
    """Return the counts in one count file; None (and a warning) if it is unreadable or damaged."""
    try:
        data = read_regular_file(path, MAX_COUNTS_BYTES)[0]
        if len(data) > MAX_COUNTS_BYTES:
            raise ValueError(f"longer than {MAX_COUNTS_BYTES:,} bytes")
        record = json.loads(data)
        if not isinstance(record, dict) or record.get("format") != COUNTS_FORMAT or not isinstance(
                record.get("counts"), dict):
            raise ValueError("not a count file of this format")
        counts: Counts = {}
        for token, devices in record["counts"].items():
            if not isinstance(devices, dict):
                raise ValueError("damaged counts")
            for device, pair in devices.items():
                if not (isinstance(pair, list) and len(pair) == 2 and type(pair[0]) is int and pair[0] >= 0):
                    raise ValueError("damaged counts")
                counts.setdefault(token, {})[device] = (pair[0], _stored_time(pair[1]))
        return counts
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, RecursionError) as error:
        log.warning("count file %s is damaged and is left out: %s", path, f"{error}"[:200])
        return None


def add_counts(total: Counts, more: Counts) -> None:
    """Add *more* into *total*: downloads add up, the last download is the later one."""
    for token, devices in more.items():
        into = total.setdefault(token, {})
        for device, (count, last) in devices.items():
            before, seen = into.get(device, (0, 0.0))
            into[device] = (before + count, max(seen, last))


def count_files(directory: Path) -> list[Path]:
    """Return every process's count file under *directory* (the data directory)."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        return sorted(path for path in (Path(directory) / COUNTS_DIRECTORY).iterdir()
                      if path.name.endswith(".json") and not path.name.startswith("."))
    return []


def read_counts(directory: Path) -> Counts:
    """Return the downloads of every process that shared the data directory *directory*, added up."""
    total: Counts = {}
    for path in count_files(directory):
        add_counts(total, read_counts_file(path) or {})
    return total


def write_counts_forever(counts: DownloadCounts, interval: float, stop: threading.Event,
                         index: "AdminIndex | None" = None, fold: "Store | None" = None) -> None:
    """Write the download counts every *interval* seconds until *stop* is set (serve writes once more after), and
    drop the administrator's index when unused; first fold the counts of stopped processes of *fold*'s."""
    if fold is not None:
        try:
            folded = fold_stopped_counts(fold)
            if folded:
                log.info("added the download counts of %d stopped processes together", folded)
        except Exception:
            log.exception("could not add the download counts of stopped processes together")
    while not stop.wait(interval):
        try:
            counts.write()
            if index is not None:
                index.forget_if_idle()
        except Exception:  # a bug: this thread is the only writer the counts have
            log.exception("writing the download counts failed; trying again in %s seconds", interval)


###############################################################################
# Who may change what is stored ###############################################
###############################################################################

#: The browser's sign-in: an HttpOnly cookie holding an expiry and its HMAC under the upload key, so every server
#: process checks it without shared state, and a new key signs everybody out.
SESSION_COOKIE = "certdrop_session"
SESSION_SECONDS = 12 * 3600

#: A session cookie's value: when it ends, its random id, and their HMAC under the upload key (session_value).
SESSION_RE = re.compile(r"([0-9]{1,12})\.([0-9a-f]{32})\.[0-9a-f]{64}")

#: The largest "e-mail this link" form: addresses and tokens.
MAIL_FORM_BYTES = 16384

#: Who the mail budget counts: the whole server.
MAIL_BUDGET_KEY = "every client"

#: Wrong upload keys a minute per client, and how many at once, before 429.
SIGN_IN_FAILURES_PER_MINUTE, SIGN_IN_FAILURE_BURST = 5, 5

#: Bursts allowed by the unknown-token and upload limits.
LOOKUP_BURST, UPLOAD_BURST = 10, 5

#: Paths that answer under any Host: links printed on cards and QR codes may name the server by a CNAME (and
#: HTTP/1.0 phones send no Host), and monitors probe health by whatever name they know.
LENIENT_PATHS = ("/c/", "/healthz")

#: Pages with a form: they depend on the visitor's sign-in, so no cache keeps them.
FORM_PAGE_HEADERS = HTML_HEADERS + (("Cache-Control", "no-store"),)

CROSS_SITE_CODE = "cross-site"
CROSS_SITE_MESSAGE = N_("This request came from another web site, so it was refused: only certdrop's own pages may "
                        "upload or sign in. Open certdrop's address yourself and try again.")


class UploadGate:
    """Who may change what is stored: the Host rule, the network rule, the loopback exemption, the upload key
    (HTTP Basic, or a browser's session signed with it) and the cross-site rule. Uploads, mail, sign-in and
    sign-out ask it; so will the administrator's actions."""

    def __init__(self, config: Config, store: Store, clock: Callable[[], float]):
        self.config = config
        self.store = store
        self.clock = clock
        self.public_host = (urllib.parse.urlsplit(config.public_url).hostname or "").rstrip(".")
        self.sign_in_failures = RateLimiter(SIGN_IN_FAILURES_PER_MINUTE, SIGN_IN_FAILURE_BURST, clock)
        self.signed_out = SignOuts(store)

    def check_host(self, request: Request) -> None:
        """Refuse (400) a request that names another server than this one (see is_our_host)."""
        if self.is_our_host(request):
            return
        if host_of(request.header("Host")) is None:
            raise BadRequest(_("The Host header is not a valid host name."), code="bad-host")
        raise BadRequest(_("This server does not answer to the name \u201c{host}\u201d, so the request was refused. "
                           "Open certdrop by its own address; its administrator can add other names to allowed_hosts "
                           "in certdrop.ini.").format(host=request.header("Host")[:100]), code="foreign-host")

    def is_our_host(self, request: Request) -> bool:
        """Return whether the request names this server: public_url's host, a name in allowed_hosts, or this machine.

        A page a browser fetched under another name (DNS rebinding: evil.example resolving to 127.0.0.1) would
        otherwise be this server's page to that site's scripts. Behind the trusted proxy with public_url set, only
        public_url's host counts: Apache and nginx pass the client's own Host on.
        """
        if self.public_host and request.environ.get("certdrop.via_proxy"):
            return host_of(request.header("Host")) == self.public_host
        return self.is_our_name(request.header("Host"))

    def is_our_name(self, host_header: str | None) -> bool:
        """Return whether a Host header names this server (see is_our_host). No Host at all (HTTP/1.0) names no
        other server: links are then made from SERVER_NAME."""
        if not host_header:
            return True
        host = host_of(host_header)
        return host is not None and (host == self.public_host or host in self.config.allowed_hosts
                                     or is_machine_host(host))

    def is_trusted_peer(self, environ: dict) -> bool:
        proxy = self.config.trusted_proxy
        return proxy == "*" or bool(proxy) and parse_address(environ.get("REMOTE_ADDR", "")) == parse_address(proxy)

    def authorize(self, request: Request, admin: bool = False) -> str:
        """Return why *request* may upload: "open", "loopback", "session" or "key"; raise an HTTPError if it may not.

        The loopback exemption holds only for a request made on this machine directly: behind IIS or Apache on
        the same box every client would otherwise be 127.0.0.1. Administration (*admin*) is never open:
        upload_auth = none counts there as remote, since revoking every link is more than publishing one.
        """
        self.check_network(request)
        auth = "remote" if admin and self.config.upload_auth == "none" else self.config.upload_auth
        if auth == "none":
            return "open"
        if auth == "remote" and self.is_direct_loopback(request):
            return "loopback"
        if self.has_session(request):
            return "session"
        given = basic_password(request)
        if given is None:
            raise Unauthorized()
        self.check_key(request, given)
        return "key"

    def check_network(self, request: Request) -> None:
        if not address_in(request.remote_addr, self.config.upload_networks):
            raise Forbidden(code="network", message=_(
                "Uploads are not accepted from your address ({address}): this server takes them only from the "
                "networks named in its upload_networks setting. Installing from a link works from anywhere.").format(
                address=request.remote_addr[:64]))

    def is_direct_loopback(self, request: Request) -> bool:
        """Return whether the request comes from this machine itself, by one of its names (is_our_host).

        A loopback address alone is not enough: a page from evil.example that resolves to 127.0.0.1 (DNS
        rebinding) makes the browser on the server send requests from loopback, under the page's own name.
        """
        address = parse_address(request.remote_addr)
        proxy = self.config.trusted_proxy
        via_proxy = request.forwarded or proxy == "*" or (proxy and parse_address(proxy) == address)
        return address is not None and address.is_loopback and not via_proxy and self.is_our_host(request)

    def refuse_cross_site(self, request: Request) -> None:
        """Refuse a state-changing request that another site's page made a browser send (CSRF).

        Browsers name the page's origin in Origin and say cross-site in Sec-Fetch-Site, older ones only the page in
        Referer; curl, wget and scripts send none of them and pass.
        """
        if request.header("Sec-Fetch-Site").lower() == "cross-site":
            raise Forbidden(_(CROSS_SITE_MESSAGE), code=CROSS_SITE_CODE)
        origin = request.header("Origin")
        if not origin and not request.header("Sec-Fetch-Site"):
            origin = request.header("Referer")  # browsers that send neither (IE 11, Firefox before 70) send this
        if origin and origin_of(origin) != origin_of(base_url_of(request, self.config, self.is_our_host(request))):
            raise Forbidden(_(CROSS_SITE_MESSAGE), code=CROSS_SITE_CODE)

    def check_key(self, request: Request, given: str) -> None:
        """Raise Unauthorized unless *given* is the upload key; wrong keys are rate-limited per client."""
        wait = self.sign_in_failures.retry_after(request.remote_addr)
        if wait:
            raise TooManyRequests(wait)
        if not hmac.compare_digest(given.encode("utf-8"), self.upload_key().encode("utf-8")):
            self.sign_in_failures.spend(request.remote_addr)
            raise Unauthorized(_("That is not the upload key. Check it and try again."))

    def upload_key(self) -> str:
        return self.config.upload_password or self.store.upload_key()[0]

    def session_value(self, expires: int, session_id: str) -> str:
        """Return the cookie value of session *session_id* ending at *expires*: both, and their HMAC under the key."""
        mac = hmac.new(self.upload_key().encode("utf-8"), f"certdrop session {expires} {session_id}".encode(),
                       hashlib.sha256)
        return f"{expires}.{session_id}.{mac.hexdigest()}"

    def session_of(self, request: Request) -> tuple[int, str] | None:
        """Return (end, id) of the request's session cookie if the key signed it and it is still on, else None."""
        match = SESSION_RE.fullmatch(cookie_value(request, SESSION_COOKIE) or "")
        if not match:
            return None
        expires, session_id = int(match[1]), match[2]
        if expires <= self.clock() or not hmac.compare_digest(match[0], self.session_value(expires, session_id)):
            return None
        return None if self.signed_out.has(session_id, expires) else (expires, session_id)

    def has_session(self, request: Request) -> bool:
        return self.session_of(request) is not None


def base_url_of(request: Request, config: Config, host_accepted: bool) -> str:
    """Return the URL that links start with for *request* (see link_base)."""
    return link_base(Signature.of(request_key(request.environ), "", host_accepted), config)


###############################################################################
# Administration ##############################################################
###############################################################################
# The administrator's page (/admin) and its JSON twin (/admin/api/v1/...): every link with its state, its
# certificate, its upload's server name and its downloads, what needs attention first, and what to do next. Who may
# see and change it is the UploadGate's question, asked exactly as for uploads.

#: Links a page of /admin shows, and the most a script may ask for at once.
ADMIN_PAGE_LINKS, API_MAX_LINKS = 50, 1000

#: What needs attention: links that end within a week; live links whose CA ends within 30 days (eduroam CAT's
#: "close to expiry").
LINK_ATTENTION_SECONDS, CA_ATTENTION_SECONDS = 7 * 86400, 30 * 86400

#: A link's states on the page, in the JSON and in `list`: "live" serves; "ended" ran out of time, its certificate
#: still stored; "revoked" by the administrator, the command line or the link's secret; "removed" by the sweep,
#: which keeps a tombstone that answers 410; "damaged" for an entry file that cannot be read.
LINK_STATES = ("live", "ended", "revoked", "removed", "damaged")
STATE_LABELS = {"live": N_("live"), "ended": N_("ended"), "revoked": N_("revoked"), "removed": N_("removed"),
                "damaged": N_("damaged")}

#: The summaries of entry files are dropped this long after /admin was last asked: they take about 600 bytes a
#: link, 57 MiB for 100,000 links, and only the administrator's page needs them.
ADMIN_INDEX_IDLE_SECONDS = 600

NOT_RECORDED = N_("not recorded")


class LinkSummary(typing.NamedTuple):
    """What /admin shows of one entry file, read from its JSON without building its certificate."""

    token: str
    name: str  # the CA's name; "" when not known (a damaged file, an old tombstone)
    role: str  # Certificate.role; "" when not known (tombstones do not keep it)
    created: float
    expires: float
    ends: float | None  # the certificate's own end, when known
    host: str | None  # the upload's server name, when recorded
    revoked: bool
    stored: bool  # the entry still holds its certificate
    damaged: bool = False
    report: bool = False  # whether the entry records its upload's report (uploads since certdrop 0.4)

    def state(self, now: float) -> str:
        if self.damaged:
            return "damaged"
        if self.revoked:
            return "revoked"
        if not self.stored:
            return "removed"
        return "ended" if now >= self.expires else "live"

    def attention(self, now: float) -> str | None:
        """Return "link" when this live link ends within a week, "ca" when its CA ends within 30 days, else None."""
        if self.state(now) != "live":
            return None
        if self.expires - now < LINK_ATTENTION_SECONDS:
            return "link"
        if self.ends is not None and self.ends - now < CA_ATTENTION_SECONDS:
            return "ca"
        return None

    def order(self, now: float) -> tuple:
        """Return where this link goes on the page: what needs attention first, soonest first; then the newest."""
        attention = self.attention(now)
        if attention == "link":
            return (0, self.expires)
        if attention == "ca":
            return (1, self.ends)
        return (2 if self.state(now) == "live" else 3, -self.created)


def summary_of(token: str, data: bytes) -> LinkSummary:
    """Return the summary of *token*'s entry file *data*; raise ValueError (or another error) if it is damaged."""
    record = Entry.record_of(token, data.decode("utf-8"))
    created, expires = _stored_time(record["created"]), _stored_time(record["expires"])
    revoked = record.get("revoked")
    if revoked is not None:
        _stored_time(revoked)
    host, report = stored_host(record.get("host")), stored_report(record.get("report")) is not None
    if "der" not in record:
        was = Remembered.from_record(record["was"]) if record.get("was") is not None else None
        return LinkSummary(token, was.name if was else "", "", created, expires, was.not_after if was else None,
                           host, revoked is not None, False, report=report)
    facts = record.get("certificate")
    if facts is None:  # format 1 keeps the DER alone
        certificate = Entry.from_json(token, data).certificate
        name, role, ends = certificate.name, certificate.role, certificate.not_after.timestamp()
    else:
        names, organization = facts["common_names"], facts["organization"]
        if not (isinstance(names, list) and all(isinstance(name, str) for name in names)
                and isinstance(organization, (str, type(None))) and isinstance(facts["is_ca"], bool)
                and isinstance(facts["self_signed"], bool)):
            raise ValueError("damaged certificate facts")
        name = names[0] if names else organization or "CA"
        role = ("root" if facts["self_signed"] else "intermediate") if facts["is_ca"] else (
            "self-signed leaf" if facts["self_signed"] else "leaf")
        ends = datetime.fromisoformat(facts["not_after"]).timestamp()
    return LinkSummary(token, name, role, created, expires, ends, host, revoked is not None, True, report=report)


#: The summaries of the entry files as /admin last saw them, by their files' signatures, in data_dir: a fresh
#: process reads this one file instead of every entry file (a cache: damaged or stale, it is read past), and
#: writes it at most every ADMIN_INDEX_WRITE_SECONDS.
ADMIN_INDEX_FILE, ADMIN_INDEX_FORMAT, ADMIN_INDEX_WRITE_SECONDS = "admin-index.json", 1, 60


def saved_summary(token: str, item) -> tuple[int, LinkSummary] | None:
    """Return (signature, summary) of one link as ADMIN_INDEX_FILE keeps it; None unless every field has its type."""
    if not (TOKEN_RE.fullmatch(token) and isinstance(item, list) and len(item) == len(LinkSummary._fields)
            and type(item[0]) is int):
        return None
    for value, kind in zip(item[1:], list(LinkSummary.__annotations__.values())[1:]):
        kinds = typing.get_args(kind) or (kind,)
        if value is None and type(None) in kinds:
            continue
        if float in kinds and type(value) in (int, float) and math.isfinite(value):
            continue
        if type(value) not in kinds or float in kinds:
            return None
    return item[0], LinkSummary(token, *item[1:])


class AdminIndex:
    """The summaries of every entry file and the download counts of every process, for /admin, `list` and the daily
    warning: each file is read again only when its signature (inode, size, time) changed, so a page of 100,000
    links costs one directory listing and one stat() a file, not 100,000 parses; a fresh process starts from
    ADMIN_INDEX_FILE. Dropped from memory when unused for ADMIN_INDEX_IDLE_SECONDS."""

    def __init__(self, store: Store):
        self.store = store
        self.path = store.directory / ADMIN_INDEX_FILE
        self._summaries: dict[str, tuple[int, LinkSummary]] = {}
        self._count_files: dict[Path, tuple[tuple, Counts]] = {}
        self._lock = threading.Lock()
        self.used = -math.inf  # time.monotonic() of the last use
        self._written = -math.inf  # time.monotonic() of the last write of ADMIN_INDEX_FILE

    def links(self) -> list[LinkSummary]:
        """Return the summary of every entry file, as the files are now."""
        with self._lock:
            self.used = time.monotonic()
            known = self._summaries or self._saved()
            kept: dict[str, tuple[int, LinkSummary]] = {}
            read = 0
            for token, path, signature in self._entry_files():
                old = known.get(token)
                if old is None or old[0] != signature:
                    old, read = (signature, self._read(token)), read + 1
                kept[token] = old
            self._summaries = kept
            if (read or len(kept) != len(known)) and time.monotonic() - self._written >= ADMIN_INDEX_WRITE_SECONDS:
                self._save(kept)
            return [summary for _, summary in kept.values()]

    def _saved(self) -> dict[str, tuple[int, LinkSummary]]:
        """Return the summaries ADMIN_INDEX_FILE keeps, or none if it is missing or damaged."""
        try:
            record = json.loads(read_regular_file(self.path, MAX_ADMIN_INDEX_BYTES)[0])
            if record.get("format") != ADMIN_INDEX_FORMAT:
                return {}
            saved = {}
            for token, item in record["links"].items():
                summary = saved_summary(token, item)
                if summary is not None:  # else read from its entry file, as a changed one is
                    saved[token] = summary
            return saved
        except FileNotFoundError:
            return {}
        except Exception as error:  # a cache: whatever is wrong with it, the entry files are read instead
            log.warning("%s is damaged and is read past: %s", self.path, f"{type(error).__name__}: {error}"[:200])
            return {}

    def _save(self, summaries: dict[str, tuple[int, LinkSummary]]) -> None:
        record = {"format": ADMIN_INDEX_FORMAT,
                  "links": {token: [signature, *summary[1:]] for token, (signature, summary) in summaries.items()}}
        try:
            _write_atomically(self.path, json.dumps(record, separators=(",", ":")).encode("utf-8"),
                              owner=owner_for_root(self.store.directory))
        except OSError as error:
            log.warning("could not write %s: %s", self.path, error.strerror or error)
        self._written = time.monotonic()

    def _entry_files(self) -> Iterator[tuple[str, str, tuple]]:
        with contextlib.suppress(FileNotFoundError), os.scandir(self.store.directory) as shards:
            for shard in shards:
                if len(shard.name) != 2 or not shard.is_dir():
                    continue
                with contextlib.suppress(FileNotFoundError), os.scandir(shard.path) as files:
                    for file in files:
                        token = file.name[:-5]
                        if not file.name.endswith(".json") or not TOKEN_RE.fullmatch(token):
                            continue
                        with contextlib.suppress(FileNotFoundError):  # one int, not a tuple: 100,000 are kept
                            yield token, file.path, hash(_signature_of(file.stat(follow_symlinks=False)))

    def summary(self, token: str) -> LinkSummary:
        """Return the summary of *token*'s entry file as it is now."""
        return self._read(token)

    def _read(self, token: str) -> LinkSummary:
        damaged = LinkSummary(token, "", "", 0.0, 0.0, None, None, False, False, damaged=True)
        try:
            path, data, _ = self.store._read_file(token, signature=False)
            return Store._decode(path, lambda: summary_of(token, data))
        except (DamagedEntry, UnknownToken):
            return damaged

    def counts(self) -> Counts:
        """Return every process's download counts added up, each count file read again only when it changed."""
        with self._lock:
            self.used = time.monotonic()
            kept: dict[Path, tuple[tuple, Counts]] = {}
            for path in count_files(self.store.directory):
                signature, old = _file_signature(path), self._count_files.get(path)
                kept[path] = old if old is not None and old[0] == signature else (
                    signature, read_counts_file(path) or {})
            self._count_files = kept
            total: Counts = {}
            for _, counts in kept.values():
                add_counts(total, counts)
            return total

    def forget_if_idle(self) -> None:
        if time.monotonic() - self.used > ADMIN_INDEX_IDLE_SECONDS and (self._summaries or self._count_files):
            with self._lock:
                self._summaries, self._count_files = {}, {}


def chosen_links(links: list[LinkSummary], now: float, state: str = "", search: str = "") -> list[LinkSummary]:
    """Return the links in *state* (any: ""; "attention": what needs it) whose name, token or server name holds
    *search*, what needs attention first."""
    needle = search.strip().casefold()
    chosen = [link for link in links
              if (not state or (link.attention(now) is not None if state == "attention" else link.state(now) == state))
              and (not needle or needle in link.name.casefold() or needle in link.token
                   or needle in (link.host or "").casefold())]
    chosen.sort(key=lambda link: link.order(now))
    return chosen


def iso_time(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, timezone.utc).isoformat().replace(
        "+00:00", "Z")


def link_record(link: LinkSummary, url: str, counts: dict[str, tuple[int, float]], now: float) -> dict:
    """Return one link as the JSON interface and `list --json` give it (README documents the fields)."""
    return {
        "token": link.token, "url": url, "name": link.name or None, "role": link.role or None,
        "state": link.state(now), "attention": link.attention(now), "created": iso_time(link.created or None),
        "expires": iso_time(link.expires or None), "certificate_ends": iso_time(link.ends), "host": link.host,
        "report_recorded": link.report,
        "fetches": {device: {"count": count, "last": iso_time(last)} for device, (count, last) in sorted(counts.items())},
    }


def attention_text(links: list[LinkSummary], now: float, config: Config) -> str:
    """Return what needs attention as plain text, one line a link, or "" when nothing does; each link as the
    command line gives it (cli_offer), the one every page, card and mail hands out."""
    lines = []
    for link in chosen_links(links, now, "attention"):
        if link.attention(now) == "link":
            text = _("The link {url} for \u201c{name}\u201d ends on {date}.")
            date = link.expires
        else:
            text = _("The CA \u201c{name}\u201d of the link {url} expires on {date}: upload its successor.")
            date = link.ends
        offer = cli_offer(config, link.token)
        url = offer.url if offer else f"/c/{link.token}"
        lines.append(term(text.format(url=url, name=link.name, date=format_time(date))))
    return "".join(line + "\n" for line in lines)


def warn_of_attention(index: AdminIndex, config: Config, clock: Callable[[], float]) -> str:
    """Log what needs attention and, with admin_mail set and mail configured, mail it; return the text."""
    text = attention_text(index.links(), clock(), config)
    if not text:
        return ""
    for line in text.splitlines():
        log.warning("needs attention: %s", line)
    if config.admin_mail and config.mail_host:
        try:
            send_mail(config, [config.admin_mail], header_text(_("certdrop: links and CAs that end soon")),
                      text + "\n" + _("The administrator's page lists them first.") + "\n")
        except MailError as error:
            log.error("could not mail what needs attention to %s: %s", config.admin_mail, error)
    return text


#: When the server first looks for what needs attention: after start-up, not competing with its first requests.
ATTENTION_FIRST_SECONDS, ATTENTION_EVERY_SECONDS = 60, 86400


def write_counts_at_exit(counts: DownloadCounts) -> None:
    """Write the downloads since the last write as the interpreter exits (atexit): under any WSGI server."""
    try:
        written = counts.write()
    except Exception:
        log.exception("could not write the download counts at exit")
        return
    if written:
        log.info("wrote %d downloads to %s", written, counts.path)


def warn_of_attention_daily(store: Store, config: Config, clock: Callable[[], float], stop: threading.Event) -> None:
    """Warn of what needs attention a minute after start and then once a day, until *stop* is set. Each look has
    an index of its own, gone when it is done: the page's stays small while nobody uses it."""
    wait = ATTENTION_FIRST_SECONDS
    while not stop.wait(wait):
        wait = ATTENTION_EVERY_SECONDS
        try:
            warn_of_attention(AdminIndex(store), config, clock)
        except Exception:
            log.exception("could not look for what needs attention; looking again tomorrow")


def admin_authorize(app: "App", request: Request, post: bool) -> str:
    """Let in whoever may upload, as uploads do (the Host rule is dispatch's) but never without the key or a
    session from another machine, whatever upload_auth says; refuse anyone else."""
    app.start_background()
    if post:
        app.gate.refuse_cross_site(request)
    return app.gate.authorize(request, admin=True)


def admin_viewer(app: "App", request: Request) -> str | None:
    """Return why *request* may see the administrator's pages (see UploadGate.authorize); None for a browser that
    is to sign in first; raise for anybody else."""
    try:
        return admin_authorize(app, request, post=False)
    except Unauthorized:
        if response_format(request) != "html":
            raise
        return None


def sign_in_first(app: "App", request: Request) -> Response:
    """Return the sign-in page, which leads back to /admin."""
    return Response(render_signin(app.home(request), "", next_page="admin"), headers=FORM_PAGE_HEADERS)


def admin_page(app: "App", request: Request) -> Response:
    """The list of links: what needs attention first, a filter by state, a search by name, a page at a time."""
    how = admin_viewer(app, request)
    if how is None:
        return sign_in_first(app, request)
    now, state, search = app.clock(), request.query.get("state", "")[:20], request.query.get("q", "")[:200]
    if state not in ("", "attention", *LINK_STATES):
        raise BadRequest(_("There is no state \u201c{state}\u201d. Choose one of the list.").format(state=state))
    links = chosen_links(app.admin_index.links(), now, state, search)
    pages = max(1, math.ceil(len(links) / ADMIN_PAGE_LINKS))
    page = admin_page_number(request.query.get("page", "1"), pages)
    shown = links[(page - 1) * ADMIN_PAGE_LINKS:page * ADMIN_PAGE_LINKS]
    counts = app.admin_index.counts()
    records = [link_record(link, app.link_for(request, link.token), counts.get(link.token, {}), now)
               for link in shown]
    data = {"links": records, "total": len(links), "page": page, "pages": pages}
    text = "".join(term(f"{r['token']}  {r['state']:<7}  {r['expires'] or '-'}  {r['name'] or '-'}") + "\n"
                   for r in records)
    return answer_for(request, 200, data, text, lambda: render_admin_page(
        app.config, shown, records, now, home=app.home(request), state=state, search=search, page=page, pages=pages,
        total=len(links), signed_in=how == "session"))


def admin_page_number(text: str, pages: int) -> int:
    if not re.fullmatch(r"[0-9]{1,9}", text) or not 1 <= int(text) <= pages:
        raise BadRequest(_("There is no page {page}: the list has {pages}.").format(page=text[:20], pages=pages))
    return int(text)


def admin_link(app: "App", request: Request, token: str) -> Response:
    """One link: its facts, the doctor's report of its upload, the chain that upload made, its downloads."""
    if admin_viewer(app, request) is None:
        return sign_in_first(app, request)
    entry = app.store.lookup(token)
    now = app.clock()
    summary = app.admin_index.summary(entry.token)
    counts = app.admin_index.counts().get(entry.token, {})
    record = link_record(summary, app.link_for(request, entry.token), counts, now)
    record["report"] = None if entry.report is None else list(entry.report)
    chain = [(certificate, app.store.live_entry_for(certificate.sha256))
             for certificate in (entry.chain_certificates if entry.der is not None and entry.chain else ())]
    record["chain"] = [{"name": certificate.name, "role": certificate.role, "token": chained.token if chained else None}
                       for certificate, chained in chain]
    text = "".join(term(f"{key}: {value}") + "\n" for key, value in record.items() if key not in ("report", "chain"))
    return answer_for(request, 200, record, text, lambda: render_admin_link(
        app.config, entry, summary, record, chain, now, home=app.home(request)))


def admin_revoke(app: "App", request: Request, token: str) -> Response:
    """Revoke a link after a confirmation: a GET, or a POST without confirm=yes, shows the question."""
    admin_authorize(app, request, post=request.method == "POST")
    entry = app.store.lookup(token)
    fields = parse_form(request, 4096, fields=("confirm",)) if request.method == "POST" else {}
    if form_text(fields, "confirm") != "yes":
        gone = entry.gone(app.clock())
        if gone:
            raise gone
        return Response(render_revoke_question(entry, app.link_for(request, entry.token), app.home(request)),
                        headers=FORM_PAGE_HEADERS)
    revoked = app.store.revoke(token)
    log.info("link %s revoked on the administrator's page", revoked.token)
    return admin_done(app, request, {"revoked": revoked.token, "state": "revoked"},
                      _("The link {token} was revoked: it answers \u201c{title}\u201d from now on, on every certdrop "
                        "process within 2 seconds.").format(token=revoked.token, title=_(ERROR_TITLES[410])))


def admin_extend(app: "App", request: Request, token: str) -> Response:
    """Lengthen a live link by one of the upload form's lifetimes, never past its certificate's end."""
    admin_authorize(app, request, post=True)
    ttl = form_text(parse_form(request, 4096, fields=("ttl",)), "ttl")
    entry = app.store.get(token)
    now = app.clock()
    expires, cut = link_expiry(app.config, entry.certificate, ttl, now)
    ends = entry.certificate.not_after.timestamp()
    if expires > ends:  # an expired certificate, for which link_expiry keeps the lifetime an upload chose
        raise LifetimeError(_("This certificate expired on {date}: its link cannot be extended past that; nothing "
                              "was changed.").format(date=format_time(ends)))
    extended = app.store.extend(token, expires)
    log.info("link %s extended on the administrator's page until %s", extended.token, format_time(extended.expires))
    text = _("The link {token} now works until {date}.").format(token=extended.token, date=format_time(expires))
    return admin_done(app, request, {"extended": extended.token, "expires": iso_time(extended.expires),
                                     "cut_to_certificate": cut},
                      f"{text} {_(CUT_NOTE)}" if cut else text)


def admin_done(app: "App", request: Request, data: dict, text: str) -> Response:
    home = app.home(request)
    return answer_for(request, 200, data, term(text) + "\n", lambda: render_page(_("Done \u2014 certdrop"), render(
        ADMIN_DONE_PAGE, heading=_("Done"), text=text, admin=f"{home}admin", back=_("Back to all links")), home=home))


def is_api_path(path: str) -> bool:
    """Return whether *path* is the JSON interface's, where every answer is JSON."""
    return path == "/admin/api" or path.startswith("/admin/api/")


def as_api(request: Request) -> Request:
    """Make *request* one of the JSON interface's: its answers and errors are JSON, whatever Accept says."""
    request.environ["HTTP_ACCEPT"] = "application/json"
    return request


def api_links(app: "App", request: Request) -> Response:
    """GET /admin/api/v1/links: ?state=, ?q=, ?page=, ?per_page= (up to API_MAX_LINKS)."""
    request = as_api(request)
    admin_authorize(app, request, post=False)
    now, state, search = app.clock(), request.query.get("state", "")[:20], request.query.get("q", "")[:200]
    if state not in ("", "attention", *LINK_STATES):
        raise BadRequest(_("There is no state \u201c{state}\u201d. Choose one of the list.").format(state=state))
    per_page = request.query.get("per_page", str(ADMIN_PAGE_LINKS))
    if not re.fullmatch(r"[0-9]{1,9}", per_page) or not 1 <= int(per_page) <= API_MAX_LINKS:
        raise BadRequest(_("per_page is a number from 1 to {most}.").format(most=API_MAX_LINKS))
    links = chosen_links(app.admin_index.links(), now, state, search)
    pages = max(1, math.ceil(len(links) / int(per_page)))
    page = admin_page_number(request.query.get("page", "1"), pages)
    counts = app.admin_index.counts()
    shown = links[(page - 1) * int(per_page):page * int(per_page)]
    return answer_for(request, 200, {
        "links": [link_record(link, app.link_for(request, link.token), counts.get(link.token, {}), now)
                  for link in shown], "total": len(links), "page": page, "pages": pages}, "", bytes)


def api_link(app: "App", request: Request, token: str) -> Response:
    return admin_link(app, as_api(request), token)


def api_revoke(app: "App", request: Request, token: str) -> Response:
    """POST /admin/api/v1/links/<token>/revoke: no confirmation step, the script asked."""
    request = as_api(request)
    admin_authorize(app, request, post=True)
    revoked = app.store.revoke(token)
    log.info("link %s revoked through the JSON interface", revoked.token)
    return answer_for(request, 200, {"revoked": revoked.token, "state": "revoked"}, "", bytes)


def api_extend(app: "App", request: Request, token: str) -> Response:
    """POST /admin/api/v1/links/<token>/extend with ttl (a lifetime of the upload form)."""
    return admin_extend(app, as_api(request), token)


ADMIN_DONE_PAGE = string.Template("""<h1>$heading</h1>
<p>$text</p>
<p><a href="$admin">$back</a></p>
""")

ADMIN_FILTER_FORM = string.Template("""<form method="get" action="$action" class="filter">
<label for="state">$state_label</label>
<select id="state" name="state">$options_html</select>
<label for="q">$search_label</label>
<input type="text" id="q" name="q" maxlength="200" value="$search" />
<p><button type="submit">$show</button></p>
</form>""")

ADMIN_LINK_SECTION = string.Template("""<section class="$css" id="link-$token">
<h2>$heading</h2>
<p class="copy">$lead_html</p>
<table>$rows_html</table>
$attention_html<p>$tools_html</p>
$actions_html
</section>""")

ADMIN_EXTEND_FORM = string.Template("""<form method="post" action="$action" class="action">
<label for="ttl-$token">$ttl_label</label>
<select id="ttl-$token" name="ttl">$options_html</select>
<button type="submit" name="extend" value="$token">$extend</button>
</form>""")

ADMIN_MAIL_FORM = string.Template("""<form method="post" action="$action" class="action">
<input type="hidden" name="tokens" value="$token" />
<label for="to-$token">$to_label</label>
<input type="text" id="to-$token" name="to" placeholder="someone@example.com" />
<button type="submit">$send</button>
</form>""")

REVOKE_QUESTION = string.Template("""<h1>$heading</h1>
<p>$text</p>
<form method="post" action="$action">
<input type="hidden" name="confirm" value="yes" />
<p><button type="submit" name="revoke" value="$token">$revoke</button> <a href="$admin">$cancel</a></p>
</form>""")


def render_admin_page(config: Config, shown: list[LinkSummary], records: list[dict], now: float, *, home: str,
                      state: str, search: str, page: int, pages: int, total: int, signed_in: bool) -> bytes:
    options = [("", _("every state")), ("attention", _("needs attention"))] + [
        (value, _(STATE_LABELS[value])) for value in LINK_STATES]
    selected = ' selected="selected"'
    options_html = "".join(f'<option value="{esc(value)}"{selected if value == state else ""}>{esc(label)}</option>'
                           for value, label in options)
    parts = [f"<h1>{esc(_('Links'))}</h1>",
             f"<p>{esc(ngettext('{count} link matches.', '{count} links match.', total).format(count=total))} "
             f"<a href=\"{esc(home)}\">{esc(_('Share a certificate'))}</a></p>",
             render(ADMIN_FILTER_FORM, action=f"{home}admin", options_html=options_html, search=search,
                    state_label=_("State"), search_label=_("Name, token or server name"), show=_("Show"))]
    parts += [render_admin_entry(config, link, record, now, home) for link, record in zip(shown, records)]
    if pages > 1:
        parts.append(render_pager(home, state, search, page, pages))
    if signed_in:
        parts.append(render(SIGN_OUT_FORM, action=f"{home}signout", signed_in=_("You are signed in with the upload "
                                                                                "key."), sign_out=_("Sign out")))
    filtered = {name: value for name, value in (("state", state), ("q", search), ("page", page))
                if value not in ("", 1)}
    here = f"{home}admin" + (f"?{urllib.parse.urlencode(filtered)}" if filtered else "")
    return render_page(_("Links \u2014 certdrop"), "\n".join(parts), home=home, here=here)


def render_pager(home: str, state: str, search: str, page: int, pages: int) -> str:
    def address(number: int) -> str:
        return f"{home}admin?" + urllib.parse.urlencode({"state": state, "q": search, "page": number})

    links = [_("Page {page} of {pages}.").format(page=page, pages=pages)]
    text = esc(links[0])
    if page > 1:
        text += f' <a href="{esc(address(page - 1))}">{esc(_("Previous page"))}</a>'
    if page < pages:
        text += f' <a href="{esc(address(page + 1))}" rel="next">{esc(_("Next page"))}</a>'
    return f'<p class="pager">{text}</p>'


def fetches_text(fetches: dict) -> str:
    if not fetches:
        return _("none counted")
    return "; ".join(_("{device}: {count}, the last on {date}").format(
        device=device, count=value["count"], date=value["last"][:16].replace("T", " ") + " UTC")
        for device, value in fetches.items())


def render_admin_rows(link: LinkSummary, record: dict) -> str:
    def when(timestamp: float | None) -> str:
        return format_time(timestamp) if timestamp else _(NOT_RECORDED)

    rows = ((_("State"), _(STATE_LABELS[record["state"]])), (_("Token"), link.token),
            (_("Created"), when(link.created)), (_("Ends"), when(link.expires)),
            (_("Certificate ends"), when(link.ends)), (_("Server name"), link.host or (_("none given") if link.report else _(NOT_RECORDED))),
            (_("Downloads"), fetches_text(record["fetches"])))
    return "".join(f"<tr><th>{esc(label)}</th><td>{esc(value)}</td></tr>" for label, value in rows)


def render_admin_entry(config: Config, link: LinkSummary, record: dict, now: float, home: str) -> str:
    """Return one link of /admin: its facts, what needs attention, and what can be done with it."""
    attention = record["attention"]
    attention_html = ""
    if attention == "link":
        attention_html = f'<p class="warn">{esc(_("This link ends within a week."))}</p>'
    elif attention == "ca":
        attention_html = f'<p class="warn">{esc(_("Its CA expires within 30 days: upload its successor."))}</p>'
    heading = (_("{role}: {name}").format(role=_(ROLE_LABELS[link.role]), name=link.name) if link.role
               else link.name or _("A link whose certificate is not recorded"))
    live = record["state"] == "live"
    admin = f"{home}admin/link/{link.token}"
    report = _("The doctor\u2019s report and the chain")
    tools = [f'<a href="{esc(admin)}">{esc(report)}</a>']
    revoke = _("Revoke\u2026")
    if live:
        tools += [f'<a href="{esc(record["url"])}/card">{esc(_("Printable card"))}</a>',
                  f'<a href="{esc(record["url"])}/qr.svg">{esc(_("QR code"))}</a>',
                  f'<a href="{esc(admin)}/revoke" class="revoke">{esc(revoke)}</a>']
    return render(ADMIN_LINK_SECTION, css="warn" if attention else "", token=link.token, heading=heading,
                  lead_html=link_html(record["url"]) if live else esc(record["url"]),
                  rows_html=render_admin_rows(link, record), attention_html=attention_html,
                  tools_html=" \u00b7 ".join(tools),
                  actions_html=render_admin_actions(config, link, home) if live else "")


def render_admin_actions(config: Config, link: LinkSummary, home: str) -> str:
    options = "".join(f'<option value="{esc(value)}">{esc(label)}</option>'
                      for value, label in allowed_ttl_choices(config))
    parts = [render(ADMIN_EXTEND_FORM, action=f"{home}admin/link/{link.token}/extend", token=link.token,
                    options_html=options, ttl_label=_("Make it work for"), extend=_("Extend"))]
    if config.mail_host:
        parts.append(render(ADMIN_MAIL_FORM, action=f"{home}mail", token=link.token, send=_("E-mail again"),
                            to_label=_("E-mail the link again to")))
    return "\n".join(parts)


def render_admin_link(config: Config, entry: Entry, link: LinkSummary, record: dict,
                      chain: list[tuple[Certificate, Entry | None]], now: float, home: str) -> bytes:
    parts = [render_admin_entry(config, link, record, now, home)]
    if entry.der is not None:
        parts.append(f"<section><h2>{esc(_('The certificate'))}</h2>{render_facts(entry.certificate)}</section>")
    if entry.report is None:
        report = "<p>{}</p>".format(esc(_("The report of this upload is not recorded: the link was made before "
                                          "certdrop kept it.")))
    elif not entry.report:
        report = f"<p>{esc(_('The doctor found nothing to say about this upload.'))}</p>"
    else:
        report = "<ul>" + "".join(f"<li>{esc(item['message'])} [{esc(item['code'])}]</li>"
                                  for item in entry.report) + "</ul>"
    heading = _("The doctor\u2019s report of its upload")
    parts.append(f"<section><h2>{esc(heading)}</h2>{report}</section>")
    if chain:
        items = "".join(
            f"<li>{esc(_('{role}: {name}').format(role=_(ROLE_LABELS[certificate.role]), name=certificate.name))} "
            + (f'<a href="{esc(home)}admin/link/{esc(chained.token)}">{esc(chained.token)}</a>' if chained
               else esc(_("no live link"))) + "</li>" for certificate, chained in chain)
        parts.append(f"<section><h2>{esc(_('The chain its upload made'))}</h2><ol>{items}</ol></section>")
    parts.append(f'<p><a href="{esc(home)}admin">{esc(_("Back to all links"))}</a></p>')
    return render_page(_("Link {token} \u2014 certdrop").format(token=entry.token), "\n".join(parts), home=home,
                       here=f"{home}admin/link/{entry.token}")


def render_revoke_question(entry: Entry, url: str, home: str) -> bytes:
    name = entry.remembered.name if entry.remembered else entry.token
    body = render(REVOKE_QUESTION, heading=_("Revoke this link?"), token=entry.token,
                  text=_("The link {url} for \u201c{name}\u201d will answer \u201c{title}\u201d at once, on every "
                         "certdrop process within 2 seconds. This cannot be undone: a new upload makes a new "
                         "link.").format(url=url, name=name, title=_(ERROR_TITLES[410])),
                  action=f"{home}admin/link/{entry.token}/revoke", admin=f"{home}admin",
                  revoke=_("Revoke it now"), cancel=_("Keep it"))
    return render_page(_("Revoke a link \u2014 certdrop"), body, home=home,
                       here=f"{home}admin/link/{entry.token}/revoke")


#: The actions of /admin and the JSON interface that change a link: their bodies are small forms, read only once
#: the request passed the gate (App.check_before_body).
ADMIN_ACTIONS = (admin_revoke, admin_extend, api_revoke, api_extend)


###############################################################################
# Application #################################################################
###############################################################################

class App:
    """The certdrop WSGI application: routes requests to handlers and turns every failure into a clear answer."""

    #: whether the first download counted or the first use of /admin starts the background work (start_background);
    #: the test suite turns it off, so that its thousands of apps leave no threads behind
    starts_background = True

    def __init__(self, config: Config, store: Store, clock: Callable[[], float] = time.time,
                 access_log: AccessLog | None = None, signer: ProfileSigner | None = None):
        self.config = config
        self.store = store
        self.clock = clock
        #: the profile signer read from the settings at start, and whether profiles are signed now: while the
        #: signer is valid. Decisions and answers are kept only until that changes (check_signer)
        self.signer, self.signing = signer, False
        #: the period in which whether profiles are signed stays as it is: [signing_from, signing_changes), empty
        #: until check_signer first looks, everything without a signer. A clock set back before it looks again too
        self.signing_from, self.signing_changes = (math.inf, -math.inf) if signer else (-math.inf, math.inf)
        self._signer_lock = threading.Lock()
        self.access_log = access_log if config.access_log else None
        #: queues a hot request's log line: AccessLog.record, bound here so that the hot path touches no AccessLog
        self.record_access = self.access_log.record if self.access_log else None
        if self.access_log:
            self.access_log.start()
        self.lookups = RateLimiter(config.lookup_limit, LOOKUP_BURST, clock)
        self.uploads = RateLimiter(config.upload_limit, UPLOAD_BURST, clock)
        #: one budget for the whole server: however many clients ask, it cannot be turned into a spam relay
        self.mail_budget = RateLimiter(config.mail_per_hour / 60, config.mail_per_hour, clock)
        self.gate = UploadGate(config, store, clock)
        #: downloads counted per link and device class (the hot path bumps them), and what /admin reads
        self.counts = DownloadCounts(config.data_dir, clock, owner=lambda: owner_for_root(store.directory),
                                     has_entry=store.has_entry_file)
        self.admin_index = AdminIndex(store)
        #: the count writer and the daily warning: started by serve, else by the first download counted or the
        #: first use of /admin (start_background), so that any WSGI server running make_app's app gets them
        self._background_lock, self.background = threading.Lock(), None
        if self.starts_background:
            self.counts.first_count = self.start_background
        #: everything kept to answer requests again; a token's answers go when the store replaces or drops its entry
        self.answers = AnswerCache(config.answer_cache_size)
        store.watchers.append(self.answers.forget)
        # bound once: serve_hot calls them on every request
        self.hot_get, self.unknown_get = self.answers.hot.get, self.answers.unknown.get
        self.limited = self.lookups.blocked  # the clients the lookup limit holds back; empty almost always
        #: the path of public_url, which every address certdrop writes starts with; None: from SCRIPT_NAME
        self.public_path = urllib.parse.urlsplit(config.public_url).path.rstrip("/") if config.public_url else None
        self.answer_request, self.screen_request = self.answer, self.screen_direct
        self.hot_first = not config.trusted_proxy  # read by __call__ on every request
        if config.trusted_proxy:
            # waitress's own reading of X-Forwarded-For/-Host/-Proto/-Port and Forwarded, from the trusted proxy
            # only, with untrusted copies cleared; inside make_app's app, so any WSGI server gets it
            from waitress.proxy_headers import proxy_headers_middleware
            proxied = functools.partial(
                proxy_headers_middleware, trusted_proxy=config.trusted_proxy,
                trusted_proxy_count=config.trusted_proxy_count,
                trusted_proxy_headers=set(config.trusted_proxy_headers), clear_untrusted=True)
            self.answer_request, self.screen_request = proxied(self.answer_proxied), proxied(self.screen_direct)

    def start_background(self, stop: threading.Event | None = None, fold: bool = True) -> threading.Event | None:
        """Start, once, the threads that write the download counts every count_interval (and drop /admin's index
        when unused) and that warn daily of what needs attention, and the write of the counts at exit; return the
        event that stops them (*stop*, or one of the app's own; None while starts_background is off). serve calls it at start (it has folded the counts
        of stopped processes itself); any other WSGI server gets it from the first download or /admin use."""
        if self.background is not None:
            return self.background
        with self._background_lock:
            if self.background is not None or not (self.starts_background or stop is not None):
                return self.background
            stop = stop or threading.Event()
            threading.Thread(target=write_counts_forever, name="certdrop counts", daemon=True, args=(
                self.counts, self.config.count_interval, stop, self.admin_index, self.store if fold else None)).start()
            threading.Thread(target=warn_of_attention_daily, name="certdrop warnings", daemon=True,
                             args=(self.store, self.config, self.clock, stop)).start()
            atexit.register(write_counts_at_exit, self.counts)
            self.background = stop
            return stop

    def __call__(self, environ: dict, start_response: Callable) -> list[bytes]:
        if self.hot_first:  # behind a trusted proxy, the hot path runs after waitress has read its headers
            body = self.serve_hot(environ, start_response)
            if body is not None:
                return body
        self.note_proxy(environ)
        return self.answer_request(environ, start_response)

    def note_proxy(self, environ: dict) -> None:
        """Note who passed the request on, before waitress's proxy middleware replaces REMOTE_ADDR and clears
        headers (see Request.forwarded), and take the trusted proxy's prefix."""
        environ["certdrop.via_proxy"] = self.gate.is_trusted_peer(environ)
        environ["certdrop.forwarded"] = environ["certdrop.via_proxy"] or was_forwarded(environ)
        if self.config.trusted_proxy:
            self.take_forwarded_prefix(environ)

    def screen(self, environ: dict) -> tuple[Prepared | None, float]:
        """Return the refusal a request with a body gets from its line and headers alone (None: read the body), and
        the body it may carry: the first checks of its handler, so that nobody sends a body certdrop would refuse.

        FairServer asks this when the headers are in, before a "100 Continue" or any body byte is taken.
        """
        try:  # in waitress's loop thread: nothing may escape, or the connection just ends
            self.note_proxy(environ)
            self.screen_request(environ, lambda *arguments: None)
        except Exception:
            log.exception("could not check a request before its body; the app will, once the body is in")
        return environ.pop("certdrop.screened", (None, SMALL_BODY))  # none when waitress's proxy reading refused

    def screen_direct(self, environ: dict, start_response: Callable) -> list[bytes]:
        request = Request(environ)
        with speaking(request.language):
            return self.screen_in_language(request)

    def screen_in_language(self, request: Request) -> list[bytes]:
        environ = request.environ
        if is_api_path(request.path):
            as_api(request)
        try:
            handler, _ = match_route(request.method, request.path)
        except HTTPError:  # the app answers 404 or 405 without reading the body
            environ["certdrop.screened"] = None, SMALL_BODY
            return []
        try:
            limit = self.check_before_body(request, handler)
        except CertdropError as error:
            environ["certdrop.screened"] = self.error_answer(request, http_error_for(error)), 0
        except HTTPError as error:
            environ["certdrop.screened"] = self.error_answer(request, error), 0
        else:
            environ["certdrop.screened"] = None, limit
        return []

    def check_before_body(self, request: Request, handler: Callable) -> int:
        """Make the checks *handler* makes before it reads a body, no more; return the largest body it reads."""
        gate, address = self.gate, request.remote_addr
        if handler not in (App.upload, App.mail, App.signin, App.signout, App.revoke, *ADMIN_ACTIONS):
            return SMALL_BODY  # pages that read no body: whatever is sent is dropped
        if not request.path.startswith(LENIENT_PATHS):
            gate.check_host(request)
        gate.refuse_cross_site(request)
        wait, limit = 0.0, SMALL_BODY
        if handler in ADMIN_ACTIONS:
            gate.authorize(request, admin=True)
        if handler in (App.upload, App.mail):
            gate.authorize(request)
            limit = self.config.max_upload if handler is App.upload else MAIL_FORM_BYTES
            wait = self.uploads.retry_after(address if handler is App.upload else mail_client(address))
        elif handler is App.signin:
            gate.check_network(request)
            wait = gate.sign_in_failures.retry_after(address)
        elif handler is App.revoke:
            wait = self.lookups.retry_after(address)
        if wait:
            raise TooManyRequests(wait)
        declared = request.environ.get("CONTENT_LENGTH", "")
        if re.fullmatch(r"[0-9]{1,20}", declared) and int(declared) > limit:
            raise payload_too_large(limit)
        return limit

    def take_forwarded_prefix(self, environ: dict) -> None:
        """Prepend an X-Forwarded-Prefix from the trusted proxy to SCRIPT_NAME; drop one from anybody else.

        Waitress knows no prefix header, so certdrop checks the peer itself, before waitress replaces REMOTE_ADDR
        with the client's address.
        """
        prefix = environ.pop("HTTP_X_FORWARDED_PREFIX", "").strip().rstrip("/")
        if prefix and self.gate.is_trusted_peer(environ) and len(prefix) <= MAX_PREFIX and PREFIX_RE.fullmatch(prefix):
            environ["SCRIPT_NAME"] = prefix + environ.get("SCRIPT_NAME", "")

    def prefix(self, request: Request) -> str:
        """Return the path every address certdrop writes starts with: public_url's, else SCRIPT_NAME."""
        return request.script_name if self.public_path is None else self.public_path

    def answer(self, environ: dict, start_response: Callable) -> list[bytes]:
        """Answer any request the full way: see full_answer."""
        started = time.perf_counter()
        status, body = serve(self.full_answer(environ), environ, start_response)
        tally = environ.get("certdrop.tally")  # a download under /c/ (deliver)
        if tally is not None and 200 <= status < 300:
            tally()
        if self.access_log:
            self.access_log.request(environ, status, len(body[0]), environ.get("certdrop.device", "-"), started)
        return body

    def answer_proxied(self, environ: dict, start_response: Callable) -> list[bytes]:
        """Answer a request as waitress's reading of the trusted proxy's headers left it: the hot way if it can."""
        body = self.serve_hot(environ, start_response)
        return body if body is not None else self.answer(environ, start_response)

    def serve_hot(self, environ: dict, start_response: Callable) -> list[bytes] | None:
        """Serve a GET of a token whose answer was decided and built before, or an unknown token's 404 given before;
        else return None.

        The hot path: one dictionary lookup by the request's values (request_values), one clock reading, one
        start_response (an unknown token's 404 also spends one lookup of the limit, when it is on). What is not kept
        there is looked for by find_hot; what find_hot does not find ready (a token not in memory or due for a look at
        its file, a client with a new signature, an answer not built yet) takes the full way, which leaves it ready
        for the next time. A client being limited takes find_hot's way, which answers it 429; others do not.
        What a request costs here is mostly the memory it touches, which other requests have pushed out of the
        processor's caches, so this touches few objects: the answer's status, headers, body and log tail are the hot
        answer's own fields, and serve is called only for an If-None-Match (every hot answer is a GET's).
        """
        started = time.perf_counter()
        values = request_values(environ)
        hot = self.hot_get(values) or self.unknown_get(values)
        if (hot is None or not hot.since <= self.clock() < hot.until
                or self.limited and self.lookups.retry_after(environ.get("REMOTE_ADDR", ""))
                or hot.spends and self.lookups.spend(environ.get("REMOTE_ADDR", ""))):
            hot = self.find_hot(_new_tuple(RequestKey, values), environ.get("REMOTE_ADDR", ""))
            if hot is None:
                return None
        else:
            hot.memory.asked_again = True
        if "HTTP_IF_NONE_MATCH" in environ:
            status, body = serve(hot.prepared, environ, start_response)
            tail = hot.tail if status == hot.code else hot.tail_304
        else:  # serve's answer to a GET, spelt out
            start_response(hot.status, hot.headers)
            status, body, tail = hot.code, hot.body, hot.tail
        if hot.tally is not None and status < 300:  # a download counted: one atomic call (see Download counts)
            hot.tally()
        if self.record_access:  # AccessLog.request, spelt out
            self.record_access((started, time.perf_counter(), environ.get("REMOTE_ADDR", ""), tail))
        return body

    def find_hot(self, key: RequestKey, address: str) -> HotAnswer | None:
        """Return the answer to the GET of *key* if it needs no routing, deciding or building; else None.

        That is: a live token's answer decided and built before, kept by its request key until its entry is due for
        a look at its file or ends; the 404 of a token known to have no file (counted by the lookup limit, as the
        full way counts it), kept by its request key while the token is known to have no file; the 429 of a client
        being limited.
        """
        if key.method != "GET" or not key.path or len(key.path) + len(key.query or "") > MAX_TARGET:
            return None
        parts = token_path(key.path)
        if parts is None:
            return None
        token, rest = parts
        if not TOKEN_RE.fullmatch(token):
            return None  # the full way answers a malformed token 404 before any limit (match_route)
        wait = self.lookups.blocked and self.lookups.retry_after(address)
        if wait:
            return self.answers.refusal(key, lambda: self.signature(key, rest), 429, max(1, math.ceil(wait)))
        generation = self.answers.generation
        entry = self.store.fresh(token)
        if entry is None:
            unknown = self.answers.refusal(key, lambda: self.signature(key, rest), 404, 0)
            if unknown is None or not self.store.is_absent(token) or self.lookups.spend(address):
                return None
            now = self.clock()  # kept while the token is known to have no file: an upload of it forgets this
            hot = HotAnswer(unknown.prepared, unknown.tail, "", token, now, now + self.store.absent_for(token), NO_ENTRY,
                            spends=bool(self.lookups.rate))
            self.answers.keep_hot(key, hot, generation)
            return hot
        decision, now = self.answers.decisions.get(self.signature(key, rest)), self.clock()
        prepared = decision and self.answers.built.get(BuiltKey(token, decision.answer))
        memory = self.store.memory_of(entry)
        if (not prepared or now >= entry.serves_until or memory is None
                or not self.signing_from <= now < self.signing_changes):
            return None
        until = min(entry.serves_until, now + self.store.fresh_for(entry), self.signing_changes)
        tail, tail_304 = hot_tail(key, prepared, decision.device), hot_tail(key, None, decision.device)
        hot = HotAnswer(prepared, tail, tail_304, token, now, until, memory,
                        self.counts.bump_for(token, decision.device, key.user_agent))
        self.answers.keep_hot(key, hot, generation)
        return hot

    def signature(self, key: RequestKey, rest: str) -> Signature:
        """Return the Signature of a request under /c/ with *key*, whose path after /c/<token>/ is *rest*."""
        return Signature.of(key, rest, self.gate.is_our_name(key.host))

    def full_answer(self, environ: dict) -> Prepared:
        """Return the answer to any request: routed to its handler, every failure turned into a clear answer, in the
        reader's language (Request.language)."""
        request = Request(environ)
        with speaking(request.language):
            return self.full_answer_in_language(request)

    def full_answer_in_language(self, request: Request) -> Prepared:
        environ = request.environ
        try:
            if len(request.path) + len(environ.get("QUERY_STRING", "")) > MAX_TARGET:
                raise URITooLong(_("The address asked for is longer than {size} KiB: no address of certdrop is that "
                                   "long. Check the link.").format(size=MAX_TARGET // 1024))
            response = self.dispatch(request)
        except HTTPError as error:
            return self.error_answer(request, error)
        except Exception:
            log.exception("error while answering %s %r", request.method, request.path[:200])
            response = Response(f"{_(HTTPError.message)}\n".encode(), 500, MIME_TEXT)
        if isinstance(response, Prepared):
            return response
        return prepare(in_language_headers(response, request.language), referrer_policy(request.path))

    def error_answer(self, request: Request, error: HTTPError) -> Prepared:
        """Return the page, text or JSON for *error*, rendered once for each ErrorPage and kept.

        An error with more of a page (a refused upload's form, which holds what was sent) is never kept. The 404 of
        an unknown token and the 429 of a limited client are the same for every token: kept for the hot path too.
        """
        page = ErrorPage.of(request, error, self.home(request))
        referrer = referrer_policy(request.path)
        if error.extra_html:
            return prepare(render_error(page, error.extra_html), referrer)
        prepared = self.answers.error(page, referrer)
        if request.refused_lookup and request.method == "GET":
            key = request_key(request.environ)
            self.answers.keep_refusal(self.signature(key, request.path[3:].partition("/")[2]), error.status,
                                      getattr(error, "seconds", 0), prepared)
        return prepared

    def dispatch(self, request: Request) -> Response | Prepared:
        if is_api_path(request.path):  # before routing: a 404 or 405 there is JSON too
            as_api(request)
        handler, arguments = match_route(request.method, request.path)
        if not request.path.startswith(LENIENT_PATHS):
            self.gate.check_host(request)
        try:
            return handler(self, request, **arguments)
        except CertdropError as error:
            raise http_error_for(error) from None

    def base_url(self, request: Request) -> str:
        """Return the URL that links start with (see link_base)."""
        return base_url_of(request, self.config, self.gate.is_our_host(request))

    def home(self, request: Request) -> str:
        return self.prefix(request) + "/"

    # -- handlers, named after what they show ------------------------------------------------------------------

    def upload_form(self, request: Request) -> Response:
        home = self.home(request)
        try:
            how = self.gate.authorize(request)
        except Unauthorized:
            return Response(render_signin(home, ""), headers=FORM_PAGE_HEADERS)
        page = render_upload_form(self.config, action=home, signed_in=how == "session")
        return Response(page, headers=FORM_PAGE_HEADERS)

    def favicon(self, request: Request) -> Response:
        """Answer browsers' unasked-for icon request with nothing, for a day: no 404 page, no console error."""
        return Response(b"", 204, MIME_TEXT, (("Cache-Control", "public, max-age=86400"),))

    def health(self, request: Request) -> Response:
        """Answer 200 while an upload would work (room for one, a probe write of an entry's size), else 503 and why."""
        problem = self.store.check_health()
        if problem:
            raise ServiceUnavailable(problem)
        return Response(b"ok\n", 200, MIME_TEXT, (("Cache-Control", "no-store"),))

    def signin_form(self, request: Request) -> Response:
        return Response(render_signin(self.home(request), ""), headers=FORM_PAGE_HEADERS)

    def signin(self, request: Request) -> Response:
        self.gate.refuse_cross_site(request)
        self.gate.check_network(request)
        fields = parse_form(request, 4096, fields=("key", "next"))
        self.gate.check_key(request, form_text(fields, "key"))
        expires = int(self.clock()) + SESSION_SECONDS
        value = self.gate.session_value(expires, secrets.token_hex(16))
        page = "admin" if form_text(fields, "next") == "admin" else ""  # no other place: no open redirect
        return self.redirect_home(request, self.session_cookie(request, value, SESSION_SECONDS), page)

    def signout(self, request: Request) -> Response:
        """End the browser's session here and on every process sharing data_dir (within 2 s), for good."""
        self.gate.refuse_cross_site(request)
        session = self.gate.session_of(request)
        if session:
            self.gate.signed_out.add(session[1], session[0])
        return self.redirect_home(request, self.session_cookie(request, "", 0))

    def upload(self, request: Request) -> Response:
        self.gate.refuse_cross_site(request)
        self.gate.authorize(request)
        wait = self.uploads.spend(request.remote_addr)
        if wait:
            raise TooManyRequests(wait)
        fields = with_query_options(request, parse_form(request, self.config.max_upload))
        now, home = self.clock(), self.home(request)
        base = self.base_url(request)  # a bad Host is refused before anything is stored
        force = form_flag(fields, "force")
        try:
            diagnosis = diagnose(choose_upload(fields), now=now, host=form_text(fields, "host"),
                                 force=force, public_roots=system_trust_store())
            links = store_links(self.store, self.config, diagnosis, form_text(fields, "ttl"), now, base,
                                self.config.host, form_text(fields, "host"))
        except (CertificateError, LifetimeError) as error:
            raise self.refusal_with_form(error, fields, home, response_format(request)) from None
        status = 201 if any(link.created for link in links) else 200
        headers = (("Location", links[0].lead), ("Vary", "Accept, User-Agent"))
        return answer_for(request, status, upload_report(links, diagnosis), render_upload_text(links, diagnosis),
                          lambda: render_result(links, diagnosis, now, home=home, mail_html=render_mail_offer(
                              self.config, links, home, whc_default(self.config))), headers)

    def mail(self, request: Request) -> Response:
        """E-mail links made by an upload, as plain text; the same credential and cross-site check as uploading."""
        self.gate.refuse_cross_site(request)
        self.gate.authorize(request)
        wait = self.uploads.spend(mail_client(request.remote_addr))  # a mail relay is worth abusing: as an upload
        if wait:
            raise TooManyRequests(wait)
        if not self.config.mail_host:
            raise NotFound(_("This server sends no mail: no [mail] host is set in certdrop.ini."))
        self.check_mail_budget(self.mail_budget.retry_after(MAIL_BUDGET_KEY))
        fields = parse_form(request, MAIL_FORM_BYTES, fields=("to", "tokens"))
        try:
            recipients = parse_addresses(fields.get("to", b"").decode("utf-8", "replace")[:4000],
                                         self.config.mail_recipients)
        except ValueError as error:
            nothing_sent = _("Nothing was sent.")
            raise BadRequest(f"{error} {nothing_sent}", code="bad-address") from None
        tokens = fields.get("tokens", b"").decode("ascii", "replace").split()[:MAX_CERTIFICATES]
        if not tokens:
            raise BadRequest(_("No link was named. Nothing was sent."))
        offers = [self.offer_for(request, token) for token in tokens]
        links = [(offer.url, self.live_entry(request, token)) for offer, token in zip(offers, tokens)]
        self.check_mail_budget(self.mail_budget.spend(MAIL_BUDGET_KEY))  # a message about to go: per_hour counts it
        try:
            recipients = send_mail(self.config, recipients, mail_subject(self.config, links),
                                   mail_text(links, whc_default(self.config), offers))
        except MailError as error:
            failure = http_error_for(error)
            work = esc(_("The links themselves work; hand them out another way:"))
            items = "".join(f"<li>{link_html(url)}</li>" for url, _ in links)
            failure.extra_html = f"<p>{work}</p><ul>{items}</ul>"
            raise failure from None
        log.info("mailed %d links to %d addresses", len(links), len(recipients))
        addresses = ", ".join(recipients)
        return answer_for(request, 200, {"sent_to": recipients},
                          term(_("sent to {addresses}").format(addresses=addresses)) + "\n",
                          lambda: render_page(_("Sent"), render(
                              MAIL_SENT_PAGE, heading=_("The message was sent"), home=self.home(request),
                              text=_("The mail server took it for {addresses}.").format(addresses=addresses),
                              another=_("Share another certificate")), home=self.home(request)))

    def check_mail_budget(self, wait: float) -> None:
        """Refuse (429) a message while the server's per_hour is spent (*wait*: seconds until it is not)."""
        if wait:
            raise TooManyRequests(wait, ngettext(
                "This server has sent the {count} message an hour its per_hour setting allows. Nothing was sent; "
                "hand the link out another way.",
                "This server has sent the {count} messages an hour its per_hour setting allows. Nothing was sent; "
                "hand the link out another way.", self.config.mail_per_hour).format(count=self.config.mail_per_hour))

    def revoke(self, request: Request, token: str) -> Response:
        """Remove a link with the secret shown when it was made: at once here, within 2 s on every process."""
        self.gate.refuse_cross_site(request)
        address = request.remote_addr
        wait = self.lookups.retry_after(address)
        if wait:
            raise TooManyRequests(wait)
        # In the body only: a query string would put the secret into access logs, ours and a proxy's.
        secret = form_text(parse_form(request, 4096, fields=("secret",)), "secret")
        try:
            entry = self.store.get(token)
        except (UnknownToken, LinkGone):
            entry = None
        if entry is None or not entry.may_be_revoked_with(secret):
            # One answer and one count for a wrong secret and a token with no live link: telling them apart
            # would let anybody test guessed tokens here, past the lookup limit. A link's secret is guessed like a
            # token, so the lookup limit counts it, never the upload key's: anybody may send one, and on an IPv6
            # network the key's limit counts a whole /64, the administrator's machine too.
            self.lookups.spend(address)
            raise Forbidden(_("Nothing was removed: there is no live link with that secret. Only the page that "
                              "made a link shows its secret; on the server, {command} removes any link.").format(
                                  command="'certdrop.py revoke TOKEN'"), code="wrong-secret")
        entry = self.store.revoke(token)
        log.info("link %s revoked from the web", entry.token)
        text = _("revoked {token}: it answers 410 from now on").format(token=entry.token)
        page = _("It answers \u201c{title}\u201d from now on, on every certdrop process within 2 seconds. Devices "
                 "that already installed the certificate keep it: remove it there by hand.").format(
                     title=_(ERROR_TITLES[410]))
        return answer_for(request, 200, {"revoked": entry.token}, f"{text}\n", lambda: render_page(
            _("Link removed"), render(REVOKED_PAGE, heading=_("The link was removed"), text=page,
                                      home=self.home(request), another=_("Share a certificate")),
            home=self.home(request)))

    def refusal_with_form(self, error: CertdropError, fields: dict[str, bytes], home: str, fmt: str) -> HTTPError:
        """Return the answer to a refused upload: the reason, then the form again, filled in as it was sent.

        Pasted text comes back unless it held a private key, which is never sent anywhere again. A refusal that
        "install it anyway" overrides brings the refused certificates back too, as PEM in the form, so that ticking
        the box and sending is all it takes: nothing is kept on the server, so any process behind the same name
        takes the confirmation. Only certificates come back (read_certificates refuses anything with a key).
        """
        forceable = getattr(error, "code", "") in FORCEABLE
        refusal = http_error_for(error)
        if forceable and fmt == "html":  # a sentence of its own after the refusal's, which says everything without it
            refusal.message += " " + _("To go ahead all the same, tick \u201cInstall it anyway\u201d below and "
                                       "send the form again: the certificates come back with it.")
        elif forceable:
            refusal.message += " " + _("To go ahead all the same, send it again with force=1 (a form field, or "
                                       "?force=1 in the address).")
        pem = "" if getattr(error, "code", "") == "private-key" else fields.get("pem", b"").decode("utf-8", "replace")
        refused = "" if not forceable or pem.strip() else refused_pem(fields)
        refusal.extra_html = render_form(self.config, home, pem=pem, ttl=form_text(fields, "ttl"),
                                         host=form_text(fields, "host"), refused=refused,
                                         forced=FLAG_VALUES.get(form_text(fields, "force").lower(), False),
                                         force_reason=_("Tick this to install it despite the refusal above.") if forceable
                                         else "")
        return refusal

    def deliver(self, request: Request, token: str, **_: str) -> Prepared:
        """Return what a request under /c/<token> gets for a live token: decided by its signature, built for the
        entry, and kept for the hot path (the route's parts are in the signature's rest)."""
        # First: an answer made from an entry or a signing state read after a forget or a clear is not kept
        # (check_signer sets self.signing before it clears; another thread may extend or replace the entry)
        generation = self.answers.generation
        entry = self.live_entry(request, token)
        signature = self.signature(request_key(request.environ), request.path[3:].partition("/")[2])
        self.check_signer(self.clock())
        decision = self.answers.decision(signature, self.config, self.signing, generation)
        request.environ["certdrop.device"] = decision.device  # for the access log
        if request.method == "GET":  # counted by answer() once it is sent with a 2xx
            request.environ["certdrop.tally"] = self.counts.bump_for(entry.token, decision.device, request.user_agent)
        return self.answers.answer(entry, decision.answer, self.config, self.signer, generation)

    def check_signer(self, now: float) -> None:
        """Sign profiles from now on if the signer is valid at *now*, else send them unsigned (with one warning).

        Whether a profile is signed is decided (decide) and kept like the rest of its answer, so when the signer's
        validity begins or ends every kept decision and answer is forgotten; the hot path serves nothing kept outside
        the period in which it was decided ([signing_from, signing_changes)), also when the clock is set back.
        """
        if self.signing_from <= now < self.signing_changes:
            return
        with self._signer_lock:
            if self.signing_from <= now < self.signing_changes:
                return
            signer, signing = self.signer, self.signer.is_valid_at(now)
            period = ((-math.inf, signer.not_before) if now < signer.not_before else
                      (signer.not_before, signer.not_after) if signing else (signer.not_after, math.inf))
            if signing != self.signing or self.signing_changes == -math.inf:
                self.signing = signing  # first: a decision made with the old value after the clear is not kept
                self.answers.clear()
                if not signing:
                    log.warning("profiles are sent unsigned: the signing certificate %r is valid from %s until %s "
                                "(profile_signer_certificate)", self.signer.name, format_time(self.signer.not_before),
                                format_time(self.signer.not_after))
            self.signing_from, self.signing_changes = period

    def root_link(self, request: Request, token: str) -> Response:
        """Send the reader of an intermediate CA's link on to its root CA's link (the upload recorded the chain),
        as it is now: never kept, since that link may end or change on its own."""
        root = recorded_root(self.live_entry(request, token))
        if root is None:
            raise NotFound(_("The upload that made this link did not hold the root CA that issued it. Ask whoever "
                             "sent you this link for the root CA's link."))
        entry = self.store.live_entry_for(root.sha256)
        if entry is None:
            raise NotFound(_("The root CA that issued this certificate, \u201c{name}\u201d, has no live link here "
                             "any more. Ask whoever sent you this link for a new one.").format(name=root.name))
        return Response(b"", 303, MIME_TEXT, (("Location", f"{self.prefix(request)}/c/{entry.token}"),
                                              ("Cache-Control", "no-store")))

    def link_for(self, request: Request, token: str) -> str:
        """Return the link to hand out for *token*: on public_url, else on a name or address phones can reach."""
        return self.offer_for(request, token).url

    def offer_for(self, request: Request, token: str) -> LinkOffer:
        """Return the link to hand out for *token* with its note and alternatives (offer_link)."""
        return offer_link(install_url(self.base_url(request), token), self.config.host, bool(self.config.public_url))

    def live_entry(self, request: Request, token: str) -> Entry:
        """Return the live entry of *token*; count unknown tokens per client, so that guessing them runs into 429.

        Once a client is limited, every lookup of it answers 429, known token or not: otherwise the difference
        between 200 and 429 would still tell a guesser which tokens exist.
        """
        wait = self.lookups.retry_after(request.remote_addr)
        if wait:
            request.refused_lookup = True
            raise TooManyRequests(wait)
        try:
            return self.store.get(token)
        except UnknownToken:
            request.refused_lookup = True
            wait = self.lookups.spend(request.remote_addr)
            if wait:
                raise TooManyRequests(wait) from None
            raise

    def session_cookie(self, request: Request, value: str, max_age: int) -> str:
        base = self.base_url(request)
        path = urllib.parse.urlsplit(base).path.rstrip("/") + "/"
        secure = "; Secure" if base.startswith("https:") else ""
        return f"{SESSION_COOKIE}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"

    def choose_language(self, request: Request, code: str) -> Response:
        """Keep the language chosen on a page's picker in a cookie for a year and go back to that page (*next*, a
        path under the prefix: anything else goes to the upload page, so the picker sends nobody elsewhere)."""
        if code not in LANGUAGES:
            raise NotFound(_("certdrop does not speak that language."))
        home = self.home(request)
        secure = "; Secure" if self.base_url(request).startswith("https:") else ""
        cookie = f"{LANGUAGE_COOKIE}={code}; Path={home}; Max-Age={LANGUAGE_COOKIE_SECONDS}; HttpOnly; SameSite=Lax{secure}"
        return Response(b"", 303, MIME_TEXT, (("Location", safe_next(request.query.get("next", ""), home)),
                                              ("Set-Cookie", cookie), ("Cache-Control", "no-store")))

    def redirect_home(self, request: Request, cookie: str, page: str = "") -> Response:
        return Response(b"", 303, MIME_TEXT, (("Location", self.base_url(request) + "/" + page), ("Set-Cookie", cookie),
                                              ("Cache-Control", "no-store")))


#: How long the picker's choice of language is kept: a year.
LANGUAGE_COOKIE_SECONDS = 365 * 86400

#: A path the picker may go back to: printable ASCII without a backslash (browsers read it as a slash).
#: The longest path the picker goes back to: a page of certdrop has a short address.
MAX_NEXT = 1024
NEXT_PATH_RE = re.compile(r"/[!-\[\]-~]*")


def safe_next(path: str, home: str) -> str:
    """Return *path* if it is an address on this server under *home* (the prefix and a slash), else *home*: no
    scheme, no "//host" (a path that names another server), no backslash, no control character."""
    if (len(path) <= MAX_NEXT and NEXT_PATH_RE.fullmatch(path) and path.startswith(home)
            and not path.startswith("//")):
        return urllib.parse.quote(path, safe=URL_SAFE + "?%")  # < > " { } and the like, as a browser sends them
    return home


def in_language_headers(response: Response, language: str) -> Response:
    """Return *response* saying its language (Content-Language) and that it depends on the headers it came from
    (Vary: Accept-Language, Cookie, beside any Vary it has)."""
    headers = dict(response.headers)
    vary = [name.strip() for name in headers.get("Vary", "").split(",") if name.strip()]
    vary += [name for name in LANGUAGE_HEADERS if name not in vary]
    rest = tuple((name, value) for name, value in response.headers if name != "Vary")
    if "Content-Language" not in headers:
        rest += (("Content-Language", language),)
    return dataclasses.replace(response, headers=rest + (("Vary", ", ".join(vary)),))


def store_links(store: Store, config: Config, diagnosis: Diagnosis, ttl: str, now: float, base: str,
                bound: str = "", host: str = "") -> list[Link]:
    """Store every installable certificate of *diagnosis*, roots first, with the server name *host* the upload gave
    and the doctor's report, and return their links: on *base*, and as handed out (offer_link, for a server
    listening on *bound*)."""
    expiries = [link_expiry(config, certificate, ttl, now) for certificate in diagnosis.installable]
    wanted = [(certificate, expires, secrets.token_urlsafe(16))
              for certificate, (expires, _) in zip(diagnosis.installable, expiries, strict=True)]  # all checked first
    chains = chains_within(list(diagnosis.installable))
    links = []
    for (certificate, expires, secret), (_, cut), (entry, created) in zip(wanted, expiries,
                                                                          store.add_all(wanted, chains, host,
                                                                                        report_record(diagnosis))):
        log.info("%s link %s for %r until %s", "new" if created else "existing", entry.token, certificate.name,
                 format_time(entry.expires))
        url = install_url(base, entry.token)
        offer = offer_link(url, bound, bool(config.public_url)) if url.startswith("http") else None
        links.append(Link(entry, url, created, cut and entry.expires == expires, secret if created else None, offer))
    return links


def upload_report(links: list[Link], diagnosis: Diagnosis) -> dict:
    """Return the JSON answer to an upload, less the version answer_for adds (README documents this shape)."""
    def when(timestamp: float) -> str:
        return datetime.fromtimestamp(timestamp, timezone.utc).isoformat().replace("+00:00", "Z")

    return {
        "format": diagnosis.source,
        "links": [{
            **link_fields(link), "token": link.entry.token, "new": link.created, "expires": when(link.entry.expires),
            "cut_to_certificate": link.cut, "name": c.name, "role": c.role, "subject": c.subject,
            "issuer": c.issuer, "not_before": when(c.not_before.timestamp()),
            "not_after": when(c.not_after.timestamp()), "sha256": colon_hex(c.sha256), "sha1": colon_hex(c.sha1),
            "revoke_url": f"{link.lead}/revoke", "revoke_secret": link.revoke_secret,
        } for link in links for c in (link.entry.certificate,)],
        "left_out": [{"name": c.name, "sha256": colon_hex(c.sha256), "reason": reason}
                     for c, reason in diagnosis.left_out],
        "findings": [dataclasses.asdict(finding) for finding in diagnosis.findings],
    }


def link_fields(link: Link) -> dict:
    """Return a link as JSON answers and ``show --json`` carry it: the link to hand out, its note (null when the
    link as asked for reaches phones) and the other links that reach this server."""
    offer = link.offer or LinkOffer(link.url, "", (), link.url)
    return {"url": offer.url, "url_note": offer.note or None, "alternatives": [url for url, _ in offer.alternatives]}


def link_note_lines(offer: LinkOffer | None, indent: str = "  ") -> list[str]:
    """Return a link's note and alternatives (offer_link) as plain-text lines, for scripts and the command line."""
    if offer is None or not offer.note:
        return []
    lines = [indent + offer.note]
    lines += [indent + _("also {link}").format(link=url) for url, _host in offer.alternatives]
    return lines


def render_upload_text(links: list[Link], diagnosis: Diagnosis) -> str:
    """Return the plain-text answer to an upload, for curl, wget and PowerShell: the links first, one a line."""
    lines = [link.lead for link in links] + [""]
    for link in links:
        certificate = link.entry.certificate
        if link.created:
            text = (_("{role} \u201c{name}\u201d, new link, works until {date} (cut to the certificate)") if link.cut
                    else _("{role} \u201c{name}\u201d, new link, works until {date}"))
        else:
            text = (_("{role} \u201c{name}\u201d, link it already had, works until {date} (cut to the certificate)")
                    if link.cut else _("{role} \u201c{name}\u201d, link it already had, works until {date}"))
        text = text.format(role=_(ROLE_LABELS[certificate.role]), name=certificate.name,
                           date=format_time(link.entry.expires))
        lines += [f"{link.lead}  {text}", *link_note_lines(link.offer), f"  SHA-256 {colon_hex(certificate.sha256)}",
                  f"  SHA-1   {colon_hex(certificate.sha1)}"]
        if link.revoke_secret:
            lines.append("  " + _("to remove it: {command}").format(
                command=f"curl -d secret={link.revoke_secret} {link.lead}/revoke"))
    lines += [_("left out: {reason}").format(reason=reason) for _certificate, reason in diagnosis.left_out]
    lines += [(_("note [{code}]: {message}") if f.note else _("warning [{code}]: {message}")).format(
        code=f.code, message=f.message) for f in diagnosis.findings]
    return "".join(term(line) + "\n" for line in lines)


def form_text(fields: dict[str, bytes], name: str) -> str:
    return fields.get(name, b"").decode("utf-8", "replace").strip()[:256]


#: How a yes-or-no option (force) may be written, in a form or a query string.
FLAG_VALUES = {"": False, "0": False, "no": False, "false": False, "off": False,
               "1": True, "yes": True, "true": True, "on": True}


def form_flag(fields: dict[str, bytes], name: str) -> bool:
    """Return a yes-or-no option of the upload; raise BadRequest for a value that is neither."""
    value = form_text(fields, name).lower()
    if value not in FLAG_VALUES:
        raise BadRequest(_("{name}={value} is neither yes nor no: send {name}=1 or leave it out.").format(
            name=name, value=value[:40]), code="bad-option")
    return FLAG_VALUES[value]


def with_query_options(request: Request, fields: dict[str, bytes]) -> dict[str, bytes]:
    """Return the upload's *fields* with the options its address carries (``POST /?ttl=30d&force=1``), taken as
    form fields are, whatever the body is. Anything else in the query string, or an option whose value there
    differs from the form's, is refused (400): an option certdrop ignored would make, say, a 7-day link unasked."""
    merged = dict(fields)
    for name, value in urllib.parse.parse_qsl(request.environ.get("QUERY_STRING", ""), keep_blank_values=True):
        if name not in UPLOAD_OPTIONS:
            raise BadRequest(_("An upload takes no \u201c{name}\u201d in its address: the options there are {options}."
                               ).format(name=name[:40], options=", ".join(UPLOAD_OPTIONS)), code="bad-option")
        given = value.encode("utf-8")
        if merged.get(name, b"").strip() and merged[name].strip() != given.strip():
            raise BadRequest(_("{name} is given twice, differently, in the form and in the address: give it "
                               "once.").format(name=name), code="bad-option")
        merged[name] = given
    return merged


def refused_pem(fields: dict[str, bytes]) -> str:
    """Return the certificates of an upload as PEM text, to send back with the form for a confirmation."""
    try:
        _source, certificates = read_certificates(choose_upload(fields))
    except (CertdropError, ValueError):
        return ""
    return "".join(certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
                   for certificate in certificates[:MAX_CERTIFICATES])


def choose_upload(fields: dict[str, bytes]) -> bytes:
    """Return the certificate bytes from the form: the file, or else the pasted text, or else the certificates
    a refusal sent back for confirming (refused_pem)."""
    file_data, pasted = fields.get("cert", b""), fields.get("pem", b"")
    if file_data.strip() and pasted.strip():
        raise BadRequest(_("Choose a file or paste the certificate text, not both."))
    return file_data if file_data.strip() else pasted if pasted.strip() else fields.get("refused", b"")


#: (path pattern, {method: handler}); HEAD is answered by the GET handler.
ROUTES = (
    (r"/", {"GET": App.upload_form, "POST": App.upload}),
    (r"/signin", {"GET": App.signin_form, "POST": App.signin}),
    (r"/signout", {"POST": App.signout}),
    (r"/healthz", {"GET": App.health}),
    (r"/favicon\.ico", {"GET": App.favicon}),
    (r"/mail", {"POST": App.mail}),
    (r"/lang/(?P<code>[a-z]{2})", {"GET": App.choose_language}),
    (r"/admin", {"GET": admin_page}),
    (r"/admin/link/(?P<token>[^/]+)", {"GET": admin_link}),
    (r"/admin/link/(?P<token>[^/]+)/revoke", {"GET": admin_revoke, "POST": admin_revoke}),
    (r"/admin/link/(?P<token>[^/]+)/extend", {"POST": admin_extend}),
    (r"/admin/api/v1/links", {"GET": api_links}),
    (r"/admin/api/v1/links/(?P<token>[^/]+)", {"GET": api_link}),
    (r"/admin/api/v1/links/(?P<token>[^/]+)/revoke", {"POST": api_revoke}),
    (r"/admin/api/v1/links/(?P<token>[^/]+)/extend", {"POST": api_extend}),
    (r"/c/(?P<token>[^/]+)/?", {"GET": App.deliver}),
    (r"/c/(?P<token>[^/]+)/revoke", {"POST": App.revoke}),
    (r"/c/(?P<token>[^/]+)/qr\.(?P<kind>svg|png)", {"GET": App.deliver}),
    (r"/c/(?P<token>[^/]+)/card", {"GET": App.deliver}),
    (r"/c/(?P<token>[^/]+)/dev", {"GET": App.deliver}),
    (r"/c/(?P<token>[^/]+)/root", {"GET": App.root_link}),
    (r"/c/(?P<token>[^/]+)/(?P<name>[A-Za-z0-9._-]{0,100}(?i:\.cer|\.crt|\.der|\.pem|\.mobileconfig|\.whc))",
     {"GET": App.deliver}),
)
COMPILED_ROUTES = tuple((re.compile(pattern), handlers) for pattern, handlers in ROUTES)
#: The routes under /c/, tried alone for paths there: most requests are for links.
TOKEN_ROUTES = tuple(route for route in COMPILED_ROUTES if route[0].pattern.startswith("/c/"))


def match_route(method: str, path: str) -> tuple[Callable, dict[str, str]]:
    """Return the handler and path arguments for a request; raise NotFound or MethodNotAllowed."""
    for pattern, handlers in TOKEN_ROUTES if path.startswith("/c/") else COMPILED_ROUTES:
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
                 cache_bytes=config.cache_size, tombstone_ttl=config.tombstone_ttl, clock=clock)


def make_app(config: Config, store: Store | None = None, clock: Callable[[], float] = time.time,
             access_log: AccessLog | None = None) -> App:
    """Return the WSGI application for *config*; tests pass their own store, clock and access log."""
    quiet_library_warnings()
    signer = load_profile_signer(config)
    return App(config, store or make_store(config, clock), clock, access_log or ACCESS_LOG, signer)


###############################################################################
# Fair shares of the server ###################################################
###############################################################################
# Waitress has no per-client limit, no deadline for a request's headers (its channel_timeout restarts with every
# byte, so a trickle never ends) and no hook between a request's headers and its body (it reads the whole body,
# after a "100 Continue", before the app sees who sends it). These subclasses of its server, channel and parser
# add the three, relying on the waitress internals named in their comments; test_waitress_internals_that_the_fair_
# server_relies_on_are_still_there fails loudly when an upgrade changes them, and requirements.txt pins the version
# they were checked on. The app itself runs under any WSGI server, without these guards.

#: Seconds a refused request's connection keeps reading (and dropping) what the client still sends, and how much,
#: so that the client reads the refusal instead of a reset; then it is closed.
LINGER_SECONDS, LINGER_BYTES = 2.0, 256 * 1024

#: The body a request that does not upload may carry (a sign-in, a sign-out, a removal): checked before it is read.
SMALL_BODY = 16 * 1024


@functools.cache
def fair_server_class() -> type:
    """Return waitress's TCP server made fair (see the section): waitress is imported here, as only serve needs it."""
    from waitress.channel import HTTPChannel
    from waitress.parser import HTTPRequestParser
    from waitress.server import TcpWSGIServer
    from waitress.utilities import RequestEntityTooLarge

    class EarlyAnswer:
        """A refusal decided from a request's headers, written by waitress's ErrorTask (which calls to_response
        for request.error and closes the connection after it)."""

        def __init__(self, prepared: Prepared):
            self.prepared = prepared

        def to_response(self, ident: str) -> tuple[str, list, bytes]:
            return self.prepared.status, [*self.prepared.headers, ("Connection", "close")], self.prepared.body[0]

    class ScreenedParser(HTTPRequestParser):
        """waitress's request parser that asks the server about a body once the headers are in (received() sets
        headers_finished and body_rcv there), before a "100 Continue" is sent or a body byte kept."""

        screened = False
        body_limit = math.inf
        channel: "FairChannel"  # whose request this is, and when its first byte came: set by FairChannel.parser_class
        began: float

        def received(self, data: bytes) -> int:
            consumed = HTTPRequestParser.received(self, data)  # not super(): this runs for every request
            if self.body_rcv is None and not self.content_length:  # no body (or headers not in yet): nothing to do
                if self.empty:  # blank lines before a request line (RFC 9112, 2.2): its headers are still due
                    self.channel.blank_since = self.began
                return consumed
            if self.headers_finished and not self.screened and not self.error:
                self.screened = True
                if self.body_rcv is not None or self.content_length:
                    self.screen()
            # A body without a length (chunked) may not run on past its limit: twice it, as waitress counts the
            # chunks' framing too (a declared length was checked against the limit itself, by the screen)
            if self.body_bytes_received > 2 * self.body_limit and not self.completed:
                self.error, self.completed = RequestEntityTooLarge("exceeds the body this request may carry"), True
            return consumed

        def screen(self) -> None:
            refusal, self.body_limit = self.channel.server.screen(self.environ_for_screening(self.channel.addr[0]))
            if refusal is not None:
                self.error, self.completed, self.expect_continue = EarlyAnswer(refusal), True, False
                self.channel.refused_early = True

        def environ_for_screening(self, address: str) -> dict:
            """Return the part of the WSGI environ the app's checks read, as waitress's WSGITask will make it."""
            path = self.path  # as WSGITask.get_environment makes PATH_INFO: leading slashes are one ("//" is "/")
            if path.startswith("/"):
                path = "/" + path.lstrip("/")
            environ = {"REMOTE_ADDR": address, "REQUEST_METHOD": self.command.upper(), "PATH_INFO": path,
                       "QUERY_STRING": self.query, "SCRIPT_NAME": "", "wsgi.url_scheme": self.url_scheme,
                       "SERVER_NAME": self.channel.server.server_name,
                       "SERVER_PORT": str(self.channel.server.effective_port)}
            for key, value in self.headers.items():
                environ[key if key in ("CONTENT_LENGTH", "CONTENT_TYPE") else "HTTP_" + key] = value
            return environ

    class DroppedRequest(ScreenedParser):
        """What follows an early refusal on its connection (the body it was not to send, and anything after):
        dropped, never parsed, so that a refused body cannot pass for requests of its own, screened in turn and
        spending the limits of whichever client its forged proxy headers name."""

        def received(self, data: bytes) -> int:
            return len(data)  # until the refusal is written and the linger (which has its own bound) takes over

    class FairChannel(HTTPChannel):
        """waitress's connection, counted per client, with a deadline for each request's line and headers and a
        lingering close after an early refusal.

        waitress's loop asks each channel readable() on every turn and hands what it reads to received(): neither
        is overridden, as that would cost every request a frame or two; a lingering channel replaces both on
        itself (see linger).
        """

        refused_early = False
        lingering_until = 0.0
        dropped = 0
        #: when the blank lines that came instead of a request line began (0: none): the header deadline runs from it
        blank_since = 0.0

        def __init__(self, server, sock, addr, adj, map=None, client: str = ""):
            self.client = client or client_key(addr[0])
            server.clients[self.client] = server.clients.get(self.client, 0) + 1  # counted out in del_channel
            try:
                super().__init__(server, sock, addr, adj, map)
            except BaseException:
                self.count_out(server)
                raise

        def parser_class(self, adj) -> "ScreenedParser":
            """Return the parser of a new request: waitress calls self.parser_class(self.adj) with the request's
            first byte, so header_seconds run from now. A method, not a partial of a parser with its own __init__:
            this runs for every request, and each frame saved shows on the hot path."""
            parser = DroppedRequest(adj) if self.refused_early else ScreenedParser(adj)
            parser.channel, parser.began = self, self.blank_since or time.monotonic()
            self.blank_since = 0.0
            return parser

        def handle_close(self) -> None:
            """Close, or, once an early refusal is sent, stop sending and read on for a while (see linger)."""
            if self.refused_early and not self.lingering_until and self.connected and self.socket is not None:
                with contextlib.suppress(OSError):
                    self.socket.shutdown(socket.SHUT_WR)
                    self.linger()
                    return
            super().handle_close()

        def linger(self) -> None:
            """Read and drop what the client still sends, up to LINGER_BYTES and LINGER_SECONDS (maintenance closes
            it then), so that it reads the refusal before the connection ends."""
            self.lingering_until = time.monotonic() + LINGER_SECONDS
            self.will_close = self.close_when_flushed = False
            self.readable = lambda: True
            self.received = self.drop

        def drop(self, data: bytes) -> bool:
            self.dropped += len(data)
            if self.dropped > LINGER_BYTES:
                self.close()
            return True

        def del_channel(self, map=None) -> None:
            """Count the connection out: every way waitress closes one (close, handle_close) ends here."""
            self.count_out(self.server)
            super().del_channel(map)

        def count_out(self, server) -> None:
            if self.client is not None:
                count = server.clients.get(self.client, 1) - 1
                if count > 0:
                    server.clients[self.client] = count
                else:
                    server.clients.pop(self.client, None)
                self.client = None

    class FairServer(TcpWSGIServer):
        """waitress's TCP server with a cap on each client's connections and the channels above."""

        channel_class = FairChannel

        def __init__(self, application, *, screen: Callable, per_client: int, header_seconds: float,
                     exempt: str, **adjustments):
            self.screen = screen  # environ -> (refusal or None, the body the request may carry)
            self.per_client = per_client
            self.header_seconds = header_seconds
            #: the trusted proxy's own address, exempt from the cap (not its /64: its neighbours are clients)
            self.exempt = parse_address(exempt) if exempt and exempt != "*" else None
            self.clients: dict[str, int] = {}  # client_key -> open connections (about 100 bytes each)
            super().__init__(application, **adjustments)

        def handle_accept(self) -> None:
            """Accept a connection as waitress does, unless its client holds per_client already."""
            try:
                accepted = self.accept()
            except OSError:
                return
            if accepted is None:
                return
            connection, address = accepted
            client = client_key(address[0])
            if self.exempt is not None and parse_address(address[0]) == self.exempt:
                client = str(self.exempt)  # no cap, and counted apart from the clients of its /64
            elif self.per_client and self.clients.get(client, 0) >= self.per_client:
                with contextlib.suppress(OSError):
                    connection.setblocking(False)
                    connection.send(TOO_MANY_CONNECTIONS)
                    connection.recv(65536)  # a request already sent, read: closing over unread bytes is a reset
                connection.close()
                return
            with contextlib.suppress(OSError):
                self.set_socket_options(connection)
                self.channel_class(self, connection, self.fix_addr(address), self.adj, map=self._map, client=client)
                return
            connection.close()

        def maintenance(self, now: float) -> None:
            """Close what waitress's own idle check misses: requests whose headers take longer than header_seconds
            however steadily their bytes trickle in, and refused connections done lingering."""
            super().maintenance(now)
            late, monotonic = time.monotonic() - self.header_seconds, time.monotonic()
            for channel in list(self.active_channels.values()):
                if channel.lingering_until and monotonic > channel.lingering_until:
                    channel.close()
                elif (channel.request is not None and not channel.request.headers_finished
                      and channel.request.began < late) or 0 < channel.blank_since < late:
                    channel.will_close = True

    return FairServer


#: What a client past its share of connections gets before its connection is closed.
TOO_MANY_CONNECTIONS = (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain; charset=utf-8\r\n"
                        b"Connection: close\r\nRetry-After: 10\r\nContent-Length: 71\r\n\r\n"
                        b"Too many open connections from your address: close some and try again.\n")


###############################################################################
# Command line ################################################################
###############################################################################


#: The file in data_dir where ``serve`` records the address it listens on, for the command line's links.
LISTENING_FILE = "listening"


def record_listening(config: Config, host: str, port: int) -> None:
    """Record in data_dir the address this server listens on (``serve --port 9000``, ``port = 0``), so that the
    command line's links name it. Written atomically: a command reading it sees the old server's or this one's."""
    data = json.dumps({"host": host, "port": port, "pid": os.getpid()}).encode() + b"\n"
    try:
        _write_atomically(Path(config.data_dir) / LISTENING_FILE, data, mode=0o644)
    except OSError as error:
        log.warning("could not record the listening address in %s: %s", config.data_dir, error)


def forget_listening(config: Config) -> None:
    """Remove the record of record_listening when it is still this process's (another server may have started)."""
    path = Path(config.data_dir) / LISTENING_FILE
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        if json.loads(read_regular_file(path, 4096)[0][:4096]).get("pid") == os.getpid():
            path.unlink()


def listening_address(config: Config) -> tuple[str, int]:
    """Return (host, port) of the running server as it recorded them, else the configuration's."""
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        record = json.loads(read_regular_file(Path(config.data_dir) / LISTENING_FILE, 4096)[0][:4096])
        host, port = record["host"], record["port"]
        if isinstance(host, str) and isinstance(port, int) and 0 < port <= 65535 and len(host) <= 253:
            return host, port
    return config.host, config.port


def cli_base_url(config: Config) -> str:
    """Return the start of links printed by the command line, which has no request to take a Host from: public_url,
    else this machine on the port the server listens on, as a browser on the server itself would name it.

    offer_link then makes of it what a page asked on the server itself shows. Empty when no address is known: with
    ``port = 0`` and no server running, the port is picked only when the server starts.
    """
    if config.public_url:
        return config.public_url
    host, port = listening_address(config)
    if port == 0:
        return ""
    if is_wildcard_address(host):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host.strip('[]')}]"
    return f"http://{host.lower()}{'' if port == 80 else f':{port}'}"


def own_server_name(config: Config) -> str:
    """Return the name serve gives waitress as SERVER_NAME, which links are made from when a request names no host
    of this server (an HTTP/1.0 phone that sends no Host; under /c/, a Host this server does not answer to): the
    address it listens on, or, on every interface, the machine's first address that phones reach, else its full
    name, else localhost. waitress's own stand-in, waitress.invalid, would give links that open nothing."""
    host = config.host
    if not is_wildcard_address(host):
        return f"[{host.strip('[]')}]" if ":" in host else host
    return next(iter(machine_addresses()), None) or machine_fqdn() or "localhost"


def cli_offer(config: Config, token: str) -> LinkOffer | None:
    """Return the link the command line prints for *token*: the one pages and answers hand out (offer_link)."""
    base = cli_base_url(config)
    if not base:
        return None
    return offer_link(install_url(base, token), listening_address(config)[0], bool(config.public_url))


def give_back_free_memory() -> None:
    """Hand back to the system the memory that start-up used and freed: compiling this module (a script run as
    ``certdrop.py serve`` is compiled afresh every time), reading the catalogs and the store. glibc's malloc keeps
    freed memory in the process otherwise: some 13 MiB of a fresh server's 50. Where there is no malloc_trim
    (musl, macOS, Windows), nothing is done."""
    import ctypes
    import gc
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return
    gc.collect()
    trim(0)


def cmd_serve(args, config: Config, clock: Callable[[], float]) -> int:
    try:
        fair_server_class()
    except ModuleNotFoundError as error:
        raise CertdropError(missing_dependency(error).removeprefix("certdrop: ")) from None

    if args.host:
        config = dataclasses.replace(config, host=args.host)
    if args.port is not None:
        config = dataclasses.replace(config, port=args.port)
    app = make_app(config, clock=clock)
    if config.log_level != "DEBUG":
        # waitress warns "Task queue depth is N" for each request that waits for a free thread: under load,
        # thousands of lines a second, costing more than the requests they are about
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    removed = app.store.remove_stale_temporary()
    if removed:
        log.info("removed %d temporary files that an interrupted writer left behind", removed)
    folded = fold_stopped_counts(app.store)
    if folded:
        log.info("added the download counts of %d stopped processes together", folded)
    give_back_free_memory()
    # Waitress keeps bodies in memory up to inbuf_overflow; set both above our own limit, so that certdrop
    # answers oversize uploads with its own message and no body is spooled to disk.
    body_limit = 2 * config.max_upload + 65536
    raise_file_limit(config.connection_limit + 64)
    # Idle and byte-at-a-time clients cost a socket each, no thread: enough sockets, polled past select()'s 1,024,
    # and dropped after channel_timeout of silence, keep one client from starving the rest.
    # Fair shares: a cap on each client's connections, a deadline for each request's headers, no body before the
    # app's checks pass (FairServer); maintenance runs every second to keep the deadline.
    try:
        server = fair_server_class()(app, screen=app.screen, per_client=config.client_connections,
                                     header_seconds=config.header_timeout, exempt=config.trusted_proxy,
                                     host=config.host, port=config.port, threads=config.threads, ident="certdrop",
                                     server_name=own_server_name(config),
                                     max_request_body_size=body_limit, inbuf_overflow=body_limit + 1,
                                     connection_limit=config.connection_limit, channel_timeout=config.channel_timeout,
                                     cleanup_interval=1, asyncore_use_poll=config.use_poll,
                                     # A request line and headers past this get waitress's own 431, never the app
                                     max_request_header_size=MAX_REQUEST_HEADERS,
                                     # The app reads proxy headers itself (make_app): waitress clearing them first
                                     # would make a request passed on by an unconfigured proxy look like one made on
                                     # this machine.
                                     clear_untrusted_proxy_headers=False)
    except ValueError as error:  # waitress's "Invalid host/port specified.": a --host it cannot listen on
        raise ConfigError(f"cannot listen on {config.host} port {config.port}: {error}") from None
    stop = threading.Event()
    if config.sweep_interval:
        threading.Thread(target=sweep_forever, args=(app.store, config.sweep_interval, stop), daemon=True).start()
    app.start_background(stop, fold=False)
    # SIGTERM (systemd), Ctrl-C, and Ctrl-Break (how Windows service wrappers stop a console program)
    for name in ("SIGTERM", "SIGINT", "SIGBREAK"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), lambda signum, frame: stop.set())
    record_listening(config, config.host, int(server.effective_port))  # before the line saying the server is up
    log.info("certdrop %s serving on http://%s:%s/ with data in %s", __version__, server.effective_host,
             server.effective_port, config.data_dir)
    announce_upload_key(app.store, config, server.effective_port)
    try:
        serve_until(server, stop)
        written = app.counts.write()  # the downloads since the last write: nothing is lost to a clean stop
        if written:
            log.info("wrote %d downloads to %s", written, app.counts.path)
    finally:
        forget_listening(config)
    if app.access_log:
        app.access_log.flush()
    log.info("certdrop stopped")
    return 0


def serve_until(server, stop: threading.Event, drain_seconds: float = 10.0) -> None:
    """Run waitress until *stop* is set; then stop accepting, finish the requests in flight and close.

    waitress's own run() would close every connection at once, dropping answers still being sent (an upload
    already stored, say). A request counts as in flight from its first byte to its last byte sent.
    """
    connections = getattr(server, "_map", None) or server.map
    loop = functools.partial(server.asyncore.loop, timeout=0.2, map=connections,
                             use_poll=server.adj.asyncore_use_poll, count=1)
    while not stop.is_set():
        loop()
    server.accepting = False
    deadline = time.monotonic() + drain_seconds
    while any(is_busy(channel) for channel in list(connections.values()) if channel is not server):
        if time.monotonic() > deadline:
            log.warning("stopping with requests still in flight after %d seconds", drain_seconds)
            break
        loop()
    server.close()
    server.task_dispatcher.shutdown()


def is_busy(channel) -> bool:
    """Return whether a waitress connection is receiving a request, running one, or sending an answer."""
    return bool(getattr(channel, "request", None) is not None or getattr(channel, "requests", None)
                or getattr(channel, "total_outbufs_len", 0))


def raise_file_limit(wanted: int) -> None:
    """Raise this process's open-file limit towards *wanted* (each connection is a socket), as far as allowed."""
    try:
        import resource
    except ImportError:  # Windows: no per-process descriptor limit to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):  # a sandbox may forbid it: then the limit it set is what there is
            target = soft
        if target < wanted:
            log.warning("only %d open files allowed (connection_limit needs %d): raise LimitNOFILE", target, wanted)


def announce_upload_key(store: Store, config: Config, port: int) -> None:
    """Tell the administrator how to upload: the generated key when it is new or a person is watching, else where it is.

    The key goes to standard error only, never into the log's messages about requests.
    """
    if config.upload_auth == "none":
        log.warning("upload_auth = none: anyone who reaches this server can publish a CA under its name")
        return
    if config.upload_password:
        return
    key, created = store.upload_key()
    base = cli_base_url(dataclasses.replace(config, port=port))
    address = offer_link(base + "/", config.host, bool(config.public_url)).url if base else "/"
    if created or sys.stderr.isatty():
        say(f"certdrop: upload key {key} ({'new, ' if created else ''}sign in at {address}signin, or "
            f"curl -u certdrop:{key} -F cert=@ca.pem {address})", file=sys.stderr)
    else:
        say(f"certdrop: the upload key is in {store.directory / UPLOAD_KEY_FILE}; 'certdrop.py upload-key' shows "
            "it", file=sys.stderr)


def sweep_forever(store: Store, interval: float, stop: threading.Event) -> None:
    """Sweep *store* every *interval* seconds until *stop* is set; log and carry on after errors."""
    while not stop.wait(interval):
        try:
            counts = store.sweep()
        except (OSError, CertdropError) as error:
            log.error("sweep failed: %s", error)
            continue
        except Exception:  # a bug, or damage no reader foresaw: this thread is the only sweep the server has
            log.exception("sweep failed; sweeping again in %s seconds", interval)
            continue
        if any(counts.values()):
            log.info("sweep: %(expired)d expired, %(deleted)d deleted, %(temporary)d temporary files", counts)


def read_input(name: str, limit: int) -> bytes:
    """Return the bytes of file *name* (``-`` is standard input); raise CertdropError if unreadable or too large."""
    try:
        if name == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(name, "rb") as file:  # at most what may be uploaded: /dev/zero or a huge file is not read whole
                data = file.read(limit + 1)
    except OSError as error:
        raise CertdropError(f"cannot read {name}: {error.strerror}") from None
    if len(data) > limit:
        raise CertdropError(f"{name} is larger than max_upload ({format_size(limit)})")
    return data


def cmd_add(args, config: Config, clock: Callable[[], float]) -> int:
    now = clock()
    diagnosis = diagnose(read_input(args.file, config.max_upload), now=now, host=args.host or "", force=args.force,
                         public_roots=system_trust_store())
    links = store_links(make_store(config, clock), config, diagnosis, args.ttl or "", now, cli_base_url(config),
                        listening_address(config)[0], args.host or "")
    if not links[0].url.startswith("http"):
        say(NO_ADDRESS_KNOWN)
    show_qr = not args.no_qr and sys.stdout.isatty()
    for link in links:
        certificate = link.entry.certificate
        say(link.lead)
        for line in link_note_lines(link.offer):
            say(line)
        if show_qr and link.url.startswith("http"):
            segno.make(link.lead, error="m").terminal(out=sys.stdout, compact=True)
        say(f"  {'new' if link.created else 'existing'} link for {_(ROLE_LABELS[certificate.role]).lower()} "
            f"\u201c{certificate.name}\u201d, works until {format_time(link.entry.expires)}")
        if link.cut:
            say(f"  {_(CUT_NOTE)}")
        say(f"  SHA-256 {colon_hex(certificate.sha256)}")
        say(f"  SHA-1   {colon_hex(certificate.sha1)}")
    for _certificate, reason in diagnosis.left_out:
        say(f"left out: {reason}")
    print_findings(diagnosis.findings, indent="")
    return 0


def print_findings(findings: Iterable[Finding], indent: str) -> None:
    """Print warnings, then device notes, then the notes for old Nokia phones under their own heading."""
    findings = list(findings)
    old_nokia = [finding for finding in findings if finding.code in OLD_NOKIA_CODES]
    for finding in findings:
        if finding not in old_nokia:
            say(f"{indent}{'note' if finding.note else 'warning'} [{finding.code}]: {finding.message}")
    if old_nokia:
        say(f"{indent}{_(OLD_NOKIA_HEADING)}:")
        for finding in old_nokia:
            say(f"{indent}  note [{finding.code}]: {finding.message}")


def say(text: str = "", file: typing.TextIO | None = None) -> None:
    """Print one line for a person at a terminal; whatever came from a certificate cannot steer the terminal."""
    print(term(text), file=file or sys.stdout)


#: What the command line says when it cannot print whole links.
NO_ADDRESS_KNOWN = ("No address is known for these links (port = 0 picks one when the server starts): start the "
                    "server, or set public_url in certdrop.ini, to print whole links.")


#: Exit statuses of ``check``.
CHECK_OK, CHECK_WARNINGS, CHECK_REFUSED, CHECK_ERROR = 0, 1, 2, 3


def check_report(name: str, data: bytes, host: str, now: float) -> tuple[int, dict]:
    """Return the exit status and the report of one file for ``check``."""
    try:
        diagnosis = diagnose(data, now=now, host=host, public_roots=system_trust_store())
    except CertificateError as error:
        return CHECK_REFUSED, {"file": name, "installable": False, "refused": {"code": error.code,
                                                                               "message": cli_message(error, "check")}}
    links = {certificate.sha256 for certificate in diagnosis.installable}
    report = {
        "file": name,
        "installable": True,
        "format": diagnosis.source,
        "certificates": [{
            "name": c.name, "role": c.role, "subject": c.subject, "issuer": c.issuer,
            "not_before": c.not_before.isoformat(), "not_after": c.not_after.isoformat(),
            "sha256": colon_hex(c.sha256), "sha1": colon_hex(c.sha1), "link": c.sha256 in links,
        } for c in diagnosis.certificates],
        "left_out": [reason for _, reason in diagnosis.left_out],
        "warnings": [dataclasses.asdict(f) for f in diagnosis.warnings],
        "notes": [dataclasses.asdict(f) for f in diagnosis.notes],
    }
    return (CHECK_WARNINGS if diagnosis.warnings else CHECK_OK), report


def print_check_report(report: dict) -> None:
    if not report["installable"]:
        say(f"{report['file']}: refused [{report['refused']['code']}]: {report['refused']['message']}")
        return
    count = len(report["certificates"])
    say(ngettext("{file}: {format}, {count} certificate", "{file}: {format}, {count} certificates", count).format(
        file=report["file"], format=report["format"], count=count))
    for c in report["certificates"]:
        say(f"  {c['role']:<17} {c['name']}  {'gets a link' if c['link'] else 'no link'}")
        say(f"  {'':<17} SHA-256 {c['sha256']}")
    for reason in report["left_out"]:
        say(f"  left out: {reason}")
    print_findings((Finding(**finding) for finding in report["warnings"] + report["notes"]), indent="  ")


def cmd_check(args, config: Config, clock: Callable[[], float]) -> int:
    now, status, reports = clock(), CHECK_OK, []
    for name in args.files:
        try:
            data = read_input(name, config.max_upload)
        except CertdropError as error:
            say(f"certdrop: {error}", file=sys.stderr)
            status = CHECK_ERROR
            continue
        file_status, report = check_report(name, data, args.host or "", now)
        status = max(status, file_status)
        reports.append(report)
        if not args.json:
            print_check_report(report)
    if args.json:
        print(json.dumps(reports, indent=2))
    return status


def cmd_list(args, config: Config, clock: Callable[[], float]) -> int:
    now, store = clock(), make_store(config, clock)
    counts = read_counts(config.data_dir)
    if args.json:
        links = chosen_links(AdminIndex(store).links(), now)
        base = cli_base_url(config)
        print(json.dumps({"version": JSON_VERSION, "links": [
            link_record(link, offer.url if (offer := cli_offer(config, link.token)) else install_url(base, link.token),
                        counts.get(link.token, {}), now) for link in links]}, indent=1))
        return 0
    notes = set()
    for token, entry in store.entries():
        if entry is None:
            say(f"{token}  damaged  (not served; the log says why)")
            continue
        gone, was = entry.gone(now), entry.remembered
        state = gone.reason if gone else "live"
        offer = cli_offer(config, entry.token)
        link = offer.url if offer else f"/c/{entry.token}"
        if offer and offer.note:
            notes.add(offer.note)
        fetched = "".join(f", {device} {count}" for device, (count, _last) in sorted(counts.get(token, {}).items()))
        say(f"{entry.token}  {state:<7}  {format_time(gone.since if gone else entry.expires)}  "
            f"{was.name if was else '-'}  {link}" + (f"  (downloads{fetched[1:]})" if fetched else ""))
    for note in sorted(notes):  # one for all: the links differ only in their token
        say(f"note: {note}")
    return 0


def cmd_show(args, config: Config, clock: Callable[[], float]) -> int:
    entry = make_store(config, clock).lookup(args.token)
    gone = entry.gone(clock())
    offer = cli_offer(config, entry.token)
    say(f"link      {offer.url if offer else f'/c/{entry.token}'}")
    for line in link_note_lines(offer, indent=" " * 10) if offer else [NO_ADDRESS_KNOWN]:
        say(line)
    say(f"state     {gone if gone else 'live until ' + format_time(entry.expires)}")
    say(f"created   {format_time(entry.created)}")
    if entry.der is None:
        if entry.was:  # the certificate itself is gone; enough remains to recognise it
            say(f"name      {entry.was.name}")
            say(f"valid     {format_time(entry.was.not_before)} to {format_time(entry.was.not_after)}")
            say(f"SHA-256   {colon_hex(entry.was.sha256)}")
        return 0
    certificate = entry.certificate
    for label, value in (("name", certificate.name), ("subject", certificate.subject),
                         ("issuer", certificate.issuer), ("valid", f"{format_time(certificate.not_before.timestamp())}"
                                                                   f" to {format_time(certificate.not_after.timestamp())}"),
                         ("serial", certificate.serial_hex), ("SHA-256", colon_hex(certificate.sha256)),
                         ("SHA-1", colon_hex(certificate.sha1))):
        say(f"{label:<9} {value}")
    return 0


def cmd_revoke(args, config: Config, clock: Callable[[], float]) -> int:
    entry = make_store(config, clock).revoke(args.token)
    say(f"revoked {entry.token}: it answers 410 Gone from now on")
    return 0


def cmd_gc(args, config: Config, clock: Callable[[], float]) -> int:
    counts = make_store(config, clock).sweep()
    say(ngettext("{expired} expired, {deleted} deleted, {temporary} temporary file removed",
                 "{expired} expired, {deleted} deleted, {temporary} temporary files removed",
                 counts["temporary"]).format(**counts))
    if counts["damaged"]:
        say(ngettext("{count} damaged entry left as it is for you to look at ('list' names it, the log says why)",
                     "{count} damaged entries left as they are for you to look at ('list' names them, the log says "
                     "why)", counts["damaged"]).format(count=counts["damaged"]))
    return 0


def cmd_upload_key(args, config: Config, clock: Callable[[], float]) -> int:
    if config.upload_password:
        say("certdrop: the upload key is upload_password in the configuration file; change it there", file=sys.stderr)
        return 1
    key, created = make_store(config, clock).upload_key(replace=args.new)
    say(key)
    if args.new:
        say("(the old key no longer works; browsers signed in with it must sign in again)", file=sys.stderr)
    elif created:
        say("(made just now: there was none yet)", file=sys.stderr)
    return 0


def build_parser():
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # usage errors exit 3, the status ``check`` documents for them
            self.print_usage(sys.stderr)
            self.exit(CHECK_ERROR, f"{self.prog}: error: {message}\n")

    parser = Parser(prog="certdrop.py", description="Share a CA certificate with one short link.")
    parser.add_argument("-c", "--config", help="ini file (default: $CERTDROP_CONFIG, else certdrop.ini beside "
                                               "certdrop.py, else built-in defaults)")
    parser.add_argument("--version", action="version", version=f"certdrop {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the web server")
    serve.add_argument("--host", help="address to listen on (overrides the config)")
    serve.add_argument("--port", type=port_argument, help="port to listen on; 0 picks a free one")
    serve.set_defaults(func=cmd_serve)
    add = commands.add_parser("add", help="store the CA certificates of a file and print their links")
    add.add_argument("file", help="certificate file (PEM, DER, PKCS#7, PKCS#12), or - for standard input")
    add.add_argument("--ttl", help="lifetime: 12h, 7d, 30d ... or cert (until the certificate expires)")
    add.add_argument("--host", help="server name people connect to; warns if the upload's server certificate "
                                    "does not name it")
    add.add_argument("--force", action="store_true", help="give a server certificate a link when no CA came with it")
    add.add_argument("--no-qr", action="store_true", help="print no QR code (none is printed when the output is no "
                                                          "terminal)")
    add.set_defaults(func=cmd_add)
    check = commands.add_parser("check", help="diagnose certificate files without storing anything; exit 0 = "
                                              "installable, 1 = with warnings, 2 = refused, 3 = usage or I/O error")
    check.add_argument("files", nargs="+", metavar="FILE", help="certificate files, or - for standard input")
    check.add_argument("--json", action="store_true", help="print the reports as JSON")
    check.add_argument("--host", help="server name to look for in the server certificates")
    check.set_defaults(func=cmd_check)
    listing = commands.add_parser("list", help="list every link, with its downloads per device class")
    listing.add_argument("--json", action="store_true", help="every link as JSON, with the fields of /admin/api/v1")
    listing.set_defaults(func=cmd_list)
    show = commands.add_parser("show", help="show one link and its certificate")
    show.add_argument("token")
    show.set_defaults(func=cmd_show)
    revoke = commands.add_parser("revoke", help="stop a link now (it answers 410 Gone)")
    revoke.add_argument("token")
    revoke.set_defaults(func=cmd_revoke)
    commands.add_parser("gc", help="remove expired certificates and old tombstones").set_defaults(func=cmd_gc)
    upload_key = commands.add_parser("upload-key", help="print the upload key that browsers and scripts sign in with")
    upload_key.add_argument("--new", action="store_true", help="replace it with a new random key")
    upload_key.set_defaults(func=cmd_upload_key)
    return parser


def main(argv: list[str] | None = None, clock: Callable[[], float] = time.time) -> int:
    """Run the command line; return the exit status. Tests pass their own *clock*."""
    args = build_parser().parse_args(argv)
    quiet_library_warnings()
    try:
        config = load_config(args.config)
    except ConfigError as error:
        say(f"certdrop: {error}", file=sys.stderr)
        return CHECK_ERROR
    if not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(TerminalFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.basicConfig(level=config.log_level, handlers=[handler])
    try:
        return args.func(args, config, clock)
    except BrokenPipeError:  # "certdrop.py list | head -1": the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except LifetimeError as error:
        say(f"certdrop: {error}", file=sys.stderr)
        return CHECK_ERROR  # a usage error, like any other bad option
    except ConfigError as error:  # a setting that names a file it cannot use (the profile signer)
        say(f"certdrop: {error}", file=sys.stderr)
        return CHECK_ERROR  # as a setting the ini file gets wrong
    except CertificateError as error:
        say(f"certdrop: {cli_message(error, args.command)}", file=sys.stderr)
    except DamagedEntry as error:
        say(f"certdrop: {error}", file=sys.stderr)
    except UnknownToken as error:
        say(f"certdrop: no link {str(error)!r}", file=sys.stderr)
    except CertdropError as error:
        say(f"certdrop: {error}", file=sys.stderr)
    except OSError as error:
        say(f"certdrop: {error}", file=sys.stderr)
    return 1


def port_argument(text: str) -> int:
    """Return --port's value: a port number from 0 to 65535 (waitress would take 99999 as 34463)."""
    import argparse
    try:
        return _parse_int(0, 65535)(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)") from None


def cli_message(error: CertificateError, command: str) -> str:
    """Return a refusal in the command line's words: the way past a refusal one may override is --force."""
    if error.code not in FORCEABLE:
        return str(error)
    if command == "check":
        return f"{error} (add --force would install it anyway.)"
    return f"{error} To install it anyway, run add again with --force."


class TerminalFormatter(logging.Formatter):
    """Log lines in which a certificate's name or a request's path cannot forge lines or steer the terminal."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return term(super().formatMessage(record))


if __name__ == "__main__":
    sys.exit(main())
