"""Tests for certdrop, in the module's order: pure functions, store, HTTP, command line, real processes."""

import ast
import base64
import codecs
import contextlib
import dataclasses
import datetime
import email
import errno
import email.policy
import fcntl
import functools
import gettext
import hashlib
import html
import http.client
import importlib
import importlib.machinery
import importlib.util
import importlib.metadata
import ipaddress
import io
import itertools
import json
import math
import logging
import multiprocessing
import os
import plistlib
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import types
import typing
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import babel.messages.mofile
import babel.messages.pofile
import bs4
import hypothesis
import hypothesis.stateful
import hypothesis.strategies as st
import pytest
import webtest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs7, pkcs12
from cryptography.x509.name import _ASN1Type  # the string types a name attribute can be written in
from cryptography.x509.oid import NameOID

import certdrop

HERE = Path(__file__).resolve().parent
NOW = 1_800_000_000.0  # 2027-01-15, inside the validity of every test certificate
DAY = 86400

S60_AGENTS = {
    "e61i": "Mozilla/5.0 (SymbianOS/9.1; Series60/3.0 NokiaE61i-1/3.0; Profile/MIDP-2.0 Configuration/CLDC-1.1) "
            "AppleWebKit/413 (KHTML, like Gecko) Safari/413",
    "6600-wap": "Nokia6600/1.0 (4.09.1) SymbianOS/7.0s Series60/2.0 Profile/MIDP-2.0 Configuration/CLDC-1.0",
    "n8-symbian3": "Mozilla/5.0 (Symbian/3; Series60/5.2 NokiaN8-00/012.002; Profile/MIDP-2.1 Configuration/CLDC-1.1 ) "
                   "AppleWebKit/533.4 (KHTML, like Gecko) NokiaBrowser/7.3.0 Mobile Safari/533.4 3gpp-gba",
}
OTHER_AGENTS = {
    "cat-s60-android": "Mozilla/5.0 (Linux; Android 6.0.1; S60 Build/MMB29M) AppleWebKit/537.36 (KHTML, like Gecko) "
                       "Chrome/109.0 Mobile Safari/537.36",
    "firefox-linux": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "s40-6500": "Nokia6500s/2.0 (05.41) Profile/MIDP-2.1 Configuration/CLDC-1.1",
    "none": "",
}


# -- certificates, made fresh for every test session ------------------------------------------------------------


def make_name(common_name=None, organization=None):
    attributes = []
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    if common_name:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def make_certificate(common_name="Example Root CA", *, issuer=None, issuer_key=None, ca=True, key=None,
                     not_before=datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc),
                     not_after=datetime.datetime(2035, 1, 1, tzinfo=datetime.timezone.utc), serial=0x1F2E3D):
    """Return (certificate, key); self-signed unless *issuer* and *issuer_key* are given."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = make_name(common_name, "Example Org")
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
               .public_key(key.public_key()).serial_number(serial)
               .not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    return builder.sign(issuer_key or key, hashes.SHA256()), key


@pytest.fixture(scope="session")
def root():
    return make_certificate()


@pytest.fixture(scope="session")
def root_der(root):
    return root[0].public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="session")
def root_pem(root):
    return root[0].public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="session")
def other_der():
    return make_certificate("Second CA", serial=77)[0].public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="session")
def key_pem(root):
    return root[1].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())


@pytest.fixture(scope="session")
def many_roots():
    """Return 120 distinct root CA certificates (DER), for tests that upload one after another."""
    key = ec.generate_private_key(ec.SECP256R1())
    return [der_of(make_certificate(f"Root {number}", key=key, serial=1000 + number)[0]) for number in range(120)]


# -- the fixture chain: config -> clock -> store -> app -> testapp ---------------------------------------------


@pytest.fixture(autouse=True)
def access_log(monkeypatch):
    """Return the access log that apps built by make_app write to: kept in memory, not on the test's stderr."""
    log = certdrop.AccessLog(io.StringIO())
    monkeypatch.setattr(certdrop, "ACCESS_LOG", log)
    return log


@pytest.fixture(autouse=True)
def no_background_threads(monkeypatch):
    """Keep apps built in this process from starting their count writer and daily warning (App.start_background):
    thousands of apps would leave threads behind. The servers the slow tests start as processes do start them."""
    monkeypatch.setattr(certdrop.App, "starts_background", False)


class FakeClock:
    def __init__(self, now=NOW):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


#: The names the tests ask the server by, besides its own: its allowed_hosts.
TEST_HOSTS = ("ca.example.org", "certs.example.net", "ca.example.com")


@pytest.fixture
def config(tmp_path):
    return certdrop.Config(data_dir=tmp_path / "data", allowed_hosts=TEST_HOSTS)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(config, clock):
    return certdrop.make_store(config, clock)


@pytest.fixture
def app(config, store, clock):
    return certdrop.make_app(config, store, clock)


def client(app, **environ):
    """Return a WebTest client of *app*, by default a browser on the server itself (loopback needs no key)."""
    return webtest.TestApp(app, extra_environ={"HTTP_HOST": "ca.example.org:8080", "REMOTE_ADDR": "127.0.0.1",
                                               **environ})


@pytest.fixture
def testapp(app):
    return client(app)


def upload(testapp, data, filename="ca.cer", status=201, headers=None, **fields):
    return testapp.post("/", params={"ttl": "7d", **fields}, upload_files=[("cert", filename, data)],
                        headers=headers or {}, status=status)


def token_of(response):
    return re.search(r"/c/([a-z0-9]+)", response.headers["Location"])[1]


def uploaded_token(testapp, data, filename="ca.cer", status=201, **fields):
    """Upload *data* and return its link's token: asked for as JSON, which skips the result page's QR codes (a fifth
    of the fast run's time when every test that needs a token drew them); the result page has tests of its own."""
    return token_of(upload(testapp, data, filename, status, headers={"Accept": "application/json"}, **fields))


def files_under(directory):
    return sorted(p for p in Path(directory).rglob("*") if p.is_file())


# -- fixtures and helpers that many sections share, in the order the tests first use them ----------------------


def html_text(response):
    return " ".join(response.html.get_text().split())


@pytest.fixture
def ini(tmp_path):
    path = tmp_path / "certdrop.ini"
    path.write_text("[certdrop]\ndata_dir = data\npublic_url = http://ca.example.org:8080\n")
    return path


def cli(ini, *args):
    return certdrop.main(["-c", str(ini), *args], clock=lambda: NOW)


@pytest.fixture
def machine(monkeypatch):
    """Give this machine an address on the company network and a full name that resolves."""
    monkeypatch.setattr(certdrop, "machine_addresses", lambda: ("192.168.1.5",))
    monkeypatch.setattr(certdrop, "machine_fqdn", lambda: "server.corp.example")
    monkeypatch.setattr(certdrop, "machine_names", lambda: frozenset({"server", "server.corp.example", "192.168.1.5"}))


def add(store, der, days=7):
    return store.add(certdrop.load_der(der), store.clock() + days * DAY)[0]


REMOTE = "192.168.1.20"  # a desktop on the company network: private, but not this machine
KEY = "correct-horse-battery-staple"


def app_with(config, store, clock, **settings):
    return certdrop.make_app(dataclasses.replace(config, **settings), store, clock)


def basic(key):
    return {"Authorization": "Basic " + base64.b64encode(f"certdrop:{key}".encode()).decode()}


def post_cert(app_client, data, status, headers=None):
    return app_client.post("/", params={"ttl": "7d"}, upload_files=[("cert", "ca.cer", data)], headers=headers or {},
                           status=status)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- configuration -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("45m", 2700), ("12h", 43200), ("7d", 604800),
                                               ("2w", 1209600), ("3600", 3600)])
def test_durations_read_with_their_units(text, seconds):
    assert certdrop.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7x", "-1d", "0d", "seven days"])
def test_malformed_durations_are_refused(text):
    with pytest.raises(ValueError):
        certdrop.parse_duration(text)


def test_shipped_ini_states_exactly_the_builtin_defaults():
    assert certdrop.Config.from_ini(HERE / "certdrop.ini") == certdrop.Config()


def test_every_setting_is_documented_in_the_shipped_ini():
    sections = re.split(r"^\[(\w+)\]$", (HERE / "certdrop.ini").read_text(), flags=re.M)[1:]
    documented = {certdrop.CONFIG_SECTIONS[name][0] + key for name, text in zip(sections[::2], sections[1::2])
                  for key in re.findall(r"^(\w+) =", text, re.M)}
    parsed = {prefix + key for prefix, parsers in certdrop.CONFIG_SECTIONS.values() for key in parsers}
    assert documented == {field.name for field in dataclasses.fields(certdrop.Config)} == parsed


def test_every_test_readme_names_exists():
    named = set(re.findall(r"`(test_[a-z0-9_]+)(?:\[\w+\])?`", (HERE / "README.md").read_text()))
    assert named and [name for name in named if not callable(globals().get(name))] == []


def test_every_setting_is_in_the_readme_table():
    readme = (HERE / "README.md").read_text()
    assert [key for key in certdrop.CONFIG_PARSERS if f"| `{key}` |" not in readme] == []
    assert [key for key in certdrop.MAIL_PARSERS if f"| `[mail] {key}` |" not in readme] == []


def test_unknown_setting_stops_start_up_naming_key_and_file(tmp_path):
    ini = tmp_path / "x.ini"
    ini.write_text("[certdrop]\nport = 8080\ncolour = blue\n")
    with pytest.raises(certdrop.ConfigError, match=rf"'colour' in \[certdrop\] of {re.escape(str(ini))}"):
        certdrop.Config.from_ini(ini)


def test_bad_value_stops_start_up_naming_key_and_file(tmp_path):
    ini = tmp_path / "x.ini"
    ini.write_text("[certdrop]\nport = eighty\n")
    with pytest.raises(certdrop.ConfigError, match=rf"'port' in \[certdrop\] of {re.escape(str(ini))}"):
        certdrop.Config.from_ini(ini)


def test_mail_settings_are_read_from_their_own_section(tmp_path):
    ini = tmp_path / "x.ini"
    ini.write_text("[certdrop]\nport = 8080\n[mail]\nhost = mail.example.com\nsecurity = tls\nsender = a@b.example\n")
    config = certdrop.Config.from_ini(ini)
    assert (config.mail_host, config.mail_security, config.mail_sender, config.port) == (
        "mail.example.com", "tls", "a@b.example", 8080)
    ini.write_text("[mail]\nsender = a@b.example\\r\\nBcc: x@y.example\n")
    with pytest.raises(certdrop.ConfigError, match="'sender' in \\[mail\\]"):
        certdrop.Config.from_ini(ini)


def test_relative_data_dir_is_relative_to_the_ini_file(tmp_path):
    ini = tmp_path / "etc" / "certdrop.ini"
    ini.parent.mkdir()
    ini.write_text("[certdrop]\ndata_dir = ../var/certdrop\n")
    assert certdrop.Config.from_ini(ini).data_dir == tmp_path / "var" / "certdrop"


def test_config_path_comes_from_the_environment_when_not_given(tmp_path, monkeypatch):
    ini = tmp_path / "env.ini"
    ini.write_text("[certdrop]\nport = 9999\n")
    monkeypatch.setenv("CERTDROP_CONFIG", str(ini))
    assert certdrop.load_config().port == 9999


def test_a_default_lifetime_outside_the_choices_is_offered_and_preselected(store, clock, config):
    app = client(certdrop.make_app(dataclasses.replace(config, default_ttl=2 * DAY), store, clock))
    select = app.get("/").forms[0]["ttl"]
    assert select.value == "172800s" and ("172800s", True, "2 days") in select.options


def test_max_ttl_hides_longer_choices_from_the_form():
    choices = [value for value, _ in certdrop.allowed_ttl_choices(certdrop.Config(max_ttl=30 * DAY))]
    assert choices == ["1h", "1d", "7d", "30d"]


# -- certificates and links ------------------------------------------------------------------------------------


def only_certificate(data):
    (certificate,) = certdrop.diagnose(data, now=NOW).installable
    return certificate


def test_pem_and_der_uploads_give_the_same_certificate(root_pem, root_der):
    assert only_certificate(root_pem).der == only_certificate(root_der).der == root_der


def test_fingerprints_are_colon_separated_upper_case_hex():
    assert certdrop.colon_hex(bytes([0x0A, 0xBC, 0xFF])) == "0A:BC:FF"


def test_upload_with_a_private_key_is_refused(root_pem, key_pem):
    with pytest.raises(certdrop.CertificateError, match="private key"):
        certdrop.diagnose(root_pem + key_pem, now=NOW)


@pytest.mark.parametrize("data", [b"", b"   \n", b"hello world", b"\x30\x03\x01\x02\x03"],
                         ids=["empty", "blank", "text", "bad-der"])
def test_things_that_are_not_certificates_are_refused(data):
    with pytest.raises(certdrop.CertificateError):
        certdrop.diagnose(data, now=NOW)


def test_file_name_is_made_of_safe_characters_only():
    cert, _ = make_certificate('My "CA" / ../..\\x\r\n')
    certificate = certdrop.inspect_certificate(cert)
    assert certificate.file_stem == "My_CA_.._.._x"


@pytest.mark.parametrize(("host", "loopback"), [("localhost", True), ("127.0.0.1", True), ("[::1]", True),
                                                ("foo.localhost", True), ("127.9.9.9", True),
                                                ("ca.example.org", False), ("10.0.0.5", False)])
def test_loopback_hosts_are_recognised(host, loopback):
    assert certdrop.is_loopback_host(host) is loopback


# -- certificate doctor ----------------------------------------------------------------------------------------


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def der_of(cert):
    return cert.public_bytes(serialization.Encoding.DER)


def pem_of(*certs):
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


class PKI:
    """Every certificate, key and file form the doctor tests need, made once per session."""

    def __init__(self, workdir):
        utc = datetime.timezone.utc
        self.root, self.root_key = make_certificate("Example Root CA", serial=1)
        self.intermediate, self.intermediate_key = make_certificate(
            "Example Issuing CA", issuer=self.root.subject, issuer_key=self.root_key, serial=2)
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        self.leaf = (x509.CertificateBuilder().subject_name(make_name("mail.example.com"))
                     .issuer_name(self.intermediate.subject).public_key(leaf_key.public_key()).serial_number(3)
                     .not_valid_before(datetime.datetime(2025, 1, 1, tzinfo=utc))
                     .not_valid_after(datetime.datetime(2027, 6, 1, tzinfo=utc))
                     .add_extension(x509.SubjectAlternativeName([x509.DNSName("mail.example.com"),
                                                                 x509.DNSName("*.owa.example.com")]), critical=False)
                     .add_extension(x509.AuthorityInformationAccess([x509.AccessDescription(
                         x509.oid.AuthorityInformationAccessOID.CA_ISSUERS,
                         x509.UniformResourceIdentifier("http://pki.example.com/issuing.crt"))]), critical=False)
                     .sign(self.intermediate_key, hashes.SHA256()))
        self.rsa_key = rsa.generate_private_key(65537, 2048)
        self.rsa_root, _ = make_certificate("RSA Root", key=self.rsa_key, serial=4)
        self.weak_root, _ = make_certificate("Weak Root", key=rsa.generate_private_key(65537, 1024), serial=5)
        self.self_signed_leaf, _ = make_certificate("intranet.example.com", ca=False, serial=6)
        self.several_cn = self._custom([x509.NameAttribute(NameOID.COMMON_NAME, "First CA"),
                                        x509.NameAttribute(NameOID.COMMON_NAME, "Second CA")])
        self.no_cn = self._custom([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Nameless Org")])
        self.no_keycertsign = self._custom(make_name("Signing-less CA"), key_usage=True)
        self.no_basic_constraints = self._custom(make_name("Bare v3"), constraints=False)
        self.expired, _ = make_certificate("Expired CA", not_after=datetime.datetime(2026, 1, 1, tzinfo=utc))
        self.not_yet_valid, _ = make_certificate("Future CA", not_before=datetime.datetime(2028, 1, 1, tzinfo=utc))
        self.expiring, _ = make_certificate("Expiring CA", not_after=datetime.datetime.fromtimestamp(NOW + 10 * DAY, utc))
        self._openssl_files(Path(workdir))

    def _custom(self, attributes, key_usage=False, constraints=True):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(attributes) if isinstance(attributes, list) else attributes
        builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(99).not_valid_before(datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc))
                   .not_valid_after(datetime.datetime(2035, 1, 1, tzinfo=datetime.timezone.utc)))
        if constraints:
            builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        if key_usage:
            builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                                            critical=True)
        return builder.sign(key, hashes.SHA256())

    def _openssl_files(self, work):
        """SHA-1 and MD5 signatures and v1 certificates, which the library will not build, come from openssl."""
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "old.key", "-out", "old.pem", "-sha1",
                "-days", "7300", "-subj", "/CN=Old SBS Root/O=Example", cwd=work)
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "sub.key", "-out", "sub.csr",
                "-subj", "/CN=Old Issuing CA", cwd=work)
        (work / "ca.ext").write_text("basicConstraints=critical,CA:TRUE\n")
        for digest in ("sha1", "md5"):
            openssl("x509", "-req", "-in", "sub.csr", "-CA", "old.pem", "-CAkey", "old.key", f"-{digest}", "-days",
                    "3650", "-set_serial", "7", "-extfile", "ca.ext", "-out", f"sub-{digest}.pem", cwd=work)
        openssl("x509", "-req", "-in", "sub.csr", "-signkey", "sub.key", "-days", "3650", "-out", "v1.pem", cwd=work)
        openssl("x509", "-in", "old.pem", "-trustout", "-addtrust", "serverAuth", "-out", "trusted.pem", cwd=work)
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "md5.key", "-out", "md5-root.pem", "-md5",
                "-days", "7300", "-subj", "/CN=MD5 SBS Root", cwd=work)
        load = lambda name: x509.load_pem_x509_certificate((work / name).read_bytes())  # noqa: E731
        self.old_root, self.sha1_intermediate, self.md5_intermediate = map(load, ("old.pem", "sub-sha1.pem",
                                                                                  "sub-md5.pem"))
        self.v1_root = load("v1.pem")
        self.md5_root = load("md5-root.pem")
        self.trusted_pem = (work / "trusted.pem").read_bytes()
        (work / "bundle.pem").write_bytes(pem_of(self.leaf, self.root, self.intermediate))
        for form in ("DER", "PEM"):
            openssl("crl2pkcs7", "-nocrl", "-certfile", "bundle.pem", "-outform", form, "-out", f"bundle.{form}.p7b",
                    cwd=work)
        self.p7b_ber, self.p7b_pem = (work / "bundle.DER.p7b").read_bytes(), (work / "bundle.PEM.p7b").read_bytes()
        openssl("pkcs12", "-export", "-inkey", "old.key", "-in", "old.pem", "-out", "pw.p12", "-passout", "pass:x",
                cwd=work)
        self.p12_password = (work / "pw.p12").read_bytes()


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"))


def wrapped_base64(der, width):
    text = base64.b64encode(der).decode()
    return "\n".join(text[i:i + width] for i in range(0, len(text), width)).encode()


def text_dump(pki):
    return (b"Certificate:\n    Data:\n        Version: 3 (0x2)\n        Subject: CN = Example Root CA\n"
            + pem_of(pki.root) + b"\nThanks,\nthe admin\n")


#: id -> (builder of the upload, expected names of the certificates that get links, root first)
INPUT_FORMS = {
    "pem": (lambda p: pem_of(p.root), ["Example Root CA"]),
    "pem-crlf-no-final-newline": (lambda p: pem_of(p.root).replace(b"\n", b"\r\n").rstrip(), ["Example Root CA"]),
    "pem-utf8-bom": (lambda p: b"\xef\xbb\xbf" + pem_of(p.root), ["Example Root CA"]),
    "pem-in-text": (text_dump, ["Example Root CA"]),
    "pem-bundle-leaf-first": (lambda p: pem_of(p.leaf, p.intermediate, p.root),
                              ["Example Root CA", "Example Issuing CA"]),
    "pem-trusted-certificate": (lambda p: p.trusted_pem, ["Old SBS Root"]),
    "pem-x509-certificate": (lambda p: pem_of(p.root).replace(b" CERTIFICATE", b" X509 CERTIFICATE"),
                             ["Example Root CA"]),
    "der": (lambda p: der_of(p.root), ["Example Root CA"]),
    "der-trailing-newline": (lambda p: der_of(p.root) + b"\n", ["Example Root CA"]),
    "base64-one-line": (lambda p: base64.b64encode(der_of(p.root)), ["Example Root CA"]),
    "base64-64-columns": (lambda p: wrapped_base64(der_of(p.root), 64), ["Example Root CA"]),
    "base64-76-columns": (lambda p: wrapped_base64(der_of(p.root), 76) + b"\r\n", ["Example Root CA"]),
    "utf16-le-bom": (lambda p: pem_of(p.root).decode().encode("utf-16"), ["Example Root CA"]),
    "utf16-be-bom": (lambda p: codecs.BOM_UTF16_BE + pem_of(p.root).decode().encode("utf-16-be"),
                     ["Example Root CA"]),
    "pkcs7-der": (lambda p: pkcs7.serialize_certificates([p.root, p.intermediate], serialization.Encoding.DER),
                  ["Example Root CA", "Example Issuing CA"]),
    "pkcs7-pem": (lambda p: pkcs7.serialize_certificates([p.intermediate, p.root], serialization.Encoding.PEM),
                  ["Example Root CA", "Example Issuing CA"]),
    "pkcs7-openssl-ber": (lambda p: p.p7b_ber, ["Example Root CA", "Example Issuing CA"]),
    "pkcs7-openssl-pem": (lambda p: p.p7b_pem, ["Example Root CA", "Example Issuing CA"]),
    "pkcs7-indefinite-length": (lambda p: indefinite_length(
        pkcs7.serialize_certificates([p.root], serialization.Encoding.DER)), ["Example Root CA"]),
    "pkcs12-certificates-only": (lambda p: pkcs12.serialize_key_and_certificates(
        None, None, None, [p.root, p.intermediate], serialization.NoEncryption()),
        ["Example Root CA", "Example Issuing CA"]),
    "sha1-chain-orders-by-signature": (lambda p: pem_of(p.sha1_intermediate, p.old_root),
                                       ["Old SBS Root", "Old Issuing CA"]),
    "md5-chain-orders-by-signature": (lambda p: pem_of(p.md5_intermediate, p.old_root),
                                      ["Old SBS Root", "Old Issuing CA"]),
    "v1-self-signed-is-a-ca": (lambda p: pem_of(p.v1_root), ["Old Issuing CA"]),
    "self-signed-server-certificate": (lambda p: pem_of(p.self_signed_leaf), ["intranet.example.com"]),
    "duplicates-count-once": (lambda p: pem_of(p.root, p.root), ["Example Root CA"]),
}


def damaged_issuer(cert):
    """Return *cert* with a string of its issuer name retagged: it loads, and fails only when the name is read."""
    der, issuer = der_of(cert), cert.issuer.public_bytes()
    damaged = issuer.replace(b"\x0c", b"\x2d", 1)  # the first UTF8String becomes a constructed tag 13
    return der.replace(issuer, damaged, 1)


def indefinite_length(der):
    """Re-encode the outer SEQUENCE of *der* with an indefinite length, as some Windows tools write BER."""
    element = certdrop.ber_element(der)
    return b"\x30\x80" + der[element.content_start:element.content_end] + b"\0\0"


def keys_of(pki):
    key, rsa_key = pki.root_key, pki.rsa_key
    pem, der, enc = serialization.Encoding.PEM, serialization.Encoding.DER, serialization.BestAvailableEncryption(b"pw")
    none, pkcs8, traditional = serialization.NoEncryption(), serialization.PrivateFormat.PKCS8, \
        serialization.PrivateFormat.TraditionalOpenSSL
    return {
        "pem-pkcs8": key.private_bytes(pem, pkcs8, none),
        "pem-pkcs8-encrypted": key.private_bytes(pem, pkcs8, enc),
        "pem-rsa-traditional": rsa_key.private_bytes(pem, traditional, none),
        "pem-ec-traditional": key.private_bytes(pem, traditional, none),
        "pem-openssh": key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, none),
        "der-pkcs8": key.private_bytes(der, pkcs8, none),
        "der-pkcs8-encrypted": key.private_bytes(der, pkcs8, enc),
        "der-pkcs1": rsa_key.private_bytes(der, traditional, none),
        "base64-der-pkcs8": base64.b64encode(key.private_bytes(der, pkcs8, none)),
        "pkcs12-with-key": pkcs12.serialize_key_and_certificates(b"ca", key, pki.root, None, none),
        "key-pasted-beside-certificate": pem_of(pki.root) + key.private_bytes(pem, pkcs8, none),
    }


KEY_FORMS = [
    "pem-pkcs8", "pem-pkcs8-encrypted", "pem-rsa-traditional", "pem-ec-traditional", "pem-openssh", "der-pkcs8",
    "der-pkcs8-encrypted", "der-pkcs1", "base64-der-pkcs8", "pkcs12-with-key", "key-pasted-beside-certificate"]


def csr_of(pki, encoding):
    return (x509.CertificateSigningRequestBuilder().subject_name(make_name("req"))
            .sign(pki.root_key, hashes.SHA256()).public_bytes(encoding))


def crl_of(pki, encoding):
    return (x509.CertificateRevocationListBuilder().issuer_name(pki.root.subject)
            .last_update(datetime.datetime(2026, 1, 1)).next_update(datetime.datetime(2027, 1, 1))
            .sign(pki.root_key, hashes.SHA256()).public_bytes(encoding))


#: id -> (builder of the upload, refusal code, words the message must contain)
REFUSALS = {
    "empty": (lambda p: b"", "empty", "empty"),
    "csr-pem": (lambda p: csr_of(p, serialization.Encoding.PEM), "csr", "signing request"),
    "csr-der": (lambda p: csr_of(p, serialization.Encoding.DER), "csr", "signing request"),
    "crl-pem": (lambda p: crl_of(p, serialization.Encoding.PEM), "crl", "revocation list"),
    "crl-der": (lambda p: crl_of(p, serialization.Encoding.DER), "crl", "revocation list"),
    "public-key-pem": (lambda p: p.root_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), "public-key", "public key"),
    "public-key-der": (lambda p: p.root_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo), "public-key", "public key"),
    "html-page": (lambda p: b"<!DOCTYPE html><html><body>Please log in</body></html>", "html", "web page"),
    "binary-junk": (lambda p: b"\x30\x82\xff\xff" + bytes(range(256)) * 4, "not-a-certificate", "binary file"),
    "zip-file": (lambda p: b"PK\x03\x04" + bytes(200), "not-a-certificate", "binary file"),
    "random-binary": (lambda p: bytes(range(255, 0, -1)) * 3, "not-a-certificate", "binary file"),
    "saved-upload-page": (lambda p: certdrop.render_upload_form(certdrop.Config(), "/"), "html", "web page"),
    "saved-page-quoting-armour": (lambda p: b"<!DOCTYPE html><html><body><pre>-----BEGIN CERTIFICATE-----\nMIIB"
                                            b"</pre></body></html>", "html", "web page"),
    "plain-text": (lambda p: b"Dear admin, here is the certificate you asked for.", "not-a-certificate",
                   "no certificate"),
    "damaged-pem": (lambda p: pem_of(p.root).replace(b"\nM", b"\nM!", 1), "damaged-pem", "damaged"),
    "pem-without-end": (lambda p: pem_of(p.root)[:-30], "damaged-pem", "damaged"),
    "password-pkcs12": (lambda p: p.p12_password, "pkcs12-password", "password-protected"),
    "unknown-x509-version": (lambda p: der_of(p.root).replace(b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x60", 1),
                             "not-a-certificate", "not a certificate"),
    "damaged-issuer-name": (lambda p: damaged_issuer(p.root), "damaged-certificate", "damaged"),
    "server-certificate-alone": (lambda p: pem_of(p.leaf), "server-certificate",
                                 "mail.example.com. Phones need the CA that issued it, \u201cExample Issuing CA\u201d"),
}

#: id -> (builder of the upload, the warning or note code expected)
WARNINGS = {
    "several-cn": (lambda p: pem_of(p.several_cn), "several-cn"),
    "no-cn": (lambda p: pem_of(p.no_cn), "no-cn"),
    "not-a-ca": (lambda p: pem_of(p.no_basic_constraints), "not-a-ca"),
    "no-keycertsign": (lambda p: pem_of(p.no_keycertsign), "no-keycertsign"),
    "expired": (lambda p: pem_of(p.expired), "expired"),
    "not-yet-valid": (lambda p: pem_of(p.not_yet_valid), "not-yet-valid"),
    "expires-soon": (lambda p: pem_of(p.expiring), "expires-soon"),
    "weak-signature-sha1": (lambda p: pem_of(p.sha1_intermediate, p.old_root), "weak-signature"),
    "weak-signature-md5": (lambda p: pem_of(p.md5_intermediate, p.old_root), "weak-signature"),
    "weak-key": (lambda p: pem_of(p.weak_root), "weak-key"),
    "intermediate-without-root": (lambda p: pem_of(p.intermediate), "intermediate"),
}
NOTES = {
    "s40-key-size": (lambda p: pem_of(p.rsa_root), "s40-key-size"),
    "wap-algorithm": (lambda p: pem_of(p.root), "wap-algorithm"),
}


def check_json(tmp_path, capsys, data, *options):
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    status = certdrop.main(["check", "--json", *options, str(path)], clock=lambda: NOW)
    return status, json.loads(capsys.readouterr().out)[0]


def diagnosis_codes(data, **options):
    return {finding.code for finding in certdrop.diagnose(data, now=NOW, **options).findings}


@pytest.mark.parametrize("form", INPUT_FORMS, ids=INPUT_FORMS)
def test_every_input_form_gives_links_for_its_cas_root_first(pki, form):
    build, names = INPUT_FORMS[form]
    assert [c.name for c in certdrop.diagnose(build(pki), now=NOW).installable] == names


@pytest.mark.parametrize("form", INPUT_FORMS, ids=INPUT_FORMS)
def test_every_input_form_is_accepted_by_the_upload_form(testapp, store, pki, form):
    build, names = INPUT_FORMS[form]
    result = upload(testapp, build(pki), "upload.bin")
    tokens = re.findall(r'class="link"><a href="http://ca.example.org:8080/c/([a-z0-9]+)"', result.text)
    assert [store.get(token).certificate.name for token in tokens] == names


@pytest.mark.parametrize("form", INPUT_FORMS, ids=INPUT_FORMS)
def test_every_input_form_is_installable_for_check(tmp_path, capsys, pki, form):
    build, names = INPUT_FORMS[form]
    status, report = check_json(tmp_path, capsys, build(pki))
    assert status in (0, 1) and [c["name"] for c in report["certificates"] if c["link"]] == names


@pytest.mark.parametrize("form", KEY_FORMS, ids=KEY_FORMS)
def test_private_keys_in_any_form_are_refused(pki, form):
    with pytest.raises(certdrop.CertificateError, match="must never leave the CA") as refusal:
        certdrop.diagnose(keys_of(pki)[form], now=NOW)
    assert refusal.value.code == "private-key"


@pytest.mark.parametrize("form", KEY_FORMS, ids=KEY_FORMS)
def test_private_key_upload_leaves_no_key_material_on_disk_or_in_the_log(testapp, config, pki, form, caplog):
    upload(testapp, pem_of(pki.intermediate))  # the data directory is not empty
    data = keys_of(pki)[form]
    result = upload(testapp, data, "key.bin", status=422)
    assert "must never leave the CA" in result.text
    key_der = pki.root_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
    scalar = pki.root_key.private_numbers().private_value.to_bytes(32, "big")
    for path in files_under(config.data_dir):
        content = path.read_bytes()
        assert b"PRIVATE KEY" not in content and key_der not in content and scalar not in content
        assert base64.b64encode(scalar)[:20] not in content
    assert "PRIVATE KEY" not in caplog.text


@pytest.mark.parametrize("form", KEY_FORMS, ids=KEY_FORMS)
def test_check_refuses_private_keys_with_status_2(tmp_path, capsys, pki, form):
    status, report = check_json(tmp_path, capsys, keys_of(pki)[form])
    assert status == 2 and report["refused"]["code"] == "private-key"


@pytest.mark.parametrize("case", REFUSALS, ids=REFUSALS)
def test_uploads_that_are_no_certificate_are_refused_saying_what_they_are(pki, case):
    build, code, words = REFUSALS[case]
    with pytest.raises(certdrop.CertificateError) as refusal:
        certdrop.diagnose(build(pki), now=NOW)
    assert refusal.value.code == code and words in str(refusal.value)


@pytest.mark.parametrize("case", REFUSALS, ids=REFUSALS)
def test_the_upload_form_answers_422_for_each_refusal(testapp, config, pki, case):
    build, code, words = REFUSALS[case]
    if case == "empty":
        result = testapp.post("/", params={"pem": ""}, status=422)
    else:
        result = upload(testapp, build(pki), "upload.bin", status=422)
    assert html_text(result) and words in html_text(result)
    assert files_under(config.data_dir) == []


@pytest.mark.parametrize("case", REFUSALS, ids=REFUSALS)
def test_check_reports_each_refusal_with_its_code_and_status_2(tmp_path, capsys, pki, case):
    build, code, _ = REFUSALS[case]
    status, report = check_json(tmp_path, capsys, build(pki))
    assert status == 2 and report["refused"]["code"] == code


def test_server_certificate_alone_names_its_issuers_published_address(pki):
    with pytest.raises(certdrop.CertificateError, match=r"published at http://pki.example.com/issuing.crt"):
        certdrop.diagnose(pem_of(pki.leaf), now=NOW)


def test_server_certificate_alone_installs_when_forced(testapp, store, pki):
    result = upload(testapp, pem_of(pki.leaf), force="1")
    assert store.get(token_of(result)).certificate.name == "mail.example.com"
    assert "Server certificate (installed anyway)" in result.text


def test_add_force_installs_a_server_certificate_alone(ini, tmp_path, capsys, pki):
    path = tmp_path / "leaf.pem"
    path.write_bytes(pem_of(pki.leaf))
    assert cli(ini, "add", str(path)) == 1
    assert "server certificate for mail.example.com" in capsys.readouterr().err
    assert cli(ini, "add", "--force", str(path)) == 0


def test_refusals_on_the_command_line_name_force_not_the_web_form(ini, tmp_path, capsys, pki):
    path = tmp_path / "leaf.pem"
    path.write_bytes(pem_of(pki.leaf))
    assert cli(ini, "add", str(path)) == 1
    err = capsys.readouterr().err
    assert "run add again with --force" in err and "install it anyway\u201d" not in err.lower()
    assert cli(ini, "check", "--json", str(path)) == 2
    assert "add --force would install it anyway" in json.loads(capsys.readouterr().out)[0]["refused"]["message"]


def test_a_refused_upload_shows_the_form_again_with_install_it_anyway_explained(testapp, pki):
    refusal = testapp.post("/", {"pem": pem_of(pki.leaf).decode(), "ttl": "30d", "host": "mail.example.com"},
                           status=422)
    assert "tick \u201cInstall it anyway\u201d below" in html_text(refusal)
    form = refusal.forms[0]
    assert form["pem"].value.startswith("-----BEGIN CERTIFICATE-----") and form["ttl"].value == "30d"
    assert form["host"].value == "mail.example.com"
    assert refusal.html.find("p", class_="warn").find("input", type="checkbox") is not None
    form["force"] = True
    assert form.submit(status=201).headers["Location"].startswith("http://ca.example.org:8080/c/")


def test_a_refused_file_is_confirmed_by_ticking_the_box_without_choosing_it_again(testapp, pki):
    refusal = upload(testapp, pki.leaf.public_bytes(serialization.Encoding.DER), "server.cer", status=422, ttl="30d")
    form = refusal.forms[0]
    assert form["refused"].value == pem_of(pki.leaf).decode() and "PRIVATE" not in form["refused"].value
    assert "you need not choose the file again" in html_text(refusal)
    assert form.submit(status=422).forms[0]["refused"].value == form["refused"].value  # unticked: asked again
    form["force"] = True
    result = form.submit(headers={"Accept": "application/json"}, status=201).json
    assert result["links"][0]["sha256"] == pki.leaf.fingerprint(hashes.SHA256()).hex(":").upper()
    assert result["links"][0]["expires"] == "2027-02-14T08:00:00Z"  # the 30 days of the refused upload, NOW + 30 d


def test_a_confirmation_needs_no_state_so_another_server_behind_the_same_name_takes_it(tmp_path, pki, clock):
    def server(name):
        config = certdrop.Config(data_dir=tmp_path / name, allowed_hosts=TEST_HOSTS)
        return client(certdrop.make_app(config, certdrop.make_store(config, clock), clock))

    form = upload(server("one"), pem_of(pki.leaf), status=422).forms[0]
    form["force"] = True
    fields = {name: value for name, value in form.submit_fields() if name != "cert"}  # no file is chosen again
    server("two").post("/", fields, status=201)
    assert files_under(tmp_path / "one") == [] and files_under(tmp_path / "two")


def test_a_refusal_with_a_key_beside_a_server_certificate_sends_nothing_back(testapp, pki, key_pem):
    refusal = upload(testapp, pem_of(pki.leaf) + key_pem, "server.pem", status=422)
    assert "refused" not in refusal.forms[0].fields and b"PRIVATE KEY" not in refusal.body
    assert pem_of(pki.leaf).splitlines()[1] not in refusal.body


@pytest.mark.parametrize("accept", ["text/plain", "application/json"])
def test_text_and_json_refusals_say_force_1_not_the_web_forms_tick(testapp, pki, accept):
    refusal = testapp.post("/", pem_of(pki.leaf), content_type="application/x-pem-file", headers={"Accept": accept},
                           status=422)
    message = refusal.json["error"]["message"] if accept == "application/json" else refusal.text
    assert "send it again with force=1" in message and "tick" not in message.lower()


def test_query_options_on_a_multipart_upload_are_honoured_like_form_fields(testapp, pki):
    answer = testapp.post("/?ttl=1h&force=1", upload_files=[("cert", "server.pem", pem_of(pki.leaf))],
                          headers={"Accept": "application/json"}, status=201).json
    assert answer["links"][0]["expires"] == "2027-01-15T09:00:00Z"  # NOW + 1 h, not the default 7 days


@pytest.mark.parametrize("content_type", ["application/x-pem-file", "application/x-www-form-urlencoded"])
def test_query_options_on_a_raw_upload_are_honoured(testapp, root_pem, content_type):
    answer = testapp.post("/?ttl=1h", root_pem, content_type=content_type, headers={"Accept": "application/json"},
                          status=201).json
    assert answer["links"][0]["expires"] == "2027-01-15T09:00:00Z"


@pytest.mark.parametrize(("query", "fields", "words"), [
    ("?tll=1h", {}, "takes no \u201ctll\u201d"),
    ("?ttl=1h", {"ttl": "7d"}, "ttl is given twice"),
    ("?force=maybe", {}, "force=maybe is neither yes nor no"),
    ("?ttl=1h&ttl=2h", {}, "ttl is given twice"),
], ids=["unknown", "conflicting", "not-a-flag", "twice-in-the-query"])
def test_query_parameters_an_upload_cannot_honour_are_refused_with_400(testapp, root_pem, query, fields, words):
    refusal = testapp.post("/" + query, fields, upload_files=[("cert", "ca.pem", root_pem)],
                           headers={"Accept": "application/json"}, status=400).json
    assert words in refusal["error"]["message"]
    raw = testapp.post("/" + query, root_pem, content_type="application/x-pem-file", status="*")
    assert raw.status_int == (201 if fields else 400)  # a raw body has no form fields for the query to differ from


def test_a_refused_private_key_is_not_sent_back_in_the_form(testapp, root_pem, key_pem):
    refusal = testapp.post("/", {"pem": (root_pem + key_pem).decode()}, status=422)
    assert refusal.forms[0]["pem"].value == "" and b"PRIVATE KEY" not in refusal.body


def test_a_lone_public_root_gets_a_note_that_devices_already_trust_it(testapp):
    store_file = next(Path(path) for path in certdrop.SYSTEM_TRUST_STORES if Path(path).exists())
    first = re.search(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", store_file.read_bytes(), re.S)[0]
    result = upload(testapp, first, "public.pem")
    assert "Devices already trust this CA" in html_text(result) and "[public-root]" in html_text(result)
    assert "You probably meant your own CA" in html_text(result)


def test_your_own_root_gets_no_public_root_note(testapp, root_der):
    assert "public-root" not in upload(testapp, root_der).text


def test_public_trust_stores_ask_for_confirmation(testapp, store, many_roots):
    public = frozenset(hashlib.sha256(der).digest() for der in many_roots[:10])
    bundle = b"".join(pem_of(x509.load_der_x509_certificate(der)) for der in many_roots[:10])
    with pytest.raises(certdrop.CertificateError) as refusal:
        certdrop.diagnose(bundle, now=NOW, public_roots=public)
    assert refusal.value.code == "public-bundle" and "10 of its 10 CAs" in str(refusal.value)
    forced = certdrop.diagnose(bundle, now=NOW, public_roots=public, force=True)
    assert len(forced.installable) == 10 and "public-bundle" in [f.code for f in forced.warnings]
    assert certdrop.diagnose(bundle[:3 * len(bundle) // 10], now=NOW, public_roots=public).installable


def test_without_a_system_store_the_shape_of_a_big_bundle_gives_it_away(many_roots):
    pems = [pem_of(x509.load_der_x509_certificate(der)) for der in many_roots[:25]]
    with pytest.raises(certdrop.CertificateError) as refusal:
        certdrop.diagnose(b"".join(pems), now=NOW)
    assert refusal.value.code == "public-bundle"
    assert len(certdrop.diagnose(b"".join(pems[:5]), now=NOW).installable) == 5  # whole PEMs: keys differ in length


def test_the_systems_own_trust_store_is_refused_until_confirmed(testapp):
    store_file = next(Path(path) for path in certdrop.SYSTEM_TRUST_STORES if Path(path).exists())
    refusal = upload(testapp, store_file.read_bytes(), status=422)
    assert "looks like a public trust store" in html_text(refusal)
    assert len(certdrop.system_trust_store()) > 100


def test_full_chain_leaves_the_server_certificate_out_and_says_why(testapp, pki):
    result = upload(testapp, pem_of(pki.leaf, pki.intermediate, pki.root))
    assert result.text.count('class="link"') == 2
    assert "The server certificate for mail.example.com gets no link" in html_text(result)


def test_several_links_say_which_to_hand_out_first(testapp, pki):
    result = upload(testapp, pem_of(pki.intermediate, pki.root))
    headings = [h2.text for h2 in result.html.select("h2")]
    assert headings[:2] == ["Root CA: Example Root CA", "Intermediate CA: Example Issuing CA"]
    assert "Hand out the first one (the root CA) first" in html_text(result)


def test_several_roots_are_not_called_intermediates(testapp, pki):
    text = html_text(upload(testapp, pem_of(pki.root, pki.rsa_root)))
    assert "one for each root CA" in text and "intermediate" not in text.lower()


def test_every_loopback_link_gets_the_reachable_note(app, pki, machine):
    result = upload(client(app, HTTP_HOST="localhost:8080"), pem_of(pki.root, pki.rsa_root))
    notes = [p.get_text() for p in result.html.find_all("p", class_="warn")]
    assert len(notes) == 2 and all("Phones cannot open localhost" in note for note in notes)


def test_the_result_page_leads_with_the_link_qr_and_mail_and_puts_old_nokia_phones_last(testapp, pki):
    page = upload(testapp, pem_of(pki.rsa_root)).text
    order = [page.index(marker) for marker in ('class="link"', 'class="qr"', "mailto:", "How to install it",
                                               "iPhone and iPad", "Only for old Nokia phones", "Nokia Series 40",
                                               "Share another certificate")]
    assert order == sorted(order)
    assert page.count("Only for old Nokia phones") == 1 and page.count("Nokia Symbian (S60)") == 1


def test_old_nokia_notes_are_grouped_under_one_heading_to_skip(testapp, pki):
    result = upload(testapp, pem_of(pki.rsa_root))
    group = next(section for section in result.html.find_all("section")
                 if section.h2 and section.h2.get_text().startswith("Only for old Nokia phones"))
    assert "[s40-key-size]" in group.get_text() and "[wap-algorithm]" in group.get_text()
    assert not any("[wap-algorithm]" in section.get_text() for section in result.html.find_all("section")
                   if section is not group and section.h2 and section.h2.get_text() == "Device notes")


def test_uploading_a_chain_again_returns_the_same_links(testapp, pki):
    first = upload(testapp, pem_of(pki.root, pki.intermediate))
    again = upload(testapp, pki.p7b_ber, "certnew.p7b", status=200)
    assert re.findall(r"/c/[a-z0-9]+", first.text)[:2] == re.findall(r"/c/[a-z0-9]+", again.text)[:2]


@pytest.mark.parametrize("case", WARNINGS, ids=WARNINGS)
def test_each_warning_is_found_by_the_doctor(pki, case):
    build, code = WARNINGS[case]
    assert code in diagnosis_codes(build(pki))


@pytest.mark.parametrize("case", WARNINGS, ids=WARNINGS)
def test_each_warning_is_on_the_result_page_with_its_code(testapp, pki, case):
    build, code = WARNINGS[case]
    result = upload(testapp, build(pki), "upload.pem", ttl="1d")
    warnings = result.html.select("section.warn li")
    assert any(f"[{code}]" in item.text for item in warnings)


@pytest.mark.parametrize("case", WARNINGS, ids=WARNINGS)
def test_check_reports_each_warning_with_status_1(tmp_path, capsys, pki, case):
    build, code = WARNINGS[case]
    status, report = check_json(tmp_path, capsys, build(pki))
    assert status == 1 and code in [warning["code"] for warning in report["warnings"]]


@pytest.mark.parametrize("case", NOTES, ids=NOTES)
def test_device_notes_do_not_count_as_warnings(tmp_path, capsys, pki, case):
    build, code = NOTES[case]
    status, report = check_json(tmp_path, capsys, build(pki))
    assert status == 0 and report["warnings"] == [] and code in [note["code"] for note in report["notes"]]


def test_clean_root_has_no_warnings(pki):
    assert certdrop.diagnose(pem_of(pki.root), now=NOW).warnings == ()


def test_md5_signed_root_is_recognised_as_self_signed(pki):
    (certificate,) = certdrop.diagnose(pem_of(pki.md5_root), now=NOW).installable
    assert certificate.role == "root" and certificate.signature_hash == "md5"


def test_self_signed_root_with_sha1_is_not_a_weak_signature(pki):
    assert "weak-signature" not in diagnosis_codes(pem_of(pki.old_root))


def test_leaf_left_out_is_still_checked_for_its_signature(pki):
    codes = diagnosis_codes(pem_of(pki.leaf, pki.intermediate, pki.root), host="mail.example.com")
    assert "host-mismatch" not in codes and "weak-signature" not in codes


@pytest.mark.parametrize(("host", "matches"), [("mail.example.com", True), ("MAIL.example.com.", True),
                                                ("a.owa.example.com", True), ("owa.example.com", False),
                                                ("x.a.owa.example.com", False), ("myserver.example.local", False)])
def test_host_is_matched_against_the_server_certificate(pki, host, matches):
    codes = diagnosis_codes(pem_of(pki.leaf, pki.root, pki.intermediate), host=host)
    assert ("host-mismatch" not in codes) is matches


def test_host_mismatch_is_a_warning_on_the_page_and_in_check(testapp, tmp_path, capsys, pki):
    data = pem_of(pki.leaf, pki.intermediate, pki.root)
    assert "[host-mismatch]" in upload(testapp, data, host="myserver.example.local").text
    status, report = check_json(tmp_path, capsys, data, "--host", "myserver.example.local")
    assert status == 1 and report["warnings"][0]["code"] == "host-mismatch"


def test_host_without_a_server_certificate_is_a_note(pki):
    assert "host-unchecked" in diagnosis_codes(pem_of(pki.root), host="mail.example.com")


def test_too_many_certificates_are_refused():
    certs = [make_certificate(f"CA {i}", serial=i + 1)[0] for i in range(certdrop.MAX_CERTIFICATES + 1)]
    with pytest.raises(certdrop.CertificateError, match="limit is 300") as refusal:
        certdrop.diagnose(pem_of(*certs), now=NOW)
    assert refusal.value.code == "too-many"


@pytest.mark.parametrize("data", [b"\x30\x80" * 40, b"\x30\x84\xff\xff\xff\xff", b"\x30", b"\x30\x80\x30\x80",
                                  b"\x1f\xff\xff\xff"], ids=["deep-nesting", "huge-length", "truncated",
                                                              "unterminated", "endless-tag"])
def test_hostile_asn1_ends_in_a_clean_refusal(data):
    with pytest.raises(certdrop.CertificateError):
        certdrop.diagnose(data, now=NOW)


# -- crafted certificates: fields the library reads lazily ------------------------------------------------------


def tlv(tag, content):
    """Return one DER element."""
    if len(content) < 0x80:
        return bytes([tag, len(content)]) + content
    length = len(content).to_bytes((len(content).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


CRAFT_KEY = ec.generate_private_key(ec.SECP256R1())


def crafted(edit):
    """Return a self-signed CA whose TBS fields *edit* rewrote, signed again so its signature verifies."""
    cert, _ = make_certificate("Crafted CA", key=CRAFT_KEY)
    tbs = cert.tbs_certificate_bytes
    fields = [tbs[f.start:f.end] for f in certdrop.ber_children(tbs, certdrop.ber_element(tbs))]
    body = tlv(0x30, b"".join(edit(fields)))
    signature = CRAFT_KEY.sign(body, ec.ECDSA(hashes.SHA256()))
    return tlv(0x30, body + tlv(0x30, bytes.fromhex("06082a8648ce3d040302")) + tlv(0x03, b"\0" + signature))


def rewrite_extensions(change):
    """Return an edit that passes the TBS's extensions through *change* (a list of DER extensions in and out).

    TBS fields: version, serial, algorithm, issuer, validity, subject, key, [3] extensions."""
    def edit(fields):
        outer = fields[7]
        inner = outer[certdrop.ber_element(outer).content_start:]
        present = [inner[e.start:e.end] for e in certdrop.ber_children(inner, certdrop.ber_element(inner))]
        return [*fields[:7], tlv(0xA3, tlv(0x30, b"".join(change(present))))]
    return edit


def san_extension(general_name):
    return tlv(0x30, tlv(0x06, bytes.fromhex("551d11")) + tlv(0x04, tlv(0x30, general_name)))


def common_name_as(value):
    """Return an edit that makes the subject and issuer a CN with the raw DER *value*."""
    name = tlv(0x30, tlv(0x31, tlv(0x30, tlv(0x06, bytes.fromhex("550403")) + value)))
    return lambda fields: [*fields[:3], name, fields[4], name, *fields[6:]]


def negative_serial(fields):
    return [fields[0], tlv(0x02, b"\xff\x01"), *fields[2:]]


CRAFTED = {
    "duplicate-extension": lambda: crafted(rewrite_extensions(lambda present: present * 2)),
    "edipartyname-in-san": lambda: crafted(rewrite_extensions(
        lambda present: [*present, san_extension(tlv(0xA5, tlv(0xA1, tlv(0x0C, b"x"))))])),
    "x400address-in-san": lambda: crafted(rewrite_extensions(
        lambda present: [*present, san_extension(tlv(0xA3, tlv(0x30, b"")))])),
    "cn-as-bit-string": lambda: crafted(common_name_as(tlv(0x03, b"\x00ab"))),
    "cn-as-integer": lambda: crafted(common_name_as(tlv(0x02, b"\x05"))),
    "cn-as-bad-utf8": lambda: crafted(common_name_as(tlv(0x0C, b"\xff\xfe"))),
}


@pytest.mark.parametrize("case", CRAFTED, ids=CRAFTED)
def test_crafted_certificates_are_refused_as_damaged(case):
    with pytest.raises(certdrop.CertificateError) as refusal:
        certdrop.diagnose(CRAFTED[case](), now=NOW)
    assert refusal.value.code == "damaged-certificate"


@pytest.mark.parametrize("case", CRAFTED, ids=CRAFTED)
def test_crafted_certificate_upload_answers_422_and_stores_nothing(testapp, config, case):
    response = upload(testapp, CRAFTED[case](), status=422)
    assert "damaged" in html_text(response)
    assert files_under(config.data_dir) == []


@pytest.mark.slow
@pytest.mark.parametrize("case", CRAFTED, ids=CRAFTED)
def test_check_of_a_crafted_certificate_exits_2_without_a_traceback(tmp_path, case):
    (tmp_path / "crafted.der").write_bytes(CRAFTED[case]())
    result = subprocess.run([sys.executable, str(HERE / "certdrop.py"), "check", str(tmp_path / "crafted.der")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "refused [damaged-certificate]" in result.stdout and "Traceback" not in result.stderr


def test_negative_serial_is_shown_with_a_minus_sign_on_the_result_page(testapp):
    assert "Serial-FF" in html_text(upload(testapp, crafted(negative_serial)))


def test_show_prints_a_negative_serial(tmp_path, capsys):
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\ndata_dir = data\n")
    (tmp_path / "negative.der").write_bytes(crafted(negative_serial))
    assert certdrop.main(["-c", str(ini), "add", str(tmp_path / "negative.der")], clock=lambda: NOW) == 0
    token = re.search(r"/c/([a-z0-9]+)", capsys.readouterr().out)[1]
    assert certdrop.main(["-c", str(ini), "show", token], clock=lambda: NOW) == 0
    assert "serial    -FF\n" in capsys.readouterr().out


# -- property tests: whatever arrives ends in a result or a clean refusal ---------------------------------------

PROPERTY_SETTINGS = hypothesis.settings(max_examples=250, deadline=None, database=None,
                                        suppress_health_check=[hypothesis.HealthCheck.too_slow])


def render_everything(diagnosis):
    """Run every renderer over every certificate of *diagnosis*, as pages, files, reports and CLI lines would."""
    entries = [certdrop.Entry("abcdefgh", NOW, NOW + DAY, certificate.der) for certificate in diagnosis.installable]
    links = [certdrop.Link(entry, "http://ca.example.org/c/abcdefgh", True) for entry in entries]
    ET.fromstring(certdrop.render_result(links, diagnosis, NOW, "/"))
    for certificate in diagnosis.installable:
        for device in certdrop.DEVICE_GUIDES:
            ET.fromstring(certdrop.render_landing(certificate, certdrop.Client(device, False), "/c/abcdefgh"))
        for content_type in (certdrop.MIME_XHTML_MP, certdrop.MIME_WML):
            ET.fromstring(certdrop.render_nokia_page(certificate, certdrop.Client("s40", False), "/c/abcdefgh",
                                                     content_type, ("whc-direct", "whc-length"), 106))
        plistlib.loads(certdrop.apple_profile(certificate))
        certdrop.hashed_certificate(certificate)
        pem = certdrop.pem_bytes(certificate).decode("ascii").splitlines()
        assert base64.b64decode("".join(pem[1:-1])) == certificate.der and max(map(len, pem)) <= 64
    json.dumps(certdrop.check_report("upload", diagnosis_bytes(diagnosis), "", NOW)[1])


def diagnosis_bytes(diagnosis):
    return b"".join(certdrop.pem_bytes(certificate) for certificate in diagnosis.certificates)


def diagnose_or_refuse(data):
    """Return the diagnosis of *data*, after rendering it everywhere, or None for a clean refusal."""
    certdrop.quiet_library_warnings()  # as the app and the command line do; pytest resets filters per test
    try:
        diagnosis = certdrop.diagnose(data, now=NOW, force=True)
    except certdrop.CertificateError as refusal:
        assert refusal.code and str(refusal)
        return None
    render_everything(diagnosis)
    return diagnosis


@functools.cache
def mutation_corpus():
    """Return real certificates to mutate: roots with and without extensions, an RSA intermediate, a leaf."""
    root, root_key = make_certificate("Corpus Root")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = make_name("Corpus RSA Intermediate", "Corpus Org")
    intermediate = (x509.CertificateBuilder().subject_name(subject).issuer_name(root.subject)
                    .public_key(rsa_key.public_key()).serial_number(99)
                    .not_valid_before(datetime.datetime(2025, 1, 1)).not_valid_after(datetime.datetime(2030, 1, 1))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                    .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), True)
                    .add_extension(x509.AuthorityInformationAccess([x509.AccessDescription(
                        x509.oid.AuthorityInformationAccessOID.CA_ISSUERS,
                        x509.UniformResourceIdentifier("http://pki.example.com/root.cer"))]), False)
                    .sign(root_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(make_name("mail.example.com")).issuer_name(subject)
            .public_key(ec.generate_private_key(ec.SECP256R1()).public_key()).serial_number(7)
            .not_valid_before(datetime.datetime(2025, 1, 1)).not_valid_after(datetime.datetime(2026, 1, 1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("mail.example.com"),
                                                        x509.IPAddress(ipaddress.ip_address("10.0.0.1"))]), False)
            .sign(rsa_key, hashes.SHA256()))
    return [der_of(root), der_of(intermediate), der_of(leaf), crafted(negative_serial)]


def element_offsets(der):
    """Return the start of every DER element inside *der*, walking constructed ones."""
    offsets, stack = [], [0]
    while stack and len(offsets) < 2000:
        offset = stack.pop()
        try:
            element = certdrop.ber_element(der, offset)
        except ValueError:
            continue
        offsets.append(offset)
        if element.tag & 0x20:  # constructed: its children are elements too
            with contextlib.suppress(ValueError):
                stack.extend(child.start for child in certdrop.ber_children(der, element))
    return offsets


@st.composite
def mutated_certificates(draw):
    der = bytearray(draw(st.sampled_from(mutation_corpus())))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["bit-flip", "truncate", "length", "tag", "duplicate-extensions"]))
        offsets = element_offsets(bytes(der)) or [0]
        if kind == "bit-flip" and der:
            index = draw(st.integers(0, len(der) - 1))
            der[index] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            der = der[:draw(st.integers(0, len(der)))]
        elif kind == "length" and len(der) > 2:
            index = min(draw(st.sampled_from(offsets)) + 1, len(der) - 1)
            der[index] = draw(st.integers(0, 255))
        elif kind == "tag" and der:
            der[draw(st.sampled_from(offsets))] = draw(st.sampled_from(
                [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0C, 0x12, 0x13, 0x14, 0x16, 0x17, 0x18, 0x1A, 0x1C, 0x1E,
                 0x30, 0x31, 0x80, 0xA0, 0xA3, 0xFF]))
        elif kind == "duplicate-extensions":
            with contextlib.suppress(ValueError, IndexError):
                der = bytearray(duplicate_an_extension(bytes(der)))
    return bytes(der)


def duplicate_an_extension(der):
    """Return *der* with its first extension twice, keeping the (now wrong) signature: deterministic, unlike
    signing again."""
    tbs, algorithm, signature = (der[e.start:e.end] for e in certdrop.ber_children(der, certdrop.ber_element(der)))
    fields = [tbs[f.start:f.end] for f in certdrop.ber_children(tbs, certdrop.ber_element(tbs))]
    fields = rewrite_extensions(lambda present: present + present[:1])(fields)
    return tlv(0x30, tlv(0x30, b"".join(fields)) + algorithm + signature)


@PROPERTY_SETTINGS
@hypothesis.given(st.binary(max_size=4096))
def test_any_bytes_give_a_diagnosis_or_a_clean_refusal(data):
    diagnose_or_refuse(data)


@pytest.mark.slow  # 250 examples, about 0.6 s
@PROPERTY_SETTINGS
@hypothesis.given(mutated_certificates())
def test_mutated_certificates_give_a_diagnosis_that_renders_everywhere_or_a_clean_refusal(der):
    diagnose_or_refuse(der)
    diagnose_or_refuse(base64.encodebytes(der))
    diagnose_or_refuse(b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der) + b"-----END CERTIFICATE-----\n")


def test_check_prints_a_readable_report(tmp_path, capsys, pki):
    path = tmp_path / "fullchain.pem"
    path.write_bytes(pem_of(pki.leaf, pki.intermediate, pki.root))
    assert certdrop.main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: PEM, 3 certificates\n")
    assert re.search(r"root +Example Root CA  gets a link", out) and "left out: The server certificate" in out


def test_check_of_a_missing_file_exits_3(tmp_path, capsys):
    assert certdrop.main(["check", str(tmp_path / "missing.pem")]) == 3


def test_check_without_files_is_a_usage_error_with_status_3(capsys):
    with pytest.raises(SystemExit) as exit_:
        certdrop.main(["check"])
    assert exit_.value.code == 3


@pytest.mark.slow
def test_library_warnings_about_odd_certificates_do_not_reach_the_user(tmp_path):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "k.pem",
            "-out", "negative.pem", "-subj", "/CN=Negative Serial Root", "-set_serial", "-5", "-days", "3650",
            cwd=tmp_path)
    result = subprocess.run([sys.executable, "-W", "default", str(HERE / "certdrop.py"), "check",
                             str(tmp_path / "negative.pem")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "Negative Serial Root" in result.stdout
    assert result.stderr == ""


def test_check_stores_nothing(tmp_path, capsys, pki, monkeypatch):
    monkeypatch.setattr(certdrop.Store, "add", lambda *args: pytest.fail("check stored something"))
    path = tmp_path / "root.pem"
    path.write_bytes(pem_of(pki.root))
    assert certdrop.main(["check", str(path)]) == 0


# -- device formats --------------------------------------------------------------------------------------------

#: User-Agent strings as devices send them: the Nokia ones from the research note (uap-core's test data) and a
#: public WAP user-agent list, current browsers in their published formats; ids ending in "-pattern" were built on
#: the pattern of their siblings. For each: the class it must get and what /c/<token> must answer with by default:
#: "der-inline", "der-attachment", "nokia-page" or "html-page".
USER_AGENTS = {
    "s60-1st-3650": ("Nokia3650/1.0 (4.17) SymbianOS/6.1 Series60/1.2 Profile/MIDP-1.0 Configuration/CLDC-1.0",
                     "s60", "der-inline"),
    "s60-2nd-6600": (S60_AGENTS["6600-wap"], "s60", "der-inline"),
    "s60-2nd-6630": ("Nokia6630/1.0 (3.45.113) SymbianOS/8.0 Series60/2.6 Profile/MIDP-2.0 Configuration/CLDC-1.1",
                     "s60", "der-inline"),
    "s60-3rd-e61i": (S60_AGENTS["e61i"], "s60", "der-inline"),
    "s60-3rd-e61-msie": ("Mozilla/4.0 (compatible; MSIE 5.0; Series60/3.0 NokiaE61-1/05w38.2 Profile/MIDP-2.0 "
                         "Configuration/CLDC-1.1)", "s60", "der-inline"),
    "s60-3rd-e65-operator": ("NokiaE65-1 Orange/1.0 (1.0633.18.02) SymbianOS/9.1 Series60/3.0 Profile/MIDP-2.0 "
                             "Configuration/CLDC-1.1", "s60", "der-inline"),
    "s60-3.1-n95": ("Mozilla/5.0 (SymbianOS/9.2; U; Series60/3.1 NokiaN95/12.0.013; Profile/MIDP-2.0 "
                    "Configuration/CLDC-1.1 ) AppleWebKit/413 (KHTML, like Gecko) Safari/413", "s60", "der-inline"),
    "s60-3.1-e71": ("Mozilla/5.0 (SymbianOS/9.2; Series60/3.1 NokiaE71-1/200.21.118; Profile/MIDP-2.0 "
                    "Configuration/CLDC-1.1 ) AppleWebKit/413 (KHTML, like Gecko) Safari/413", "s60", "der-inline"),
    "s60-5th-5800": ("Mozilla/5.0 (SymbianOS/9.4; Series60/5.0 Nokia5800d-1/20.7.006; Profile/MIDP-2.1 "
                     "Configuration/CLDC-1.1 ) AppleWebKit/525 (KHTML, like Gecko) Version/3.0 BrowserNG/7.2.3",
                     "s60", "der-inline"),
    "s60-5th-n97": ("Mozilla/5.0 (SymbianOS/9.4; Series60/5.0 NokiaN97-5/10.2.020; Profile/MIDP-2.1 "
                    "Configuration/CLDC-1.1) AppleWebKit/525 (KHTML, like Gecko) BrowserNG/7", "s60", "der-inline"),
    "symbian3-n8": (S60_AGENTS["n8-symbian3"], "s60", "der-inline"),
    "symbian-belle-701": ("Mozilla/5.0 (Symbian/3; Series60/5.3 Nokia701/111.020.0307; Profile/MIDP-2.1 "
                          "Configuration/CLDC-1.1 ) AppleWebKit/533.4 (KHTML, like Gecko) NokiaBrowser/7.4.1.14 "
                          "Mobile Safari/533.4 3gpp-gba", "s60", "der-inline"),
    "s60-ucweb-proxy": ("Mozilla/5.0 (S60V3; U; en-us; Nokia6120ci)/UC Browser8.2.0.132/28/355/UCWEB Mobile",
                        "s60", "nokia-page"),
    "s60-imode-n73": ("portalmmm/2.0 N73(c100;TB)", "s60", "der-inline"),
    "s60-truncated-wap": ("Nokia6630/1.0 (2.39.15)", "s60", "der-inline"),
    "s60-opera-mini-n95": ("Opera/9.80 (J2ME/MIDP; Opera Mini/NokiaN95/22.478; U; en) Presto/2.5.25 Version/10.54",
                           "s60", "nokia-page"),
    "symbian-s80-9210": ("Nokia 9210/Symbian Crystal 6.0 (1.00)", "s60", "der-inline"),
    "s60-japan-v702nk": ("Vodafone/1.0/V702NK/NKJ001 Series60/2.6 Profile/MIDP-2.0 Configuration/CLDC-1.1", "s60",
                         "der-inline"),
    "wap-6210-of-2000": ("Nokia6210/1.0 (03.01) UP.Link/4.2.2.1", "s40", "nokia-page"),
    "wap-3330": ("Nokia3330/1.0 (04.50) UP.Link/5.1.1a", "s40", "nokia-page"),
    "s40-6650-of-2003": ("Nokia6650/1.0 (13.88) Profile/MIDP-1.0 Configuration/CLDC-1.0", "s40", "nokia-page"),
    "s60-7650-model-only": ("Nokia7650 [XIDRIS WML Browser 2.2]", "s60", "der-inline"),
    "s40-6220-of-2003": ("Nokia6220/2.0 (5.15) Profile/MIDP-2.0 Configuration/CLDC-1.1", "s40", "nokia-page"),
    "s40-6260-slide-pattern": ("Nokia6260s-1/2.0 (04.60) Profile/MIDP-2.1 Configuration/CLDC-1.1", "s40", "nokia-page"),
    "s40-6500s": ("Nokia6500s/2.0 (05.41) Profile/MIDP-2.1 Configuration/CLDC-1.1", "s40", "nokia-page"),
    "s40-2730c": ("Nokia2730c/2.0 (07.60) Profile/MIDP-2.1 Configuration/CLDC-1.1", "s40", "nokia-page"),
    "s40-6303c-webkit": ("Nokia6303c/2.0 (06.40) Profile/MIDP-2.1 Configuration/CLDC-1.1 Mozilla/5.0 "
                         "AppleWebKit/420 (KHTML, like Gecko) Safari/420", "s40", "nokia-page"),
    "s40-6100-old": ("Nokia6100/1.0 (05.16) Profile/MIDP-1.0 Configuration/CLDC-1.0", "s40", "nokia-page"),
    "s40-ovi-6300": ("Mozilla/5.0 (Series40/3.0FP1; Nokia6300/07.00; Profile/MIDP-2.1 Configuration/CLDC-1.1) "
                     "Gecko/20100401 S40OviBrowser/0.8.3", "s40", "nokia-page"),
    "s40-ovi-2700c": ("Mozilla/5.0 (Series40; Nokia2700c-2/07.15; Profile/MIDP-2.1 Configuration/CLDC-1.1) "
                      "Gecko/20100401 S40OviBrowser/4.0.0.0.45", "s40", "nokia-page"),
    "s40-opera-mini-2730c": ("Opera/9.80 (J2ME/MIDP; Opera Mini/Nokia2730c-1/22.478; U; en) Presto/2.5.25 "
                             "Version/10.54", "s40", "nokia-page"),
    "s40-ucweb-201": ("Nokia201/2.0 (11.21) Profile/MIDP-2.1 Configuration/CLDC-1.1 "
                      "UCBrowser8.3.0.154/70/355/UCWEB Mobile", "s40", "nokia-page"),
    "s40-midlet-untrusted": ("Nokia7210c/2.0 (05.60) Profile/MIDP-2.1 Configuration/CLDC-1.1 UNTRUSTED/1.0",
                             "s40", "nokia-page"),
    "lg-naming-nokia6233": ("LG-CU920/V1.0s Obigo/Q05A Profile/MIDP-2.0 Configuration/CLDC-1.1 Nokia6233/2.0",
                            "other", "html-page"),
    # Classes the first users' agents fell through (written in the published formats of those browsers):
    # "Nokia" in any case, Series 40 WebKit and Opera Mini naming the phone, a model token ending at a delimiter.
    "s40-upper-case-6230": ("NOKIA6230/2.0 (04.44) Profile/MIDP-2.0 Configuration/CLDC-1.1", "s40", "nokia-page"),
    "s40-cdma-6236i": ("NOKIA-6236i UP.Browser/6.2.3.4 (GUI) MMP/2.0", "s40", "nokia-page"),
    "s60-lower-case-6680": ("nokia6680/1.0 (4.04.07) SymbianOS/8.0 Series60/2.6 Profile/MIDP-2.0 "
                            "Configuration/CLDC-1.1", "s60", "der-inline"),
    "s60-lower-case-model-only": ("nokian73/1.0 (2.0628.0.0.1)", "s60", "der-inline"),
    "s40-webkit-6600s": ("Mozilla/5.0 (Nokia; U; en) AppleWebKit/533.4 (KHTML, like Gecko) Nokia6600s/2.0 (03.60) "
                         "Profile/MIDP-2.1 Configuration/CLDC-1.1", "s40", "nokia-page"),
    "s40-7610-supernova": ("Nokia7610 Supernova/2.0 (05.20) Profile/MIDP-2.1 Configuration/CLDC-1.1", "s40",
                           "nokia-page"),
    # Model names with a long suffix (issue 21): the name is part of the model. UA shapes from WURFL's lists
    # ("Nokia5310XpressMusic/2.0 (07.01) Profile/MIDP-2.1 ..."), the WebKit one as the issue's user reported it.
    "s40-5310-xpressmusic-webkit": ("Mozilla/5.0 (Nokia5310XpressMusic/2.0 (09.42); Profile/MIDP-2.1 "
                                    "Configuration/CLDC-1.1) AppleWebKit/420+ (KHTML, like Gecko) Safari/420+", "s40",
                                    "nokia-page"),
    "s40-5310-xpressmusic": ("Nokia5310XpressMusic/2.0 (07.01) Profile/MIDP-2.1 Configuration/CLDC-1.1", "s40",
                             "nokia-page"),
    "s40-3600-slide-webkit": ("Mozilla/5.0 (Nokia3600slide/2.0 (04.20); Profile/MIDP-2.1 Configuration/CLDC-1.1) "
                              "AppleWebKit/420+ (KHTML, like Gecko) Safari/420+", "s40", "nokia-page"),
    "s40-3600-slide-opera-mini": ("Opera/9.80 (J2ME/MIDP; Opera Mini/4.2.14912/870; U; Nokia3600slide; en) "
                                  "Presto/2.4.15", "s40", "nokia-page"),
    "s60-3600-opera-mini": ("Opera/9.80 (J2ME/MIDP; Opera Mini/4.2.14912/870; U; Nokia3600; en) Presto/2.4.15", "s60",
                            "nokia-page"),
    "s40-7610-supernova-webkit": ("Mozilla/5.0 (Nokia7610 Supernova/2.0 (05.20); Profile/MIDP-2.1 "
                                  "Configuration/CLDC-1.1) AppleWebKit/420+ (KHTML, like Gecko) Safari/420+", "s40",
                                  "nokia-page"),
    "s60-6700-slide-opera-mini": ("Opera/9.80 (J2ME/MIDP; Opera Mini/4.2.14912/870; U; Nokia6700slide; en) "
                                  "Presto/2.4.15", "s60", "nokia-page"),
    "s40-opera-mini-naming-the-phone": ("Opera/9.80 (J2ME/MIDP; Opera Mini/5.1.21214/28.2725; U; Nokia 6230; en) "
                                        "Presto/2.5.25 Version/10.54", "s40", "nokia-page"),
    "s60-opera-mini-lower-case": ("Opera/9.80 (J2ME/MIDP; Opera mini/4.2.14912/870; U; NokiaN95; en) "
                                  "Presto/2.4.15", "s60", "nokia-page"),
    "opera-mini-generic": ("Opera/9.80 (J2ME/MIDP; Opera Mini/9.80 (J2ME/23.377; U; en) Presto/2.5.25 "
                           "Version/10.54", "other", "html-page"),
    "meego-n9": ("Mozilla/5.0 (MeeGo; NokiaN9) AppleWebKit/534.13 (KHTML, like Gecko) NokiaBrowser/8.5.0 Mobile "
                 "Safari/534.13", "other", "html-page"),
    "cat-s60-android": (OTHER_AGENTS["cat-s60-android"], "android", "html-page"),
    "lenovo-s60-android": ("Mozilla/5.0 (Linux; Android 5.0.2; Lenovo S60-a Build/LRX22G) AppleWebKit/537.36 "
                           "(KHTML, like Gecko) Chrome/58.0.3029.83 Mobile Safari/537.36", "android", "html-page"),
    "android-chrome": ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
                       "Chrome/131.0.0.0 Mobile Safari/537.36", "android", "html-page"),
    "android-firefox": ("Mozilla/5.0 (Android 14; Mobile; rv:132.0) Gecko/132.0 Firefox/132.0", "android",
                        "html-page"),
    "nokia-x-android": ("Mozilla/5.0 (Linux; U; Android 4.1.2; en-us; Nokia_X Build/JZO54K) AppleWebKit/534.30 "
                        "(KHTML, like Gecko) Version/4.0 Mobile Safari/534.30", "android", "html-page"),
    "iphone-safari": ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
                      "Gecko) Version/18.1 Mobile/15E148 Safari/604.1", "ios", "html-page"),
    "ipad-ios12": ("Mozilla/5.0 (iPad; CPU OS 12_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
                   "Version/12.1 Mobile/15E148 Safari/604.1", "ios", "html-page"),
    "iphone-chrome": ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
                      "Gecko) CriOS/120.0.6099.119 Mobile/15E148 Safari/604.1", "ios", "html-page"),
    "ipados-as-mac": ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
                      "Version/17.0 Safari/605.1.15", "macos", "html-page"),
    "macos-firefox": ("Mozilla/5.0 (Macintosh; Intel Mac OS X 14.5; rv:132.0) Gecko/20100101 Firefox/132.0",
                      "macos", "html-page"),
    "macos-chrome": ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
                     "Chrome/131.0.0.0 Safari/537.36", "macos", "html-page"),
    "windows-edge": ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
                     "Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0", "windows", "html-page"),
    "windows-firefox": ("Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:132.0) Gecko/20100101 Firefox/132.0",
                        "windows", "html-page"),
    "windows-ie11": ("Mozilla/5.0 (Windows NT 6.1; Trident/7.0; rv:11.0) like Gecko", "windows", "html-page"),
    "linux-firefox": (OTHER_AGENTS["firefox-linux"], "firefox", "html-page"),
    "ubuntu-firefox": ("Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0", "firefox",
                       "html-page"),
    "linux-chrome": ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
                     "Safari/537.36", "linux", "html-page"),
    "chromeos": ("Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) "
                 "Chrome/131.0.0.0 Safari/537.36", "chromeos", "html-page"),
    "windows-phone-8.1": ("Mozilla/5.0 (Mobile; Windows Phone 8.1; Android 4.0; ARM; Trident/7.0; Touch; rv:11.0; "
                          "IEMobile/11.0; NOKIA; Lumia 630) like iPhone OS 7_0_3 Mac OS X AppleWebKit/537 (KHTML, "
                          "like Gecko) Mobile Safari/537", "windows-mobile", "html-page"),
    "windows-phone-10": ("Mozilla/5.0 (Windows Phone 10.0; Android 6.0.1; Microsoft; Lumia 950) "
                         "AppleWebKit/537.36 (KHTML, like Gecko) Chrome/52.0.2743.116 Mobile Safari/537.36 "
                         "Edge/15.15063", "windows-mobile", "html-page"),
    "windows-mobile-6.5": ("Mozilla/4.0 (compatible; MSIE 6.0; Windows CE; IEMobile 8.12; MSIEMobile 6.5)",
                           "windows-mobile", "html-page"),
    "blackberry-9900": ("Mozilla/5.0 (BlackBerry; U; BlackBerry 9900; en) AppleWebKit/534.11+ (KHTML, like Gecko) "
                        "Version/7.1.0.346 Mobile Safari/534.11+", "blackberry", "html-page"),
    "blackberry-10": ("Mozilla/5.0 (BB10; Touch) AppleWebKit/537.35+ (KHTML, like Gecko) Version/10.3.3.2205 "
                      "Mobile Safari/537.35+", "blackberry", "html-page"),
    "blackberry-os4-midp": ("BlackBerry9000/4.6.0.167 Profile/MIDP-2.0 Configuration/CLDC-1.1 VendorID/102",
                            "blackberry", "html-page"),
    "curl": ("curl/8.5.0", "other", "der-attachment"),
    "wget": ("Wget/1.21.4", "other", "der-attachment"),
    "no-user-agent": ("", "other", "html-page"),
}

#: The file each landing page offers first.
FIRST_FILES = {"ios": ".mobileconfig", "android": ".crt", "windows": ".cer", "macos": ".mobileconfig",
               "linux": ".pem", "firefox": ".crt", "windows-mobile": ".cer", "blackberry": ".cer", "other": ".crt"}

FIXED_CODES = {"whc-direct": "502351 322412 497438 320788 097006", "whc-length": "224675 382440 165332 125849 248054"}


def fixed_certificate():
    """Return a certificate whose DER is the same on every run (Ed25519 signatures are deterministic)."""
    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Fixed Test Root")])
    start = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(42).not_valid_before(start).not_valid_after(start.replace(year=2045))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, None))
    return certdrop.inspect_certificate(cert)


@pytest.fixture
def root_token(testapp, root_der):
    return uploaded_token(testapp, root_der)


def response_kind(response):
    disposition = response.headers.get("Content-Disposition", "")
    if response.content_type == "application/x-x509-ca-cert":
        return "der-attachment" if disposition.startswith("attachment") else "der-inline"
    if b"XHTML Mobile" in response.body:
        return "nokia-page"
    return "html-page" if b"<!DOCTYPE html>" in response.body else "unknown"


@pytest.mark.parametrize("name", USER_AGENTS, ids=USER_AGENTS)
def test_each_real_user_agent_is_classified(name):
    agent, device, _ = USER_AGENTS[name]
    assert certdrop.classify(agent) == device


@pytest.mark.slow  # 71 uploads and answers, about 0.7 s together
@pytest.mark.parametrize("name", USER_AGENTS, ids=USER_AGENTS)
def test_each_real_user_agent_gets_its_answer(testapp, root_token, root_der, name):
    agent, _, expected = USER_AGENTS[name]
    response = testapp.get(f"/c/{root_token}", headers={"User-Agent": agent})
    assert response.status_int == 200 and response_kind(response) == expected
    assert response.content_type == ("application/x-x509-ca-cert" if expected.startswith("der") else "text/html")
    if expected.startswith("der"):
        assert response.body == root_der
    if expected == "der-attachment":
        assert response.headers["Content-Disposition"] == 'attachment; filename="Example_Root_CA.crt"'
    if expected.endswith("page"):
        ET.fromstring(response.body)  # every page is well-formed XML


def test_at_least_forty_real_user_agents_are_pinned():
    assert len(USER_AGENTS) >= 40


def test_proxy_browser_headers_name_the_handset(testapp, root_token):
    response = testapp.get(f"/c/{root_token}", headers={"User-Agent": "Opera/9.80 (J2ME/MIDP; Opera Mini/9.80 "
                                                                      "(J2ME/23.377; U; en) Presto/2.5.25",
                                                        "X-OperaMini-Phone-UA": S60_AGENTS["e61i"]})
    assert response_kind(response) == "nokia-page" and b"open this link in its own browser" in response.body


def test_device_stock_ua_classifies_without_calling_the_browser_a_proxy(testapp, root_token):
    response = testapp.get(f"/c/{root_token}", headers={
        "User-Agent": "Mozilla/5.0 (Linux; Android 14) AppleWebKit/537.36 Chrome/131.0 Mobile Safari/537.36 OPR/85.0",
        "Device-Stock-UA": USER_AGENTS["android-chrome"][0]})
    assert "Install a certificate" in response.text and "Opera Mini and UC Browser" not in response.text


@pytest.mark.parametrize("device", FIRST_FILES, ids=FIRST_FILES)
def test_each_landing_page_offers_its_platforms_file_first(testapp, root_token, device):
    agent = next(agent for agent, kind, _ in USER_AGENTS.values() if kind == device)
    page = testapp.get(f"/c/{root_token}", headers={"User-Agent": agent})
    first = page.html.select_one("a.button")["href"]
    assert first == f"/c/{root_token}/Example_Root_CA{FIRST_FILES[device]}"


@pytest.mark.parametrize("device", FIRST_FILES, ids=FIRST_FILES)
def test_each_landing_page_shows_fingerprints_and_why_to_compare(testapp, root_token, root, device):
    agent = next(agent for agent, kind, _ in USER_AGENTS.values() if kind == device)
    text = html_text(testapp.get(f"/c/{root_token}", headers={"User-Agent": agent}))
    assert root[0].fingerprint(hashes.SHA256()).hex(":").upper() in text
    assert root[0].fingerprint(hashes.SHA1()).hex(":").upper() in text and "Compare these fingerprints" in text


def test_landing_pages_name_their_platforms_steps(testapp, root_token):
    def text(device):
        agent = next(agent for agent, kind, _ in USER_AGENTS.values() if kind == device)
        return html_text(testapp.get(f"/c/{root_token}", headers={"User-Agent": agent}))
    assert "within 8 minutes" in text("ios") and "Certificate Trust Settings" in text("ios")
    assert "Install a certificate" in text("android") and "screen lock" in text("android")
    android = text("android")
    assert "More security & privacy › Encryption & credentials" in android
    assert "Install from device storage" in android
    assert "Search Settings for “CA certificate”" in android and "network security configuration" in android
    assert "Use third party CA certificates" in android
    windows = text("windows")
    assert "Cert:\\LocalMachine\\Root" in windows and "Cert:\\CurrentUser\\Root" in windows
    assert "certutil -addstore -f Root $f" in windows and "certutil -user -addstore -f Root $f" in windows
    assert "Trusted Root Certification Authorities" in windows and "security.enterprise_roots.enabled" in windows
    assert "update-ca-certificates" in text("linux") and "trust anchor --store" in text("linux")
    assert "libnss3-tools" in text("linux")
    assert "identify websites" in text("firefox") and "update-ca-trust" in text("firefox")
    assert "Keychain Access" in text("macos") and "add-trusted-cert -d -r trustRoot" in text("macos")
    assert "Installed by you › Trusted certificates › Import" in text("chromeos")
    assert "Authorities › Import" in text("chromeos") and "Trust this certificate for identifying websites" in text(
        "chromeos")


def test_macos_steps_open_the_cer_in_keychain_access_not_the_profile(testapp, root_token):
    page = html_text(testapp.get(f"/c/{root_token}", headers={"User-Agent": USER_AGENTS["macos-chrome"][0]}))
    assert "download Example_Root_CA.cer, open it in Keychain Access" in page


#: Real User-Agents of apps' web views and of iOS browsers that cannot install a profile: id -> (User-Agent, the
#: app's name as the page shows it, device). Each is quoted from the source named beside it.
IN_APP_AGENTS = {
    # github.com/allinurl/goaccess/issues/804
    "facebook-ios": ("Mozilla/5.0 (iPhone; CPU iPhone OS 10_3_2 like Mac OS X) AppleWebKit/603.2.4 (KHTML, like "
                     "Gecko) Mobile/14F89 [FBAN/FBIOS;FBAV/96.0.0.45.70;FBBV/60548545;FBDV/iPhone7,2;FBMD/iPhone;"
                     "FBSN/iOS;FBSV/10.3.2;FBSS/2;FBCR/E-Plus;FBID/phone;FBLC/de_DE;FBOP/5;FBRV/0]", "Facebook", "ios"),
    "facebook-android": ("Mozilla/5.0 (Linux; Android 7.0; SM-G930F Build/NRD90M; wv) AppleWebKit/537.36 (KHTML, "
                         "like Gecko) Version/4.0 Chrome/58.0.3029.83 Mobile Safari/537.36 "
                         "[FB_IAB/FB4A;FBAV/127.0.0.22.69;]", "Facebook", "android"),
    # matomo-org/device-detector#6867
    "messenger-android": ("Mozilla/5.0 (Linux; Android 11; RMX1931 Build/RKQ1.200928.002; wv) AppleWebKit/537.36 "
                          "(KHTML, like Gecko) Version/4.0 Chrome/93.0.4577.82 Mobile Safari/537.36 "
                          "[FB_IAB/Orca-Android;FBAV/331.0.0.15.119;]", "Messenger", "android"),
    # github.com/DamonOehlman/detect-browser/issues/56
    "instagram-ios": ("Mozilla/5.0 (iPhone; CPU iPhone OS 11_2_5 like Mac OS X) AppleWebKit/604.5.6 (KHTML, like "
                      "Gecko) Mobile/15D60 Instagram 31.0.0.14.97 (iPhone9,1; iOS 11_2_5; en_US; en-US; scale=2.00; "
                      "gamut=wide; 750x1334)", "Instagram", "ios"),
    "instagram-android": ("Mozilla/5.0 (Linux; Android 7.0; SM-G930P Build/NRD90M; wv) AppleWebKit/537.36 (KHTML, "
                          "like Gecko) Version/4.0 Chrome/64.0.3282.137 Mobile Safari/537.36 Instagram 30.0.0.12.95 "
                          "Android (24/7.0; 480dpi; 1080x1920; samsung; SM-G930P; heroqltespr; com; en_US; 89867442)",
                          "Instagram", "android"),
    # foroco/php-browser-detection#16
    "wechat-ios": ("Mozilla/5.0 (iPhone; CPU iPhone OS 15_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
                   "Mobile/15E148 MicroMessenger/8.0.22(0x18001626) NetType/WIFI Language/zh_CN", "WeChat", "ios"),
    # faisalman/ua-parser-js#115
    "wechat-android": ("Mozilla/5.0 (Linux; Android 5.1; Nexus 5 Build/LMY47D; wv) AppleWebKit/537.36 (KHTML, like "
                       "Gecko) Version/4.0 Chrome/42.0.2311.137 Mobile Safari/537.36 MicroMessenger/6.2.0.16_r1138404"
                       ".543 NetType/WIFI Language/zh_CN", "WeChat", "android"),
    # nielsbasjes/yauaa#565
    "line-ios": ("Mozilla/5.0 (iPhone; CPU iPhone OS 15_4_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
                 "Mobile/15E148 Safari Line/12.4.0", "LINE", "ios"),
    # matomo-org/device-detector#5530
    "line-android": ("Mozilla/5.0 (Linux; Android 6.0.1; HTC_B810x Build/MMB29M; wv) AppleWebKit/537.36 (KHTML, like "
                     "Gecko) Version/4.0 Chrome/46.0.2490.76 Mobile Safari/537.36 Line/6.5.0/IAB", "LINE", "android"),
    # intoli/user-agents#78
    "telegram-android": ("Mozilla/5.0 (Linux; Android 11; K) AppleWebKit/537.36 (KHTML, like Gecko) "
                         "Chrome/129.0.6668.70 Mobile Safari/537.36 Telegram-Android/11.2.1 (Tecno mobile limited "
                         "TECNO CH7n; Android 11; SDK 30; AVERAGE)", "Telegram", "android"),
    # donatj/PhpUserAgent#67: Snapchat says "(like Safari/604.1)", yet is a web view
    "snapchat-ios": ("Mozilla/5.0 (iPhone; CPU iPhone OS 13_6_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
                     "Gecko) Version/13.1.2 Mobile/15E148 Snapchat/11.0.6.81 (like Safari/604.1)", "Snapchat", "ios"),
    # shalanah/inapp-spy#55
    "tiktok-ios": ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_6_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
                   "Gecko) Mobile/15E148 Safari/604.1 musical_ly_41.9.0", "TikTok", "ios"),
    # browscap/browscap#1707
    "linkedin-ios": ("Mozilla/5.0 (iPhone; CPU iPhone OS 11_2_1 like Mac OS X) AppleWebKit/602.1.50 (KHTML, like "
                     "Gecko) LinkedIn/9.11.908.1 Version/10.0 Mobile/15C153 Safari/602.1", "LinkedIn", "ios"),
    # WoltLab/WCF#3051
    "firefox-ios": ("Mozilla/5.0 (iPhone; CPU iPhone OS 12_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
                    "FxiOS/18.2b15817 Mobile/15E148 Safari/605.1.15", "Firefox", "ios"),
    # browscap/browscap#1533
    "focus-ios": ("Mozilla/5.0 (iPhone; CPU iPhone OS 10_2_1 like Mac OS X) AppleWebKit/602.4.6 (KHTML, like Gecko) "
                  "Focus/3.2 Mobile/14D27", "Firefox Focus", "ios"),
    # duckduckgo/apple-browsers#2009
    "duckduckgo-ios": ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
                       "Gecko) Version/26.0 Mobile/15E148 Safari/604.1 Ddg/18.6", "DuckDuckGo", "ios"),
    # pixu1980/detector-js#25
    "opera-ios": ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
                  "Version/17.4 Mobile/15E148 Safari/604.1 OPT/4.6.1", "Opera", "ios"),
    # medama-io/go-useragent#23
    "edge-ios": ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
                 "EdgiOS/125.0.2535.87 Version/17.0 Mobile/15E148 Safari/604.1", "Microsoft Edge", "ios"),
    # zenn.dev/kecy/articles/f51851e42c4243 (Chrome for iOS 91, before profiles could be installed from it)
    "chrome-ios-91": ("Mozilla/5.0 (iPhone; CPU iPhone OS 14_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
                      "Gecko) CriOS/91.0.4472.80 Mobile/15E148 Safari/604.1", "Chrome", "ios"),
    # medama-io/go-useragent#42: an iOS web view that names no app
    "web-view-ios": ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_6_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
                     "Gecko) Mobile/15E148", "", "ios"),
    # serbanghita/Mobile-Detect#423 (LinkedIn on Android: browscap/browscap#1707): an Android web view, no app named
    "web-view-android": ("Mozilla/5.0 (Linux; Android 7.1.2; VirtualBox Build/NZH54D; wv) AppleWebKit/537.36 (KHTML, "
                         "like Gecko) Version/4.0 Chrome/52.0.2743.100 Safari/537.36", "", "android"),
}


@pytest.mark.parametrize(("agent", "app_name", "device"), IN_APP_AGENTS.values(), ids=IN_APP_AGENTS)
def test_in_app_browsers_and_browsers_that_cannot_install_are_recognised(agent, app_name, device):
    assert certdrop.identify(agent, "", False) == certdrop.Client(device, False, app_name, installs=False)


@pytest.mark.parametrize("name", ["iphone-safari", "iphone-chrome", "ipad-ios12", "android-chrome",
                                  "android-firefox", "ipados-as-mac", "windows-edge"])
def test_browsers_that_can_install_are_not_sent_away(name):
    agent, device, _ = USER_AGENTS[name]
    assert certdrop.identify(agent, "", False) == certdrop.Client(device, False)


@pytest.mark.parametrize(("agent", "app_name", "device"), IN_APP_AGENTS.values(), ids=IN_APP_AGENTS)
def test_in_app_pages_lead_with_the_way_out_naming_the_app_and_showing_the_link_as_text(testapp, root_token, agent,
                                                                                       app_name, device):
    response = testapp.get(f"/c/{root_token}", headers={"User-Agent": agent})
    way_out = response.html.find("section", class_="way-out")
    way = "Safari" if device == "ios" else "Chrome"
    assert way_out.h2.get_text() == f"Open this page in {way}"
    text = " ".join(way_out.get_text().split())
    assert (f"This page is open in {app_name}, which cannot" if app_name else "This page is open inside an app") in text
    assert way_out.find(class_="copy").get_text() == f"http://ca.example.org:8080/c/{root_token}"
    assert way_out.find("a") is None  # text to copy: a link would open in the same app again
    body = response.text
    assert body.index('class="way-out"') < body.index('class="button"')  # the way out first, the download below
    assert response.html.find("a", class_="button")["href"].endswith(FIRST_FILES[device])


def test_chrome_for_ios_120_gets_the_page_safari_gets(testapp, root_token):
    def page(name):
        return testapp.get(f"/c/{root_token}", headers={"User-Agent": USER_AGENTS[name][0]})
    chrome = page("iphone-chrome")
    assert chrome.html.find("section", class_="way-out") is None
    assert chrome.body == page("iphone-safari").body


def test_every_ios_page_says_to_open_the_link_in_safari_when_nothing_happened(testapp, root_token):
    for name in ("iphone-safari", "iphone-chrome", "ipad-ios12", "ipados-as-mac"):
        text = html_text(testapp.get(f"/c/{root_token}", headers={"User-Agent": USER_AGENTS[name][0]}))
        assert f"Nothing happened? Open this link in Safari: http://ca.example.org:8080/c/{root_token}" in text, name


def test_an_android_web_view_is_sent_to_chrome_and_chrome_is_not(testapp, root_token):
    web_view = testapp.get(f"/c/{root_token}", headers={"User-Agent": IN_APP_AGENTS["web-view-android"][0]})
    assert "Open in Chrome" in html_text(web_view) and web_view.html.find(class_="way-out")
    chrome = testapp.get(f"/c/{root_token}", headers={"User-Agent": USER_AGENTS["android-chrome"][0]})
    assert chrome.html.find(class_="way-out") is None and "Nothing happened?" not in chrome.text


def test_the_link_a_phone_page_shows_is_made_from_the_address_the_request_came_by(app, root_token):
    page = client(app, HTTP_HOST="ca.example.org:8443").get(
        f"/c/{root_token}", headers={"User-Agent": IN_APP_AGENTS["instagram-ios"][0]})
    assert page.html.find(class_="copy").get_text() == f"http://ca.example.org:8443/c/{root_token}"
    assert page.html.find(class_="qr") is None  # a phone is not pointed at its own screen


@pytest.mark.parametrize(("agent", "phone"), [
    ("Mozilla/5.0 (Mobile; Nokia_8110_4G; rv:48.0) Gecko/48.0 Firefox/48.0 KAIOS/2.5", True),
    ("Opera/9.80 (J2ME/MIDP; Opera Mini/4.2.14912/870; U; id) Presto/2.4.15", True),
    ("SomeBrowser/1.0 (HaikuOS)", False),  # a computer no class knows: the QR code is for its reader's phone
], ids=["kaios", "opera-mini-j2me", "unknown-computer"])
def test_a_phone_no_device_class_knows_is_not_pointed_at_its_own_screen(testapp, root_token, agent, phone):
    page = testapp.get(f"/c/{root_token}", headers={"User-Agent": agent})
    assert certdrop.identify(agent, "", False).device == "other"
    assert (page.html.find(class_="qr") is None) is phone and ("/dev" in page.text) is not phone


def test_a_mac_user_agent_gets_a_page_for_a_mac_or_an_ipad_with_both_guides(testapp, root_token):
    page = testapp.get(f"/c/{root_token}", headers={"User-Agent": USER_AGENTS["ipados-as-mac"][0]})
    assert page.html.title.get_text() == "Install \u201cExample Root CA\u201d on a Mac or an iPad"
    assert page.html.h1.get_text() == "Install \u201cExample Root CA\u201d on a Mac or an iPad"
    assert page.html.find("a", class_="button")["href"].endswith(".mobileconfig")  # the profile first
    assert [h2.get_text() for h2 in page.html.find_all("h2")][:2] == ["Mac", "iPhone and iPad"]
    mac, ipad = (" ".join(ol.get_text().split()) for ol in page.html.find_all("ol")[:2])
    assert "macOS 15 and later: System Settings › General › Device Management" in mac
    assert "macOS 13 and 14: System Settings › Privacy & Security › Profiles" in mac
    assert "no “Always Trust” in Keychain Access" in mac and "support.apple.com/102390" in mac
    assert "“Profile Downloaded”" in ipad and "VPN & Device Management" in ipad
    assert "Certificate Trust Settings" in ipad


def test_the_mac_page_gives_administrators_a_security_command_that_checks_the_fingerprint(testapp, root_token):
    page = testapp.get(f"/c/{root_token}", headers={"User-Agent": USER_AGENTS["macos-chrome"][0]})
    commands = [code.get_text() for code in page.html.find_all("code", class_="cmd")]
    assert len(commands) == 1 and commands[0].startswith('d="$(mktemp -d)" &&\ncurl -fsSL -o "$d/ca.der" ')
    assert commands[0].endswith(" &&\nsudo security add-trusted-cert -d -r trustRoot -k "
                                '/Library/Keychains/System.keychain "$d/ca.der"')
    assert '"$(shasum -a 256 <"$d/ca.der" | cut -c1-64)"' in commands[0]


@pytest.fixture
def intermediate_token(testapp, pki):
    return uploaded_token(testapp, pem_of(pki.intermediate))


def test_a_root_ios_page_asks_for_full_trust(testapp, root_token):
    text = html_text(testapp.get(f"/c/{root_token}", headers={"User-Agent": USER_AGENTS["iphone-safari"][0]}))
    assert "Turn on full trust" in text and "intermediate CA" not in text


@pytest.mark.parametrize("name", ["iphone-safari", "ipados-as-mac", "macos-chrome"])
def test_an_intermediate_apple_page_never_shows_the_full_trust_step_and_asks_for_the_root(testapp,
                                                                                         intermediate_token, name):
    text = html_text(testapp.get(f"/c/{intermediate_token}", headers={"User-Agent": USER_AGENTS[name][0]}))
    assert "Turn on full trust" not in text and "switch on" not in text and "trustRoot" not in text
    assert "This is an intermediate CA" in text and "install the root ca that issued it too" in text.lower()
    assert ("add-certificates -k /Library/Keychains/System.keychain" in text) == (name != "iphone-safari")


def test_an_intermediate_android_page_points_to_installing_the_root(testapp, intermediate_token):
    text = html_text(testapp.get(f"/c/{intermediate_token}",
                                 headers={"User-Agent": USER_AGENTS["android-chrome"][0]}))
    assert "This is an intermediate CA: Android trusts it only once the root CA that issued it is installed" in text


@pytest.mark.parametrize("name", ["iphone-safari", "ipados-as-mac", "android-chrome", "windows-edge", "linux-chrome",
                                  "chromeos", "blackberry-10", "s40-6500s"])
def test_every_device_page_says_when_the_link_ends(testapp, store, root_token, name):
    page = testapp.get(f"/c/{root_token}", headers={"User-Agent": USER_AGENTS[name][0]})
    date = certdrop.format_time(store.get(root_token).expires)
    assert f"The link works until {date}." in page.text


def test_an_in_app_page_says_when_the_link_ends(testapp, store, root_token):
    page = testapp.get(f"/c/{root_token}", headers={"User-Agent": IN_APP_AGENTS["instagram-ios"][0]})
    assert f"The link works until {certdrop.format_time(store.get(root_token).expires)}." in html_text(page)


def test_the_card_says_when_the_link_ends_and_whom_to_ask(config, store, clock, root_token):
    contact = "IT help desk, room 12, ext. 4711 <b>&"
    card = client(certdrop.make_app(dataclasses.replace(config, contact=contact), store, clock)).get(
        f"/c/{root_token}/card")
    text = html_text(card)
    assert f"The link works until {certdrop.format_time(store.get(root_token).expires)}." in text
    assert f"Questions, or a new link: ask {contact}." in text
    assert "<b>&" not in card.text and "&lt;b&gt;&amp;" in card.text  # escaped like any other text


def test_the_card_of_an_intermediate_never_asks_to_switch_on_full_trust(testapp, root_token, intermediate_token):
    assert "Certificate Trust Settings: switch it on" in html_text(testapp.get(f"/c/{root_token}/card"))
    card = html_text(testapp.get(f"/c/{intermediate_token}/card"))
    assert "switch it on" not in card and "It is an intermediate CA: no trust switch for it" in card


def test_a_card_without_a_contact_names_nobody(testapp, root_token):
    assert "Questions, or a new link" not in testapp.get(f"/c/{root_token}/card").text


def test_contact_setting_is_read_from_the_ini_as_one_line(tmp_path):
    path = tmp_path / "certdrop.ini"
    path.write_text("[certdrop]\ncontact = IT help desk,\n  room 12, ext. 4711\n")
    assert certdrop.Config.from_ini(path).contact == "IT help desk, room 12, ext. 4711"


@pytest.mark.parametrize(("device", "command"), [
    ("windows-edge", "certutil -addstore -f Root $f"),
    ("windows-edge", "Import-Certificate -FilePath $f -CertStoreLocation Cert:\\LocalMachine\\Root }"),
    ("linux-chrome", ' &&\nsudo trust anchor --store "$d/ca.der"'),
    ("linux-chrome", " &&\ncertutil -d \"sql:$db\" -A -t C,, -n Example_Root_CA -i \"$d/ca.der\""),
])
def test_commands_are_shown_as_code_to_copy_whole(testapp, root_token, device, command):
    page = testapp.get(f"/c/{root_token}", headers={"User-Agent": USER_AGENTS[device][0]})
    assert any(command in code.get_text() for code in page.html.find_all("code", class_="cmd"))


def test_the_main_button_names_the_format_as_people_write_it(testapp, root_token):
    page = testapp.get(f"/c/{root_token}", headers={"User-Agent": USER_AGENTS["android-chrome"][0]})
    assert page.html.find("a", class_="button").get_text() == "Download the certificate (DER, .crt)"
    page = testapp.get(f"/c/{root_token}", headers={"User-Agent": USER_AGENTS["iphone-safari"][0]})
    assert page.html.find("a", class_="button").get_text() == "Download the configuration profile"


def test_fingerprints_wrap_only_between_bytes(testapp, root_token):
    page = testapp.get(f"/c/{root_token}", headers={"User-Agent": USER_AGENTS["android-chrome"][0]})
    cells = re.findall(rb'<td class="fp">(.*?)</td>', page.body)
    assert len(cells) == 2
    for cell in cells:
        assert re.fullmatch(rb"([0-9A-F]{2}:<wbr />)+[0-9A-F]{2}", cell)


def test_every_landing_page_lists_every_format(testapp, root_token):
    page = testapp.get(f"/c/{root_token}", headers={"User-Agent": USER_AGENTS["android-chrome"][0]})
    links = [a["href"].rsplit("/", 1)[1] for a in page.html.select("section li a")]
    assert links == ["Example_Root_CA.crt", "Example_Root_CA.cer", "Example_Root_CA.pem",
                     "Example_Root_CA.mobileconfig", "Example_Root_CA.whc", "Example_Root_CA.alt.whc"]


def test_firefox_on_linux_gets_the_der_inline_for_its_trust_dialog(testapp, root_token, root_der):
    response = testapp.get(f"/c/{root_token}/Example_Root_CA.crt", headers={"User-Agent": OTHER_AGENTS["firefox-linux"]})
    assert response.content_type == "application/x-x509-ca-cert" and response.body == root_der
    assert "Content-Disposition" not in response.headers


def test_client_that_takes_only_certificates_gets_the_der(testapp, root_token, root_der):
    response = testapp.get(f"/c/{root_token}", headers={"Accept": "application/x-x509-ca-cert"})
    assert response.body == root_der


@pytest.mark.parametrize(("path", "content_type", "disposition"), [
    ("any-name.cer", "application/x-x509-ca-cert", 'attachment; filename="any-name.cer"'),
    ("x.CRT", "application/x-x509-ca-cert", 'attachment; filename="x.CRT"'),
    ("ca.der", "application/x-x509-ca-cert", 'attachment; filename="ca.der"'),
    ("mine.pem", "application/x-pem-file", 'attachment; filename="mine.crt"'),
    ("ca.mobileconfig", "application/x-apple-aspen-config", 'attachment; filename="ca.mobileconfig"'),
    ("ca.whc", "application/vnd.wap.hashed-certificate", None),
    ("ca.alt.whc", "application/vnd.wap.hashed-certificate", None),
], ids=["cer", "crt-upper", "der", "pem", "mobileconfig", "whc", "alt-whc"])
def test_explicit_file_names_serve_their_format(testapp, root_token, path, content_type, disposition):
    response = testapp.get(f"/c/{root_token}/{path}", headers={"User-Agent": USER_AGENTS["windows-edge"][0]})
    assert response.content_type == content_type
    assert response.headers.get("Content-Disposition") == disposition


@pytest.mark.parametrize(("chosen", "content_type"), [
    ("der", "application/x-x509-ca-cert"), ("pem", "application/x-pem-file"),
    ("mobileconfig", "application/x-apple-aspen-config"), ("whc", "application/vnd.wap.hashed-certificate"),
    ("whc-alt", "application/vnd.wap.hashed-certificate"), ("page", "text/html")])
def test_format_query_picks_a_format_by_hand(testapp, root_token, chosen, content_type):
    response = testapp.get(f"/c/{root_token}?format={chosen}", headers={"User-Agent": S60_AGENTS["e61i"]})
    assert response.content_type == content_type


def test_unknown_format_query_is_a_clear_400(testapp, root_token):
    assert "choose der, pem" in testapp.get(f"/c/{root_token}?format=zip", status=400).text


def test_unknown_file_extension_is_404_without_touching_the_store(testapp, store, monkeypatch):
    monkeypatch.setattr(store, "get", lambda token: pytest.fail("asked the store"))
    testapp.get("/c/abcdefgh/ca.exe", status=404)


def test_der_and_pem_files_are_byte_exact(testapp, root_token, root_der, root_pem):
    assert testapp.get(f"/c/{root_token}/a.der").body == root_der
    pem = testapp.get(f"/c/{root_token}/a.pem").body
    assert pem == root_pem
    assert all(len(line) <= 64 for line in pem.splitlines())
    assert x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER) == root_der


def profile_of(testapp, token):
    return plistlib.loads(testapp.get(f"/c/{token}/ca.mobileconfig").body)


def test_profile_carries_the_root_as_a_root_payload(testapp, root_token, root_der, root):
    profile = profile_of(testapp, root_token)
    (payload,) = profile["PayloadContent"]
    sha256 = root[0].fingerprint(hashes.SHA256()).hex()
    assert profile["PayloadType"] == "Configuration" and profile["PayloadVersion"] == 1
    assert payload["PayloadType"] == "com.apple.security.root" and payload["PayloadContent"] == root_der
    assert payload["PayloadDisplayName"] == profile["PayloadDisplayName"] == "Example Root CA"
    assert sha256 in profile["PayloadIdentifier"] and sha256 in payload["PayloadIdentifier"]
    assert str(uuid.UUID(profile["PayloadUUID"])).upper() == profile["PayloadUUID"]
    assert profile["PayloadUUID"] != payload["PayloadUUID"]


def test_profile_uuids_follow_from_the_certificate(testapp, root_token, root):
    first = certdrop.apple_profile(certdrop.inspect_certificate(root[0]), language="en")
    assert testapp.get(f"/c/{root_token}/ca.mobileconfig").body == first
    renewed = certdrop.apple_profile(certdrop.inspect_certificate(make_certificate()[0]))
    assert plistlib.loads(renewed)["PayloadUUID"] != plistlib.loads(first)["PayloadUUID"]
    assert plistlib.loads(renewed)["PayloadIdentifier"] != plistlib.loads(first)["PayloadIdentifier"]


def test_profile_for_an_intermediate_uses_the_pkcs1_payload(testapp, pki):
    token = uploaded_token(testapp, pem_of(pki.intermediate))
    (payload,) = profile_of(testapp, token)["PayloadContent"]
    assert payload["PayloadType"] == "com.apple.security.pkcs1" and payload["PayloadContent"] == der_of(pki.intermediate)


def test_profile_survives_control_characters_in_the_name():
    cert, _ = make_certificate("Evil\x01\x1b CA")
    profile = plistlib.loads(certdrop.apple_profile(certdrop.inspect_certificate(cert)))
    assert profile["PayloadDisplayName"] == "Evil\ufffd\ufffd CA"


def chain_tokens(testapp, *certs):
    """Upload *certs* in one body; return the tokens of their links, root first."""
    answer = testapp.post("/", pem_of(*certs), content_type="text/plain", headers={"Accept": "application/json"})
    return [link["token"] for link in answer.json["links"]]


@pytest.mark.parametrize("agent", ["android-chrome", "iphone-safari", "windows-edge"])
def test_an_intermediates_page_sends_its_reader_to_the_roots_link_first(testapp, pki, agent):
    root_token, intermediate_token = chain_tokens(testapp, pki.intermediate, pki.root)
    page = testapp.get(f"/c/{intermediate_token}", headers={"User-Agent": USER_AGENTS[agent][0]})
    note = page.html.find("a", href=f"/c/{intermediate_token}/root")
    assert note is not None and "Install the root CA that issued it first" in html_text(page)
    assert testapp.get(f"/c/{intermediate_token}/root", status=303).headers["Location"] == f"/c/{root_token}"
    assert testapp.get(f"/c/{root_token}", headers={"User-Agent": USER_AGENTS[agent][0]}).html.find(
        "a", href=f"/c/{root_token}/root") is None


def test_the_roots_link_of_an_intermediate_says_plainly_when_there_is_none(testapp, store, pki):
    root_token, intermediate_token = chain_tokens(testapp, pki.intermediate, pki.root)
    store.revoke(root_token)
    assert "has no live link here any more" in testapp.get(f"/c/{intermediate_token}/root", status=404).text
    other_root, other_key = make_certificate("Root Left At Home")
    alone = make_certificate("Lone Intermediate CA", issuer=other_root.subject, issuer_key=other_key)[0]
    lone = chain_tokens(testapp, alone)[0]
    page = testapp.get(f"/c/{lone}", headers={"User-Agent": USER_AGENTS["android-chrome"][0]})
    assert page.html.find("a", href=f"/c/{lone}/root") is None
    assert "did not hold the root CA" in testapp.get(f"/c/{lone}/root", status=404).text


def test_every_link_of_a_chain_offers_one_profile_with_the_root_and_its_intermediate(testapp, pki):
    root_token, intermediate_token = chain_tokens(testapp, pki.leaf, pki.intermediate, pki.root)
    profile = testapp.get(f"/c/{root_token}/ca.mobileconfig").body
    assert testapp.get(f"/c/{intermediate_token}/ca.mobileconfig").body == profile
    payloads = plistlib.loads(profile)["PayloadContent"]
    assert [payload["PayloadType"] for payload in payloads] == ["com.apple.security.root", "com.apple.security.pkcs1"]
    assert [payload["PayloadContent"] for payload in payloads] == [der_of(pki.root), der_of(pki.intermediate)]
    assert len({payload["PayloadUUID"] for payload in payloads}) == 2


def test_a_chain_profile_keeps_its_identifier_and_uuid_across_downloads_and_re_uploads(testapp, pki):
    root_token, intermediate_token = chain_tokens(testapp, pki.root, pki.intermediate)
    first = profile_of(testapp, intermediate_token)
    assert chain_tokens(testapp, pki.intermediate, pki.root) == [root_token, intermediate_token]
    again = profile_of(testapp, root_token)
    assert again == first == profile_of(testapp, intermediate_token)
    assert first["PayloadIdentifier"] == f"certdrop.{pki.root.fingerprint(hashes.SHA256()).hex()}"


def test_a_lone_root_and_its_chain_share_the_identifier_but_not_the_uuid(testapp, pki):
    (root_token,) = chain_tokens(testapp, pki.root)
    alone = profile_of(testapp, root_token)
    assert chain_tokens(testapp, pki.root, pki.intermediate)[0] == root_token
    chained = profile_of(testapp, root_token)
    assert len(alone["PayloadContent"]) == 1 and len(chained["PayloadContent"]) == 2
    assert alone["PayloadIdentifier"] == chained["PayloadIdentifier"]  # installing the chain replaces the root
    assert alone["PayloadUUID"] != chained["PayloadUUID"]


def test_a_re_upload_of_the_root_alone_keeps_the_chain_its_link_recorded(testapp, pki):
    root_token, _ = chain_tokens(testapp, pki.root, pki.intermediate)
    assert chain_tokens(testapp, pki.root) == [root_token]
    assert len(profile_of(testapp, root_token)["PayloadContent"]) == 2


def test_entry_files_record_the_chain_root_first_and_files_without_it_still_serve(testapp, pki, config):
    root_token, intermediate_token = chain_tokens(testapp, pki.root, pki.intermediate)
    store = certdrop.make_store(config, FakeClock())
    for token in (root_token, intermediate_token):
        record = json.loads(store.path_for(token).read_bytes())
        others = [base64.b64decode(der) if der else der_of(pki.root if token == root_token else pki.intermediate)
                  for der in record["chain"]]
        assert others == [der_of(pki.root), der_of(pki.intermediate)] and record["chain"].count(None) == 1
        del record["chain"]  # as entries written before chains were recorded are
        store.path_for(token).write_text(json.dumps(record))
    fresh = client(certdrop.make_app(config, clock=FakeClock()))
    (payload,) = profile_of(fresh, intermediate_token)["PayloadContent"]
    assert payload["PayloadContent"] == der_of(pki.intermediate)
    assert fresh.get(f"/c/{root_token}/ca.crt").body == der_of(pki.root)


def test_an_entry_whose_chain_leaves_out_its_own_certificate_is_damaged(pki, root_der):
    record = {"format": 2, "token": "abcdefgh", "created": NOW, "expires": NOW + DAY, "revoked": None,
              "sha256": hashlib.sha256(root_der).hexdigest(), "der": base64.b64encode(root_der).decode(),
              "chain": [base64.b64encode(der).decode() for der in (der_of(pki.root), der_of(pki.intermediate))]}
    # its own place in the chain is null; a chain without a null leaves it out
    with pytest.raises(ValueError, match="chain"):
        certdrop.Entry.from_json("abcdefgh", json.dumps(record).encode())


def test_profile_uuids_differ_by_language_and_by_signing(pki):
    root = certdrop.inspect_certificate(pki.root)
    uuids = {plistlib.loads(certdrop.apple_profile(root, language=language, signed=signed))["PayloadUUID"]
             for language in ("en", "de") for signed in (False, True)}
    assert len(uuids) == 4


def test_profile_names_the_organisation_and_asks_to_compare_the_fingerprint(testapp, pki):
    root_token, _ = chain_tokens(testapp, pki.root, pki.intermediate)
    profile = profile_of(testapp, root_token)
    fingerprint = pki.root.fingerprint(hashes.SHA256()).hex(":").upper()
    assert profile["PayloadOrganization"] == "Example Org"
    assert fingerprint in profile["ConsentText"]["default"] and fingerprint in profile["PayloadDescription"]
    assert "Example Root CA" in profile["ConsentText"]["default"]


def test_a_profile_has_no_organisation_when_the_ca_names_none(testapp, pki):
    profile = plistlib.loads(certdrop.apple_profile(certdrop.inspect_certificate(pki.several_cn)))
    assert "PayloadOrganization" not in profile


# -- signed profiles ------------------------------------------------------------------------------------------


class Signer:
    """A signer's CA, an intermediate below it and a signing certificate below that (valid NOW - 1 day to NOW +
    3 days, within a link's default 7 days), with their PEM files in *directory*: chain.pem (signing certificate,
    then intermediate), key.pem."""

    def __init__(self, directory):
        utc = datetime.timezone.utc
        self.ca, ca_key = make_certificate("Signer Root CA", serial=11)
        self.intermediate, intermediate_key = make_certificate(
            "Signer Issuing CA", issuer=self.ca.subject, issuer_key=ca_key, serial=12)
        self.key = rsa.generate_private_key(65537, 2048)
        self.not_after = NOW + 3 * DAY
        self.certificate, _ = make_certificate(
            "ca.example.org", issuer=self.intermediate.subject, issuer_key=intermediate_key, ca=False, key=self.key,
            serial=13, not_before=datetime.datetime.fromtimestamp(NOW - DAY, utc),
            not_after=datetime.datetime.fromtimestamp(self.not_after, utc))
        self.directory = Path(directory)
        self.ca_pem = self.directory / "signer_ca.pem"
        self.ca_pem.write_bytes(pem_of(self.ca))
        self.chain_pem = self.directory / "chain.pem"
        self.chain_pem.write_bytes(pem_of(self.certificate, self.intermediate))
        self.key_pem = self.directory / "key.pem"
        self.key_pem.write_bytes(self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))


@pytest.fixture(scope="session")
def signer(tmp_path_factory):
    return Signer(tmp_path_factory.mktemp("signer"))


@pytest.fixture
def signing_app(config, clock, signer):
    config = dataclasses.replace(config, profile_signer_certificate=signer.chain_pem, profile_signer_key=signer.key_pem)
    return client(certdrop.make_app(config, clock=clock))


def signed_content(signed):
    """Return the content a PKCS#7 SignedData (DER) holds, read independently of certdrop's own signing."""
    assert pkcs7.load_der_pkcs7_certificates(signed)  # it is SignedData and carries certificates
    start = signed.index(b"<?xml")
    end = signed.index(b"</plist>\n", start) + len(b"</plist>\n")
    return signed[start:end]


@pytest.mark.parametrize("agent", ["iphone-safari", "macos-chrome"])
def test_apple_pages_say_what_verified_and_not_verified_mean(signing_app, testapp, root_der, other_der, agent):
    headers = {"User-Agent": USER_AGENTS[agent][0]}
    unsigned_page = html_text(testapp.get(f"/c/{uploaded_token(testapp, root_der)}", headers=headers))
    signed_page = html_text(signing_app.get(f"/c/{uploaded_token(signing_app, other_der)}", headers=headers))
    assert "“Not Verified” in red" in unsigned_page and "“Verified”" not in unsigned_page.replace("“Not Verified”", "")
    assert "calls this profile “Verified”" in signed_page and "does not make the certificate inside" in signed_page


def test_a_signed_profile_holds_the_unsigned_profile_and_keeps_its_bytes(signing_app, pki):
    root_token, intermediate_token = chain_tokens(signing_app, pki.root, pki.intermediate)
    signed = signing_app.get(f"/c/{root_token}/ca.mobileconfig")
    assert signed.content_type == "application/x-apple-aspen-config" and not signed.body.startswith(b"<?xml")
    assert signing_app.get(f"/c/{root_token}/ca.mobileconfig").body == signed.body  # signed once, kept
    assert signing_app.get(f"/c/{intermediate_token}?format=mobileconfig").body == signed.body
    unsigned = signing_app.get(f"/c/{root_token}/ca.unsigned.mobileconfig")
    assert unsigned.headers["Content-Disposition"] == 'attachment; filename="ca.unsigned.mobileconfig"'
    content = signed_content(signed.body)
    assert plistlib.loads(content)["PayloadUUID"] != plistlib.loads(unsigned.body)["PayloadUUID"]
    assert signing_app.get(f"/c/{root_token}?format=mobileconfig-unsigned").body == unsigned.body
    assert len(plistlib.loads(content)["PayloadContent"]) == 2


@pytest.mark.slow
def test_a_signed_profile_verifies_against_the_signers_ca_with_the_unsigned_profile_inside(signing_app, signer,
                                                                                            pki, tmp_path):
    (token,) = chain_tokens(signing_app, pki.root)
    (tmp_path / "profile.mobileconfig").write_bytes(signing_app.get(f"/c/{token}/ca.mobileconfig").body)
    verified = subprocess.run(["openssl", "cms", "-verify", "-purpose", "any", "-inform", "DER", "-CAfile",
                               str(signer.ca_pem), "-attime", str(int(NOW)), "-in", "profile.mobileconfig",
                               "-out", "content"], cwd=tmp_path, capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr
    content = (tmp_path / "content").read_bytes()
    assert content == signed_content((tmp_path / "profile.mobileconfig").read_bytes())
    assert plistlib.loads(content)["PayloadContent"][0]["PayloadContent"] == der_of(pki.root)
    # the same profile, built unsigned but for its signed flag, is what was signed
    built = certdrop.apple_profile(certdrop.inspect_certificate(pki.root), language="en", signed=True)
    assert content == built


def test_an_expired_signer_gives_unsigned_profiles_and_one_warning(signing_app, signer, clock, pki, caplog):
    (token,) = chain_tokens(signing_app, pki.root)
    assert not signing_app.get(f"/c/{token}/ca.mobileconfig").body.startswith(b"<?xml")
    clock.now = signer.not_after
    with caplog.at_level(logging.WARNING, logger="certdrop"):
        for _ in range(3):
            profile = signing_app.get(f"/c/{token}/ca.mobileconfig").body
            assert profile == signing_app.get(f"/c/{token}/ca.unsigned.mobileconfig").body
    assert [record.getMessage() for record in caplog.records if "unsigned" in record.getMessage()] == [
        f"profiles are sent unsigned: the signing certificate 'ca.example.org' is valid from "
        f"{certdrop.format_time(NOW - DAY)} until {certdrop.format_time(signer.not_after)} "
        f"(profile_signer_certificate)"]


def test_a_signer_not_yet_valid_signs_from_the_moment_it_is(signing_app, clock, pki):
    (token,) = chain_tokens(signing_app, pki.root)
    clock.now = NOW - 2 * DAY
    assert signing_app.get(f"/c/{token}/ca.mobileconfig").body.startswith(b"<?xml")
    clock.now = NOW
    assert not signing_app.get(f"/c/{token}/ca.mobileconfig").body.startswith(b"<?xml")


@pytest.mark.parametrize(("first", "then", "signed_then"), [
    (NOW, NOW - 2 * DAY, False),  # set back before the signer's notBefore: unsigned again
    (NOW + 4 * DAY, NOW, True),  # set back from past its notAfter into its validity: signed again
], ids=["before-its-start", "back-into-its-validity"])
def test_a_clock_set_back_across_the_signers_validity_signs_as_a_fresh_server_would(signing_app, clock, pki, first,
                                                                                   then, signed_then):
    (token,) = chain_tokens(signing_app, pki.root)
    clock.now = first
    signing_app.get(f"/c/{token}/ca.mobileconfig")  # decided, built and kept with the signing state at *first*
    clock.now = then
    for path in (f"/c/{token}/ca.mobileconfig", f"/c/{token}/ca.mobileconfig", f"/c/{token}?format=mobileconfig"):
        assert signing_app.get(path).body.startswith(b"<?xml") is not signed_then, path


def test_a_key_that_does_not_match_its_certificate_stops_serve_at_start(tmp_path, signer, pki, capsys):
    other = tmp_path / "other.pem"
    other.write_bytes(pki.rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    ini = tmp_path / "certdrop.ini"
    ini.write_text(f"[certdrop]\ndata_dir = data\nprofile_signer_certificate = {signer.chain_pem}\n"
                   "profile_signer_key = other.pem\n")
    assert cli(ini, "serve", "--port", "0") == certdrop.CHECK_ERROR
    error = capsys.readouterr().err
    assert f"the key in {other} (profile_signer_key) does not match the certificate in {signer.chain_pem}" in error
    assert "PRIVATE KEY" not in error


@pytest.mark.parametrize("problem", ["missing", "password", "not-a-key", "ed25519"])
def test_a_signer_key_that_cannot_be_used_stops_the_app_with_a_clear_message(tmp_path, signer, problem):
    key = tmp_path / "key.pem"
    if problem == "password":
        key.write_bytes(signer.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.BestAvailableEncryption(b"secret")))
    elif problem == "not-a-key":
        key.write_bytes(signer.chain_pem.read_bytes())
    elif problem == "ed25519":
        key.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    config = certdrop.Config(data_dir=tmp_path / "data", profile_signer_certificate=signer.chain_pem,
                             profile_signer_key=key)
    message = {"missing": "cannot read", "password": "has a password", "not-a-key": "holds no PEM private key",
               "ed25519": "neither RSA nor EC"}[problem]
    with pytest.raises(certdrop.ConfigError, match=message):
        certdrop.make_app(config, clock=FakeClock())


def test_the_signer_keeps_no_key_text_and_no_answer_carries_the_key(signing_app, signer, pki):
    (token,) = chain_tokens(signing_app, pki.root)
    kept = vars(signing_app.app.signer)
    assert not any(isinstance(value, (bytes, str)) and b"PRIVATE" in (value if isinstance(value, bytes) else
                                                                      value.encode()) for value in kept.values())
    secret = signer.key.private_numbers().d.to_bytes(256, "big").lstrip(b"\0")
    for path in ("", "/ca.mobileconfig", "/ca.unsigned.mobileconfig", "/ca.crt", "/ca.pem", "/card"):
        body = signing_app.get(f"/c/{token}{path}").body
        assert secret not in body and b"PRIVATE KEY" not in body


def test_the_signature_note_says_verified_is_not_trusted_and_not_verified_is_usual():
    verified, not_verified = (certdrop.render_profile_signature_note(signed) for signed in (True, False))
    assert "\u201cVerified\u201d" in verified and "does not make the certificate inside it trustworthy" in verified
    assert "\u201cNot Verified\u201d" in not_verified and "fingerprint" in not_verified


def test_signer_files_are_relative_to_the_ini_file_and_go_together(tmp_path):
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\nprofile_signer_certificate = tls/chain.pem\nprofile_signer_key = tls/key.pem\n")
    config = certdrop.Config.from_ini(ini)
    assert config.profile_signer_certificate == tmp_path / "tls" / "chain.pem"
    assert config.profile_signer_key == tmp_path / "tls" / "key.pem"
    ini.write_text("[certdrop]\nprofile_signer_key = tls/key.pem\n")
    with pytest.raises(certdrop.ConfigError, match="go together"):
        certdrop.Config.from_ini(ini)


def parse_hashed(body):
    """Return the fields of a TrustedCAInfo body, read independently of certdrop."""
    version, charset, length = body[0], int.from_bytes(body[1:3], "big"), body[3]
    name, rest = body[4:4 + length], body[4 + length:]
    return version, charset, name, rest[0], rest[1:-2], rest[-2:]


def test_hashed_certificate_matches_the_research_vectors():
    fake = dataclasses.replace(fixed_certificate(), der=b"\x30\x01\x00", common_names=("Test",))
    direct = certdrop.hashed_certificate(fake)
    prefixed = certdrop.hashed_certificate(fake, length_prefixed=True)
    assert direct == bytes.fromhex("01006A0454657374023001000000")
    assert prefixed == bytes.fromhex("01006A04546573740200033001000000")
    assert certdrop.hashed_certificate_code(direct) == "404111 588616 451872 172643 327908"
    assert certdrop.hashed_certificate_code(prefixed) == "632828 567206 015198 044651 484535"


@pytest.mark.parametrize("kind", ["whc-direct", "whc-length"])
def test_hashed_certificate_fields_and_pinned_code_for_a_fixed_certificate(kind):
    certificate = fixed_certificate()
    body, content_type = certdrop.file_body(certificate, kind)
    version, charset, name, cert_format, certificate_field, trailer = parse_hashed(body)
    assert (version, charset, name, cert_format, trailer) == (1, 106, b"Fixed Test Root", 2, b"\0\0")
    if kind == "whc-length":
        assert int.from_bytes(certificate_field[:2], "big") == len(certificate.der)
        certificate_field = certificate_field[2:]
    assert certificate_field == certificate.der and content_type == "application/vnd.wap.hashed-certificate"
    assert certdrop.hashed_certificate_code(body) == FIXED_CODES[kind]


def test_every_code_group_passes_the_handsets_check_digit_rule():
    for value in range(0, 65536, 97):
        digits = f"{value:05d}"
        group = digits + str(certdrop._check_digit(digits))
        total = sum(int(d) if i % 2 else (2 * int(d) - 9 if int(d) > 4 else 2 * int(d)) for i, d in enumerate(group))
        assert total % 10 == 0


def test_display_name_is_cut_on_a_character_boundary_to_255_bytes():
    name = certdrop.wap_display_name("\u00e9" * 200, 106)
    assert len(name) == 254 and name.decode("utf-8") == "\u00e9" * 127
    assert certdrop.wap_display_name("Caf\u00e9 \u2603", 4) == b"Caf\xe9 ?"


def s40_page(testapp, token, accept=""):
    return testapp.get(f"/c/{token}", headers={"User-Agent": USER_AGENTS["s40-6500s"][0], "Accept": accept})


def test_s40_page_is_small_xhtml_mp_with_the_der_and_both_hashed_certificates(testapp, root_token):
    page = s40_page(testapp, root_token, "application/vnd.wap.xhtml+xml, text/html")
    assert page.content_type == "application/vnd.wap.xhtml+xml" and len(page.body) < 3072
    tree = ET.fromstring(page.body)
    links = [a.get("href") for a in tree.iter("{http://www.w3.org/1999/xhtml}a")]
    assert links == [f"/c/{root_token}/Example_Root_CA.cer", f"/c/{root_token}/Example_Root_CA.whc",
                     f"/c/{root_token}/Example_Root_CA.alt.whc"]
    assert not re.search(rb"<script|<style|<img|<link", page.body)


def test_nokia_pages_show_both_fingerprints_in_short_lines(testapp, root_token, root):
    text = s40_page(testapp, root_token).text
    sha256 = root[0].fingerprint(hashes.SHA256())
    assert f"SHA-256:<br/>{sha256[:5].hex(':').upper()}<br/>{sha256[5:10].hex(':').upper()}" in text
    assert root[0].fingerprint(hashes.SHA1())[15:].hex(":").upper() in text


def test_s40_page_prints_the_code_of_each_hashed_certificate(testapp, root_token):
    text = s40_page(testapp, root_token).text
    for path in ("ca.whc", "ca.alt.whc"):
        code = certdrop.hashed_certificate_code(testapp.get(f"/c/{root_token}/{path}").body).split()
        assert f"{' '.join(code[:3])}<br/>{' '.join(code[3:])}" in text
    assert "SHA-256 or ECDSA CA may fail" in text


def test_s40_phone_following_the_page_gets_the_der_inline(testapp, root_token, root_der):
    response = testapp.get(f"/c/{root_token}/Example_Root_CA.cer", headers={"User-Agent": USER_AGENTS["s40-6500s"][0]})
    assert response.content_type == "application/x-x509-ca-cert" and response.body == root_der
    assert "Content-Disposition" not in response.headers


def test_s40_delivery_der_sends_the_cer_inline(config, store, clock, root_token, root_der):
    response = nokia_app(config, store, clock, s40_delivery="der").get(
        f"/c/{root_token}", headers={"User-Agent": USER_AGENTS["s40-2730c"][0]})
    assert response.body == root_der and "Content-Disposition" not in response.headers


def test_s40_page_is_a_wml_deck_for_wap_1_browsers(testapp, root_token):
    page = s40_page(testapp, root_token, "text/vnd.wap.wml, text/html, image/vnd.wap.wbmp")
    assert page.content_type == "text/vnd.wap.wml" and ET.fromstring(page.body).tag == "wml"


@pytest.mark.parametrize(("accept", "content_type"), [
    ("application/xhtml+xml", "application/xhtml+xml"), ("text/html, */*", "text/html"), ("", "text/html"),
    ("application/vnd.wap.xhtml+xml;q=0, text/vnd.wap.wml", "text/vnd.wap.wml"),
    ("text/vnd.wap.wml;q=0.5, application/vnd.wap.xhtml+xml;q=0.9", "application/vnd.wap.xhtml+xml"),
    ("application/vnd.wap.xhtml+xml ; q=0.0, application/xhtml+xml;q=0", "text/html"),
    ("application/vnd.wap.xhtml+xml;q=junk", "text/html"),
])
def test_nokia_page_type_follows_accept(testapp, root_token, accept, content_type):
    assert s40_page(testapp, root_token, accept).content_type == content_type


def test_wml_escapes_dollar_signs_in_names(testapp):
    cert, _ = make_certificate("Cost $ CA")
    token = uploaded_token(testapp, der_of(cert))
    assert b"Cost $$ CA" in s40_page(testapp, token, "text/vnd.wap.wml").body


def test_s40_page_for_an_intermediate_offers_the_der_and_says_why(testapp, pki):
    token = uploaded_token(testapp, pem_of(pki.intermediate))
    page = s40_page(testapp, token)
    assert b".whc" not in page.body and b"needs a self-signed root" in page.body
    assert "self-signed root" in testapp.get(f"/c/{token}/ca.whc", status=404).text
    assert b"choose the hashed certificate" not in page.body, "no step may point at what the page does not offer"


def test_s40_steps_mention_the_1024_bit_limit_only_for_larger_keys(testapp, pki, root_token):
    assert b"1024-bit RSA key; this one has a 256-bit EC key" in s40_page(testapp, root_token).body
    assert b"this one has a 2048-bit RSA key" in s40_page(testapp, uploaded_token(testapp, pem_of(pki.rsa_root))).body
    assert b"1024-bit" not in s40_page(testapp, uploaded_token(testapp, pem_of(pki.weak_root))).body


def test_nokia_pages_put_the_first_action_before_the_fingerprints(testapp, root_token):
    for accept in ("application/vnd.wap.xhtml+xml", "text/vnd.wap.wml"):
        body = s40_page(testapp, root_token, accept).body
        assert body.index(b".cer\">") < body.index(b"SHA-1") < body.index(b"SHA-256")


@pytest.mark.parametrize(("accept", "only"), [
    ("application/x-x509-ca-cert", True), ("application/pkix-cert, text/html;q=0", True),
    ("application/x-x509-ca-cert, */*;q=0.1", False), ("application/x-x509-ca-cert;q=0, */*", False),
    ("application/x-x509-ca-cert, text/*", False),
])
def test_only_clients_that_refuse_html_get_the_certificate_itself(accept, only):
    assert certdrop.accepts_only_certificates(accept) is only


def nokia_app(config, store, clock, **settings):
    return client(certdrop.make_app(dataclasses.replace(config, **settings), store, clock))


def test_whc_layout_setting_swaps_the_default_and_the_other(config, store, clock, testapp, root_token, root_der):
    swapped = nokia_app(config, store, clock, whc_layout="length-prefixed")
    assert swapped.get(f"/c/{root_token}/ca.whc").body == testapp.get(f"/c/{root_token}/ca.alt.whc").body
    assert parse_hashed(swapped.get(f"/c/{root_token}/ca.whc").body)[4][2:] == root_der


def test_whc_charset_setting_is_written_into_the_body(config, store, clock, root_token):
    latin = nokia_app(config, store, clock, whc_charset=4)
    assert parse_hashed(latin.get(f"/c/{root_token}/ca.whc").body)[1] == 4


def test_s40_delivery_setting_sends_a_file_instead_of_the_page(config, store, clock, root_token):
    direct = nokia_app(config, store, clock, s40_delivery="whc")
    response = direct.get(f"/c/{root_token}", headers={"User-Agent": USER_AGENTS["s40-6500s"][0]})
    assert response.content_type == "application/vnd.wap.hashed-certificate"


def test_s60_delivery_page_sends_the_steps_first(config, store, clock, root_token):
    response = nokia_app(config, store, clock, s60_delivery="page").get(
        f"/c/{root_token}", headers={"User-Agent": S60_AGENTS["e61i"]})
    assert b"Internet" in response.body and b".whc" not in response.body
    ET.fromstring(response.body)


def test_s60_delivery_redirect_keeps_a_cer_extension(config, store, clock, root_token, root_der):
    app = nokia_app(config, store, clock, s60_delivery="redirect")
    response = app.get(f"/c/{root_token}", headers={"User-Agent": S60_AGENTS["e61i"]}, status=302)
    assert response.headers["Location"] == f"http://ca.example.org:8080/c/{root_token}/Example_Root_CA.cer"
    followed = app.get(f"/c/{root_token}/Example_Root_CA.cer", headers={"User-Agent": S60_AGENTS["e61i"]})
    assert followed.body == root_der and "Content-Disposition" not in followed.headers


def test_s60_attachment_setting_adds_the_header(config, store, clock, root_token):
    response = nokia_app(config, store, clock, s60_attachment=True).get(
        f"/c/{root_token}", headers={"User-Agent": S60_AGENTS["e61i"]})
    assert response.headers["Content-Disposition"] == 'attachment; filename="Example_Root_CA.cer"'


@pytest.mark.parametrize(("path", "words"), [("", True), ("/ca.cer", False), ("/ca.mobileconfig", True),
                                             ("/ca.whc", False), ("?format=page", True)])
def test_answers_carry_vary_cache_control_and_nosniff(testapp, root_token, path, words):
    headers = testapp.get(f"/c/{root_token}{path}").headers
    assert headers["Vary"] == ("User-Agent, Accept, X-OperaMini-Phone-UA, X-UCBrowser-Device-UA, Device-Stock-UA"
                               + (", Accept-Language, Cookie" if words else ""))
    assert headers["Cache-Control"] == "private, no-transform" and headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("rest", ["/ca.cer", "/ca.crt", "/ca.der", "/ca.pem", "/qr.png", "/qr.svg", "/ca.whc",
                                  "?format=der"])
def test_a_file_or_qr_code_is_one_answer_for_every_language_and_does_not_vary_by_it(config, store, clock, root_token,
                                                                                     rest):
    app = certdrop.make_app(config, store, clock)
    reader = client(app)
    answers = [reader.get(f"/c/{root_token}{rest}", headers={"Accept-Language": language, "Cookie": cookie})
               for language, cookie in (("en", ""), ("de", ""), ("fr", "certdrop_lang=ru"))]
    assert len({(answer.body, tuple(answer.headerlist)) for answer in answers}) == 1
    assert "Content-Language" not in answers[0].headers
    vary = {name.strip() for name in answers[0].headers["Vary"].split(",")}
    assert {"User-Agent", "Accept"} <= vary and not vary & {"Accept-Language", "Cookie"}
    assert len([key for key in app.answers.built.items if key.token == root_token]) == 1
    again = reader.get(f"/c/{root_token}{rest}", headers={"Accept-Language": "pl",
                                                           "If-None-Match": answers[0].headers["ETag"]}, status=304)
    assert again.headers["Vary"] == answers[0].headers["Vary"]


def test_etag_differs_per_variant_and_if_none_match_answers_304(testapp, root_token):
    der = testapp.get(f"/c/{root_token}/ca.cer")
    pem = testapp.get(f"/c/{root_token}/ca.pem")
    assert der.headers["ETag"] != pem.headers["ETag"]
    again = testapp.get(f"/c/{root_token}/ca.cer", headers={"If-None-Match": der.headers["ETag"]}, status=304)
    assert again.body == b"" and again.headers["ETag"] == der.headers["ETag"]
    testapp.get(f"/c/{root_token}/ca.cer", headers={"If-None-Match": '"other"'}, status=200)


def test_head_works_for_pages_and_files(testapp, root_token):
    for path in ("", "/ca.mobileconfig"):
        full = testapp.get(f"/c/{root_token}{path}")
        head = testapp.head(f"/c/{root_token}{path}")
        assert head.body == b"" and head.headers["Content-Length"] == str(len(full.body))


def test_a_hot_token_is_answered_without_rendering_again(testapp, root_token, monkeypatch):
    agent = {"User-Agent": USER_AGENTS["iphone-safari"][0]}
    first = testapp.get(f"/c/{root_token}", headers=agent)
    monkeypatch.setattr(certdrop, "render_landing", lambda *args: pytest.fail("rendered again"))
    monkeypatch.setattr(certdrop, "apple_profile", lambda *args: pytest.fail("built again"))
    assert testapp.get(f"/c/{root_token}", headers=agent).body == first.body


def test_a_hot_token_is_served_without_routing_deciding_or_rendering(testapp, app, root_token, monkeypatch):
    agents = [S60_AGENTS["e61i"], USER_AGENTS["android-chrome"][0], USER_AGENTS["windows-edge"][0]]
    first = [testapp.get(f"/c/{root_token}", headers={"User-Agent": agent}) for agent in agents]
    monkeypatch.setattr(certdrop.App, "full_answer", lambda *args: pytest.fail("took the full way"))
    again = [testapp.get(f"/c/{root_token}", headers={"User-Agent": agent}) for agent in agents]
    assert [answer.body for answer in again] == [answer.body for answer in first]
    assert [answer.headers["ETag"] for answer in again] == [answer.headers["ETag"] for answer in first]


def test_a_hot_answer_is_304_for_its_etag_and_empty_for_head(testapp, root_token, monkeypatch):
    full = testapp.get(f"/c/{root_token}/ca.cer")
    monkeypatch.setattr(certdrop.App, "full_answer", lambda *args: pytest.fail("took the full way"))
    testapp.get(f"/c/{root_token}/ca.cer", headers={"If-None-Match": full.headers["ETag"]}, status=304)
    monkeypatch.undo()
    head = testapp.head(f"/c/{root_token}/ca.cer")
    assert head.body == b"" and head.headers["Content-Length"] == str(len(full.body))


def test_a_desktop_page_decided_for_one_host_is_not_served_for_another(testapp, root_token):
    agent = {"User-Agent": USER_AGENTS["windows-edge"][0]}
    first = testapp.get(f"/c/{root_token}", headers={**agent, "Host": "ca.example.org:8080"})
    second = testapp.get(f"/c/{root_token}", headers={**agent, "Host": "certs.example.net"})
    assert f"http://ca.example.org:8080/c/{root_token}" in first.text
    assert f"http://certs.example.net/c/{root_token}" in second.text and "ca.example.org" not in second.text


@pytest.mark.parametrize("key", ["PATH_INFO", "REQUEST_METHOD", "QUERY_STRING",
                                 *("HTTP_" + name.upper().replace("-", "_") for name in certdrop.CLIENT_HEADERS),
                                 "HTTP_ACCEPT_LANGUAGE", "HTTP_COOKIE", "HTTP_HOST", "SERVER_NAME", "SERVER_PORT",
                                 "wsgi.url_scheme",
                                 "SCRIPT_NAME"])
def test_every_value_an_answer_depends_on_is_in_the_request_key_and_all_but_the_path_in_the_signature(key):
    environ = {"PATH_INFO": "/c/abcdefgh", "REQUEST_METHOD": "GET", "QUERY_STRING": "", "HTTP_USER_AGENT": "x",
               "HTTP_HOST": "h", "SERVER_NAME": "s", "SERVER_PORT": "80", "wsgi.url_scheme": "http", "SCRIPT_NAME": ""}
    key_of = certdrop.request_key
    assert key_of({**environ, key: "other"}) != key_of(environ)
    if key not in ("PATH_INFO", "REQUEST_METHOD", "HTTP_ACCEPT_LANGUAGE", "HTTP_COOKIE"):  # read by reader_language
        signature = certdrop.Signature.of
        assert signature(key_of({**environ, key: "other"}), "", True) != signature(key_of(environ), "", True)
    assert certdrop.Signature.of(key_of(environ), "ca.cer", True) != certdrop.Signature.of(key_of(environ), "", True)


def test_request_key_fills_each_named_field_from_its_own_environ_value():
    sources = {"path": "PATH_INFO", "method": "REQUEST_METHOD", "query": "QUERY_STRING", "user_agent": "HTTP_USER_AGENT",
               "accept": "HTTP_ACCEPT", "opera_mini_phone_ua": "HTTP_X_OPERAMINI_PHONE_UA",
               "uc_browser_device_ua": "HTTP_X_UCBROWSER_DEVICE_UA", "device_stock_ua": "HTTP_DEVICE_STOCK_UA",
               "accept_language": "HTTP_ACCEPT_LANGUAGE", "cookie": "HTTP_COOKIE", "host": "HTTP_HOST",
               "server_name": "SERVER_NAME",
               "server_port": "SERVER_PORT", "scheme": "wsgi.url_scheme", "script_name": "SCRIPT_NAME"}
    assert set(sources) == set(certdrop.RequestKey._fields)
    key = certdrop.request_key({source: f"value of {source}" for source in sources.values()})
    assert {field: getattr(key, field) for field in sources} == {field: f"value of {source}"
                                                                  for field, source in sources.items()}
    assert {"host_accepted", "language"} <= set(certdrop.Signature._fields)


def test_a_hot_token_answers_410_once_revoked_or_expired(testapp, app, store, clock, root_der, other_der):
    revoked, expiring = uploaded_token(testapp, root_der), uploaded_token(testapp, other_der, ttl="1h")
    for token in (revoked, expiring):
        for _ in range(3):  # decided, kept by signature, then kept by request key
            testapp.get(f"/c/{token}", headers={"User-Agent": S60_AGENTS["e61i"]})
    assert len(app.answers.hot) == 2
    store.revoke(revoked)
    testapp.get(f"/c/{revoked}", headers={"User-Agent": S60_AGENTS["e61i"]}, status=410)
    clock.advance(3601)
    testapp.get(f"/c/{expiring}", headers={"User-Agent": S60_AGENTS["e61i"]}, status=410)


def test_a_hot_answer_is_one_dictionary_lookup_away(testapp, app, root_token, monkeypatch):
    agent = {"User-Agent": USER_AGENTS["android-chrome"][0]}
    first, _ = testapp.get(f"/c/{root_token}", headers=agent), testapp.get(f"/c/{root_token}", headers=agent)
    monkeypatch.setattr(certdrop.App, "find_hot", lambda *args: pytest.fail("looked for the answer again"))
    monkeypatch.setattr(certdrop.EntryMemory, "fresh", lambda *args: pytest.fail("looked in the store"))
    monkeypatch.setattr(app.store, "fresh", lambda *args: pytest.fail("looked in the store"))
    assert testapp.get(f"/c/{root_token}", headers=agent).body == first.body


def test_a_repeated_unknown_token_is_one_dictionary_lookup_away_and_still_counted(testapp, app, monkeypatch):
    agent = {"User-Agent": S60_AGENTS["e61i"]}
    first = testapp.get("/c/abcdefgh", headers=agent, status=404)
    testapp.get("/c/abcdefgh", headers=agent, status=404)
    monkeypatch.setattr(certdrop.App, "find_hot", lambda *args: pytest.fail("looked for the answer again"))
    monkeypatch.setattr(app.store, "fresh", lambda *args: pytest.fail("looked in the store"))
    spent = []
    monkeypatch.setattr(app.lookups, "spend", lambda address: spent.append(address) or 0.0)
    assert testapp.get("/c/abcdefgh", headers=agent, status=404).body == first.body
    assert spent == ["127.0.0.1"]


def test_unknown_tokens_asked_for_again_cannot_push_live_answers_out(config, store, clock, root_der):
    app = app_with(config, store, clock, answer_cache_size=100_000, lookup_limit=0)
    visitor = client(app)
    token = uploaded_token(visitor, root_der)
    agent = {"User-Agent": S60_AGENTS["e61i"]}
    for _ in range(2):
        visitor.get(f"/c/{token}", headers=agent)
    live = set(app.answers.hot.items)
    for number in range(400):
        unknown = "".join(certdrop.TOKEN_ALPHABET[int(digit)] for digit in f"{number:08d}")
        for _ in range(2):
            visitor.get(f"/c/{unknown}", headers=agent, status=404)
    assert len(app.answers.unknown) > 0 and app.answers.unknown.bytes <= app.answers.unknown.max_bytes
    assert set(app.answers.hot.items) == live


def test_an_unknown_token_stored_by_this_process_is_found_at_once(testapp, app, store, root_der, monkeypatch):
    agent = {"User-Agent": S60_AGENTS["e61i"]}
    for _ in range(3):
        testapp.get("/c/abcdefgh", headers=agent, status=404)
    monkeypatch.setattr(store, "_new_token", lambda: "abcdefgh")
    assert uploaded_token(testapp, root_der) == "abcdefgh"
    assert testapp.get("/c/abcdefgh", headers=agent).body == root_der


def test_an_unknown_token_stored_after_many_other_guesses_is_found_at_once(testapp, app, store, root_der,
                                                                         monkeypatch):
    agent = {"User-Agent": S60_AGENTS["e61i"]}
    for _ in range(3):
        testapp.get("/c/abcdefgh", headers=agent, status=404)
    for number in range(certdrop.MAX_ABSENT_TOKENS + 1):  # the token's record of having no file is pushed out
        store.memory.mark_absent(f"guess{number}")
    monkeypatch.setattr(store, "_new_token", lambda: "abcdefgh")
    assert uploaded_token(testapp, root_der) == "abcdefgh"
    assert testapp.get("/c/abcdefgh", headers=agent).body == root_der


def test_an_unknown_token_another_process_stores_is_found_once_the_store_looks_again(config, root_der):
    server = certdrop.Store(config.data_dir, clock=time.time, revalidate_after=0.05)  # real time passes
    app = client(certdrop.make_app(config, server, time.time))
    other = certdrop.make_store(config, time.time)
    token = other._new_token()
    for _ in range(3):
        app.get(f"/c/{token}", headers={"User-Agent": S60_AGENTS["e61i"]}, status=404)
    other._write(certdrop.Entry(token, time.time(), time.time() + DAY, root_der,
                                facts=certdrop.certificate_facts(certdrop.load_der(root_der))))
    time.sleep(0.06)
    assert app.get(f"/c/{token}", headers={"User-Agent": S60_AGENTS["e61i"]}).body == root_der


def test_a_hot_answer_revoked_by_another_process_is_410_once_the_store_revalidates(config, root_der):
    server = certdrop.Store(config.data_dir, clock=time.time, revalidate_after=0.05)  # real time passes
    token = add(server, root_der).token
    app = client(certdrop.make_app(config, server, time.time))
    for _ in range(3):
        app.get(f"/c/{token}", headers={"User-Agent": S60_AGENTS["e61i"]})
    certdrop.make_store(config, time.time).revoke(token)
    time.sleep(0.06)
    app.get(f"/c/{token}", headers={"User-Agent": S60_AGENTS["e61i"]}, status=410)


def test_a_client_limited_for_guessing_gets_429_even_for_a_hot_token(testapp, root_token):
    agent = {"User-Agent": S60_AGENTS["e61i"]}
    for _ in range(3):
        testapp.get(f"/c/{root_token}", headers=agent)
    for _ in range(certdrop.LOOKUP_BURST + 1):
        testapp.get("/c/abcdefgh", headers=agent, expect_errors=True)
    testapp.get(f"/c/{root_token}", headers=agent, status=429)


def test_a_limited_client_gets_404_for_a_malformed_token_as_the_full_way_gives_it(testapp, root_token):
    agent = {"User-Agent": S60_AGENTS["e61i"]}
    for _ in range(certdrop.LOOKUP_BURST + 1):
        testapp.get("/c/abcdefgh", headers=agent, expect_errors=True)
    testapp.get(f"/c/{root_token}/card", headers=agent, status=429)  # a 429 kept for the signature (rest "card")
    for malformed in ("x", "bad!token", "a" * 40):  # the route refuses these before any limit is asked
        testapp.get(f"/c/{malformed}/card", headers=agent, status=404)
        testapp.get(f"/c/{malformed}", headers=agent, status=404)


def test_unknown_tokens_answered_from_memory_still_count_towards_the_lookup_limit(testapp, monkeypatch):
    statuses = [testapp.get("/c/abcdefgh", expect_errors=True).status_int for _ in range(certdrop.LOOKUP_BURST + 1)]
    assert statuses == [404] * certdrop.LOOKUP_BURST + [429]
    first = testapp.get("/c/abcdefgh", status=429)
    monkeypatch.setattr(certdrop.App, "full_answer", lambda *args: pytest.fail("took the full way"))
    assert testapp.get("/c/abcdefgh", status=429).body == first.body
    assert testapp.get(f"/c/{certdrop.TOKEN_ALPHABET[:8]}", status=429).headers["Retry-After"] == "2"


def test_a_repeated_refusal_is_found_by_request_key_without_a_signature(testapp, monkeypatch):
    for _ in range(certdrop.LOOKUP_BURST + 1):
        testapp.get("/c/abcdefgh", expect_errors=True)
    first = testapp.get("/c/abcdefgh", status=429)
    monkeypatch.setattr(certdrop.Signature, "of", lambda *args: pytest.fail("made a signature again"))
    assert testapp.get("/c/abcdefgh", status=429).body == first.body


def test_an_answer_built_while_another_thread_extends_its_link_is_not_kept_past_the_extension(
        testapp, app, store, clock, root_token, monkeypatch):
    build_answer, extended = certdrop.build_answer, []

    def build_then_extend(entry, *arguments):
        built = build_answer(entry, *arguments)  # built from the entry this request read ...
        if not extended:  # ... when another thread (the administrator's page) extends the link
            extended.append(store.extend(root_token, NOW + 30 * DAY))
        return built

    monkeypatch.setattr(certdrop, "build_answer", build_then_extend)
    testapp.get(f"/c/{root_token}/card")
    monkeypatch.setattr(certdrop, "build_answer", build_answer)
    until = certdrop.format_time(NOW + 30 * DAY)
    for _ in range(3):  # the full way, then the hot path: both from the extended entry
        assert f"works until {until}" in html_text(testapp.get(f"/c/{root_token}/card"))


def test_file_names_chosen_by_clients_cannot_grow_the_answer_cache(testapp, app, root_token, root_der):
    for number in range(200):
        assert testapp.get(f"/c/{root_token}/name{number}.cer").body == root_der
    assert sum(key.token == root_token for key in app.answers.built.items) <= certdrop.MAX_ANSWERS_PER_TOKEN


def test_a_limited_client_does_not_take_other_clients_off_the_hot_path(testapp, root_token, monkeypatch):
    agent = {"User-Agent": S60_AGENTS["e61i"]}
    for _ in range(3):
        testapp.get(f"/c/{root_token}", headers=agent)
    for _ in range(certdrop.LOOKUP_BURST + 1):
        testapp.get("/c/abcdefgh", headers=agent, expect_errors=True, extra_environ={"REMOTE_ADDR": "192.168.1.66"})
    monkeypatch.setattr(certdrop.App, "find_hot", lambda *args: pytest.fail("left the hot path"))
    testapp.get(f"/c/{root_token}", headers=agent, status=200)


def test_evicting_one_entry_forgets_only_that_entrys_answers(testapp, app, store, root_der, other_der):
    first, second = uploaded_token(testapp, root_der), uploaded_token(testapp, other_der)
    for token in (first, second):
        for _ in range(3):
            testapp.get(f"/c/{token}", headers={"User-Agent": S60_AGENTS["e61i"]})
    assert {hot.token for hot in app.answers.hot.items.values()} == {first, second}
    store.memory.forget(first)
    assert {hot.token for hot in app.answers.hot.items.values()} == {second}
    assert {key.token for key in app.answers.built.items} == {second}


def test_an_address_over_8_kib_answers_414_and_is_kept_nowhere(testapp, app, root_token):
    for path, query in ((f"/c/{'a' * 9000}", ""), (f"/c/{root_token}", "x=" + "y" * 9000), ("/" + "z" * 9000, "")):
        for _ in range(2):
            answer = testapp.get(path, params=query or None, status=414, headers={"User-Agent": "curl/8.5.0"})
            assert "longer than 8 KiB" in answer.text
    assert len(app.answers) == len(app.answers.errors) == 2  # under /c/ and elsewhere: no address in the key


def test_a_request_with_a_huge_header_is_answered_but_never_kept(testapp, app, root_token):
    agent = "Mozilla/5.0 (Linux; Android 14) " + "x" * 5000
    for _ in range(3):
        assert testapp.get(f"/c/{root_token}", headers={"User-Agent": agent}).status_int == 200
    assert len(app.answers.hot) == 0 and len(app.answers.decisions) == 0


def test_the_answer_cache_stays_within_its_byte_budget_whatever_clients_send(config, store, clock, root_der):
    app = app_with(config, store, clock, answer_cache_size=200_000)
    visitor = client(app)
    token = uploaded_token(visitor, root_der)
    for number in range(300):
        visitor.get(f"/c/{token}", headers={"User-Agent": f"Mozilla/5.0 (Android 14; Pixel {number}) Chrome/120"})
        visitor.get(f"/c/{'abcdefghjk'[number % 10]}{number:07d}"[:11], status="*")
    assert app.answers.bytes <= 200_000
    for part in app.answers.parts():
        assert part.bytes <= part.max_bytes and part.bytes == sum(part._sizes.values())


def test_a_bounded_map_forgets_the_first_put_first_and_never_keeps_what_is_over_its_bound():
    kept = certdrop.BoundedMap(100)
    kept.put("a", 1, 40)
    kept.put("b", 2, 40)
    assert kept.put("c", 3, 40) == [("a", 1)] and set(kept.items) == {"b", "c"} and kept.bytes == 80
    assert kept.put("huge", 4, 101) == [] and "huge" not in kept.items


def test_a_full_rate_limit_table_never_forgets_a_client_that_is_being_limited(monkeypatch):
    monkeypatch.setattr(certdrop.RateLimiter, "MAX_CLIENTS", 8)
    clock = FakeClock()
    limiter = certdrop.RateLimiter(60, 2, clock)
    limiter.spend("10.0.0.1"), limiter.spend("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") > 0
    for number in range(2, 500):  # a flood of fresh addresses
        limiter.spend(f"10.0.{number // 250}.{number % 250}")
    assert limiter.retry_after("10.0.0.1") > 0 and limiter.spend("10.0.0.1") > 0
    assert len(limiter._buckets) <= 8


def test_when_every_client_in_the_table_is_limited_newcomers_share_one_bucket(monkeypatch):
    monkeypatch.setattr(certdrop.RateLimiter, "MAX_CLIENTS", 4)
    limiter = certdrop.RateLimiter(60, 1, FakeClock())
    for number in range(4):
        limiter.spend(f"10.0.0.{number}")
    assert limiter.spend("10.0.1.1") == 0 and limiter.spend("10.0.1.2") > 0
    assert len(limiter._buckets) <= 5


def test_result_page_passes_on_the_steps_of_every_family(testapp, root_der):
    text = html_text(upload(testapp, root_der))
    for label in ("Nokia Symbian (S60)", "Nokia Series 40", "iPhone and iPad", "Android", "Windows", "macOS",
                  "Linux", "Firefox"):
        assert label in text


# -- property test: a warm server answers exactly as a fresh one (issue 18) -------------------------------------

#: What the warm server is asked with: the tests' own names and broken ones, real clients from the tables above,
#: and formats a phone or a script asks for. None leaves the header out.
WARM_HOSTS = [*TEST_HOSTS, "ca.example.org:8080", "localhost:8080", "evil.example", "x:99999", None]
WARM_AGENTS = [*(agent for agent, _, _ in USER_AGENTS.values()), *S60_AGENTS.values(), *OTHER_AGENTS.values(),
               "curl/8.5.0", None]
WARM_ACCEPTS = ["text/html", "application/json", "*/*", "application/x-x509-ca-cert", "text/plain",
                "application/vnd.wap.xhtml+xml", "text/vnd.wap.wml", "application/json;q=0.5, text/html",
                "application/x-x509-ca-cert, */*;q=0.1", None]
WARM_LANGUAGES = ["en", "de-DE", "nl;q=0.5", "\xe9;;q=x", None, "de-AT, en;q=0.5", "ru", "pl;q=0.9, *;q=0.1",
                  "de;q=0, ru"]
#: Cookie headers: the picker's choice (which wins over Accept-Language), other cookies, a bad choice.
WARM_COOKIES = [None, None, "certdrop_lang=de", "certdrop_lang=pl", "other=1; certdrop_lang=ru", "certdrop_lang=xx",
                "other=1"]
WARM_QUERIES = ["", "format=der", "format=pem", "format=page", "format=mobileconfig", "format=whc", "format=whc-alt",
                "format=bogus", "format=", "x=1&format=pem", "format=%70em"]
WARM_SUFFIXES = ["", "/", "/card", "/dev", "/qr.svg", "/qr.png", "/ca.crt", "/ca.cer", "/ca.pem", "/ca.mobileconfig",
                 "/ca.whc", "/ca.alt.whc", "/Example_Root_CA.CER", "/revoke", "/nope"]
WARM_OTHER_PATHS = ["/", "/healthz", "/nope", "/favicon.ico", "/c/", "/c", "/lang/de", "/lang/xx"]
#: Durations the clock jumps by: within a link's life, past the ends of links (1h, 1d, 7d) and of tombstones
#: (30 days), and back (a clock set back by NTP).
WARM_CLOCK_MOVES = st.one_of(st.integers(1, 600), st.integers(1, 3 * DAY),
                             st.sampled_from([3599, 3600, 3601, DAY, 7 * DAY, 31 * DAY]), st.integers(-3600, -1))
LATIN_1_WORD = st.text(st.characters(max_codepoint=255), max_size=12)  # as WSGI carries paths and headers
TOKEN_LIKE = st.one_of(st.text(certdrop.TOKEN_ALPHABET, min_size=6, max_size=10),  # well-formed, mostly unknown
                       st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=9))

#: How a token is spelt in a request: mostly as given, sometimes in capitals (tokens are lower case).
WARM_TOKEN_SPELLINGS = [str, str, str, str, str.upper, lambda token: token[:1].upper() + token[1:]]
#: What a request about a token is drawn from (see draw_request): built once, as building strategies is costly.
WARM_REQUEST = st.tuples(
    st.integers(0, len(WARM_TOKEN_SPELLINGS) - 1),
    st.one_of(st.sampled_from(["", "", "", "/", "/ca.cer", "/ca.crt"]), st.sampled_from(WARM_SUFFIXES),
              LATIN_1_WORD.map(lambda name: f"/{name}.cer")),
    st.sampled_from(["GET"] * 6 + ["HEAD", "PUT", "POST"]),
    st.one_of(st.just(""), st.sampled_from(WARM_QUERIES), LATIN_1_WORD),
    st.sampled_from([*TEST_HOSTS, "ca.example.org:8080", *WARM_HOSTS]),
    st.one_of(st.sampled_from(WARM_AGENTS), LATIN_1_WORD),
    st.one_of(st.sampled_from(WARM_ACCEPTS), LATIN_1_WORD),
    st.sampled_from(WARM_LANGUAGES),
    st.sampled_from(WARM_COOKIES),
    st.sampled_from([False, False, True]),  # If-None-Match: one of the ETags seen so far, a third of the time
    st.sampled_from(["", "", "/certdrop"]),
    st.sampled_from(["127.0.0.1", "127.0.0.1", "192.168.1.9", "203.0.113.7"]))


@functools.cache
def warm_certificates():
    """Return the DER of the CAs the warm server shares: two roots, an intermediate, and a root whose end cuts
    its links short (five days after NOW)."""
    root, root_key = make_certificate("Warm Root CA", serial=181)
    intermediate = make_certificate("Warm Issuing CA", issuer=root.subject, issuer_key=root_key, ca=True, serial=182)
    short = make_certificate("Short-lived CA", serial=183,
                             not_after=datetime.datetime.fromtimestamp(NOW + 5 * DAY, datetime.timezone.utc))
    second = make_certificate("Zweite Stelle \xfc", serial=184)
    return [cert.public_bytes(serialization.Encoding.DER) for cert in (root, intermediate[0], short[0], second[0])]


def warm_environ(method, path, query="", headers=(), script_name="", remote_addr="127.0.0.1", body=b"",
                 content_type=""):
    """Return the environ a WSGI server makes of a request; *headers* are (name, value) pairs, None left out."""
    environ = {"REQUEST_METHOD": method, "SCRIPT_NAME": script_name, "PATH_INFO": path, "QUERY_STRING": query,
               "SERVER_NAME": "ca.example.net", "SERVER_PORT": "8080", "SERVER_PROTOCOL": "HTTP/1.1",
               "REMOTE_ADDR": remote_addr, "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
               "wsgi.errors": io.StringIO(), "wsgi.multithread": True, "wsgi.multiprocess": False,
               "wsgi.run_once": False, "wsgi.version": (1, 0)}
    if body or content_type:
        environ.update(CONTENT_LENGTH=str(len(body)), CONTENT_TYPE=content_type)
    for name, value in headers:
        if value is not None:
            environ["HTTP_" + name.upper().replace("-", "_")] = value
    return environ


def wsgi_answer(app, environ):
    """Return (status line, headers, body) of *app* for *environ*; Date left out (a server adds it, not the app)."""
    started = []
    body = b"".join(app(environ, lambda status, headers, exc_info=None: started.append((status, headers))))
    (status, headers), = started
    return status, [(name, value) for name, value in headers if name.lower() != "date"], body


def answer_difference(warm, fresh):
    """Return how two answers (status line, headers, body) differ: the status or headers, else where bodies part."""
    if warm[:2] != fresh[:2]:
        return f"warm {warm[:2]!r}, fresh {fresh[:2]!r}"
    warm, fresh = warm[2], fresh[2]
    at = next((index for index, (a, b) in enumerate(zip(warm, fresh)) if a != b), min(len(warm), len(fresh)))
    return f"bodies differ at byte {at}: warm {warm[at - 60:at + 100]!r}, fresh {fresh[at - 60:at + 100]!r}"


def logged_target(script_name, path, query):
    """Return how the access log must name a request's target: the bytes sent (WSGI gives them as Latin-1
    characters), percent-encoded where a terminal could be fooled."""
    safe = "/:@!$&'()*+,;=-._~"
    target = urllib.parse.quote(script_name.rstrip("/") + path, safe=safe, encoding="latin-1")
    return target + ("?" + urllib.parse.quote(query, safe=safe + "?%", encoding="latin-1") if query else "")


class NewLines:
    """An AccessLog writing to memory; called, it returns the lines written since the last call."""

    def __init__(self):
        self.stream = io.StringIO()
        self.access_log, self.seen = certdrop.AccessLog(self.stream), 0

    def __call__(self):
        self.access_log.flush()  # the log's own thread may have written some already: all are in the stream
        text = self.stream.getvalue()
        text, self.seen = text[self.seen:], len(text)
        return text.splitlines()


@functools.cache
def warm_access_logs():
    """Return the access logs of the warm apps and of the fresh ones: an app starts a writer thread for its log
    that never ends, so every run of the machine shares these two."""
    return NewLines(), NewLines()


@hypothesis.settings(stateful_step_count=40, deadline=None, database=None,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.data_too_large])
class AWarmServerAnswersExactlyAsAFreshOne(hypothesis.stateful.RuleBasedStateMachine):
    """One server kept warm through uploads, revokes, sweeps, clock moves and requests; each request it answers is
    asked again of an app built afresh on a store read afresh from the same directory, and both answers must be
    the same bytes, and both access log lines name the request as it was made. Rate limits are off: 429s have
    tests of their own."""

    def __init__(self):
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="certdrop-warm-"))
        self.clock = FakeClock()
        self.config = certdrop.Config(data_dir=self.directory, allowed_hosts=TEST_HOSTS, upload_password=KEY,
                                      lookup_limit=0, upload_limit=0)
        # Changes go through the warm app's own store, which must show them at once: another process's changes
        # would be seen only when the store looks at the disk again, a second of real time later.
        self.store = certdrop.make_store(self.config, self.clock)
        self.warm_lines, self.fresh_lines = warm_access_logs()
        self.warm_lines(), self.fresh_lines()  # lines of an earlier run that ended midway are not this run's
        self.warm = certdrop.make_app(self.config, self.store, self.clock, access_log=self.warm_lines.access_log)
        self.tokens = []
        self.etags = ['"nope"', "*"]
        self.asked = None  # the last request under /c/

    def teardown(self):
        shutil.rmtree(self.directory, ignore_errors=True)

    def fresh_answer(self, environ):
        fresh = certdrop.make_app(self.config, certdrop.make_store(self.config, self.clock), self.clock,
                                  access_log=self.fresh_lines.access_log)
        return wsgi_answer(fresh, environ)

    @hypothesis.stateful.rule(der=st.sampled_from(range(4)), ttl=st.sampled_from(["1h", "1d", "7d", ""]),
                              accept=st.sampled_from(["application/json", "text/html"]))
    def upload_through_the_warm_server(self, der, ttl, accept):
        environ = warm_environ("POST", "/", f"ttl={ttl}" if ttl else "", [("Host", "ca.example.org"),
                               ("Accept", accept), ("User-Agent", "curl/8.5.0")],
                               body=warm_certificates()[der], content_type="application/pkix-cert")
        status, headers, body = wsgi_answer(self.warm, environ)
        assert status[:3] in ("200", "201"), (status, body[:500])
        self.tokens.append(re.search(r"/c/([a-z0-9]+)", dict(headers)["Location"])[1])
        line, = self.warm_lines()
        assert line.split(" ")[2:6] == ["POST", logged_target("", "/", environ["QUERY_STRING"]), status[:3],
                                        str(len(body))], line

    @hypothesis.stateful.initialize(der=st.sampled_from(range(4)), seconds=st.sampled_from([3600, DAY, 7 * DAY]))
    def a_link_to_begin_with(self, der, seconds):
        self.add_to_the_warm_store(der, seconds)

    @hypothesis.stateful.rule(der=st.sampled_from(range(4)), seconds=st.sampled_from([3600, DAY, 7 * DAY]))
    def add_to_the_warm_store(self, der, seconds):
        entry, _ = self.store.add(certdrop.load_der(warm_certificates()[der]), self.clock() + seconds)
        self.tokens.append(entry.token)

    @hypothesis.stateful.precondition(lambda self: self.tokens)
    @hypothesis.stateful.rule(data=st.data())
    def revoke_in_the_warm_store(self, data):
        with contextlib.suppress(certdrop.UnknownToken, certdrop.LinkGone):  # gone already, or swept away
            self.store.revoke(data.draw(st.sampled_from(self.tokens), label="token"))

    @hypothesis.stateful.rule()
    def sweep_the_warm_store(self):
        self.store.sweep()

    @hypothesis.stateful.rule(seconds=WARM_CLOCK_MOVES)
    def move_the_clock(self, seconds):
        self.clock.advance(seconds)

    def draw_request(self, data, token):
        """Return (method, path, query, headers, SCRIPT_NAME, REMOTE_ADDR) of a request about *token*: drawn with
        strategies built once (WARM_REQUEST), since building them for each draw cost more than the requests."""
        spelling, suffix, method, query, host, agent, accept, language, cookie, asks_again, script_name, \
            remote_addr = data.draw(WARM_REQUEST, label="request")
        path = f"/c/{WARM_TOKEN_SPELLINGS[spelling](token)}{suffix}"
        if method == "POST" and path.endswith("/revoke"):
            # A wrong secret posted to /revoke counts towards a limit that no setting turns off (the revoke tests
            # have it)
            method = "GET"
        if_none_match = data.draw(st.sampled_from(self.etags), label="If-None-Match") if asks_again else None
        headers = (("Host", host), ("User-Agent", agent), ("Accept", accept), ("Accept-Language", language),
                   ("Cookie", cookie), ("If-None-Match", if_none_match))
        return method, path, query, headers, script_name, remote_addr

    @hypothesis.stateful.precondition(lambda self: self.tokens)
    @hypothesis.stateful.rule(data=st.data(), times=st.integers(1, 3))
    def ask_about_a_link(self, data, times):
        token = data.draw(st.sampled_from(self.tokens), label="token")
        self.ask(self.draw_request(data, token), times)

    @hypothesis.stateful.precondition(lambda self: self.asked)
    @hypothesis.stateful.rule(data=st.data(), times=st.integers(1, 3))
    def ask_the_same_about_another_link(self, data, times):
        """What was decided for one token's request (device, format, file name) is kept for any token's."""
        token = data.draw(st.one_of(st.sampled_from(self.tokens), TOKEN_LIKE), label="token")
        method, path, *rest = self.asked
        parts = path.split("/", 3)
        self.ask((method, "/".join([*parts[:2], token, *parts[3:]]), *rest), times)

    @hypothesis.stateful.rule(data=st.data(), times=st.integers(1, 3))
    def ask_anything(self, data, times):
        request = self.draw_request(data, data.draw(TOKEN_LIKE, label="token"))
        path = data.draw(st.one_of(st.just(request[1]), st.sampled_from(WARM_OTHER_PATHS)), label="path")
        self.ask((request[0], path, *request[2:]), times)

    def ask(self, request, times):
        """Ask the warm app *times* times, and a fresh app each time; the hot path keeps answers for next time."""
        method, path, query, headers, script_name, remote_addr = request
        if path.startswith("/c/"):
            self.asked = request
        for _ in range(times):
            warm = wsgi_answer(self.warm, warm_environ(method, path, query, headers, script_name, remote_addr))
            fresh = self.fresh_answer(warm_environ(method, path, query, headers, script_name, remote_addr))
            assert warm == fresh, answer_difference(warm, fresh)
            self.etags.extend(value for name, value in warm[1] if name == "ETag" and value not in self.etags)
            self.check_access_log(method, script_name, path, query, warm)

    def check_access_log(self, method, script_name, path, query, answer):
        """Check that the warm app's line names the request as it was made, and says what the fresh app's says."""
        (warm_line,), (fresh_line,) = self.warm_lines(), self.fresh_lines()
        warm, fresh = warm_line.split(" "), fresh_line.split(" ")
        status, _, body = answer
        # time, client address, method, target, status, bytes, device, duration
        assert warm[2:6] == [method, logged_target(script_name, path, query), status[:3], str(len(body))], warm_line
        assert warm[1:-1] == fresh[1:-1], (warm_line, fresh_line)


# A RuleBasedStateMachine runs as the unittest TestCase it makes; pytest collects a class only by a Test* name.
class TestAWarmServerAnswersExactlyAsAFreshOne(AWarmServerAnswersExactlyAsAFreshOne.TestCase):
    """Ten sequences: the fast run's share, which an everyday change to the hot path breaks first."""
    settings = hypothesis.settings(AWarmServerAnswersExactlyAsAFreshOne.TestCase.settings, max_examples=10)


@pytest.mark.slow
class TestAWarmServerAnswersExactlyAsAFreshOneOverManySequences(AWarmServerAnswersExactlyAsAFreshOne.TestCase):
    """A hundred sequences, in CI."""
    settings = hypothesis.settings(AWarmServerAnswersExactlyAsAFreshOne.TestCase.settings, max_examples=100)


# -- store -----------------------------------------------------------------------------------------------------


def in_a_thread(function, seconds=5.0):
    """Run *function* in a thread; fail if it has not returned within *seconds* (a FIFO's open() waits for ever)."""
    outcome = []

    def run():
        try:
            outcome.append((True, function()))
        except Exception as error:  # raised again here, in the test's own thread
            outcome.append((False, error))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{function} still waits after {seconds} s"
    returned, value = outcome[0]
    if not returned:
        raise value
    return value


def test_a_fifo_where_the_store_keeps_a_file_makes_nobody_wait(store, config, root_der, other_der, clock):
    entry = add(store, root_der)
    directory = config.data_dir
    for path in (store._index_path(hashlib.sha256(other_der).digest()), directory / certdrop.UPLOAD_KEY_FILE,
                 directory / certdrop.SignOuts.FILE, directory / "counts" / "other-host-1.json"):
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
    assert in_a_thread(lambda: store.live_entry_for(hashlib.sha256(other_der).digest())) is None
    assert len(in_a_thread(store.upload_key)[0]) > 8  # a FIFO is no key: a new one replaces it
    with pytest.raises(certdrop.StorageError, match="not a regular file"):  # sign-ins answer 503, naming it
        in_a_thread(lambda: certdrop.SignOuts(store).has("a" * 32, int(NOW) + 60))
    assert in_a_thread(lambda: certdrop.read_counts_file(directory / "counts" / "other-host-1.json")) is None
    assert store.get(entry.token).token == entry.token


def test_an_entry_file_past_any_size_an_upload_writes_is_damaged_without_being_read_whole(store, root_der):
    token = add(store, root_der).token
    os.truncate(store.path_for(token), certdrop.MAX_ENTRY_BYTES * 16)  # sparse: takes no room on disk
    fresh = certdrop.Store(store.directory, clock=store.clock)
    with pytest.raises(certdrop.DamagedEntry, match="longer than"):
        fresh.get(token)
    assert dict(fresh.entries())[token] is None  # listed as damaged, and the rest goes on


def test_an_entrys_memory_counts_the_report_its_bundle_upload_keeps(store, root_der):
    entry = add(store, root_der)
    report = tuple({"code": "expired", "message": "m" * 100, "certificate": "Root", "note": False}
                   for _ in range(244))
    assert dataclasses.replace(entry, report=report).memory_size() - entry.memory_size() >= 244 * 440


def test_healthz_recovers_once_space_comes_back_after_a_failed_write(store, root_der):
    add(store, root_der)
    store._failure = certdrop.WriteFailure(store.directory, OSError(errno.ENOSPC, "No space left on device"))
    assert store.check_health() is None and store._failure is None


def test_a_directory_named_like_a_temporary_file_is_left_alone_and_stops_nothing(store, root_der, config):
    add(store, root_der)
    stale = config.data_dir / ".left-by-a-person.tmp"
    stale.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert store.remove_stale_temporary() == 0 and stale.is_dir()
    assert store.sweep()["damaged"] == 0


def test_two_processes_that_find_no_upload_key_at_once_end_with_one_key(store, config, monkeypatch):
    other = certdrop.Store(config.data_dir, clock=store.clock)  # another process on the same directory
    looked = []
    stored_key = certdrop.Store._stored_key

    def look_then_lose_the_race(path):
        looked.append(path)
        if len(looked) == 1:  # the other process makes its key between this one's first look and its lock
            monkeypatch.setattr(certdrop.Store, "_stored_key", staticmethod(stored_key))
            key, created = other.upload_key()
            assert created
            monkeypatch.setattr(certdrop.Store, "_stored_key", staticmethod(look_then_lose_the_race))
            return ""
        return stored_key(path)

    monkeypatch.setattr(certdrop.Store, "_stored_key", staticmethod(look_then_lose_the_race))
    key, created = store.upload_key()
    assert not created and key == other.upload_key()[0]


def test_new_tokens_use_the_unambiguous_alphabet_and_configured_length(store, root_der):
    token = add(store, root_der).token
    assert len(token) == 8 and set(token) <= set("23456789abcdefghjkmnpqrstuvwxyz")


def test_store_returns_the_exact_certificate(store, root_der):
    assert store.get(add(store, root_der).token).der == root_der


def test_entries_survive_a_new_store_on_the_same_directory(config, clock, root_der):
    token = add(certdrop.make_store(config, clock), root_der).token
    assert certdrop.make_store(config, clock).get(token).der == root_der


def test_damaged_entry_file_is_not_served_and_is_logged(config, clock, root_der, caplog):
    token = add(certdrop.make_store(config, clock), root_der).token
    path = certdrop.make_store(config, clock).path_for(token)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(certdrop.UnknownToken):
        certdrop.make_store(config, clock).get(token)
    assert "damaged" in caplog.text


def test_entry_whose_certificate_was_altered_is_not_served(config, clock, root_der):
    token = add(certdrop.make_store(config, clock), root_der).token
    path = certdrop.make_store(config, clock).path_for(token)
    record = json.loads(path.read_text())
    record["der"] = record["der"][:-8] + "AAAAAAA="
    path.write_text(json.dumps(record))
    with pytest.raises(certdrop.UnknownToken):
        certdrop.make_store(config, clock).get(token)


def damage(store, token, **fields):
    """Rewrite fields of *token*'s entry file as an editor or a bad disk might."""
    path = store.path_for(token)
    record = json.loads(path.read_text())
    record.update(fields)
    path.write_text(json.dumps(record))


DAMAGE = {
    "expiry-past-year-9999": {"expires": 1e300},
    "expiry-negative": {"expires": -1},
    "expiry-a-string": {"expires": "soon"},
    "created-infinite": {"created": float("inf")},
    "revoked-a-boolean": {"revoked": True},
    "revoked-huge": {"revoked": 10 ** 30},
}


@pytest.mark.parametrize("fields", DAMAGE.values(), ids=DAMAGE)
def test_entries_with_fields_out_of_range_are_damaged_never_fatal(config, clock, root_der, other_der, fields):
    token = add(certdrop.make_store(config, clock), root_der).token
    healthy = add(certdrop.make_store(config, clock), other_der).token
    damage(certdrop.make_store(config, clock), token, **fields)
    store = certdrop.make_store(config, clock)
    with pytest.raises(certdrop.DamagedEntry):
        store.get(token)
    assert dict(store.entries()) == {token: None, healthy: store.get(healthy)}
    assert store.sweep()["damaged"] == 1 and store.path_for(token).exists()


def test_entry_file_that_is_not_an_object_is_damaged(config, clock, root_der):
    store = certdrop.make_store(config, clock)
    token = add(store, root_der).token
    store.path_for(token).write_text("[1, 2, 3]")
    with pytest.raises(certdrop.DamagedEntry):
        certdrop.make_store(config, clock).get(token)


#: One value of each kind JSON has; a field holding a kind it may not hold is damage.
JSON_VALUES = {"null": None, "boolean": True, "integer": 2, "number": 2.5, "text": "x", "list": [], "object": {}}
JSON_KIND_OF = {str: "text", int: "integer", bool: "boolean", list: "list", type(None): "null"}

#: The kinds each field of an entry file may hold: "certificate.x" is a fact, "was.x" a tombstone's memory.
ENTRY_FIELD_KINDS = {
    "format": {"integer"}, "token": {"text"}, "created": {"integer", "number"}, "expires": {"integer", "number"},
    "revoked": {"integer", "number", "null"}, "der": {"text"}, "sha256": {"text"}, "certificate": {"object", "null"},
    "revoke_sha256": {"text", "null"}, "was": {"object", "null"}, "was.name": {"text"}, "was.sha256": {"text"},
    "was.not_before": {"integer", "number"}, "was.not_after": {"integer", "number"},
    **{f"certificate.{name}": {JSON_KIND_OF[kind] for kind in (kinds if isinstance(kinds, tuple) else (kinds,))}
       for name, kinds in certdrop.STORED_FACTS.items()},
}


@pytest.mark.parametrize("field", ENTRY_FIELD_KINDS)
def test_an_entry_file_holding_any_other_kind_of_value_in_a_field_is_damaged(config, clock, root_der, other_der,
                                                                             field):
    store = certdrop.make_store(config, clock)
    token = (store.revoke(add(store, other_der).token) if field.startswith("was") else add(store, root_der)).token
    path = store.path_for(token)
    record = json.loads(path.read_text())
    outer, _, inner = field.partition(".")
    for kind, value in JSON_VALUES.items():
        if kind in ENTRY_FIELD_KINDS[field]:
            continue
        path.write_text(json.dumps({**record, outer: {**record[outer], inner: value} if inner else value}))
        with pytest.raises(certdrop.DamagedEntry):
            certdrop.make_store(config, clock).lookup(token)


def test_storing_the_same_certificate_again_keeps_the_link_and_the_later_expiry(store, root_der):
    first = add(store, root_der, days=30)
    again, created = store.add(certdrop.load_der(root_der), store.clock() + DAY)
    assert (again.token, again.expires, created) == (first.token, first.expires, False)
    later, _ = store.add(certdrop.load_der(root_der), store.clock() + 90 * DAY)
    assert later.token == first.token and later.expires == store.clock() + 90 * DAY


def test_revoked_link_is_gone_and_says_since_when(store, clock, root_der):
    token = add(store, root_der).token
    store.revoke(token)
    with pytest.raises(certdrop.LinkGone) as gone:
        store.get(token)
    assert gone.value.reason == "revoked" and gone.value.since == clock()


def test_revocation_by_another_process_is_seen_once_the_cache_revalidates(config, clock, root_der):
    server = certdrop.Store(config.data_dir, clock=clock, revalidate_after=0)
    token = add(server, root_der).token
    server.get(token)
    certdrop.make_store(config, clock).revoke(token)
    with pytest.raises(certdrop.LinkGone):
        server.get(token)


def test_cached_entry_is_served_without_reading_its_file(store, root_der, monkeypatch):
    token = add(store, root_der).token
    monkeypatch.setattr(certdrop.Store, "_load", lambda *args: pytest.fail("read the disk for a hot token"))
    assert store.get(token).der == root_der


def test_memory_cache_is_bounded_and_evicted_entries_still_load(config, clock, root_der, other_der):
    store = certdrop.Store(config.data_dir, clock=clock, cache_entries=1)
    first, second = add(store, root_der), add(store, other_der)
    assert len(store.memory._cache) == 1
    assert store.get(first.token).der == root_der and store.get(second.token).der == other_der


def test_sweep_turns_expired_entries_into_tombstones_then_deletes_them(store, clock, root_der):
    entry = add(store, root_der, days=1)
    clock.advance(2 * DAY)
    assert store.sweep()["expired"] == 1
    assert b'"der"' not in store.path_for(entry.token).read_bytes()
    with pytest.raises(certdrop.LinkGone, match="expired"):
        store.get(entry.token)
    clock.advance(31 * DAY)
    assert store.sweep()["deleted"] == 1
    with pytest.raises(certdrop.UnknownToken):
        store.get(entry.token)


def test_sweep_removes_stale_temporary_files_only(store, root_der):
    add(store, root_der)
    shard = next(store.directory.glob("??"))
    stale, fresh = shard / ".x.json.1.tmp", shard / ".y.json.2.tmp"
    stale.write_bytes(b"{")
    fresh.write_bytes(b"{")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert store.sweep()["temporary"] == 1
    assert not stale.exists() and fresh.exists()


def test_a_new_link_for_a_certificate_whose_link_was_revoked(store, root_der):
    first = add(store, root_der)
    store.revoke(first.token)
    assert add(store, root_der).token != first.token


@pytest.mark.parametrize("token", ["../../etc/passwd", "abc", "x" * 33, "abcd0efg", "ABCDEFGH"])
def test_paths_come_only_from_well_formed_tokens(store, token):
    with pytest.raises(certdrop.UnknownToken):
        store.path_for(token)


def test_entry_files_keep_the_certificate_facts_so_a_cold_lookup_parses_no_certificate(config, clock, root_der,
                                                                                     monkeypatch):
    token = add(certdrop.make_store(config, clock), root_der).token
    record = json.loads(certdrop.make_store(config, clock).path_for(token).read_text())
    assert record["format"] == 2 and record["certificate"]["subject"] == "CN=Example Root CA,O=Example Org"
    expected = certdrop.load_der(root_der)
    monkeypatch.setattr(certdrop, "parse_der", lambda der: pytest.fail("parsed the DER of a stored entry"))
    monkeypatch.setattr(certdrop, "is_signed_by", lambda *args: pytest.fail("verified a stored signature again"))
    assert certdrop.make_store(config, clock).get(token).certificate == expected


@pytest.mark.parametrize("facts", [{"self_signed": "yes"}, {"common_names": [1]}, {"not_after": "soon"},
                                   {"serial": "xyz"}, {"not_before": "2025-01-01T00:00:00"}],
                         ids=["bool-a-string", "name-a-number", "date-no-date", "serial-no-hex", "date-no-zone"])
def test_entries_with_damaged_certificate_facts_are_damaged_never_fatal(config, clock, root_der, facts):
    token = add(certdrop.make_store(config, clock), root_der).token
    record = json.loads(certdrop.make_store(config, clock).path_for(token).read_text())
    damage(certdrop.make_store(config, clock), token, certificate={**record["certificate"], **facts})
    with pytest.raises(certdrop.DamagedEntry):
        certdrop.make_store(config, clock).get(token)


def test_a_serial_number_too_long_for_a_json_integer_is_stored_and_read_back(store, config, clock):
    # A crafted CA may carry a serial of thousands of digits; Python's JSON refuses integers past 4,300.
    big = certdrop.inspect_certificate(x509.load_der_x509_certificate(
        make_certificate("Big Serial CA", serial=2 ** 159 - 1)[0].public_bytes(serialization.Encoding.DER)))
    huge = dataclasses.replace(big, serial=-(10 ** 5000))
    token = store.add(huge, clock() + DAY)[0].token
    assert certdrop.make_store(config, clock).get(token).certificate.serial == -(10 ** 5000)


def counting_fsyncs(monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda descriptor: (synced.append(os.readlink(f"/proc/self/fd/{descriptor}")),
                                                         real(descriptor)))
    return synced


def test_an_upload_syncs_each_file_once_and_each_directory_once(store, clock, root_der, other_der, monkeypatch):
    third = make_certificate("Third CA", serial=99)[0].public_bytes(serialization.Encoding.DER)
    store.add(certdrop.load_der(third), clock() + DAY)  # the data directory and sha256/ exist already
    synced = counting_fsyncs(monkeypatch)
    stored = store.add_all([(certdrop.load_der(der), clock() + DAY, "secret") for der in (root_der, other_der)])
    files = [str(store.path_for(entry.token)) for entry, _ in stored]
    indexes = [str(store.directory / "sha256" / hashlib.sha256(der).hexdigest()) for der in (root_der, other_der)]
    written = {path: synced.count(path) for path in synced if not os.path.isdir(path)}
    assert len(written) == 4 and set(written.values()) == {1}  # each new file once, under its temporary name
    directories = [path for path in synced if os.path.isdir(path)]
    assert sorted(directories) == sorted(set(directories))  # no directory twice
    assert {str(Path(path).parent) for path in files + indexes} <= set(directories)


def test_uploading_the_same_certificates_again_writes_nothing(store, clock, root_der, monkeypatch):
    first, _ = store.add(certdrop.load_der(root_der), clock() + DAY)
    before = store.path_for(first.token).stat().st_mtime_ns
    synced = counting_fsyncs(monkeypatch)
    clock.advance(30)  # the same lifetime, chosen half a minute later
    again, created = store.add(certdrop.load_der(root_der), clock() + DAY)
    assert (again.expires, created, synced) == (first.expires, False, [])
    assert store.path_for(first.token).stat().st_mtime_ns == before
    clock.advance(60)
    moved, _ = store.add(certdrop.load_der(root_der), clock() + DAY)
    assert moved.expires == clock() + DAY and synced


def test_the_memory_cache_is_bounded_by_bytes(config, clock, root_der, other_der):
    size = certdrop.ENTRY_OVERHEAD + len(root_der)
    store = certdrop.Store(config.data_dir, clock=clock, cache_bytes=size + 100)
    first, second = add(store, root_der), add(store, other_der)
    assert list(store.memory._cache) == [second.token] and store.memory._cached_bytes <= size + 100
    assert store.get(first.token).der == root_der  # evicted entries load again
    assert store.memory._cached_bytes == sum(item.size for item in store.memory._cache.values())


def test_a_repeated_unknown_token_costs_no_file_system_call(store, monkeypatch):
    with pytest.raises(certdrop.UnknownToken):
        store.get("abcdefgh")
    monkeypatch.setattr(os, "open", lambda *args: pytest.fail("looked at the disk again within a second"))
    with pytest.raises(certdrop.UnknownToken):
        store.get("abcdefgh")


def test_a_link_another_process_makes_is_found_once_the_unknown_token_is_looked_for_again(config, clock, root_der):
    server = certdrop.Store(config.data_dir, clock=clock, revalidate_after=0.05)
    other = certdrop.make_store(config, clock)
    token = other._new_token()
    with pytest.raises(certdrop.UnknownToken):
        server.get(token)
    entry = certdrop.Entry(token, clock(), clock() + DAY, root_der,
                           facts=certdrop.certificate_facts(certdrop.load_der(root_der)))
    other._write(entry)
    time.sleep(0.06)
    assert server.get(token).der == root_der


def test_the_sweep_reads_only_the_times_of_entries_that_have_not_ended(store, clock, root_der, other_der,
                                                                       monkeypatch):
    live, ending = add(store, root_der, days=30), add(store, other_der, days=1)
    clock.advance(2 * DAY)
    read = []
    real = certdrop.Entry.from_json.__func__
    monkeypatch.setattr(certdrop.Entry, "from_json",
                        classmethod(lambda cls, token, data: (read.append(token), real(cls, token, data))[1]))
    assert store.sweep()["expired"] == 1
    assert read == [ending.token] and store.get(live.token).der == root_der


class FakeMsvcrt:
    """Windows' msvcrt.locking on Linux: byte-range locks that other processes respect, as on Windows.

    Like msvcrt.locking, a lock from one process excludes every other; the store's thread lock covers threads.
    """

    LK_LOCK, LK_UNLCK = 1, 0

    def __init__(self):
        self.calls = []

    def locking(self, fd, mode, nbytes):
        self.calls.append(mode)
        fcntl.lockf(fd, fcntl.LOCK_EX if mode == self.LK_LOCK else fcntl.LOCK_UN, nbytes, 0, os.SEEK_SET)


@pytest.fixture
def windows_locking(monkeypatch):
    """Make the store take the branch Windows takes: no fcntl, msvcrt.locking."""
    fake = FakeMsvcrt()
    monkeypatch.setattr(certdrop, "fcntl", None)
    monkeypatch.setattr(certdrop, "msvcrt", fake)
    return fake


def hold_store_lock(directory, held, release):
    """Child process: take the store's write lock, say so, and keep it until told to let go."""
    with certdrop.Store(directory)._exclusive():
        held.set()
        release.wait(10)


@pytest.mark.slow
@pytest.mark.parametrize("branch", ["posix", "windows"])
def test_the_write_lock_keeps_other_processes_out(tmp_path, request, branch):
    if branch == "windows":
        request.getfixturevalue("windows_locking")
    context = multiprocessing.get_context("fork")
    held, release = context.Event(), context.Event()
    child = context.Process(target=hold_store_lock, args=(tmp_path, held, release))
    child.start()
    try:
        assert held.wait(10)
        threading.Timer(0.5, release.set).start()
        started = time.monotonic()
        with certdrop.Store(tmp_path)._exclusive():
            waited = time.monotonic() - started
    finally:
        release.set()
        child.join(10)
    assert waited >= 0.4, "the lock was taken while another process held it"


def test_on_windows_concurrent_uploads_of_one_certificate_give_one_link(config, clock, root_der, windows_locking):
    store = certdrop.make_store(config, clock)
    certificate = certdrop.load_der(root_der)
    results = []
    threads = [threading.Thread(target=lambda: results.append(store.add(certificate, NOW + DAY)))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({entry.token for entry, _ in results}) == 1 and sum(created for _, created in results) == 1
    assert windows_locking.calls.count(FakeMsvcrt.LK_LOCK) == windows_locking.calls.count(FakeMsvcrt.LK_UNLCK) == 8


# -- HTTP: the upload page and the result page -----------------------------------------------------------------


def test_upload_page_is_a_form_with_file_paste_and_lifetime(testapp):
    page = testapp.get("/")
    form = page.forms[0]
    assert form.method == "post" and form.action == "/" and form.enctype == "multipart/form-data"
    assert {"cert", "pem", "ttl"} <= set(form.fields)
    assert form["ttl"].value == "7d"
    ET.fromstring(page.body)  # polyglot: also well-formed XML
    label = page.html.find("label", attrs={"for": "cert"}).get_text()
    assert all(extension in label for extension in (".cer", ".crt", ".der", ".pem", ".p7b", ".p7c", ".p12", ".pfx"))


def test_upload_page_explains_where_to_find_the_ca_certificate(testapp):
    page = testapp.get("/")
    assert "certsrv" in page.text and "Certification Path" in page.text and "Copy to File" in page.text


def test_pem_upload_shows_the_link_with_explicit_http(testapp, root_pem):
    result = upload(testapp, root_pem, "ca.pem")
    token = token_of(result)
    assert f"http://ca.example.org:8080/c/{token}" in result.text


def test_result_page_shows_the_certificate_facts(testapp, root, root_der):
    cert = root[0]
    result = upload(testapp, root_der)
    facts = dict(zip(result.html.select("th"), result.html.select("td")))
    text = {th.text: td.text for th, td in facts.items()}
    assert text["Subject"] == "CN=Example Root CA,O=Example Org"
    assert text["Issuer"] == "CN=Example Root CA,O=Example Org"
    assert text["Serial"] == "1F:2E:3D"
    assert text["Valid from"] == "2025-01-01 00:00 UTC" and text["Valid until"] == "2035-01-01 00:00 UTC"
    assert text["SHA-256"] == cert.fingerprint(hashes.SHA256()).hex(":").upper()
    assert text["SHA-1"] == cert.fingerprint(hashes.SHA1()).hex(":").upper()


def test_result_page_says_when_the_link_expires(testapp, root_der):
    result = upload(testapp, root_der, ttl="30d")
    assert certdrop.format_time(NOW + 30 * DAY) in result.text and "30 days" in result.text


def test_result_page_has_install_steps_for_s60(testapp, root_der):
    result = upload(testapp, root_der)
    assert "Internet" in result.text and "restart" in result.text


def test_pasted_pem_text_is_accepted(testapp, root_pem):
    result = testapp.post("/", params={"pem": root_pem.decode(), "ttl": "1d"}, status=201)
    assert "Your install link" in result.text


def test_file_and_pasted_text_together_are_refused(testapp, root_pem):
    upload(testapp, root_pem, pem=root_pem.decode(), status=400)


def test_uploading_the_same_certificate_again_returns_the_same_link(testapp, root_pem, root_der):
    first = uploaded_token(testapp, root_pem)
    again = upload(testapp, root_der, status=200)
    assert token_of(again) == first and "already has a link" in again.text


def test_private_key_upload_is_refused_and_nothing_is_written(testapp, config, root_pem, key_pem):
    result = upload(testapp, root_pem + key_pem, status=422)
    assert "private key" in result.text
    assert files_under(config.data_dir) == []


def test_upload_over_the_size_limit_answers_413(config, store, clock, root_der):
    small = client(certdrop.make_app(dataclasses.replace(config, max_upload=1000), store, clock))
    result = upload(small, root_der + b"\0" * 2000, status=413)
    assert "larger than the limit" in result.text


def test_lifetime_beyond_the_configured_maximum_is_refused(config, store, clock, root_der):
    strict = client(certdrop.make_app(dataclasses.replace(config, max_ttl=30 * DAY), store, clock))
    upload(strict, root_der, ttl="90d", status=400)


@pytest.mark.parametrize("ttl", ["99999999999d", "999999999999999999999", "30s", "0m", "-5d", "7 days", "forever",
                                 "1e9"])
def test_lifetimes_outside_the_allowed_range_answer_400_naming_the_choices_and_store_nothing(testapp, config, root_der,
                                                                                              ttl):
    refusal = upload(testapp, root_der, ttl=ttl, status=400)
    assert "Choose 1h, 1d, 7d, 30d, 90d, 365d, cert, or a duration" in html_text(refusal)
    assert files_under(config.data_dir) == []


def test_a_lifetime_is_any_duration_from_one_minute(testapp, store, root_der):
    token = uploaded_token(testapp, root_der, ttl="1m")
    assert store.get(token).expires == NOW + 60


def test_a_link_never_outlives_its_certificate_and_the_page_says_so(testapp, store):
    ending = make_certificate("Ending Soon CA", not_after=datetime.datetime.fromtimestamp(NOW + 10 * DAY,
                                                                                           datetime.timezone.utc))[0]
    result = upload(testapp, der_of(ending), ttl="999d")
    assert store.get(token_of(result)).expires == NOW + 10 * DAY
    assert "sooner than the lifetime you chose" in html_text(result)


def test_an_expired_certificate_keeps_the_chosen_lifetime_and_its_warning(testapp, store):
    expired = make_certificate("Expired CA", not_before=datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc),
                               not_after=datetime.datetime(2021, 1, 1, tzinfo=datetime.timezone.utc))[0]
    result = upload(testapp, der_of(expired), ttl="7d")
    assert store.get(token_of(result)).expires == NOW + 7 * DAY
    assert "[expired]" in html_text(result)


def test_add_with_a_lifetime_out_of_range_exits_3_and_stores_nothing(tmp_path, capsys, root_pem):
    (tmp_path / "ca.pem").write_bytes(root_pem)
    (tmp_path / "certdrop.ini").write_text("[certdrop]\ndata_dir = data\n")
    assert certdrop.main(["-c", str(tmp_path / "certdrop.ini"), "add", str(tmp_path / "ca.pem"), "--ttl",
                          "99999999999d"]) == 3
    assert "is not a lifetime this server allows" in capsys.readouterr().err
    assert files_under(tmp_path / "data") == []


def test_durations_longer_than_a_century_are_refused_in_the_config():
    with pytest.raises(ValueError):
        certdrop.parse_duration("99999999999d")


def test_link_until_the_certificate_expires(testapp, store, root_der):
    token = uploaded_token(testapp, root_der, ttl="cert")
    assert store.get(token).expires == datetime.datetime(2035, 1, 1, tzinfo=datetime.timezone.utc).timestamp()


def test_upload_of_a_type_that_holds_no_certificate_is_refused_with_415(testapp, root_der):
    refusal = testapp.post("/", b'{"cert": 1}', content_type="application/json", status=415)
    assert "multipart/form-data" in html_text(refusal)


def test_hostile_host_header_is_refused(testapp, root_der):
    testapp.post("/", params={"ttl": "7d"}, upload_files=[("cert", "c", root_der)],
                 headers={"Host": "evil.example<script>"}, status=400)


def test_certificate_text_is_escaped_in_the_page(testapp):
    cert, _ = make_certificate('<script>alert("x")</script>')
    result = upload(testapp, cert.public_bytes(serialization.Encoding.DER))
    assert "<script>" not in result.text and "&lt;script&gt;" in result.text
    ET.fromstring(result.body)


def test_public_url_builds_the_link(config, store, clock, root_der):
    app = client(certdrop.make_app(dataclasses.replace(config, public_url="https://intranet.example.com/ca"),
                                            store, clock))
    assert "https://intranet.example.com/ca/c/" in upload(app, root_der).text


def test_a_loopback_link_leads_with_the_machines_address_then_its_full_name(app, root_der, machine):
    result = upload(client(app, HTTP_HOST="localhost:8080"), root_der)
    token = token_of(result)
    assert result.html.find("p", class_="link").get_text() == f"http://192.168.1.5:8080/c/{token}"
    note = " ".join(result.html.find("p", class_="warn").get_text(" ").split())
    assert "Phones cannot open localhost: it is this server's own loopback name" in note
    assert "this server's address 192.168.1.5" in note and f"http://server.corp.example:8080/c/{token}" in note


def test_a_single_label_host_leads_with_an_address_too(app, root_der, machine):
    result = upload(client(app, HTTP_HOST="server:80"), root_der)
    assert result.html.find("p", class_="link").get_text() == f"http://192.168.1.5/c/{token_of(result)}"
    assert "a short name that phones often cannot look up" in html_text(result)


@pytest.mark.parametrize(("url", "addresses", "fqdn", "expected"), [
    ("http://localhost:8080/c/x", ("10.0.0.5", "192.168.1.5"), "ca.corp.example",
     ["http://10.0.0.5:8080/c/x", "http://192.168.1.5:8080/c/x", "http://ca.corp.example:8080/c/x"]),
    ("http://127.0.0.1/c/x", (), "ca.corp.example", ["http://ca.corp.example/c/x"]),
    ("http://server:8080/c/x", ("10.0.0.5",), None, ["http://10.0.0.5:8080/c/x"]),
    ("http://localhost/c/x", (), None, []),
    ("http://ca.corp.example/c/x", ("10.0.0.5",), "ca.corp.example", []),
    ("http://10.0.0.5:8080/c/x", ("10.0.0.5",), "ca.corp.example", []),
], ids=["loopback", "loopback-without-addresses", "single-label", "nothing-known", "full-name", "address"])
def test_reachable_links_put_ipv4_addresses_first_then_the_full_name(url, addresses, fqdn, expected):
    assert [link for link, _ in certdrop.reachable_links(url, addresses, fqdn)] == expected



#: The reviewer's host: a home network, Docker's bridge and an OpenVPN tunnel (the string order led with 10.8.0.6).
MULTI_HOMED = {"192.168.1.5": "eth0", "172.17.0.1": "docker0", "10.8.0.6": "tun0"}


def test_the_address_the_default_route_leaves_by_leads_and_bridges_and_tunnels_are_left_out():
    assert certdrop.order_addresses(MULTI_HOMED, "192.168.1.5") == ("192.168.1.5",)
    more = {**MULTI_HOMED, "192.168.122.1": "virbr0", "172.18.0.1": "br-3f2a9c", "10.0.0.2": "wg0",
            "10.9.0.1": "tap0", "169.254.3.4": "vethb2", "10.1.2.3": "enp3s0"}
    assert certdrop.order_addresses(more, "192.168.1.5") == ("192.168.1.5", "10.1.2.3")


def test_a_link_made_on_a_multi_homed_host_leads_with_its_default_route_address(monkeypatch):
    monkeypatch.setattr(certdrop, "machine_addresses", lambda: certdrop.order_addresses(MULTI_HOMED, "192.168.1.5"))
    monkeypatch.setattr(certdrop, "machine_fqdn", lambda: None)
    offer = certdrop.offer_link("http://localhost:8080/c/x", "0.0.0.0")
    assert offer.url == "http://192.168.1.5:8080/c/x" and offer.alternatives == ()


def test_addresses_without_a_default_route_follow_in_numeric_order_private_first():
    addresses = {"192.168.1.10": "", "192.168.1.9": "", "8.8.4.4": "", "10.0.0.20": "", "127.0.0.1": "lo",
                 "169.254.1.1": ""}
    assert certdrop.order_addresses(addresses) == ("10.0.0.20", "192.168.1.9", "192.168.1.10", "8.8.4.4")
    assert certdrop.order_addresses(addresses, "192.168.1.10")[:2] == ("192.168.1.10", "10.0.0.20")


def test_a_default_route_through_a_tunnel_does_not_lead():
    assert certdrop.order_addresses(MULTI_HOMED, "10.8.0.6") == ("192.168.1.5",)


@pytest.mark.parametrize(("host", "addresses", "fqdn", "name"), [
    ("192.168.1.5", ("10.0.0.2",), None, "192.168.1.5"),  # listening on one address: that one
    ("::1", (), None, "[::1]"),
    ("certs.example.org", (), None, "certs.example.org"),
    ("0.0.0.0", ("192.168.1.5", "10.0.0.2"), "server.corp.example", "192.168.1.5"),  # every interface: the best
    ("::", (), "server.corp.example", "server.corp.example"),
    ("0.0.0.0", (), None, "localhost"),
])
def test_serve_names_the_server_for_requests_without_a_host_of_its_own(monkeypatch, host, addresses, fqdn, name):
    monkeypatch.setattr(certdrop, "machine_addresses", lambda: addresses)
    monkeypatch.setattr(certdrop, "machine_fqdn", lambda: fqdn)
    assert certdrop.own_server_name(certdrop.Config(host=host)) == name


def test_this_machines_default_route_address_is_one_of_its_own_and_leads():
    default = certdrop.default_route_address()
    if default is None:
        pytest.skip("this machine has no IPv4 route to leave by")
    assert default in certdrop.local_addresses()
    assert certdrop.order_addresses(certdrop.local_addresses(), default)[0] == default

def test_a_loopback_upload_gives_the_same_link_note_and_alternatives_on_the_page_in_text_json_mail_and_card(
        app, root_der, machine):
    local = client(app, HTTP_HOST="127.0.0.1:8080")
    page = upload(local, root_der)
    token = token_of(page)
    lead, other = f"http://192.168.1.5:8080/c/{token}", f"http://server.corp.example:8080/c/{token}"
    note = ("Phones cannot open 127.0.0.1: it is this server's own loopback name. This link uses this server's "
            "address 192.168.1.5 instead.")
    text = local.post("/", root_der, content_type="application/pkix-cert", headers={"User-Agent": "curl/8.5.0"},
                      status=200)
    data = local.post("/", root_der, content_type="application/pkix-cert", headers={"Accept": "application/json"},
                      status=200).json["links"][0]
    assert page.headers["Location"] == text.headers["Location"] == lead
    assert page.html.find("p", class_="link").get_text() == text.text.splitlines()[0] == data["url"] == lead
    assert data["url_note"] == note and data["alternatives"] == [other] and data["revoke_url"] == f"{lead}/revoke"
    assert f"  {note}\n  also {other}\n" in text.text
    warning = " ".join(page.html.find("p", class_="warn").get_text(" ").split())
    assert warning.startswith(note) and f"Also: {other}" in warning
    assert lead in urllib.parse.unquote(next(a["href"] for a in page.html.find_all("a")
                                             if a["href"].startswith("mailto:")))
    body = urllib.parse.parse_qs(urllib.parse.urlsplit(next(a["href"] for a in page.html.find_all("a")
                                                            if a["href"].startswith("mailto:"))).query)["body"][0]
    assert f"  {lead}\n  {note}\n  also {other}\n" in body
    assert lead in html_text(local.get(f"/c/{token}/card"))
    assert lead in html_text(local.get(f"/c/{token}", headers={"User-Agent": USER_AGENTS["windows-edge"][0]}))


def test_a_server_listening_on_loopback_only_offers_no_machine_address_and_says_why(config, store, clock, root_der,
                                                                                     machine):
    local = client(certdrop.make_app(dataclasses.replace(config, host="127.0.0.1"), store, clock),
                   HTTP_HOST="127.0.0.1:8080")
    data = local.post("/", root_der, content_type="application/pkix-cert", headers={"Accept": "application/json"},
                      status=201).json["links"][0]
    assert data["url"] == f"http://127.0.0.1:8080/c/{data['token']}" and data["alternatives"] == []
    assert "This server listens only on 127.0.0.1, which no other device can reach: set host = 0.0.0.0" in (
        data["url_note"])


def test_a_link_on_a_real_name_has_no_note_and_no_alternatives(testapp, root_der, machine):
    data = testapp.post("/", root_der, content_type="application/pkix-cert", headers={"Accept": "application/json"},
                        status=201).json["links"][0]
    assert data["url"].startswith("http://ca.example.org:8080/c/")
    assert data["url_note"] is None and data["alternatives"] == []


def test_public_url_leads_over_the_host_a_page_was_asked_by(config, store, clock, root_der, machine):
    app = certdrop.make_app(dataclasses.replace(config, public_url="https://certs.example.com"), store, clock)
    result = upload(client(app, HTTP_HOST="127.0.0.1:8080"), root_der)
    assert result.html.find("p", class_="link").get_text() == f"https://certs.example.com/c/{token_of(result)}"
    assert "Phones cannot open" not in result.text


@pytest.mark.parametrize(("url", "bound", "public", "lead", "alternatives", "says"), [
    ("http://127.0.0.1:9000/c/x", "0.0.0.0", False, "http://192.168.1.5:9000/c/x",
     ["http://server.corp.example:9000/c/x"], "This link uses this server's address 192.168.1.5 instead."),
    ("http://[::1]:9000/c/x", "::", False, "http://192.168.1.5:9000/c/x", ["http://server.corp.example:9000/c/x"],
     "Phones cannot open ::1: it is this server's own loopback name."),
    ("http://server:9000/c/x", "0.0.0.0", False, "http://192.168.1.5:9000/c/x",
     ["http://server.corp.example:9000/c/x"], "it is a short name that phones often cannot look up"),
    ("http://127.0.0.1:9000/c/x", "127.0.0.1", False, "http://127.0.0.1:9000/c/x", [],
     "This server listens only on 127.0.0.1, which no other device can reach"),
    ("http://[::1]:9000/c/x", "::1", False, "http://[::1]:9000/c/x", [], "This server listens only on ::1"),
    ("http://localhost:9000/c/x", "10.9.9.9", False, "http://10.9.9.9:9000/c/x", [],
     "This link uses this server's address 10.9.9.9 instead."),
    ("http://localhost:9000/c/x", "0.0.0.0", True, "http://localhost:9000/c/x",
     ["http://192.168.1.5:9000/c/x", "http://server.corp.example:9000/c/x"],
     "It is public_url in certdrop.ini, so it leads all the same: set public_url to a name phones can open, such as "
     "http://192.168.1.5:9000."),
    ("http://ca.example.org:9000/c/x", "0.0.0.0", False, "http://ca.example.org:9000/c/x", [], ""),
], ids=["loopback", "ipv6-loopback", "bare-name", "listening-on-loopback", "listening-on-ipv6-loopback",
        "listening-on-one-address", "loopback-public-url", "real-name"])
def test_one_rule_makes_the_link_its_note_and_its_alternatives(machine, url, bound, public, lead, alternatives, says):
    offer = certdrop.offer_link(url, bound, public)
    assert offer.url == lead and [link for link, _ in offer.alternatives] == alternatives
    assert says in offer.note and bool(offer.note) == bool(says) and offer.asked == url


@pytest.mark.parametrize(("listening", "base"), [
    ({"host": "0.0.0.0", "port": 9000}, "http://127.0.0.1:9000"),
    ({"host": "::1", "port": 9000}, "http://[::1]:9000"),
    ({"host": "10.9.9.9", "port": 80}, "http://10.9.9.9"),
    (None, "http://127.0.0.1:8080"),  # no server running: the ini's host and port
    ({"host": "0.0.0.0", "port": "9000"}, "http://127.0.0.1:8080"),  # not a record serve writes: ignored
], ids=["every-interface", "ipv6-loopback", "one-address", "no-record", "damaged-record"])
def test_the_command_line_names_the_address_the_server_recorded(tmp_path, listening, base):
    config = certdrop.Config(data_dir=tmp_path)
    if listening is not None:
        (tmp_path / "listening").write_text(json.dumps(listening))
    assert certdrop.cli_base_url(config) == base
    assert certdrop.cli_base_url(dataclasses.replace(config, public_url="https://ca.example.org")) == (
        "https://ca.example.org")


def test_result_page_has_no_loopback_warning_for_a_real_host(testapp, root_der):
    assert "Phones cannot open" not in upload(testapp, root_der).text


# -- HTTP: every word through the translation function ------------------------------------------------------------


class Bracketed(gettext.NullTranslations):
    """A pseudo-language: every message, once English has chosen it, wrapped in ⟦ ⟧. Words a page shows outside
    the brackets did not go through _() or ngettext()."""

    def gettext(self, message):
        return f"\u27e6{message}\u27e7"

    def ngettext(self, singular, plural, n):
        return f"\u27e6{singular if n == 1 else plural}\u27e7"


def visible_text(body):
    """Return what a page shows: its text without markup, style sheet or doctype, entities decoded."""
    text = re.sub(r"(?s)<style>.*?</style>", " ", body).replace("<wbr />", "")  # wbr splits no word
    return html.unescape(re.sub(r"<[^>]*>", " ", text))


#: What pages show that is data or notation, not words of certdrop's to translate.
NOT_WORDS_RE = re.compile(
    r"(https?|mailto):\S+"  # addresses
    r"|\[[a-z0-9-]+\] \(\d{3} [A-Za-z -]+\)"  # what ends a plain-text error for scripts: [not-found] (404 Not Found)
    r"|\[[a-z0-9-]+\]"  # the code for scripts that follows a finding: [expires-soon]
    r"|\b[0-9A-F]{2}(:[0-9A-F]{2})+\b"  # fingerprints and serial numbers, whole or in a Nokia page's short lines
    r"|\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC"  # times, as format_time writes them
    r"|SHA-256|SHA-1")  # the names of the fingerprints


def english_outside_brackets(text, allowed):
    """Return the English words (two letters or more) in *text* outside ⟦ ⟧, once the *allowed* strings (names
    of the certificates, say) and whatever NOT_WORDS_RE matches are taken out."""
    for phrase in sorted(allowed, key=len, reverse=True):
        text = text.replace(phrase, " ")
    text = NOT_WORDS_RE.sub(" ", text)
    while True:  # innermost brackets first: a translated label inside a translated sentence nests them
        inner = re.sub("\u27e6[^\u27e6\u27e7]*\u27e7", " ", text)
        if inner == text:
            break
        text = inner
    assert "\u27e6" not in text and "\u27e7" not in text, text
    return re.findall(r"[A-Za-z]{2,}", text)


@pytest.mark.slow
def test_every_page_speaks_through_the_translation_function(config, store, clock, pki, key_pem):
    agents = {family: USER_AGENTS[name][0] for family, name in (
        ("ios", "iphone-safari"), ("android", "android-chrome"), ("windows", "windows-edge"),
        ("macos", "macos-chrome"), ("linux", "linux-chrome"), ("firefox", "linux-firefox"), ("chromeos", "chromeos"))}
    s40 = USER_AGENTS["s40-6500s"][0]

    def fresh(environ=None, **settings):
        # A new app for every page: kept answers are keyed by language, which is "en" for every request yet, so an
        # app that had answered in English could answer from what it kept.
        return client(certdrop.make_app(dataclasses.replace(config, **settings), store, clock), **(environ or {}))

    texts = {}
    with certdrop.in_language(Bracketed()):
        texts["upload page"] = fresh().get("/").text
        texts["sign-in page"] = fresh(upload_auth="always").get("/signin").text
        browser = fresh(upload_auth="always", upload_password="the key")
        browser.post("/signin", {"key": "the key"}, status=303)
        texts["upload page, signed in"] = browser.get("/").text
        result = upload(fresh(), pem_of(pki.leaf, pki.root, pki.intermediate), "bundle.pem", host="www.example.com")
        texts["result page"] = result.text
        texts["result page with mail"] = upload(fresh(mail_host="mail.example.com"), pem_of(pki.expiring), status=201,
                                                ttl="1d").text
        token = token_of(result)
        texts["result page on localhost"] = upload(fresh({"HTTP_HOST": "localhost:8080"}), pem_of(pki.root),
                                                   status=200).text
        texts["upload as text"] = fresh().post("/", pem_of(pki.root), headers={
            "Content-Type": "application/x-pem-file", "User-Agent": "curl/8.5.0"}, status=200).text
        for family, agent in agents.items():
            texts[f"{family} page"] = fresh().get(f"/c/{token}", headers={"User-Agent": agent}).text
        texts["s60 page"] = fresh().get(f"/c/{token}?format=page", headers={"User-Agent": S60_AGENTS["e61i"]}).text
        for name in ("instagram-ios", "web-view-ios", "web-view-android"):
            texts[f"{name} page"] = fresh().get(f"/c/{token}", headers={"User-Agent": IN_APP_AGENTS[name][0]}).text
        intermediate = re.search(r"/c/([a-z0-9]+)", upload(fresh(), pem_of(pki.intermediate), status=200).text)[1]
        for family in ("ios", "macos", "android"):
            texts[f"{family} page of an intermediate"] = fresh().get(f"/c/{intermediate}",
                                                                     headers={"User-Agent": agents[family]}).text
        for accept in ("application/vnd.wap.xhtml+xml", "text/vnd.wap.wml"):
            texts[f"s40 page {accept}"] = fresh().get(f"/c/{token}", headers={"User-Agent": s40,
                                                                               "Accept": accept}).text
        texts["card"] = fresh().get(f"/c/{token}/card").text
        texts["profile"] = plistlib.loads(fresh().get(f"/c/{token}?format=mobileconfig").body)["PayloadDescription"]
        texts["404"] = fresh().get("/nothing-here", status=404).text
        texts["405"] = fresh().get("/signout", status=405).text
        texts["400"] = fresh().get(f"/c/{token}?format=bogus", status=400).text
        texts["413"] = fresh(max_upload=1024).post("/", b"x" * 2048, headers={"Content-Type": "text/plain"},
                                                   status=413).text
        texts["json error"] = fresh().get("/nothing-here", headers={"Accept": "application/json"},
                                          status=404).json["error"]["message"]
        texts["text error"] = fresh().get("/nothing-here", headers={"User-Agent": "curl/8.5.0"}, status=404).text
        texts["s40 error"] = fresh().get("/c/zzzzzzzz", headers={"User-Agent": s40, "Accept": "text/vnd.wap.wml"},
                                         status=404).text
        texts["private key refused"] = upload(fresh(), key_pem, "key.pem", status=422).text
        texts["server certificate refused"] = upload(fresh(), pem_of(pki.leaf), "leaf.pem", status=422).text
        entry = store.get(token)
        texts["mail"] = certdrop.mail_text([(f"http://ca.example.org/c/{token}", entry)], ("whc-direct", 106))
        texts["mail subject"] = certdrop.mail_subject(config, [(f"http://ca.example.org/c/{token}", entry)])
        admin = fresh(mail_host="mail.example.com")
        texts["admin page"] = admin.get("/admin").text
        texts["admin page, signed in"] = browser.get("/admin").text
        texts["admin link page"] = admin.get(f"/admin/link/{token}").text
        texts["admin revoke question"] = admin.get(f"/admin/link/{intermediate}/revoke").text
        texts["admin extended"] = admin.post(f"/admin/link/{intermediate}/extend", {"ttl": "cert"}).text
        texts["attention"] = certdrop.attention_text(certdrop.AdminIndex(store).links(), clock(),
                                                    dataclasses.replace(config, public_url="http://ca"))
        revoke = next(form for form in result.forms.values() if form.action.endswith(f"/c/{token}/revoke"))
        texts["revoked page"] = revoke.submit().text
        texts["410"] = fresh().get(f"/c/{token}", status=410).text
    certificates = [certdrop.inspect_certificate(cert) for cert in (pki.root, pki.intermediate, pki.leaf, pki.expiring)]
    allowed = {
        *(text for c in certificates for text in (c.name, c.subject, c.issuer)),  # shown as they are
        "certdrop",  # the program's name: the upload page's title and every page's footer
        "Instagram",  # an app's name, as BROWSERS names it
        *certdrop.LANGUAGES.values(),  # the picker names each language in its own words
        *(path.stem for path in store.directory.glob("??/*.json")),  # tokens, on the administrator's pages
        "www.example.com",  # the server name an upload gave
    }
    for page, text in texts.items():
        assert "\u27e6" in text, page
        shown = visible_text(text) if "<" in text else text
        assert english_outside_brackets(shown, allowed) == [], page


def test_translated_sentences_keep_their_placeholders_and_plurals():
    assert certdrop.TooManyRequests(1).message == "Too many requests from your address. Try again in 1 second."
    assert certdrop.TooManyRequests(1.5).message == "Too many requests from your address. Try again in 2 seconds."
    with certdrop.in_language(Bracketed()):
        assert certdrop.TooManyRequests(2).message == ("\u27e6Too many requests from your address. Try again in 2 "
                                                       "seconds.\u27e7")
        assert certdrop.format_duration(3600) == "\u27e61 hour\u27e7"
        assert certdrop.LinkGone("revoked", NOW).args[0] == (  # translated first, then the date filled in
            f"\u27e6This link was revoked on {certdrop.format_time(NOW)}.\u27e7")
    assert certdrop.format_duration(1) == "1 second" and certdrop.format_duration(2 * DAY) == "2 days"
    assert certdrop._("Sign in") == "Sign in"  # outside the block: English again


#: The sections of certdrop.py whose every sentence is for the people who use its pages and answers (the rest
#: speak to administrators: configuration errors, the store's damage reports, the command line, the log).
SPOKEN_SECTIONS = ("Errors", "Certificate doctor", "Device formats", "Links and lifetimes", "Rendering",
                   "HTTP plumbing", "Answers under /c/", "Who may change what is stored", "Application")

#: Strings in those sections that look like sentences and are not: (function or class, string).
NOT_SENTENCES = {
    ("RateLimiter", "newcomers while the table is full"),  # a log line's wording, in its class
    ("quiet_library_warnings", "Attribute's length must be"),  # the start of a library warning, to filter it
    ("ber_element", "truncated or too deeply nested"),  # a ValueError that ends as a refusal with its own words
    ("prepare", "control character in header "),  # a ValueError that would be certdrop's own bug
    # what an install command prints when the download is not the certificate: part of the command, in English
    ("refusal_text", "certdrop: nothing installed: the download failed or its SHA-256 fingerprint is not "),
    ("<module>", '{get} && sudo trust anchor --store "$d/ca.der"'),  # a LinuxSystem's command
}


def test_no_sentence_is_built_outside_the_translation_function():
    source = Path(certdrop.__file__).read_text(encoding="utf-8")
    lines = source.splitlines()
    banners = sorted((number, match[1]) for number, line in enumerate(lines, 1)
                     if (match := re.fullmatch(r"# ([A-Z][A-Za-z /<>]+?) #{5,}", line)))
    spoken = [(start, end) for (start, name), (end, _) in zip(banners, banners[1:] + [(len(lines) + 1, "")])
              if name in SPOKEN_SECTIONS]
    assert len(spoken) == len(SPOKEN_SECTIONS)
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def called(node):
        """Return the name of the function *node* is an argument of, and the function or class it is in."""
        call, where = None, "<module>"
        while node in parents:
            node = parents[node]
            if call is None and isinstance(node, ast.Call):
                call = getattr(node.func, "id", getattr(node.func, "attr", ""))
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                return call, node.name
        return call, where

    built = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("_", "N_", "ngettext"):
            # The message ids themselves are whole: literals, or constants marked with N_(), never built.
            messages = node.args[:2 if node.func.id == "ngettext" else 1]
            literal = all(isinstance(message, ast.Constant) for message in messages)
            if (node.func.id != "_" and not literal
                    or any(isinstance(message, (ast.JoinedStr, ast.BinOp)) for message in messages)):
                built.append((node.lineno, ast.unparse(node)[:80]))
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and re.search(r"[A-Za-z]+ [a-z]+ [a-z]+", node.value)):
            continue
        if isinstance(parents.get(node), ast.Expr) or not any(start <= node.lineno < end for start, end in spoken):
            continue  # a docstring, or words for administrators
        call, where = called(node)
        if call in ("_", "N_", "ngettext", "debug", "info", "warning", "error", "exception"):
            continue  # translated, or a log line for administrators
        if call == "Guide" and isinstance(parents[node], ast.Dict):
            continue  # a command to paste, the same in every language
        if (where, node.value) not in NOT_SENTENCES:
            built.append((node.lineno, node.value[:80]))
    assert built == []


# -- HTTP: languages --------------------------------------------------------------------------------------------

IPHONE = {"User-Agent": USER_AGENTS["iphone-safari"][0]}


def load_update_script():
    """Return locale/update as a module: the tests check the catalogs with what made them."""
    loader = importlib.machinery.SourceFileLoader("locale_update", str(certdrop.LOCALE_DIR / "update"))
    module = types.ModuleType(loader.name)
    module.__file__ = loader.path
    loader.exec_module(module)
    return module


def read_catalog(code):
    with (certdrop.LOCALE_DIR / code / "LC_MESSAGES" / "certdrop.po").open("rb") as file:
        return babel.messages.pofile.read_po(file, locale=code)


def placeholders(text):
    return sorted(re.findall(r"\{[a-z_]*\}", text))


@pytest.mark.parametrize(("accept_language", "cookie", "language"), [
    ("de", "", "de"),
    ("de-AT", "", "de"),  # a region finds its language
    ("de-Latn-AT", "", "de"),
    ("DE-at", "", "de"),
    ("fr;q=0.1, pl;q=0.9", "", "pl"),  # the highest q wins, not the first
    ("nl, ru", "", "nl"),  # the first of equals
    ("ru;q=0.5, nl;q=0.5", "", "ru"),
    ("de;q=0, nl;q=0.2", "", "nl"),  # q=0: not this one
    ("de;q=0", "", "en"),
    ("ja, zh-CN;q=0.9", "", "en"),  # none spoken: English
    ("ja, es;q=0.3", "", "es"),
    ("*", "", "en"),
    ("ja, *;q=0.5, fr;q=0.4", "", "en"),  # any language before French: the code's own
    ("en-GB, de;q=0.9", "", "en"),
    ("", "", "en"),
    ("\xe9;;q=x", "", "en"),  # garbage
    ("de;q=abc, es", "", "es"),  # a bad q spoils its own range only
    ("de;q=1.5, es;q=0.5", "", "es"),
    (";;;,,,", "", "en"),
    ("x" * 100_000, "", "en"),  # overlong: read in part, never an error
    ("ja," * 5000 + "de", "", "en"),  # past the ranges read
    ("ru", "certdrop_lang=de", "de"),  # the picker's choice wins
    ("", "a=1; certdrop_lang=pl; b=2", "pl"),
    ("ru", "certdrop_lang=xx", "ru"),  # a choice certdrop does not speak: the header again
    ("ru", "other_certdrop_lang=de", "ru"),
    ("nl", "a=certdrop_lang=de", "nl"),
    ("", "x" * 100_000 + "; certdrop_lang=de", "en"),  # overlong: read in part
], ids=lambda value: repr(value)[:40])
def test_the_reader_language_comes_from_the_picker_cookie_then_accept_language(accept_language, cookie, language):
    assert certdrop.reader_language(accept_language, cookie) == language


def test_pages_speak_the_accept_language_of_the_reader(testapp, root_token):
    page = testapp.get(f"/c/{root_token}", headers={**IPHONE, "Accept-Language": "de-AT, en;q=0.5"})
    assert '<html xmlns="http://www.w3.org/1999/xhtml" lang="de" xml:lang="de">' in page.text
    assert re.search(r"<title>\u201e[^<]+\u201c installieren</title>", page.text), page.text[:400]
    assert "Tippen Sie auf die Schaltfl\u00e4che und w\u00e4hlen Sie \u201eErlauben\u201c." in page.text
    english = testapp.get(f"/c/{root_token}", headers={**IPHONE, "Accept-Language": "ja"})
    assert 'lang="en"' in english.text and "Tap the button and choose Allow." in english.text


def test_a_language_chosen_on_the_picker_sticks_and_wins_over_accept_language(testapp, root_token):
    chosen = testapp.get(f"/lang/de?next=/c/{root_token}", status=303)
    assert chosen.headers["Location"] == f"/c/{root_token}"
    cookie = chosen.headers["Set-Cookie"]
    assert cookie.startswith("certdrop_lang=de; Path=/;") and "SameSite=Lax" in cookie and "HttpOnly" in cookie
    assert int(re.search(r"Max-Age=(\d+)", cookie)[1]) >= 180 * 86400
    for headers in (IPHONE, {**IPHONE, "Accept-Language": "ru, en;q=0.5"}):
        page = testapp.get(f"/c/{root_token}", headers=headers)
        assert 'lang="de"' in page.text and "Tippen Sie auf die Schaltfl\u00e4che" in page.text
        assert page.headers["Content-Language"] == "de"
    testapp.get(f"/lang/en?next=/c/{root_token}", status=303)
    assert "Tap the button and choose Allow." in testapp.get(f"/c/{root_token}", headers=IPHONE).text


def test_the_picker_cookie_keeps_to_the_prefix(config, store, clock):
    chosen = client(certdrop.make_app(config, store, clock), SCRIPT_NAME="/certdrop").get(
        "/lang/pl?next=/certdrop/c/abcdefgh", status=303)
    assert chosen.headers["Location"] == "/certdrop/c/abcdefgh"
    assert chosen.headers["Set-Cookie"].startswith("certdrop_lang=pl; Path=/certdrop/;")


@pytest.mark.parametrize("target", [
    "//evil.example/", "///evil.example", "/\\evil.example", "\\\\evil.example", "https://evil.example/",
    "http:/evil.example", "javascript:alert(1)", "evil.example", "/c/x\r\nSet-Cookie: a=b", "/c/x\nLocation: //e",
    "/c/\x00x", "/c/\u00e9", "", "/other", "/certdropx/c/abc", "/certdrop/" + "a" * 9000,
], ids=lambda target: repr(target)[:30])
def test_the_picker_sends_nobody_away_from_the_prefix(config, store, clock, target):
    prefixed = client(certdrop.make_app(config, store, clock), SCRIPT_NAME="/certdrop")
    chosen = prefixed.get("/lang/de?" + urllib.parse.urlencode({"next": target[:7000]}), status=303)
    assert chosen.headers["Location"] == "/certdrop/"


def test_the_pickers_way_back_is_percent_encoded_as_a_browser_sends_it(testapp):
    chosen = testapp.get("/lang/de?" + urllib.parse.urlencode({"next": '/c/<x>"{y}'}), status=303)
    assert chosen.headers["Location"] == "/c/%3Cx%3E%22%7By%7D"


def test_an_unknown_language_is_not_found_and_sets_no_cookie(testapp):
    for path in ("/lang/xx?next=/", "/lang/deu", "/lang/"):
        refused = testapp.get(path, status=404)
        assert "Set-Cookie" not in refused.headers


@pytest.mark.parametrize("path", ["/", "/signin", "/nothing-here", "/c/{token}", "/c/{token}/card", "/c/zzzzzzzz"])
def test_every_html_page_has_the_picker_and_says_its_language(testapp, root_token, path):
    path = path.format(token=root_token)
    page = testapp.get(path, headers={**IPHONE, "Accept-Language": "de"}, status="*")
    assert page.content_type == "text/html"
    assert page.headers["Content-Language"] == "de" and 'lang="de"' in page.text
    assert {"Accept-Language", "Cookie"} <= {name.strip() for name in page.headers["Vary"].split(",")}
    links = dict(re.findall(r'<a href="([^"]*/lang/[a-z]{2}\?next=[^"]*)"[^>]*>([^<]+)</a>', page.text))
    assert sorted(links.values()) == sorted(name for code, name in certdrop.LANGUAGES.items() if code != "de")
    assert "<b lang=\"de\">Deutsch</b>" in page.text
    expected_next = path if path.startswith("/c/") and not path.startswith("/c/zz") else "/"
    assert all(html.unescape(link).endswith("next=" + urllib.parse.quote(expected_next, safe="")) for link in links)
    ET.fromstring(page.body)  # still well-formed XML



@pytest.mark.parametrize("script_name", ["", "/ca"])
@pytest.mark.parametrize("page", ["/c/{token}/dev", "/admin", "/admin?state=live", "/admin/link/{token}",
                                  "/admin/link/{token}/revoke"])
def test_the_picker_on_the_developer_and_administration_pages_returns_there(app, root_token, page, script_name):
    reader = client(app, SCRIPT_NAME=script_name)
    path = page.format(token=root_token)
    shown = reader.get(path, headers={**IPHONE, "Accept-Language": "de"})
    hrefs = [html.unescape(href) for href in re.findall(r'<a href="([^"]*/lang/[a-z]{2}\?next=[^"]*)"', shown.text)]
    assert len(hrefs) == len(certdrop.LANGUAGES) - 1
    assert all(href.startswith(f"{script_name}/lang/") for href in hrefs), hrefs
    chosen = reader.get(hrefs[0].removeprefix(script_name), status=303)
    assert urllib.parse.urlsplit(chosen.headers["Location"])[2:4] == tuple(
        urllib.parse.urlsplit(script_name + path)[2:4])


def test_a_page_made_after_a_post_sends_its_picker_to_the_upload_page_under_the_prefix(app, root_token):
    done = client(app, SCRIPT_NAME="/ca").post(f"/admin/link/{root_token}/revoke", {"confirm": "yes"})
    assert re.findall(r'href="([^"]*)/lang/de\?next=([^"]*)"', done.text) == [("/ca", "%2Fca%2F")]

def test_upload_answers_merge_the_language_into_their_vary(testapp, root_der):
    result = upload(testapp, root_der)
    assert result.headers["Vary"] == "Accept, User-Agent, Accept-Language, Cookie"
    assert result.headers["Content-Language"] == "en"


@pytest.mark.parametrize("accept", ["application/vnd.wap.xhtml+xml", "text/vnd.wap.wml"])
def test_nokia_pages_say_their_language_in_utf8(testapp, root_token, accept):
    s40 = {"User-Agent": USER_AGENTS["s40-6500s"][0], "Accept": accept, "Accept-Language": "de, ru;q=0.5"}
    page = testapp.get(f"/c/{root_token}", headers=s40)
    assert page.headers["Content-Language"] == "de" and "charset=utf-8" in page.headers["Content-Type"]
    root = ET.fromstring(page.body)
    assert root.get("{http://www.w3.org/XML/1998/namespace}lang") == "de"
    assert "CA-Zertifikat" in page.body.decode("utf-8")


@pytest.mark.parametrize("code", [code for code in certdrop.LANGUAGES if code != "en"])
@pytest.mark.parametrize("device", ["iphone-safari", "android-chrome", "windows-edge", "s40-6500s"])
def test_each_language_has_its_own_device_pages(testapp, root_token, code, device):
    agent = {"User-Agent": USER_AGENTS[device][0]}
    page = testapp.get(f"/c/{root_token}", headers={**agent, "Accept-Language": code})
    english = testapp.get(f"/c/{root_token}", headers={**agent, "Accept-Language": "en"})
    assert page.headers["Content-Language"] == code and "Accept-Language" in page.headers["Vary"]
    text = page.body.decode("utf-8")
    assert f'lang="{code}"' in text and page.body != english.body
    english_lines = set(english.body.decode("utf-8").splitlines())
    # most of what a person reads is in the reader's language, not English left over
    prose = [line for line in text.splitlines() if re.search(r">[A-Za-z\u00c0-\u024f\u0400-\u04ff]{3,}", line)]
    assert sum(line not in english_lines for line in prose) >= len(prose) * 0.6, prose
    if device == "s40-6500s":  # an old phone: well-formed XHTML-MP in UTF-8, small enough for it
        ET.fromstring(page.body)
        assert len(page.body) < 3000, len(page.body)


def test_a_kept_answer_never_carries_a_set_cookie(app, testapp, root_token):
    testapp.get(f"/lang/ru?next=/c/{root_token}", status=303)
    for _ in range(3):
        for path in (f"/c/{root_token}", f"/c/{root_token}/ca.cer", "/c/zzzzzzzz", f"/c/{root_token}/card"):
            answer = testapp.get(path, headers={**IPHONE, "Accept-Language": "de"}, status="*")
            assert "Set-Cookie" not in answer.headers
    kept = [value for part in (app.answers.built, app.answers.errors, app.answers.refusals, app.answers.hot,
                               app.answers.unknown) for value in part.items.values()]
    assert app.answers.hot.items and app.answers.unknown.items and kept
    for prepared in kept:
        prepared = getattr(prepared, "prepared", prepared)
        assert "Set-Cookie" not in dict(prepared.headers)


def test_hot_answers_are_kept_apart_by_language(app, testapp, root_token):
    for _ in range(2):
        german = testapp.get(f"/c/{root_token}", headers={**IPHONE, "Accept-Language": "de"})
        english = testapp.get(f"/c/{root_token}", headers=IPHONE)
        chosen = testapp.get(f"/c/{root_token}", headers={**IPHONE, "Cookie": "certdrop_lang=de"})
        assert german.headers["Content-Language"] == chosen.headers["Content-Language"] == "de"
        assert english.headers["Content-Language"] == "en" and german.body != english.body
        assert chosen.body == german.body
    assert len(app.answers.hot) == 3


def test_the_profile_describes_itself_in_the_language_of_the_reader(testapp, root_token):
    german = testapp.get(f"/c/{root_token}/ca.mobileconfig", headers={**IPHONE, "Accept-Language": "de"})
    english = testapp.get(f"/c/{root_token}/ca.mobileconfig", headers=IPHONE)
    assert plistlib.loads(german.body)["PayloadDescription"].startswith("Installiert das CA-Zertifikat ")
    assert plistlib.loads(english.body)["PayloadDescription"].startswith("Installs the CA certificate ")
    assert german.headers["Content-Language"] == "de" and "Content-Language" not in testapp.get(
        f"/c/{root_token}/ca.cer", headers={**IPHONE, "Accept-Language": "de"}).headers


def corrupt_catalog(directory, how):
    mo = directory / "de" / "LC_MESSAGES" / "certdrop.mo"
    if how == "missing":
        mo.unlink()
    elif how == "corrupt":
        mo.write_bytes(b"\xde\x12\x04\x95" + os.urandom(64))
    elif how == "truncated":
        mo.write_bytes(mo.read_bytes()[:100])
    else:  # a Plural-Forms header that gettext cannot work out
        catalog = read_catalog("de")
        buffer = io.BytesIO()
        babel.messages.mofile.write_mo(buffer, catalog)
        mo.write_bytes(buffer.getvalue().replace(b"plural=(n != 1);", b"plural=(n != 1;;;"))


@pytest.mark.parametrize("how", ["missing", "corrupt", "truncated", "bad plural header"])
def test_a_broken_catalog_falls_back_to_english_with_one_log_line(config, store, clock, tmp_path, monkeypatch,
                                                                   caplog, root_der, how):
    shutil.copytree(certdrop.LOCALE_DIR, tmp_path / "locale")
    corrupt_catalog(tmp_path / "locale", how)
    with caplog.at_level(logging.INFO, logger="certdrop"):
        catalogs = certdrop.load_catalogs(tmp_path / "locale")
    assert [record.levelname for record in caplog.records] == ["WARNING"], caplog.text
    assert "Deutsch" in caplog.text and "English" in caplog.text
    assert set(catalogs) == set(certdrop.LANGUAGES) - {"de"}
    monkeypatch.setattr(certdrop, "CATALOGS", catalogs)
    testapp = client(certdrop.make_app(config, store, clock))
    token = uploaded_token(testapp, root_der)
    page = testapp.get(f"/c/{token}", headers={**IPHONE, "Accept-Language": "de, ru;q=0.1"})
    assert 'lang="ru"' in page.text  # the next language the reader takes
    page = testapp.get(f"/c/{token}", headers={**IPHONE, "Accept-Language": "de", "Cookie": "certdrop_lang=de"})
    assert 'lang="en"' in page.text and "Tap the button and choose Allow." in page.text
    assert page.headers["Content-Language"] == "en"


def test_without_a_locale_directory_certdrop_speaks_english_and_says_nothing(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="certdrop"):
        assert set(certdrop.load_catalogs(tmp_path / "nowhere")) == {"en"}
    assert caplog.records == []


@pytest.mark.parametrize("code", [code for code in certdrop.LANGUAGES if code != "en"])
def test_the_compiled_catalogs_match_their_po_files(code):
    buffer = io.BytesIO()
    babel.messages.mofile.write_mo(buffer, read_catalog(code))
    buffer.seek(0)
    with (certdrop.LOCALE_DIR / code / "LC_MESSAGES" / "certdrop.mo").open("rb") as file:
        committed = gettext.GNUTranslations(file)
    assert committed._catalog == gettext.GNUTranslations(buffer)._catalog, "run locale/update"
    assert code in certdrop.CATALOGS


def test_every_message_of_the_code_is_in_the_template_and_every_catalog():
    template = load_update_script().extract()
    ids = {message.id if isinstance(message.id, str) else message.id[0] for message in template if message.id}
    with (certdrop.LOCALE_DIR / "certdrop.pot").open("rb") as file:
        committed = {m.id if isinstance(m.id, str) else m.id[0] for m in babel.messages.pofile.read_po(file) if m.id}
    assert ids == committed, "run locale/update"
    # Babel's extractor does not look inside f-strings; Python's own parser does: every literal message is seen
    tree = ast.parse(Path(certdrop.__file__).read_text(encoding="utf-8"))
    literal = {node.args[0].value for node in ast.walk(tree)
               if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("_", "N_", "ngettext")
               and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)}
    assert literal - ids == set(), "a message the extractor cannot see (inside an f-string?)"
    for code in certdrop.LANGUAGES:
        if code != "en":
            catalog = read_catalog(code)
            assert ids - {message.id if isinstance(message.id, str) else message.id[0]
                          for message in catalog if message.id} == set(), code  # iterating leaves obsolete ones out


@pytest.mark.parametrize("code", [code for code in certdrop.LANGUAGES if code != "en"])
def test_every_message_is_translated_in_every_catalog_with_the_same_placeholders(code):
    catalog = read_catalog(code)
    problems = []
    for message in catalog:
        if not message.id:
            continue
        ids = message.id if isinstance(message.id, tuple) else (message.id,)
        strings = message.string if isinstance(message.string, tuple) else (message.string,)
        if message.fuzzy or not all(strings):
            problems.append(("untranslated" if not message.fuzzy else "fuzzy", ids[0][:60]))
        elif any(placeholders(string) != placeholders(ids[-1]) for string in strings):
            problems.append(("placeholders", ids[0][:60]))
    assert problems == []


@pytest.mark.parametrize(("code", "forms"), [
    ("pl", {1: "1 minuta", 2: "2 minuty", 5: "5 minut", 12: "12 minut", 21: "21 minut", 22: "22 minuty",
            111: "111 minut"}),
    ("ru", {1: "1 \u043c\u0438\u043d\u0443\u0442\u0430", 2: "2 \u043c\u0438\u043d\u0443\u0442\u044b",
            5: "5 \u043c\u0438\u043d\u0443\u0442", 12: "12 \u043c\u0438\u043d\u0443\u0442",
            21: "21 \u043c\u0438\u043d\u0443\u0442\u0430", 22: "22 \u043c\u0438\u043d\u0443\u0442\u044b",
            111: "111 \u043c\u0438\u043d\u0443\u0442"}),
])
def test_polish_and_russian_count_in_three_forms_each_keeping_its_number(code, forms):
    header = read_catalog(code).plural_forms
    assert header.startswith("nplurals=3;")
    with certdrop.in_language(certdrop.translations_for(code)):
        said = {count: certdrop.ngettext("{count} minute", "{count} minutes", count).format(count=count)
                for count in forms}
        assert said == forms
        assert certdrop.format_duration(300) == forms[5]



# -- HTTP: who may upload --------------------------------------------------------------------------------------


@pytest.fixture
def keyed(config, store, clock):
    """Return the app with a known upload key, as a client on the company network would reach it."""
    return app_with(config, store, clock, upload_password=KEY)


def test_upload_from_another_machine_without_the_key_answers_401_and_stores_nothing(keyed, config, root_der):
    refusal = post_cert(client(keyed, REMOTE_ADDR=REMOTE), root_der, 401, {"User-Agent": "curl/8.5.0"})
    assert refusal.headers["WWW-Authenticate"].startswith('Basic realm="certdrop uploads"')
    assert "upload key" in refusal.text and KEY not in refusal.text
    assert files_under(config.data_dir) == []


def test_browser_without_the_key_gets_the_sign_in_form_not_a_password_dialog(keyed, root_der):
    refusal = post_cert(client(keyed, REMOTE_ADDR=REMOTE), root_der, 401)
    assert not refusal.headers["WWW-Authenticate"].startswith("Basic")
    assert refusal.html.find("form", action="/signin") is not None and KEY not in refusal.text


def test_upload_with_the_key_over_http_basic_works_from_another_machine(keyed, root_der):
    post_cert(client(keyed, REMOTE_ADDR=REMOTE), root_der, 201, basic(KEY))


@pytest.mark.parametrize("header", ["X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "Forwarded",
                                    "X-Real-IP"])
def test_a_loopback_request_passed_on_by_a_proxy_needs_the_key(keyed, root_der, header):
    post_cert(client(keyed), root_der, 401, {header: "for=203.0.113.9" if header == "Forwarded" else "203.0.113.9"})


def test_requests_from_the_trusted_proxy_need_the_key_even_without_forwarding_headers(config, store, clock, root_der):
    behind_iis = app_with(config, store, clock, upload_password=KEY, trusted_proxy="127.0.0.1")
    post_cert(client(behind_iis), root_der, 401)
    post_cert(client(behind_iis), root_der, 201, basic(KEY))


def test_upload_auth_always_asks_loopback_too(config, store, clock, root_der):
    post_cert(client(app_with(config, store, clock, upload_auth="always", upload_password=KEY)), root_der, 401)


def test_upload_auth_none_lets_anyone_on_the_allowed_networks_upload(config, store, clock, root_der):
    post_cert(client(app_with(config, store, clock, upload_auth="none"), REMOTE_ADDR=REMOTE), root_der, 201)


@pytest.mark.parametrize("address", ["203.0.113.5", "2001:db8::5", "::ffff:8.8.8.8", "not-an-address", ""])
def test_uploads_from_outside_the_upload_networks_answer_403_even_with_the_key(keyed, config, root_der, address):
    refusal = post_cert(client(keyed, REMOTE_ADDR=address), root_der, 403, basic(KEY))
    assert "upload_networks" in html_text(refusal)
    assert files_under(config.data_dir) == []


def test_ipv4_mapped_addresses_count_as_the_ipv4_address_they_carry(keyed, root_der):
    post_cert(client(keyed, REMOTE_ADDR="::ffff:192.168.1.20"), root_der, 201, basic(KEY))


def test_wrong_keys_are_rate_limited_even_when_the_right_one_follows(keyed, root_der):
    remote = client(keyed, REMOTE_ADDR=REMOTE)
    for _ in range(certdrop.SIGN_IN_FAILURE_BURST):
        post_cert(remote, root_der, 401, basic("guess"))
    limited = post_cert(remote, root_der, 429, basic(KEY))
    assert int(limited.headers["Retry-After"]) >= 1


def test_the_upload_key_is_made_once_kept_private_and_printed_by_upload_key(ini, tmp_path, capsys):
    assert cli(ini, "upload-key") == 0
    key = capsys.readouterr().out.strip()
    assert re.fullmatch(r"([a-z2-9]{5}-){3}[a-z2-9]{5}", key)
    path = tmp_path / "data" / "upload.key"
    assert path.read_text().strip() == key and path.stat().st_mode & 0o777 == 0o600
    assert cli(ini, "upload-key") == 0 and capsys.readouterr().out.strip() == key
    assert cli(ini, "upload-key", "--new") == 0
    assert capsys.readouterr().out.strip() not in ("", key)


@pytest.mark.parametrize("damaged", [b"\xff\xfe\x00k\x00e\x00y", b"key\x1b[2J", b"k" * 2000],
                         ids=["not-ascii", "a-control-character", "longer-than-a-line-of-typing"])
def test_a_damaged_upload_key_file_is_replaced_by_a_new_key(ini, tmp_path, capsys, damaged):
    path = tmp_path / "data" / "upload.key"
    path.parent.mkdir()
    path.write_bytes(damaged)
    assert cli(ini, "upload-key") == 0
    key = capsys.readouterr().out.strip()
    assert re.fullmatch(r"([a-z2-9]{5}-){3}[a-z2-9]{5}", key) and path.read_text().strip() == key


def test_upload_key_defers_to_upload_password(tmp_path, capsys):
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\ndata_dir = data\nupload_password = secret\n")
    assert certdrop.main(["-c", str(ini), "upload-key"]) == 1
    assert "upload_password" in capsys.readouterr().err and not (tmp_path / "data" / "upload.key").exists()


def test_the_generated_key_lets_a_remote_script_upload(app, store, root_der):
    key, created = store.upload_key()
    assert created
    post_cert(client(app, REMOTE_ADDR=REMOTE), root_der, 201, basic(key))


# -- signing in with a browser

def sign_in(app_client, key=KEY, status=303):
    return app_client.post("/signin", {"key": key}, status=status)


def test_the_upload_page_asks_a_remote_browser_to_sign_in_first(keyed):
    page = client(keyed, REMOTE_ADDR=REMOTE).get("/")
    assert page.html.find("input", type="password") is not None and page.html.find("input", type="file") is None


def test_signing_in_sets_a_strict_http_only_cookie_and_opens_the_upload_form(keyed, root_der):
    remote = client(keyed, REMOTE_ADDR=REMOTE)
    signed_in = sign_in(remote)
    cookie = signed_in.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/;" in cookie and "Secure" not in cookie
    assert KEY not in cookie and signed_in.headers["Location"] == "http://ca.example.org:8080/"
    page = remote.get("/")
    assert page.html.find("input", type="file") is not None and page.html.find("form", action="/signout")
    post_cert(remote, root_der, 201)


def test_url_encoded_fields_are_the_bytes_sent_whatever_their_characters(config, store, clock, root_token):
    remote = client(app_with(config, store, clock, upload_password="p\u00e4sswort\u20ac"), REMOTE_ADDR=REMOTE)
    sign_in(remote, key="p\u00e4sswort\u20ac")  # sent as UTF-8, percent-encoded, as the sign-in form sends it
    for key in ("\u20ac", "\u0436", "p\u00e4sswort"):  # wrong keys: refused, whatever their characters
        sign_in(client(remote.app, REMOTE_ADDR=REMOTE), key=key, status=401)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for path, body in ((f"/c/{root_token}/revoke", "secret=%ff"), ("/", "pem=%E2%82%AC"), ("/", "pem=%ff&ttl=%ff")):
        answer = client(remote.app).post(path, body, headers=form, expect_errors=True)
        assert 400 <= answer.status_int < 500, (path, body, answer.status)


def test_a_wrong_key_at_sign_in_shows_the_form_again_and_sets_no_cookie(keyed):
    refused = sign_in(client(keyed, REMOTE_ADDR=REMOTE), key="guess", status=401)
    assert "That is not the upload key" in html_text(refused) and "Set-Cookie" not in refused.headers
    assert refused.html.find("input", type="password") is not None


def test_signing_out_ends_the_session(keyed, root_der):
    remote = client(keyed, REMOTE_ADDR=REMOTE)
    sign_in(remote)
    assert "Max-Age=0" in remote.post("/signout", status=303).headers["Set-Cookie"]
    post_cert(remote, root_der, 401)


def test_a_signed_out_cookie_sent_again_from_another_address_cannot_upload(keyed, root_der):
    remote = client(keyed, REMOTE_ADDR=REMOTE)
    sign_in(remote)
    cookie = remote.cookies[certdrop.SESSION_COOKIE]
    remote.post("/signout", status=303)
    elsewhere = client(keyed, REMOTE_ADDR="192.168.1.77")
    elsewhere.set_cookie(certdrop.SESSION_COOKIE, cookie)
    post_cert(elsewhere, root_der, 401)


def test_a_sign_out_is_kept_in_the_data_directory_so_a_new_app_never_revives_it(keyed, config, store, clock,
                                                                                root_der):
    remote = client(keyed, REMOTE_ADDR=REMOTE)
    sign_in(remote)
    cookie = remote.cookies[certdrop.SESSION_COOKIE]
    remote.post("/signout", status=303)
    restarted = client(app_with(config, certdrop.make_store(config, clock), clock, upload_password=KEY),
                       REMOTE_ADDR=REMOTE)
    restarted.set_cookie(certdrop.SESSION_COOKIE, cookie)
    post_cert(restarted, root_der, 401)


def test_signing_out_ends_only_that_session(keyed, root_der):
    first, second = client(keyed, REMOTE_ADDR=REMOTE), client(keyed, REMOTE_ADDR=REMOTE)
    sign_in(first)
    sign_in(second)
    first.post("/signout", status=303)
    post_cert(second, root_der, 201)


def test_an_oversized_sign_out_file_ends_every_older_session_but_not_newer_ones(keyed, config, clock, root_der):
    before = client(keyed, REMOTE_ADDR=REMOTE)
    sign_in(before)
    config.data_dir.mkdir(exist_ok=True)
    (config.data_dir / certdrop.SignOuts.FILE).write_bytes(b"x" * (certdrop.MAX_SIGNED_OUT_BYTES + 1))
    clock.advance(2)
    keyed.gate.signed_out._checked = -math.inf  # as if a second had passed since the file was last looked at
    post_cert(before, root_der, 401)
    clock.advance(1)
    after = client(keyed, REMOTE_ADDR=REMOTE)
    sign_in(after)
    post_cert(after, root_der, 201)


def test_a_session_ends_after_twelve_hours(keyed, clock, root_der):
    remote = client(keyed, REMOTE_ADDR=REMOTE)
    sign_in(remote)
    clock.advance(certdrop.SESSION_SECONDS + 1)
    post_cert(remote, root_der, 401)


def session_of(signed_in):
    """Return the Cookie header that a browser sends after the sign-in answer *signed_in*."""
    return {"Cookie": signed_in.headers["Set-Cookie"].split(";")[0]}


def test_a_forged_or_foreign_session_cookie_is_refused(config, store, clock, keyed, root_der):
    remote = client(keyed, REMOTE_ADDR=REMOTE)
    post_cert(remote, root_der, 401, {"Cookie": f"{certdrop.SESSION_COOKIE}={int(NOW) + 3600}.{'0' * 64}"})
    other = client(app_with(config, store, clock, upload_password="another key"), REMOTE_ADDR=REMOTE)
    post_cert(remote, root_der, 401, session_of(sign_in(other, key="another key")))
    post_cert(remote, root_der, 201, session_of(sign_in(remote)))


def test_a_session_works_on_every_process_that_shares_the_key(config, clock, keyed, root_der):
    cookie = session_of(sign_in(client(keyed, REMOTE_ADDR=REMOTE)))
    second = client(app_with(config, certdrop.make_store(config, clock), clock, upload_password=KEY),
                    REMOTE_ADDR=REMOTE)
    post_cert(second, root_der, 201, cookie)


def test_a_new_upload_key_signs_everybody_out(app, store, root_der, ini):
    remote = client(app, REMOTE_ADDR=REMOTE)
    cookie = session_of(sign_in(remote, key=store.upload_key()[0]))
    store.upload_key(replace=True)
    post_cert(remote, root_der, 401, cookie)


def test_the_session_cookie_is_scoped_to_the_public_prefix_and_secure_over_https(config, store, clock):
    app = app_with(config, store, clock, upload_password=KEY, public_url="https://intranet.example.com/certdrop")
    cookie = sign_in(client(app, REMOTE_ADDR=REMOTE)).headers["Set-Cookie"]
    assert "Path=/certdrop/;" in cookie and cookie.endswith("; Secure")


# -- cross-site requests

@pytest.mark.parametrize("headers", [{"Origin": "http://evil.example"}, {"Origin": "null"},
                                     {"Origin": "http://ca.example.org:8081"}, {"Sec-Fetch-Site": "cross-site"},
                                     {"Origin": "http://ca.example.org:8080", "Sec-Fetch-Site": "cross-site"}],
                         ids=["other-site", "null-origin", "other-port", "fetch-metadata", "both"])
def test_a_forged_cross_site_upload_stores_nothing(testapp, config, root_der, headers):
    refusal = post_cert(testapp, root_der, 403, headers)
    assert "another web site" in html_text(refusal)
    assert files_under(config.data_dir) == []


def test_every_page_with_a_form_lets_the_browser_send_its_real_origin(keyed, root_der):
    remote = client(keyed, REMOTE_ADDR=REMOTE)
    for page in (remote.get("/"), remote.get("/signin"), post_cert(remote, root_der, 401),
                 sign_in(remote, key="guess", status=401)):
        assert page.html.find("form") is not None
        assert page.headers["Referrer-Policy"] == "same-origin", "no-referrer makes browsers send Origin: null"


def test_cross_site_sign_in_and_sign_out_are_refused(keyed):
    remote = client(keyed, REMOTE_ADDR=REMOTE)
    remote.post("/signin", {"key": KEY}, headers={"Origin": "http://evil.example"}, status=403)
    remote.post("/signout", headers={"Sec-Fetch-Site": "cross-site"}, status=403)


def test_same_origin_browsers_and_scripts_without_origin_may_upload(testapp, root_der, other_der):
    post_cert(testapp, root_der, 201, {"Origin": "http://ca.example.org:8080", "Sec-Fetch-Site": "same-origin"})
    post_cert(testapp, other_der, 201, {"User-Agent": "curl/8.5.0"})


def test_with_public_url_the_origin_must_be_the_public_one(config, store, clock, root_der):
    app = client(app_with(config, store, clock, public_url="http://intranet.example.com/certdrop"))
    post_cert(app, root_der, 403, {"Origin": "http://ca.example.org:8080"})
    post_cert(app, root_der, 201, {"Origin": "http://intranet.example.com"})


# -- rate limits

def test_guessing_tokens_runs_into_429_and_then_even_known_tokens_wait(testapp, clock, root_der):
    token = uploaded_token(testapp, root_der)
    for guess in range(certdrop.LOOKUP_BURST):
        testapp.get(f"/c/{'zzzzzz' + certdrop.TOKEN_ALPHABET[guess] * 2}", status=404)
    limited = testapp.get("/c/zzzzzzzz", status=429)
    assert int(limited.headers["Retry-After"]) >= 1
    testapp.get(f"/c/{token}", status=429)  # or a guesser would still tell live tokens from dead ones
    clock.advance(int(limited.headers["Retry-After"]))
    testapp.get(f"/c/{token}", status=200)


def test_other_clients_are_not_held_up_by_a_guesser(app, root_der):
    guesser, other = client(app, REMOTE_ADDR="10.0.0.7"), client(app, REMOTE_ADDR="10.0.0.8")
    token = uploaded_token(client(app), root_der)
    for _ in range(certdrop.LOOKUP_BURST + 1):
        guesser.get("/c/zzzzzzzz", expect_errors=True)
    other.get(f"/c/{token}", status=200)


def test_ipv6_clients_count_per_64(app):
    for host in range(certdrop.LOOKUP_BURST):
        client(app, REMOTE_ADDR=f"2001:db8:1:2::{host + 1}").get("/c/zzzzzzzz", status=404)
    client(app, REMOTE_ADDR="2001:db8:1:2:ffff::1").get("/c/zzzzzzzz", status=429)
    client(app, REMOTE_ADDR="2001:db8:1:3::1").get("/c/zzzzzzzz", status=404)


def test_lookup_limit_0_turns_the_limit_off(config, store, clock):
    unlimited = client(app_with(config, store, clock, lookup_limit=0))
    for _ in range(3 * certdrop.LOOKUP_BURST):
        unlimited.get("/c/zzzzzzzz", status=404)


def test_uploads_are_rate_limited_per_client(testapp, root_der):
    for _ in range(certdrop.UPLOAD_BURST):
        post_cert(testapp, root_der, "*")
    assert int(post_cert(testapp, root_der, 429).headers["Retry-After"]) >= 1


# -- property test: any request gets an answer, never a 500 ---------------------------------------------------

HEADER_NAMES = ["User-Agent", "Accept", "Accept-Language", "Host", "Origin", "Referer", "Cookie", "Authorization",
                "If-None-Match", "Sec-Fetch-Site", "X-OperaMini-Phone-UA", "X-UCBrowser-Device-UA", "Device-Stock-UA",
                "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Forwarded-Port", "X-Forwarded-Prefix",
                "X-Real-IP", "Forwarded", "Transfer-Encoding"]
LATIN_1 = st.text(st.characters(max_codepoint=255), max_size=80)  # WSGI carries header values as latin-1 text

#: Header values that gave a 500 once, or are the kind that could: ports past 65535, brackets around no IPv6
#: address, more digits than int() takes, non-ASCII where base64 is expected, names too long for a QR code.
HOSTILE_HEADER_VALUES = [
    "x:99999", "localhost:65536", "[::1]:99999", "x:0", "x:", "[", "[::::]", "[1.2.3.4]", "[v1.x]", "a.b" + "x" * 3000,
    "http://[", "http://[::::]", "http://[1.2.3.4]", "http://x:99999", "null",
    f"certdrop_session={'9' * 5000}.x", f"certdrop_session={'9' * 20}.x", "certdrop_session=\xe9.x",
    "Basic \xe9", "Basic ////", "Basic ====", "basic", "9" * 5000, "-1", "*/*;q=" + "9" * 5000, "text/html;q=nan",
    "for=x;proto=http;host=x:99999", 'for="[";host="[::::]"', "/" + "a" * 3000, "%", "%zz", "\x00\r\n", 'W/"x", *',
]
HEADER_VALUES = st.one_of(
    LATIN_1, st.sampled_from(HOSTILE_HEADER_VALUES),
    st.text(max_size=40).map(lambda text: text.encode("utf-8").decode("latin-1")),  # UTF-8, as a server passes it on
    st.tuples(st.sampled_from(["x", "localhost", "127.0.0.1", "[::1]", "[::]", "ca.example.org", ""]),
              st.text("0123456789", max_size=12)).map(":".join),
    st.text("0123456789", min_size=1, max_size=6000))


@functools.cache
def fuzzed_app(proxy_headers=None):
    """Return an app with one live link, shared by the examples (hypothesis runs them many times per test); with
    *proxy_headers*, behind a trusted proxy that may send those. No rate limit: a 429 would hide what it answers."""
    directory = Path(tempfile.mkdtemp(prefix="certdrop-fuzz-"))
    config = certdrop.Config(data_dir=directory, upload_password=KEY, lookup_limit=0, upload_limit=0,
                             allowed_hosts=TEST_HOSTS, trusted_proxy="*" if proxy_headers else "",
                             trusted_proxy_headers=proxy_headers or certdrop.Config.trusted_proxy_headers)
    app = certdrop.make_app(config, certdrop.make_store(config, FakeClock()), FakeClock())
    app.gate.sign_in_failures = app.mail_budget = certdrop.RateLimiter(0, 0)
    token = app.store.add(certdrop.load_der(mutation_corpus()[0]), NOW + DAY)[0].token
    return app, token


@st.composite
def requests(draw):
    app, token = fuzzed_app()
    path = draw(st.one_of(
        st.sampled_from(["/", "/signin", "/signout", f"/c/{token}", f"/c/{token}/", f"/c/{token.upper()}/x.cer",
                         f"/c/{token}/ca.alt.whc", "/c/zzzzzzzz", "/c/../../etc/passwd"]),
        st.text(st.characters(max_codepoint=255), max_size=60).map(lambda text: "/" + text),
        LATIN_1.map(lambda text: f"/c/{token}/{text}")))
    environ = {
        "REQUEST_METHOD": draw(st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "get", "BREW"])),
        "PATH_INFO": path, "QUERY_STRING": draw(st.one_of(st.just("format=der"), LATIN_1)),
        "SCRIPT_NAME": draw(st.sampled_from(["", "/certdrop"])), "SERVER_NAME": "localhost", "SERVER_PORT": "80",
        "REMOTE_ADDR": draw(st.sampled_from(["127.0.0.1", "192.168.1.9", "2001:db8::1", "", "junk"])),
        "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(draw(st.binary(max_size=600))),
    }
    environ["CONTENT_LENGTH"] = draw(st.one_of(st.just(str(len(environ["wsgi.input"].getvalue()))), LATIN_1))
    environ["CONTENT_TYPE"] = draw(st.one_of(
        st.sampled_from(["multipart/form-data; boundary=x", "application/x-www-form-urlencoded", ""]), LATIN_1))
    for name in draw(st.lists(st.sampled_from(HEADER_NAMES), max_size=5, unique=True)):
        environ["HTTP_" + name.upper().replace("-", "_")] = draw(LATIN_1)
    return environ


class ErrorRecords(logging.Handler):
    """Keep the ERROR records certdrop logs while it is attached: an answer below 500 may still hide a traceback."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def answer_of(app, environ):
    """Return (status, headers, body) of *app* for *environ*, asserting nothing was logged at ERROR on the way."""
    answers, errors, logger = [], ErrorRecords(), logging.getLogger("certdrop")
    logger.addHandler(errors)
    try:
        body = b"".join(app(environ, lambda status, headers: answers.append((status, headers))))
    finally:
        logger.removeHandler(errors)
    assert not errors.records, [record.getMessage() for record in errors.records]
    (status, headers), = answers
    return int(status[:3]), headers, body


@pytest.mark.slow  # 250 examples, about 0.8 s
@PROPERTY_SETTINGS
@hypothesis.given(requests())
def test_any_request_gets_an_answer_below_500_with_clean_headers(environ):
    app, _ = fuzzed_app()
    status, headers, body = answer_of(app, environ)
    assert status < 500, (status, body[:300])
    for name, value in headers:
        assert value.isprintable() and "\r" not in value and "\n" not in value, (name, value)


#: Every route, each asked with GET and POST (one of them answers 405), by a token that exists and one that does not.
ROUTE_PATHS = ["/", "/signin", "/signout", "/mail", "/healthz", "/c/{token}", "/c/{token}/card", "/c/{token}/qr.svg",
               "/c/{token}/qr.png", "/c/{token}/x.crt", "/c/{token}/revoke", "/c/{token}/dev", "/c/zzzzzzzz"]

#: How each app of fuzzed_app is reached: directly, or behind a proxy trusted with X-Forwarded-* or Forwarded.
PROXY_HEADERS = [None, certdrop.Config.trusted_proxy_headers, ("forwarded",)]


def route_environ(token, method, path, headers, remote_addr="127.0.0.1"):
    """Return the environ of a request to a route of ROUTE_PATHS with *headers* ({name: value}), from
    *remote_addr*, with a form body that names every field a route reads; Content-Length and Content-Type among
    *headers* replace the body's own."""
    body = f"ttl=1d&host=x&key=k&secret=s&to=a%40b.example&tokens={token}".encode()
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path.format(token=token), "QUERY_STRING": "",
               "SCRIPT_NAME": "", "SERVER_NAME": "localhost", "SERVER_PORT": "80", "REMOTE_ADDR": remote_addr,
               "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)),
               "CONTENT_TYPE": "application/x-www-form-urlencoded"}
    for name, value in headers.items():
        key = name.upper().replace("-", "_")
        environ[key if key in ("CONTENT_LENGTH", "CONTENT_TYPE") else "HTTP_" + key] = value
    return environ


@pytest.mark.slow  # about 1.7 s of examples
@hypothesis.settings(PROPERTY_SETTINGS, max_examples=200)
@hypothesis.given(st.sampled_from(PROXY_HEADERS), st.sampled_from(["GET", "POST"]), st.sampled_from(ROUTE_PATHS),
                  st.dictionaries(st.sampled_from([*HEADER_NAMES, "Content-Length", "Content-Type"]), HEADER_VALUES,
                                  min_size=1, max_size=4),
                  st.sampled_from(["127.0.0.1", "192.168.1.9", "203.0.113.7"]))
def test_any_header_value_on_any_route_gets_an_answer_below_500_and_logs_no_error(proxy_headers, method, path,
                                                                                  headers, remote_addr):
    app, token = fuzzed_app(proxy_headers)
    status, _, body = answer_of(app, route_environ(token, method, path, headers, remote_addr))
    assert status < 500, (status, body[:300])


#: Requests that answered 500 before every header parse was made total: (header, value, routes it broke).
HEADERS_THAT_BROKE = {
    "host-port-past-65535": ("Host", "x:99999", ["/c/{token}", "/c/{token}/card", "/c/{token}/dev",
                                                 "/c/{token}/qr.svg"]),
    "host-brackets-around-no-ipv6": ("Host", "[1.2.3.4]", ["/c/{token}", "/c/{token}/card", "/signout"]),
    "host-too-long-for-a-qr-code": ("Host", "a.b" + "x" * 3000, ["/c/{token}", "/c/{token}/card", "/c/{token}/qr.png"]),
    "origin-bracket": ("Origin", "http://[", ["/", "/signin", "/signout", "/mail", "/c/{token}/revoke"]),
    "origin-brackets-around-no-ipv6": ("Origin", "http://[::::]", ["/", "/signin", "/signout"]),
    "session-of-5000-digits": ("Cookie", f"certdrop_session={'9' * 5000}.x", ["/", "/mail"]),
    "basic-not-ascii": ("Authorization", "Basic \xe9", ["/", "/mail"]),
    "forwarded-host-port-past-65535": ("X-Forwarded-Host", "x:99999", ["/c/{token}", "/c/{token}/card"]),
    "forwarded-host-in-brackets": ("Forwarded", 'for=x;host="[::::]"', ["/c/{token}", "/signout"]),
    "prefix-too-long-for-a-qr-code": ("X-Forwarded-Prefix", "/" + "a" * 3000, ["/c/{token}", "/c/{token}/qr.png"]),
}


@pytest.mark.parametrize("case", HEADERS_THAT_BROKE, ids=HEADERS_THAT_BROKE)
def test_header_values_that_once_gave_500_get_an_answer_below_500(case):
    name, value, paths = HEADERS_THAT_BROKE[case]
    for proxy_headers in PROXY_HEADERS:  # behind a proxy, the session and the key are checked for loopback too
        app, token = fuzzed_app(proxy_headers)
        for path in paths:
            method = "GET" if path.startswith("/c/") and not path.endswith("revoke") else "POST"
            status, _, body = answer_of(app, route_environ(token, method, path, {name: value}))
            assert status < 500, (proxy_headers, path, status, body[:300])


def test_a_broken_host_under_c_gets_links_on_the_servers_own_name():
    app, token = fuzzed_app()
    environ = route_environ(token, "GET", "/c/{token}", {"Host": "ca.example.org:99999"})
    environ.update(SERVER_NAME="ca.example.net", SERVER_PORT="8080", HTTP_USER_AGENT=USER_AGENTS["windows-edge"][0])
    status, _, body = answer_of(app, environ)
    assert status == 200 and f"http://ca.example.net:8080/c/{token}".encode() in body and b"99999" not in body


@pytest.mark.parametrize("host", [".", "..", ".:8080", "a..b", ".example.org", "-"])
def test_a_host_of_dots_or_empty_labels_names_no_server_and_gets_no_upload(testapp, root_der, host):
    refused = post_cert(testapp, root_der, 400, {"Host": host})
    assert certdrop.host_of(host) in (None, "-") and ("not a valid host name" in refused.text or host == "-")
    assert certdrop.host_of("ca.example.org.") == "ca.example.org"  # a final dot is still a name


def test_a_broken_host_elsewhere_is_refused_with_400(testapp):
    answer = testapp.post("/signout", headers={"Host": "x:99999"}, status=400)
    assert "The Host header is not a valid host name." in html_text(answer)


# -- HTTP: uploads from scripts ------------------------------------------------------------------------------

RAW_TYPES = {
    "application/pkix-cert": lambda pki: der_of(pki.root),
    "application/x-x509-ca-cert": lambda pki: der_of(pki.root),
    "application/octet-stream": lambda pki: der_of(pki.root),
    "application/x-pem-file": lambda pki: pem_of(pki.root),
    "text/plain": lambda pki: pem_of(pki.root),
    "application/pkcs7-mime": lambda pki: pki.files["pkcs7-der"] if hasattr(pki, "files") else pkcs7.serialize_certificates(
        [pki.root], serialization.Encoding.DER),
    "application/x-pkcs12": lambda pki: pkcs12.serialize_key_and_certificates(
        None, None, None, [pki.root], serialization.NoEncryption()),
}


@pytest.mark.parametrize("content_type", RAW_TYPES, ids=RAW_TYPES)
def test_a_body_that_is_the_file_itself_is_an_upload(testapp, pki, content_type):
    answer = testapp.post("/?ttl=1d", RAW_TYPES[content_type](pki), content_type=content_type,
                          headers={"User-Agent": "curl/8.5.0"}, status=201)
    assert answer.content_type == "text/plain" and answer.text.splitlines()[0] == answer.headers["Location"]


def test_wget_post_file_sends_the_file_as_a_form_and_it_still_works(testapp, root_pem, store):
    answer = testapp.post("/?ttl=30d", root_pem, content_type="application/x-www-form-urlencoded",
                          headers={"User-Agent": "Wget/1.21.3"}, status=201)
    token = answer.text.splitlines()[0].rsplit("/", 1)[1]
    assert store.get(token).expires == NOW + 30 * DAY


@pytest.mark.parametrize("agent", ["Mozilla/5.0 (Windows NT 10.0; Microsoft Windows 10.0.19045; en-US) "
                                   "WindowsPowerShell/5.1.19041.4648",
                                   "Mozilla/5.0 (Windows NT 10.0; Microsoft Windows 10.0.22631; en-US) PowerShell/7.4.6"],
                         ids=["windows-powershell-5.1", "powershell-7"])
def test_powershell_gets_the_same_text_answer_as_curl(testapp, root_der, agent):
    answer = testapp.post("/", root_der, content_type="application/x-www-form-urlencoded",
                          headers={"User-Agent": agent}, status=201)
    assert answer.content_type == "text/plain" and "SHA-256 " in answer.text


def test_the_text_answer_lists_links_names_fingerprints_and_findings(testapp, pki):
    answer = testapp.post("/", pem_of(pki.root, pki.intermediate, pki.leaf), content_type="text/plain",
                          headers={"User-Agent": "curl/8.5.0"}, status=201).text
    lines = answer.splitlines()
    assert lines[0].startswith("http://ca.example.org:8080/c/") and lines[1].startswith("http://") and lines[2] == ""
    assert "Root CA \u201cExample Root CA\u201d, new link, works until " in answer
    assert re.search(r"^  SHA-256 ([0-9A-F]{2}:){31}[0-9A-F]{2}$", answer, re.MULTILINE)
    assert "left out: The server certificate for mail.example.com" in answer and "[wap-algorithm]" in answer


def test_json_clients_get_the_documented_upload_shape(testapp, pki, root):
    answer = testapp.post("/", pem_of(pki.root, pki.leaf), content_type="text/plain",
                          headers={"Accept": "application/json"}, status=201).json
    assert answer["version"] == 1 and answer["format"] == "PEM"
    link = answer["links"][0]
    assert set(link) == {"url", "url_note", "alternatives", "token", "new", "expires", "cut_to_certificate", "name",
                         "role", "subject", "issuer",
                         "not_before", "not_after", "sha256", "sha1", "revoke_url", "revoke_secret"}
    assert link["url"].endswith("/c/" + link["token"]) and link["role"] == "root" and link["new"] is True
    assert link["expires"] == "2027-01-22T08:00:00Z" and link["not_after"] == "2035-01-01T00:00:00Z"
    assert answer["left_out"][0]["name"] == "mail.example.com"
    assert {"code", "message", "certificate", "note"} == set(answer["findings"][0])


def test_json_errors_carry_their_stable_refusal_code(testapp, root_pem, key_pem):
    error = testapp.post("/", root_pem + key_pem, content_type="text/plain", headers={"Accept": "application/json"},
                         status=422).json["error"]
    assert (error["status"], error["code"]) == (422, "private-key") and "private key" in error["message"]


@pytest.mark.slow
def test_real_curl_and_wget_upload_and_read_the_text_answer(tmp_path, root_pem, other_der):
    ini = tmp_path / "certdrop.ini"
    ini.write_text(f"[certdrop]\ndata_dir = data\nupload_auth = always\nupload_password = {KEY}\n")
    (tmp_path / "ca.pem").write_bytes(root_pem)
    (tmp_path / "other.der").write_bytes(other_der)
    server = Server(ini)
    try:
        form = subprocess.run(["curl", "-sS", "-u", f"certdrop:{KEY}", "-F", f"cert=@{tmp_path / 'ca.pem'}",
                               server.url + "/"], capture_output=True, text=True, timeout=30)
        binary = subprocess.run(["curl", "-sS", "-u", f"certdrop:{KEY}", "--data-binary", f"@{tmp_path / 'other.der'}",
                                 "-H", "Content-Type: application/pkix-cert", server.url + "/?ttl=1d"],
                                capture_output=True, text=True, timeout=30)
        wget = subprocess.run(["wget", "-q", "-O", "-", "--user", "certdrop", "--password", KEY, "--auth-no-challenge",
                               f"--post-file={tmp_path / 'ca.pem'}", server.url + "/"],
                              capture_output=True, text=True, timeout=30)
    finally:
        server.stop()
    for result in (form, binary, wget):
        assert result.returncode == 0, result.stderr
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/c/[a-z2-9]{8}", result.stdout.splitlines()[0])
    assert form.stdout.splitlines()[0] == wget.stdout.splitlines()[0], "the same certificate keeps its link"


# -- HTTP: only our own names


@pytest.mark.parametrize(("method", "path"), [("GET", "/"), ("POST", "/"), ("GET", "/signin"), ("POST", "/signin"),
                                              ("POST", "/signout"), ("POST", "/mail")])
def test_a_foreign_host_is_refused_with_400_everywhere_but_under_c_and_stores_nothing(testapp, config, root_der,
                                                                                      method, path):
    """DNS rebinding: a page on evil.example, resolving to 127.0.0.1, makes the server's own browser ask."""
    foreign = {"Host": "evil.example:8080", "Origin": "http://evil.example:8080"}
    if method == "GET":
        answer = testapp.get(path, headers=foreign, status=400)
    else:
        answer = testapp.post(path, {"cert": root_der.hex(), "key": "x", "to": "a@example.com"}, headers=foreign,
                              status=400)
    assert "does not answer to the name" in answer.text and "allowed_hosts" in answer.text
    assert not (config.data_dir / "sha256").exists()


def test_a_foreign_host_uploading_as_a_script_from_loopback_gets_400_not_201(testapp, config, root_der):
    refused = testapp.post("/", root_der, content_type="application/pkix-cert",
                           headers={"Host": "evil.example", "Accept": "application/json"}, status=400)
    assert refused.json["error"]["code"] == "foreign-host" and not (config.data_dir / "sha256").exists()


@pytest.mark.parametrize("host", ["localhost:8080", "127.0.0.1:8080", "[::1]:8080", "ca.example.org", "CA.Example.ORG.",
                                  "certs.example.net:443"])
def test_loopback_names_machine_names_and_allowed_hosts_are_accepted(testapp, host):
    testapp.get("/", headers={"Host": host}, status=200)


def test_public_urls_host_is_accepted_and_alone_accepted_through_the_trusted_proxy(config, store, clock):
    app = app_with(config, store, clock, public_url="https://ca.example.com/certdrop", trusted_proxy="127.0.0.1")
    through_proxy = client(app)
    through_proxy.get("/", headers={"X-Forwarded-Host": "ca.example.com", "X-Forwarded-Proto": "https"}, status=200)
    for forwarded in ("evil.example", "localhost", "ca.example.org"):
        through_proxy.get("/", headers={"X-Forwarded-Host": forwarded}, status=400)


def test_under_c_a_foreign_host_is_answered_with_links_on_the_servers_own_name(testapp, root_token):
    page = testapp.get(f"/c/{root_token}", headers={"Host": "evil.example:8080",
                                                   "User-Agent": USER_AGENTS["windows-edge"][0]},
                       extra_environ={"SERVER_NAME": "ca.example.org", "SERVER_PORT": "8080"}, status=200)
    assert "evil.example" not in page.text and f"http://ca.example.org:8080/c/{root_token}" in page.text
    card = testapp.get(f"/c/{root_token}/card", headers={"Host": "evil.example"},
                       extra_environ={"SERVER_NAME": "ca.example.org", "SERVER_PORT": "8080"}, status=200)
    assert "evil.example" not in card.text


def test_allowed_hosts_takes_names_and_addresses_and_refuses_urls(tmp_path):
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\nallowed_hosts = Certs.Example.COM, fd00::5 10.1.2.3\n")
    assert certdrop.load_config(str(ini)).allowed_hosts == ("certs.example.com", "fd00::5", "10.1.2.3")
    ini.write_text("[certdrop]\nallowed_hosts = https://certs.example.com/\n")
    with pytest.raises(certdrop.ConfigError, match="allowed_hosts"):
        certdrop.load_config(str(ini))


# -- HTTP: removing a link from the web


def revoke_form(page):
    return next(form for form in page.forms.values() if form.action.endswith("/revoke"))


def test_the_page_that_made_a_link_can_remove_it(testapp, store, root_der, config):
    result = upload(testapp, root_der)
    token = token_of(result)
    secret = revoke_form(result)["secret"].value
    assert secret not in "".join(path.read_text() for path in files_under(config.data_dir))
    removed = revoke_form(result).submit(status=200)
    assert "The link was removed" in html_text(removed)
    testapp.get(f"/c/{token}", status=410)


def test_a_link_that_already_existed_shows_no_secret(testapp, root_der):
    upload(testapp, root_der)
    again = upload(testapp, root_der, status=200)
    assert "already had this link" in html_text(again) and not again.html.find("input", attrs={"name": "secret"})


def test_scripts_remove_a_link_with_its_secret(testapp, root_der):
    made = testapp.post("/", root_der, content_type="application/pkix-cert", headers={"Accept": "application/json"},
                        status=201).json["links"][0]
    testapp.post(made["revoke_url"], {"secret": "guess"}, headers={"User-Agent": "curl/8.5.0"}, status=403)
    testapp.get(f"/c/{made['token']}", status=200)
    answer = testapp.post(made["revoke_url"], {"secret": made["revoke_secret"]}, headers={"User-Agent": "curl/8.5.0"})
    assert answer.text == f"revoked {made['token']}: it answers 410 from now on\n"
    testapp.get(f"/c/{made['token']}", status=410)


def test_removing_a_link_refuses_cross_site_requests_and_guessing(testapp, root_der):
    result = upload(testapp, root_der)
    token, secret = token_of(result), revoke_form(result)["secret"].value
    testapp.post(f"/c/{token}/revoke", {"secret": secret}, headers={"Origin": "http://evil.example"}, status=403)
    for _ in range(certdrop.LOOKUP_BURST):  # a secret is guessed like a token: the lookup limit counts it
        testapp.post(f"/c/{token}/revoke", {"secret": "guess"}, status=403)
    testapp.post(f"/c/{token}/revoke", {"secret": secret}, status=429)
    testapp.get(f"/c/{token}", status=429)


@pytest.mark.parametrize("agent", ["curl/8.5.0", USER_AGENTS["windows-edge"][0]], ids=["text", "html"])
def test_an_unknown_token_a_removed_link_and_a_wrong_secret_get_the_same_answer(testapp, store, root_der, other_der,
                                                                                agent):
    made = testapp.post("/", root_der, content_type="application/pkix-cert", headers={"Accept": "application/json"},
                        status=201).json["links"][0]
    removed, _ = store.add(certdrop.load_der(other_der), NOW + DAY, "s3cret")
    store.revoke(removed.token)
    answers = [testapp.post(f"/c/{token}/revoke", {"secret": "guess"}, headers={"User-Agent": agent}, status="*")
               for token in (made["token"], "zzzzzzzz", removed.token)]
    assert {answer.status_int for answer in answers} == {403}
    assert answers[0].body == answers[1].body == answers[2].body


def test_guessing_tokens_at_the_removal_address_runs_into_429(config, store, clock):
    app = client(app_with(config, store, clock, lookup_limit=5))
    tokens = ["".join(random_tokens) for random_tokens in itertools.islice(
        itertools.product("abcdefgh", repeat=8), certdrop.LOOKUP_BURST + 2)]
    statuses = [app.post(f"/c/{token}/revoke", {"secret": "guess"}, status="*").status_int for token in tokens]
    assert statuses[:certdrop.LOOKUP_BURST] == [403] * certdrop.LOOKUP_BURST and 429 in statuses[-2:]


def test_wrong_secrets_from_an_ipv6_neighbour_never_hold_back_the_administrators_key(keyed, root_token):
    neighbour, administrator = (client(keyed, REMOTE_ADDR=address) for address in ("fd00:1::bad", "fd00:1::1"))
    for _ in range(certdrop.SIGN_IN_FAILURE_BURST + 1):  # anybody may send these: no network rule, no key
        neighbour.post(f"/c/{root_token}/revoke", {"secret": "x"}, status=403)
    administrator.get("/admin/api/v1/links", headers=basic(KEY), status=200)
    sign_in(administrator)


def test_a_browser_that_sends_only_a_foreign_referer_is_refused_as_cross_site(keyed, store, root_der, other_der):
    token = add(store, root_der).token
    old_browser = {"Referer": "http://evil.example/page.html"}  # IE 11: no Origin, no Sec-Fetch-Site
    client(keyed).post(f"/admin/link/{token}/revoke", {"confirm": "yes"}, headers=old_browser, status=403)
    post_cert(client(keyed), other_der, 403, old_browser)
    post_cert(client(keyed), other_der, 201, {"Referer": "http://ca.example.org:8080/"})  # its own page
    store.get(token)  # still live


def test_a_secret_in_the_query_string_is_not_taken_so_it_never_reaches_a_log(testapp, root_der):
    made = testapp.post("/", root_der, content_type="application/pkix-cert", headers={"Accept": "application/json"},
                        status=201).json["links"][0]
    testapp.post(f"{made['revoke_url']}?secret={made['revoke_secret']}", status=403)
    testapp.get(f"/c/{made['token']}", status=200)


def test_links_made_before_secrets_existed_cannot_be_removed_from_the_web(testapp, store, root_der):
    entry, _ = store.add(certdrop.load_der(root_der), NOW + DAY)  # no secret, as 0.1.0 stored links
    testapp.post(f"/c/{entry.token}/revoke", {"secret": ""}, status=403)


@pytest.mark.slow  # waits about 1 s of real time
def test_a_link_removed_through_one_process_ends_on_another_within_2_seconds(config, root_der):
    first, second = (client(certdrop.make_app(config)) for _ in range(2))
    result = upload(first, root_der)
    token = token_of(result)
    second.get(f"/c/{token}", status=200)
    revoke_form(result).submit(status=200)
    deadline = time.monotonic() + 2.0
    while second.get(f"/c/{token}", expect_errors=True).status_int != 410:
        assert time.monotonic() < deadline, "still served 2 seconds after its removal"
        time.sleep(0.1)


# -- HTTP: QR codes and the printable card


def decode_qr(png, tmp_path):
    """Return what a real decoder (zbarimg, from Debian's zbar-tools) reads in a PNG."""
    (tmp_path / "qr.png").write_bytes(png)
    result = subprocess.run(["zbarimg", "--quiet", "--raw", str(tmp_path / "qr.png")], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.slow
def test_the_qr_code_png_decodes_to_the_link_phones_can_reach(app, root_der, machine, tmp_path):
    local = client(app, HTTP_HOST="localhost:8080")
    token = uploaded_token(local, root_der)
    png = local.get(f"/c/{token}/qr.png")
    assert png.content_type == "image/png"
    assert decode_qr(png.body, tmp_path) == f"http://192.168.1.5:8080/c/{token}"


def test_the_qr_code_svg_is_a_standalone_image(testapp, root_token):
    svg = testapp.get(f"/c/{root_token}/qr.svg")
    assert svg.content_type == "image/svg+xml" and svg.headers["Content-Security-Policy"] == "default-src 'none'"
    assert ET.fromstring(svg.body).tag == "{http://www.w3.org/2000/svg}svg"


def test_the_result_page_shows_each_link_as_a_qr_code(testapp, pki):
    result = upload(testapp, pem_of(pki.root, pki.intermediate))
    assert len(result.html.select("section .qr svg")) == 2


@pytest.mark.parametrize("agent", ["windows-edge", "macos-chrome", "linux-chrome", "linux-firefox", "chromeos"])
def test_desktop_landing_pages_show_the_qr_code_for_a_phone(testapp, root_token, agent):
    page = testapp.get(f"/c/{root_token}", headers={"User-Agent": USER_AGENTS[agent][0]})
    assert page.html.select(".qr svg") and f"/c/{root_token}/card" in page.text


@pytest.mark.parametrize("agent", ["android-chrome", "iphone-safari"])
def test_phone_landing_pages_show_no_qr_code(testapp, root_token, agent):
    assert not testapp.get(f"/c/{root_token}", headers={"User-Agent": USER_AGENTS[agent][0]}).html.select(".qr")


def test_the_printable_card_has_the_link_its_code_fingerprints_and_steps(testapp, root_token, root):
    card = testapp.get(f"/c/{root_token}/card")
    ET.fromstring(card.body)
    assert card.html.find("p", class_="card-link").get_text() == f"http://ca.example.org:8080/c/{root_token}"
    assert card.html.select(".qr svg") and root[0].fingerprint(hashes.SHA256()).hex(":").upper() in html_text(card)
    families = [th.get_text() for th in card.html.select("table.card-steps th")]
    assert families == ["iPhone, iPad", "Android", "Windows", "macOS", "Linux, ChromeOS", "Nokia"]
    assert "@page" in card.text and "@media print" in card.text


def run_in_terminal(*args):
    """Run the command line with its standard output on a pseudo-terminal, as a person sees it."""
    leader, follower = os.openpty()
    process = subprocess.Popen([sys.executable, str(HERE / "certdrop.py"), *args], stdout=follower,
                               stderr=subprocess.DEVNULL)
    os.close(follower)
    output = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(leader, 65536):
            output += chunk
    process.wait(30)
    os.close(leader)
    return output.decode("utf-8", "replace")


@pytest.mark.slow
def test_add_prints_a_qr_code_on_a_terminal_only(tmp_path, root_pem, other_der, capsys):
    (tmp_path / "certdrop.ini").write_text("[certdrop]\ndata_dir = data\npublic_url = http://ca.example.org\n")
    (tmp_path / "ca.pem").write_bytes(root_pem)
    (tmp_path / "other.der").write_bytes(other_der)
    ini = str(tmp_path / "certdrop.ini")
    assert "\u2588" in run_in_terminal("-c", ini, "add", str(tmp_path / "ca.pem"))
    assert "\u2588" not in run_in_terminal("-c", ini, "add", "--no-qr", str(tmp_path / "other.der"))
    assert certdrop.main(["-c", ini, "add", str(tmp_path / "ca.pem")]) == 0
    assert "\u2588" not in capsys.readouterr().out


# -- HTTP: behind a reverse proxy, under a prefix --------------------------------------------------------------


def addresses_in(page):
    """Return every address a page points at: links, form actions, buttons."""
    return [tag.get("href") or tag.get("action") for tag in page.html.find_all(["a", "form"])
            if (tag.get("href") or tag.get("action")) and not (tag.get("href") or "").startswith("mailto:")]


def test_every_address_carries_the_prefix_of_public_url(config, store, clock, root_der, pki):
    app = client(app_with(config, store, clock, public_url="https://intranet.example.com/certdrop"))
    pages = [app.get("/"), app.get("/signin"), app.get("/nowhere", status=404)]
    result = upload(app, pem_of(pki.root, pki.intermediate))
    token = token_of(result)
    pages += [result, refused_upload(app)]
    pages += [app.get(f"/c/{token}", headers={"User-Agent": USER_AGENTS[agent][0]})
              for agent in ("android-chrome", "windows-edge", "linux-chrome", "iphone-safari")]
    for page in pages:
        for address in addresses_in(page):
            assert address.startswith(("/certdrop/", "https://intranet.example.com/certdrop/")), (page.request.url,
                                                                                                  address)
    nokia = s40_page(app, token, "application/vnd.wap.xhtml+xml").body.decode()
    assert all(href.startswith("/certdrop/c/") for href in re.findall(r'href="([^"]+)"', nokia))
    assert result.headers["Location"].startswith("https://intranet.example.com/certdrop/c/")


def refused_upload(app):
    return app.post("/", {"pem": "not a certificate"}, status=422)


def proxied(app, peer="127.0.0.1", **headers):
    return client(app, REMOTE_ADDR=peer, **{f"HTTP_{name.upper().replace('-', '_')}": value
                                           for name, value in headers.items()})


def test_the_trusted_proxy_sets_scheme_host_prefix_and_client_address(config, store, clock, root_der, access_log):
    app = app_with(config, store, clock, trusted_proxy="127.0.0.1", upload_password=KEY)
    through_proxy = proxied(app, **{"X-Forwarded-For": "192.168.1.20", "X-Forwarded-Proto": "https",
                                    "X-Forwarded-Host": "ca.example.com", "X-Forwarded-Prefix": "/certdrop"})
    result = post_cert(through_proxy, root_der, 201, basic(KEY))
    assert result.headers["Location"].startswith("https://ca.example.com/certdrop/c/")
    assert result.html.find("a", string=re.compile("Share another"))["href"] == "/certdrop/"
    access_log.flush()
    assert " 192.168.1.20 POST /certdrop/ 201 " in access_log.stream.getvalue()


def test_forwarding_headers_from_anybody_else_are_ignored(config, store, clock, root_der):
    app = app_with(config, store, clock, trusted_proxy="127.0.0.1", upload_password=KEY)
    spoofed = proxied(app, peer="192.168.1.30", **{"X-Forwarded-For": "10.9.9.9", "X-Forwarded-Proto": "https",
                                                    "X-Forwarded-Host": "evil.example", "X-Forwarded-Prefix": "/x"})
    result = post_cert(spoofed, root_der, 201, basic(KEY))
    assert result.headers["Location"].startswith("http://ca.example.org:8080/c/")


def test_a_request_through_the_trusted_proxy_from_this_machine_still_needs_the_key(config, store, clock, root_der):
    app = app_with(config, store, clock, trusted_proxy="127.0.0.1", upload_password=KEY)
    post_cert(proxied(app, **{"X-Forwarded-For": "127.0.0.1"}), root_der, 401)


# -- HTTP: health and the access log


def test_the_browsers_icon_request_gets_an_empty_answer_not_an_error_page(testapp):
    answer = testapp.get("/favicon.ico", status=204)
    assert answer.body == b"" and "max-age=86400" in answer.headers["Cache-Control"]
    assert "Content-Length" not in answer.headers and "Content-Type" not in answer.headers


def test_healthz_answers_200_while_the_data_directory_works(testapp, config):
    config.data_dir.mkdir(parents=True)
    assert testapp.get("/healthz").text == "ok\n"
    assert files_under(config.data_dir) == [], "the probe leaves nothing behind"


@pytest.mark.slow
def test_healthz_answers_503_naming_what_is_wrong(testapp, small_disk, clock):
    assert "missing" in testapp.get("/healthz", status=503).text
    app, config = disk_app(small_disk, clock)
    config.data_dir.mkdir()
    fill(small_disk)
    assert "is full" in app.get("/healthz", status=503, headers={"User-Agent": "curl/8.5.0"}).text
    (small_disk / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert "read-only" in app.get("/healthz", status=503, headers={"User-Agent": "curl/8.5.0"}).text


def test_each_request_gets_one_access_log_line(testapp, root_der, access_log):
    token = uploaded_token(testapp, root_der)
    testapp.get(f"/c/{token}", headers={"User-Agent": S60_AGENTS["e61i"]})
    testapp.get(f"/c/{token}/x y\x1b.cer?format=der", status=404)
    access_log.flush()
    lines = access_log.stream.getvalue().splitlines()
    assert re.fullmatch(rf"\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ 127\.0\.0\.1 GET /c/{token} 200 {len(root_der)} s60 "
                        r"\d+\.\dms", lines[1])
    assert " GET /c/" in lines[2] and "/x%20y%1B.cer?format=der 404 " in lines[2]
    testapp.get("/c/%C3%A9t%C3%A9?q=%C3%A9", status=404)  # the bytes sent, once encoded: not the UTF-8 of Latin-1
    access_log.flush()
    assert " GET /c/%C3%A9t%C3%A9?q=%C3%A9 404 " in access_log.stream.getvalue().splitlines()[3]


def test_the_access_log_keeps_a_bounded_number_of_short_lines_only(testapp, access_log, monkeypatch):
    monkeypatch.setattr(certdrop, "ACCESS_TAILS", certdrop.BoundedMap(100_000))
    for number in range(200):
        testapp.get(f"/c/{number:08}", expect_errors=True)
    testapp.get("/c/" + "x" * 5000, expect_errors=True)
    access_log.flush()
    assert certdrop.ACCESS_TAILS.bytes <= 100_000 and len(certdrop.ACCESS_TAILS) < 200
    assert not any(len(path) > 512 for _, _, path, *_ in certdrop.ACCESS_TAILS.items)
    assert access_log.stream.getvalue().count("\n") == 201


def test_the_access_log_queue_drops_the_oldest_lines_past_its_bound_when_nothing_writes_them():
    log = certdrop.AccessLog(io.StringIO())
    for number in range(certdrop.AccessLog.MAX_PENDING + 5):
        log.record((0.0, 0.0, "127.0.0.1", f"GET /{number} 404 0 -"))
    log.flush()
    lines = log.stream.getvalue().splitlines()
    assert len(lines) == certdrop.AccessLog.MAX_PENDING and lines[0].split()[3] == "/5"


@pytest.mark.slow
def test_the_access_log_writes_a_full_batch_at_once_and_a_lone_line_within_a_second():
    log = certdrop.AccessLog(io.StringIO())
    log.start()
    now = time.perf_counter()
    log.record((now, now, "192.0.2.1", "GET /lone 404 0 -"))
    time.sleep(3 * log.INTERVAL)
    assert log.stream.getvalue() == ""  # one line waits for more, or for its second
    deadline = time.monotonic() + log.MAX_WAIT + 1
    while not log.stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(log.stream.getvalue().splitlines()) == 1
    for number in range(log.BATCH):
        log.record((time.perf_counter(), time.perf_counter(), "192.0.2.1", f"GET /{number} 404 0 -"))
    time.sleep(3 * log.INTERVAL)
    assert len(log.stream.getvalue().splitlines()) == 1 + log.BATCH


@pytest.mark.slow
def test_access_log_lines_waiting_at_exit_are_written():
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); import certdrop\n"
              "log = certdrop.AccessLog(sys.stdout); log.start()\n"
              "log.record((time.perf_counter(), time.perf_counter(), '192.0.2.1', 'GET /last 200 1 s60'))\n")
    result = subprocess.run([sys.executable, "-c", script, str(HERE)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "GET /last 200 1 s60" in result.stdout, result.stderr


def test_access_log_off_writes_nothing(config, store, clock, access_log):
    client(app_with(config, store, clock, access_log=False)).get("/")
    access_log.flush()
    assert access_log.stream.getvalue() == ""


# -- HTTP: the install link ------------------------------------------------------------------------------------


@pytest.mark.parametrize("agent", S60_AGENTS.values(), ids=S60_AGENTS.keys())
def test_s60_gets_raw_der_as_ca_cert_without_attachment(testapp, root_der, agent):
    token = uploaded_token(testapp, root_der)
    response = testapp.get(f"/c/{token}", headers={"User-Agent": agent})
    assert response.content_type == "application/x-x509-ca-cert"
    assert "Content-Disposition" not in response.headers
    assert response.body == root_der


def test_head_answers_with_headers_and_no_body(testapp, root_der):
    token = uploaded_token(testapp, root_der)
    response = testapp.head(f"/c/{token}/ca.crt")
    assert response.headers["Content-Length"] == str(len(root_der)) and response.body == b""


def test_tokens_are_case_insensitive(testapp, root_der):
    token = uploaded_token(testapp, root_der)
    assert testapp.get(f"/c/{token.capitalize()}/ca.crt").body == root_der
    assert testapp.get(f"/c/{token.upper()}?format=der").body == root_der


@pytest.mark.parametrize("path", ["/c/abc", "/c/" + "a" * 33, "/c/abcd0efg", "/c/..%2F..%2Fetc", "/c/",
                                  "/c/abcdefgh/extra", "/nothing"])
def test_malformed_paths_are_404_without_touching_the_store(testapp, store, monkeypatch, path):
    monkeypatch.setattr(store, "get", lambda token: pytest.fail("asked the store"))
    testapp.get(path, status=404)


def test_unknown_token_is_404(testapp):
    testapp.get("/c/abcdefgh", status=404)


def test_expired_link_answers_410_saying_since_when(testapp, clock, root_der):
    token = uploaded_token(testapp, root_der, ttl="1d")
    clock.advance(2 * DAY)
    response = testapp.get(f"/c/{token}", status=410)
    assert f"expired on {certdrop.format_time(NOW + DAY)}" in response.text


def test_revoked_link_answers_410_saying_since_when(testapp, store, clock, root_der):
    token = uploaded_token(testapp, root_der)
    clock.advance(3600)
    store.revoke(token)
    assert f"revoked on {certdrop.format_time(NOW + 3600)}" in testapp.get(f"/c/{token}", status=410).text


def test_link_stays_410_after_the_sweep_and_404_after_the_tombstone_expires(testapp, store, clock, root_der):
    token = uploaded_token(testapp, root_der, ttl="1h")
    clock.advance(DAY)
    store.sweep()
    testapp.get(f"/c/{token}", status=410)
    clock.advance(30 * DAY)
    store.sweep()
    testapp.get(f"/c/{token}", status=404)


def test_a_new_app_on_the_same_directory_serves_earlier_uploads(testapp, config, clock, root_der):
    token = uploaded_token(testapp, root_der)
    fresh = client(certdrop.make_app(config, clock=clock))
    assert fresh.get(f"/c/{token}/ca.crt").body == root_der


def test_damaged_entry_answers_404(testapp, config, clock, store, root_der):
    token = uploaded_token(testapp, root_der)
    store.path_for(token).write_bytes(b'{"format": 1, "tok')
    fresh = client(certdrop.make_app(config, clock=clock))
    fresh.get(f"/c/{token}", status=404)


@pytest.mark.parametrize("path", ["/c/abcdefgh", "/nothing", "/c/abcdefgh?format=der"])
def test_error_pages_are_well_formed_xml(testapp, path):
    ET.fromstring(testapp.get(path, status=404).body)


def test_gone_page_is_well_formed_xml(testapp, store, root_der):
    token = uploaded_token(testapp, root_der)
    store.revoke(token)
    ET.fromstring(testapp.get(f"/c/{token}", status=410).body)


def test_nokia_phones_get_errors_as_pages_they_can_show(testapp, clock, root_der):
    s40 = {"User-Agent": "Nokia6500s/2.0 (05.41) Profile/MIDP-2.1 Configuration/CLDC-1.1"}
    missing = testapp.get("/c/abcdefgh", headers=s40, status=404)
    assert b"XHTML Mobile" in missing.body and b"No such page or link" in missing.body
    ET.fromstring(missing.body)
    wml = testapp.get("/c/abcdefgh", headers={**s40, "Accept": "text/vnd.wap.wml"}, status=404)
    assert wml.content_type == "text/vnd.wap.wml" and ET.fromstring(wml.body).tag == "wml"
    token = uploaded_token(testapp, root_der, ttl="1h")
    clock.advance(DAY)
    gone = testapp.get(f"/c/{token}", headers={"User-Agent": S60_AGENTS["e61i"]}, status=410)
    assert b"XHTML Mobile" in gone.body and b"expired on" in gone.body


def test_error_pages_lead_with_what_happened_in_plain_words(testapp, store, root_token):
    store.revoke(root_token)
    ended = testapp.get(f"/c/{root_token}", status=410)
    assert ended.html.h1.get_text() == "This link has ended" and "Gone" not in ended.html.h1.get_text()
    assert "Ask whoever sent you this link" in html_text(ended) and "upload page" not in html_text(ended)
    missing = testapp.get("/nowhere", status=404)
    assert missing.html.h1.get_text() == "No such page or link" and "Back to the upload page" in html_text(missing)


def test_wrong_method_answers_405_with_allow(testapp):
    response = testapp.delete("/", status=405)
    assert response.headers["Allow"] == "GET, HEAD, POST"


def test_curl_gets_errors_as_plain_text(testapp):
    response = testapp.get("/c/abcdefgh", headers={"User-Agent": "curl/8.5.0"}, status=404)
    assert response.content_type == "text/plain"
    assert response.text == ("No such page or link: Nothing has this address. Check it for typing mistakes. "
                             "[not-found] (404 Not Found)\n")


def test_json_clients_get_errors_as_json(testapp):
    response = testapp.get("/c/abcdefgh", headers={"Accept": "application/json"}, status=404)
    assert response.json["error"]["status"] == 404


def test_unexpected_failure_is_logged_and_answers_500_without_details(app, caplog, monkeypatch):
    monkeypatch.setattr(app.store, "get", lambda token: 1 / 0)
    response = client(app).get("/c/abcdefgh", expect_errors=True)
    assert response.status_int == 500 and "ZeroDivisionError" not in response.text
    assert "ZeroDivisionError" in caplog.text


def test_html_pages_carry_a_strict_security_policy(testapp):
    headers = testapp.get("/").headers
    assert "script-src" not in headers["Content-Security-Policy"]
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    # The upload page's address holds no token; "same-origin" lets its form send a real Origin (no-referrer would
    # make browsers send "Origin: null", which the cross-site check refuses).
    assert headers["Referrer-Policy"] == "same-origin"


@pytest.mark.parametrize("agent", ["s60-3rd-e61i", "s40-6500s", "android-chrome", "curl"], ids=str)
@pytest.mark.parametrize("path", ["", "/ca.cer", "/ca.whc", "?format=pem"], ids=["link", "cer", "whc", "pem"])
def test_every_answer_under_c_carries_no_referrer(testapp, root_token, agent, path):
    user_agent = USER_AGENTS[agent][0] if agent in USER_AGENTS else "curl/8.5.0"
    response = testapp.get(f"/c/{root_token}{path}", headers={"User-Agent": user_agent})
    assert response.headers["Referrer-Policy"] == "no-referrer"
    etag = response.headers["ETag"]
    assert testapp.get(f"/c/{root_token}{path}", headers={"User-Agent": user_agent, "If-None-Match": etag},
                       status=304).headers["Referrer-Policy"] == "no-referrer"


def test_unknown_and_ended_links_carry_no_referrer(testapp, store, root_token):
    assert testapp.get("/c/abcdefgh", status=404).headers["Referrer-Policy"] == "no-referrer"
    store.revoke(root_token)
    assert testapp.get(f"/c/{root_token}", status=410).headers["Referrer-Policy"] == "no-referrer"


def test_nokia_xhtml_pages_carry_the_strict_policy_and_wml_decks_need_none(testapp, root_token):
    xhtml = s40_page(testapp, root_token, "application/vnd.wap.xhtml+xml")
    assert xhtml.headers["Content-Security-Policy"] == certdrop.CONTENT_SECURITY_POLICY
    assert "Content-Security-Policy" not in s40_page(testapp, root_token, "text/vnd.wap.wml").headers


@pytest.mark.parametrize("length", ["\u00b2", "\u0661\u0662", "12a", "-1", " 5"], ids=["superscript-two", "arabic-digits",
                                                                                  "letters", "negative", "space"])
def test_content_length_of_anything_but_ascii_digits_is_a_400(app, length):
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/", "CONTENT_LENGTH": length, "HTTP_HOST": "localhost",
               "CONTENT_TYPE": "application/x-www-form-urlencoded", "wsgi.input": io.BytesIO(b"pem=x"),
               "REMOTE_ADDR": "127.0.0.1", "wsgi.url_scheme": "http"}
    statuses = []
    app(environ, lambda status, headers: statuses.append(status))
    assert statuses == ["400 Bad Request"]


# -- the administrator's page (issue 22) ----------------------------------------------------------------------------

ADMIN_AGENTS = {"android": USER_AGENTS["android-chrome"][0], "windows": USER_AGENTS["windows-edge"][0],
                "iphone": USER_AGENTS["iphone-safari"][0]}


def admin_links(app_client, **query):
    """Return the JSON interface's list of links, by token."""
    answer = app_client.get("/admin/api/v1/links", params={"per_page": 1000, **query})
    assert answer.json["version"] == 1
    return {link["token"]: link for link in answer.json["links"]}


def fetch(app_client, token, agent, times=1, path=""):
    for _ in range(times):
        app_client.get(f"/c/{token}{path}", headers={"User-Agent": agent}, status=200)


def admin_section(page, token):
    return page.html.find("section", id=f"link-{token}")


def tag_text(tag):
    return " ".join(tag.get_text(" ").split())


def test_the_admin_page_lists_every_link_with_its_state_and_its_downloads_per_device_class(app, testapp, store, clock,
                                                                                            pki, root_der, other_der):
    live = uploaded_token(testapp, root_der, host="mail.example.com")
    chained = upload(testapp, pem_of(pki.root, pki.intermediate))
    revoked, ended = uploaded_token(testapp, other_der), add(store, der_of(pki.self_signed_leaf), days=1).token
    store.revoke(revoked)
    fetch(testapp, live, ADMIN_AGENTS["android"], 3)
    fetch(testapp, live, ADMIN_AGENTS["windows"], 2)
    fetch(testapp, live, ADMIN_AGENTS["iphone"])
    fetch(testapp, live, "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)", 4)  # a preview: not counted
    testapp.get(f"/c/{live}", headers={"User-Agent": ADMIN_AGENTS["android"], "If-None-Match": "*"}, status=304)
    assert app.counts.write() == 6
    clock.advance(2 * DAY)
    links = admin_links(testapp)
    tokens = {live, revoked, ended} | {re.search(r"/c/([a-z0-9]+)", a["href"])[1]
                                       for a in chained.html.select("p.link a")}
    assert set(links) == tokens and len(tokens) == 5
    assert {token: links[token]["state"] for token in (live, revoked, ended)} == {
        live: "live", revoked: "revoked", ended: "ended"}
    assert {device: fetches["count"] for device, fetches in links[live]["fetches"].items()} == {
        "android": 3, "windows": 2, "ios": 1}
    assert links[live]["host"] == "mail.example.com" and links[live]["role"] == "root"
    assert links[live]["name"] == "Example Root CA" and links[live]["certificate_ends"].startswith("20")
    page = testapp.get("/admin")
    assert page.headers["Cache-Control"] == "no-store"
    for token in tokens:
        assert admin_section(page, token) is not None, token
    row = tag_text(admin_section(page, live))
    assert "android: 3" in row and "windows: 2" in row and "ios: 1" in row and "mail.example.com" in row
    assert "revoked" in tag_text(admin_section(page, revoked))


def test_the_admin_page_puts_what_needs_attention_first_and_filters_and_searches(testapp, store, pki):
    rest = add(store, der_of(pki.intermediate), days=60).token
    later = add(store, der_of(pki.expiring), days=9).token  # its CA ends in 10 days, the link in 9
    soon = add(store, der_of(pki.root), days=3).token
    links = admin_links(testapp)
    assert list(links) == [soon, later, rest]
    assert [links[token]["attention"] for token in (soon, later, rest)] == ["link", "ca", None]
    assert list(admin_links(testapp, state="attention")) == [soon, later]
    assert list(admin_links(testapp, q="ISSUING")) == [rest]
    page = testapp.get("/admin", params={"state": "attention"})
    assert [section["id"] for section in page.html.select("section[id^=link-]")] == [f"link-{soon}", f"link-{later}"]
    testapp.get("/admin", params={"state": "lost"}, status=400)
    testapp.get("/admin", params={"page": "9"}, status=400)


def test_the_admin_page_is_paged(testapp, store, many_roots):
    for der in many_roots[:certdrop.ADMIN_PAGE_LINKS + 5]:
        add(store, der)
    first, second = testapp.get("/admin"), testapp.get("/admin", params={"page": 2})
    assert len(first.html.select("section[id^=link-]")) == certdrop.ADMIN_PAGE_LINKS
    assert len(second.html.select("section[id^=link-]")) == 5
    assert "Page 1 of 2." in html_text(first) and first.html.find("a", rel="next") is not None


def test_revoking_from_the_page_asks_first_then_changes_exactly_that_link(testapp, store, root_der, other_der):
    token, other = uploaded_token(testapp, root_der), uploaded_token(testapp, other_der)
    before = store.path_for(other).read_bytes()
    question = testapp.get("/admin").click(href=f"/admin/link/{token}/revoke")
    assert store.lookup(token).revoked is None, "asking changes nothing"
    done = question.forms[0].submit(status=200)
    assert "was revoked" in html_text(done)
    testapp.get(f"/c/{token}", status=410)
    assert store.path_for(other).read_bytes() == before
    again = question.forms[0].submit(status=410)  # a stale page's form: a clear message, nothing changed
    assert "revoked on" in html_text(again)


def test_extending_from_the_page_changes_exactly_that_link_and_never_past_the_certificate(testapp, store, clock,
                                                                                           root_der, other_der):
    token, other = uploaded_token(testapp, root_der), uploaded_token(testapp, other_der)
    before = store.path_for(other).read_bytes()
    form = next(form for form in testapp.get("/admin").forms.values() if form.action.endswith(f"/{token}/extend"))
    form["ttl"] = "30d"
    assert "now works until" in html_text(form.submit(status=200))
    assert store.lookup(token).expires == clock() + 30 * DAY
    assert store.path_for(other).read_bytes() == before
    form["ttl"] = "1d"
    refusal = form.submit(status=400)  # shorter than it already is
    assert "nothing was changed" in html_text(refusal) and store.lookup(token).expires == clock() + 30 * DAY
    form["ttl"] = "cert"
    form.submit(status=200)
    assert store.lookup(token).expires == store.lookup(token).certificate.not_after.timestamp()


def test_a_link_whose_certificate_expired_cannot_be_extended(testapp, store, pki):
    token = add(store, der_of(pki.expired), days=3).token
    before = store.path_for(token).read_bytes()
    refusal = testapp.post(f"/admin/link/{token}/extend", {"ttl": "30d"}, status=400)
    assert "expired on 2026-01-01" in html_text(refusal) and store.path_for(token).read_bytes() == before
    testapp.post(f"/admin/link/{token}/extend", {"ttl": "cert"}, status=400)


def test_revoke_and_extend_through_the_json_interface_change_exactly_that_link(keyed, store, clock, root_der,
                                                                                other_der):
    remote = client(keyed, REMOTE_ADDR=REMOTE)
    token = token_of(post_cert(remote, root_der, 201, basic(KEY)))
    other = token_of(post_cert(remote, other_der, 201, basic(KEY)))
    before = store.path_for(other).read_bytes()
    extended = remote.post(f"/admin/api/v1/links/{token}/extend", {"ttl": "90d"}, headers=basic(KEY))
    assert extended.json == {"version": 1, "extended": token, "expires": certdrop.iso_time(clock() + 90 * DAY),
                             "cut_to_certificate": False}
    assert remote.post(f"/admin/api/v1/links/{token}/revoke", headers=basic(KEY)).json["revoked"] == token
    assert store.lookup(token).revoked == clock() and store.path_for(other).read_bytes() == before
    twice = remote.post(f"/admin/api/v1/links/{token}/revoke", headers=basic(KEY), status=410)
    assert twice.json["error"]["code"] == "gone"
    unknown = remote.post("/admin/api/v1/links/abcdefgh/revoke", headers=basic(KEY), status=404)
    assert unknown.json["error"]["code"] == "not-found"
    bad = remote.post(f"/admin/api/v1/links/{other}/extend", {"ttl": "3 weeks"}, headers=basic(KEY), status=400)
    assert bad.json["error"]["code"] == "lifetime" and store.path_for(other).read_bytes() == before


@pytest.mark.parametrize("headers", [{"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                                     {"Origin": "null"}], ids=["other-site", "fetch-metadata", "null-origin"])
def test_a_cross_site_post_to_an_admin_action_changes_nothing(testapp, store, config, root_der, headers):
    token = uploaded_token(testapp, root_der)
    before = files_under(config.data_dir), store.path_for(token).read_bytes()
    for action, fields in (("revoke", {"confirm": "yes"}), ("extend", {"ttl": "30d"})):
        for path in (f"/admin/link/{token}/{action}", f"/admin/api/v1/links/{token}/{action}"):
            testapp.post(path, fields, headers=headers, status=403)
    assert (files_under(config.data_dir), store.path_for(token).read_bytes()) == before


def test_a_browser_not_signed_in_gets_the_sign_in_page_and_signing_in_leads_back(keyed, store, root_der):
    remote = client(keyed, REMOTE_ADDR=REMOTE)
    add(store, root_der)
    page = remote.get("/admin")
    assert page.html.find("input", type="password") is not None and "Example Root CA" not in page.text
    signed_in = page.forms[0]
    signed_in["key"] = KEY
    listing = signed_in.submit(status=303).follow()
    assert "Example Root CA" in html_text(listing)
    script = client(keyed, REMOTE_ADDR=REMOTE).get("/admin/api/v1/links", status=401)
    assert script.json["error"]["code"] == "unauthorized"


def test_the_admin_page_is_refused_as_uploads_are(keyed, store, root_der):
    token = add(store, root_der).token
    client(keyed, REMOTE_ADDR="203.0.113.9").get("/admin", headers=basic(KEY), status=403)  # the network rule
    client(keyed, REMOTE_ADDR=REMOTE, HTTP_HOST="evil.example").get("/admin", headers=basic(KEY), status=400)
    client(keyed, REMOTE_ADDR=REMOTE).post(f"/admin/link/{token}/revoke", {"confirm": "yes"}, status=401)
    assert store.lookup(token).revoked is None
    assert client(keyed, REMOTE_ADDR=REMOTE).get("/admin", headers=basic(KEY)).status_int == 200


def test_upload_auth_none_opens_uploads_but_never_the_admin_page_or_its_json_interface(config, store, clock,
                                                                                        root_der, other_der):
    open_app = app_with(config, store, clock, upload_auth="none", upload_password=KEY)
    token = add(store, root_der).token
    remote = client(open_app, REMOTE_ADDR=REMOTE)
    post_cert(remote, other_der, 201)  # uploads are open, as upload_auth = none says
    assert remote.get("/admin").html.find("input", type="password") is not None  # the sign-in page
    remote.get("/admin/api/v1/links", status=401)
    remote.get(f"/admin/api/v1/links/{token}", status=401)
    remote.post(f"/admin/api/v1/links/{token}/revoke", status=401)
    remote.post(f"/admin/link/{token}/revoke", {"confirm": "yes"}, status=401)
    remote.post(f"/admin/api/v1/links/{token}/extend", {"ttl": "30d"}, status=401)
    assert store.lookup(token).revoked is None
    assert remote.get("/admin/api/v1/links", headers=basic(KEY)).json["total"] == 2
    assert client(open_app).get("/admin/api/v1/links").json["total"] == 2  # this machine itself, as with remote


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/admin/api/v1/links/ZZ/revoke"), ("GET", "/admin/api/v1/links/ZZ"), ("GET", "/admin/api/v2/links"),
    ("GET", "/admin/api/v1/nothing"), ("DELETE", "/admin/api/v1/links"), ("GET", "/admin/api/")])
def test_every_answer_under_the_json_interface_is_json_even_when_routing_refuses_it(keyed, method, path):
    answer = client(keyed, REMOTE_ADDR=REMOTE).request(path, method=method, headers={
        **basic(KEY), "Accept": "text/html"}, expect_errors=True)
    assert answer.status_int in (404, 405) and answer.content_type == "application/json"
    assert answer.json["error"]["code"] in ("not-found", "method-not-allowed")


def test_extending_through_the_json_interface_with_a_json_body_says_it_takes_form_fields(keyed, store, root_der):
    token = add(store, root_der).token
    before = store.path_for(token).read_bytes()
    refusal = client(keyed, REMOTE_ADDR=REMOTE).post(f"/admin/api/v1/links/{token}/extend", '{"ttl": "30d"}', headers={
        **basic(KEY), "Content-Type": "application/json"}, status=415)
    message = refusal.json["error"]["message"]
    assert "form fields" in message and "-d ttl=30d" in message and "certificate file" not in message
    assert store.path_for(token).read_bytes() == before


def test_a_session_that_ended_before_an_admin_action_signs_in_again_back_to_the_admin_page(keyed, store, clock,
                                                                                         root_der):
    token = add(store, root_der).token
    visitor = client(keyed, REMOTE_ADDR=REMOTE)
    sign_in(visitor)
    form = next(form for form in visitor.get("/admin").forms.values() if form.action.endswith(f"/{token}/extend"))
    clock.advance(certdrop.SESSION_SECONDS + 1)
    form["ttl"] = "30d"
    page = form.submit(status=401)
    assert page.html.find("input", attrs={"name": "next"})["value"] == "admin"
    page.forms[0]["key"] = KEY
    assert page.forms[0].submit(status=303).headers["Location"].endswith("/admin")
    assert store.lookup(token).expires == NOW + 7 * DAY


def test_extending_an_ended_link_from_the_page_says_it_ended_and_leads_back_to_the_admin_page(testapp, store, clock,
                                                                                             root_der):
    token = add(store, root_der, days=1).token
    clock.advance(2 * DAY)
    page = testapp.post(f"/admin/link/{token}/extend", {"ttl": "30d"}, status=410)
    assert "This link has ended" in html_text(page) and "expired on" in html_text(page)
    assert [a["href"] for a in page.html.select("main a")] == ["/admin"]
    assert "Back to the upload page" not in page.text


def test_the_link_page_shows_the_doctors_report_and_the_chain_again(testapp, pki):
    result = upload(testapp, pem_of(pki.root, pki.intermediate, pki.leaf), host="wrong.example.org")
    root_token, intermediate = (re.search(r"/c/([a-z0-9]+)", a["href"])[1] for a in result.html.select("p.link a"))
    page = testapp.get(f"/admin/link/{intermediate}")
    text = html_text(page)
    assert "[host-mismatch]" in text and "[left-out]" in text
    chain = page.html.find("ol")
    assert [a.text for a in chain.find_all("a")] == [root_token, intermediate]
    assert testapp.get(f"/admin/api/v1/links/{intermediate}").json["chain"][0]["role"] == "root"


def test_a_store_of_the_older_format_shows_not_recorded_and_keeps_working(testapp, store, clock, root_der, other_der):
    """Entries written before uploads recorded their server name and report: format 2 without them, and format 1."""
    old = add(store, root_der)
    record = json.loads(store.path_for(old.token).read_bytes())
    assert "host" not in record and "report" not in record
    (store.directory / "ab").mkdir(exist_ok=True)
    (store.directory / "ab" / "abcdefgh.json").write_text(json.dumps({
        "format": 1, "token": "abcdefgh", "created": NOW, "expires": NOW + DAY, "revoked": None,
        "sha256": hashlib.sha256(other_der).hexdigest(), "der": base64.b64encode(other_der).decode()}))
    links = admin_links(testapp)
    assert {token: (link["state"], link["host"], link["report_recorded"]) for token, link in links.items()} == {
        old.token: ("live", None, False), "abcdefgh": ("live", None, False)}
    page = testapp.get("/admin")
    assert "Server name not recorded" in tag_text(admin_section(page, old.token))
    assert "not recorded" in html_text(testapp.get(f"/admin/link/{old.token}"))
    fetch(testapp, "abcdefgh", ADMIN_AGENTS["windows"])
    testapp.post(f"/admin/link/{old.token}/extend", {"ttl": "30d"})
    assert json.loads(store.path_for(old.token).read_bytes())["format"] == certdrop.ENTRY_FORMAT


def test_a_new_upload_records_its_server_name_and_report_and_a_damaged_report_is_damage(testapp, store, root_der):
    token = uploaded_token(testapp, root_der, host="mail.example.com")
    record = json.loads(store.path_for(token).read_bytes())
    assert record["host"] == "mail.example.com" and "host-unchecked" in [item["code"] for item in record["report"]]
    damage(store, token, report=[{"code": 1}])
    store.memory.forget(token)
    testapp.get(f"/c/{token}", status=404)
    assert admin_links(testapp)[token]["state"] == "damaged"
    testapp.get(f"/admin/link/{token}", status=404)
    assert testapp.get("/admin", params={"state": "damaged"}).html.find("section", id=f"link-{token}") is not None


def test_downloads_are_counted_once_per_2xx_whichever_way_they_are_answered(app, testapp, root_der):
    token = uploaded_token(testapp, root_der)
    fetch(testapp, token, ADMIN_AGENTS["android"], 5)  # the first the full way, then the hot path
    testapp.head(f"/c/{token}", headers={"User-Agent": ADMIN_AGENTS["android"]})
    testapp.get(f"/c/{token}/nothing.txt", status=404)
    fetch(testapp, token, ADMIN_AGENTS["android"], 1, path="/Example.crt")
    fetch(testapp, token, ADMIN_AGENTS["android"], 1, path="/card")  # the administrator's, like the QR codes
    fetch(testapp, token, ADMIN_AGENTS["android"], 1, path="/qr.svg")
    assert app.counts.write() == 6 and app.counts.write() == 0
    assert certdrop.read_counts(app.config.data_dir)[token] == {"android": (6, NOW)}


@pytest.mark.slow  # a few seconds of timeit rounds
def test_the_admin_benchmark_still_measures_the_hot_path_of_this_code(capsys):
    """benchmarks/admin.py builds hot answers of its own to time counting on and off: a change to HotAnswer once left
    it failing with nobody the wiser (README cites its figures)."""
    spec = importlib.util.spec_from_file_location("admin_benchmark", HERE / "benchmarks" / "admin.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    benchmark.measure_hot_path(100)
    assert re.search(r"counting on [\d.]+ us, off [\d.]+ us a request .* 103 downloads counted and written",
                     capsys.readouterr().out)


@pytest.mark.parametrize("agent", [
    "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)", "facebookexternalhit/1.1",
    "WhatsApp/2.23.20.0 A", "TelegramBot (like TwitterBot)", "Twitterbot/1.0",
    "Mozilla/5.0 (compatible; Discordbot/2.0; +https://discordapp.com)",
    "LinkedInBot/1.0 (compatible; Mozilla/5.0; Apache-HttpClient +http://www.linkedin.com)",
    "Mozilla/5.0 (Windows NT 6.1; WOW64) SkypeUriPreview Preview/0.5"])
def test_link_preview_fetchers_are_not_counted(agent):
    assert certdrop.is_link_preview(agent)


@pytest.mark.parametrize("name", ["android-chrome", "iphone-safari", "windows-edge"])
def test_people_and_in_app_browsers_are_counted(name):
    assert not certdrop.is_link_preview(USER_AGENTS[name][0])
    assert not certdrop.is_link_preview("Mozilla/5.0 (Linux; Android 14; wv) Telegram-Android/10.0.5")


def test_count_files_of_several_processes_add_up_and_a_damaged_one_is_left_out(tmp_path, caplog):
    counts = tmp_path / "counts"
    counts.mkdir()
    (counts / "a-1.json").write_text(json.dumps({"format": 1, "counts": {"abcdefgh": {"android": [2, NOW]}}}))
    (counts / "b-2.json").write_text(json.dumps({"format": 1, "counts": {"abcdefgh": {"android": [3, NOW + 5]}}}))
    (counts / "c-3.json").write_text('{"format": 1, "counts": {"abcdefgh": {"android": [-1, 0]}}}')
    assert certdrop.read_counts(tmp_path) == {"abcdefgh": {"android": (5, NOW + 5)}}
    assert "c-3.json is damaged" in caplog.text


def test_the_count_table_is_bounded_and_quiet_pairs_leave_it(tmp_path, monkeypatch):
    monkeypatch.setattr(certdrop, "MAX_TALLIES", 3)
    counts = certdrop.DownloadCounts(tmp_path, clock=lambda: NOW)
    bumps = [counts.bump_for(f"token{n}aa", "android", "") for n in range(4)]
    assert bumps[3] is None and all(bumps[:3])
    bumps[0]()
    assert counts.write() == 1 and counts.write() == 0
    assert list(counts._tallies) == [("token0aa", "android")]  # the others were quiet for two writes: gone
    bumps[1]()  # a hot answer kept before they went may still count once: read at the next write
    assert counts.write() == 1 and counts.write() == 0 and counts._tallies == {}
    assert certdrop.read_counts_file(counts.path) == {"token0aa": {"android": (1, NOW)},
                                                      "token1aa": {"android": (1, NOW)}}


def test_the_admin_index_reads_an_entry_file_only_when_it_changed_and_a_fresh_one_starts_from_its_file(
        store, many_roots, monkeypatch):
    tokens = [add(store, der).token for der in many_roots[:20]]
    index = certdrop.AdminIndex(store)
    assert len(index.links()) == 20 and index.path.exists()
    read = []
    monkeypatch.setattr(certdrop.AdminIndex, "_read", lambda self, token: read.append(token) or certdrop.LinkSummary(
        token, "changed", "", 0.0, 0.0, None, None, False, True))
    assert len(index.links()) == 20 and read == []  # nothing changed: nothing parsed
    store.revoke(tokens[0])
    assert [link.name for link in index.links() if link.token == tokens[0]] == ["changed"] and read == [tokens[0]]
    fresh = certdrop.AdminIndex(store)
    assert len(fresh.links()) == 20 and read == [tokens[0], tokens[0]]  # the saved file is a minute old: same
    monkeypatch.setattr(certdrop, "ADMIN_INDEX_IDLE_SECONDS", 0)
    fresh.forget_if_idle()
    assert fresh._summaries == {}
    index.path.write_text("{damaged")
    assert len(certdrop.AdminIndex(store).links()) == 20


@pytest.mark.parametrize(("field", "value"), [("ends", "x"), ("host", 5), ("created", None), ("name", None),
                                               ("revoked", 1), ("expires", True), ("report", "yes")])
def test_a_damaged_admin_index_is_read_past_link_by_link_and_never_gives_a_500(config, store, clock, root_der,
                                                                              other_der, field, value):
    damaged, kept = add(store, root_der).token, add(store, other_der).token
    before = admin_links(client(certdrop.make_app(config, store, clock)))
    index = store.directory / certdrop.ADMIN_INDEX_FILE
    record = json.loads(index.read_text())
    record["links"][damaged][certdrop.LinkSummary._fields.index(field)] = value  # the signature comes first
    record["links"][kept][1] = "kept from the saved index"
    index.write_text(json.dumps(record))
    fresh = client(certdrop.make_app(config, store, clock))
    fresh.get("/admin", status=200)
    links = admin_links(fresh)
    assert links[damaged] == before[damaged]  # read again from its entry file
    assert links[kept]["name"] == "kept from the saved index"  # the rest of the index is still used
    assert fresh.get(f"/admin/api/v1/links/{damaged}").json["name"] == before[damaged]["name"]


def test_count_files_of_stopped_processes_are_folded_into_one_and_a_crash_midway_adds_nothing_twice(store):
    directory, host = store.directory / "counts", certdrop.counts_host()
    directory.mkdir(parents=True)
    store.path_for("abcdefgh").parent.mkdir(parents=True)
    store.path_for("abcdefgh").write_text("{}")  # its entry file: counts of links without one are dropped
    stopped = next(pid for pid in range(99_999, 4_000_000, 7) if not certdrop.is_running(pid))
    files = {f"{host}-{stopped}.json": 2, f"{host}-{os.getpid()}.json": 3, f"{host}-1.json": 4,  # 1: init, running
             f"other-machine-{stopped}.json": 5}
    for name, count in files.items():
        (directory / name).write_text(json.dumps({"format": 1, "counts": {"abcdefgh": {"android": [count, NOW]}}}))
    assert certdrop.fold_stopped_counts(store) == 1
    assert sorted(path.name for path in directory.iterdir()) == sorted(
        [f"{host}-{os.getpid()}.json", f"{host}-1.json", f"other-machine-{stopped}.json", f"{host}-stopped.json"])
    assert certdrop.read_counts(store.directory) == {"abcdefgh": {"android": (14, NOW)}}
    archive = json.loads((directory / f"{host}-stopped.json").read_text())
    name = archive["folded"][0][0]
    (directory / name).write_text(json.dumps({"format": 1, "counts": {"abcdefgh": {"android": [2, NOW]}}}))
    archive["folded"][0][1:] = certdrop._file_signature(directory / name)  # as if a crash came before its removal
    (directory / f"{host}-stopped.json").write_text(json.dumps(archive))
    assert certdrop.fold_stopped_counts(store) == 0 and not (directory / name).exists()
    assert certdrop.read_counts(store.directory) == {"abcdefgh": {"android": (14, NOW)}}
    (directory / name).write_text(json.dumps({"format": 1, "counts": {"abcdefgh": {"android": [1, NOW]}}}))
    assert certdrop.fold_stopped_counts(store) == 1  # a later process with the same id: its counts are added
    assert certdrop.read_counts(store.directory) == {"abcdefgh": {"android": (15, NOW)}}


def test_count_files_drop_links_whose_entry_file_is_gone_when_folded_and_in_the_periodic_write(store, clock, root_der,
                                                                                              other_der, monkeypatch):
    live, tombstone = add(store, root_der).token, add(store, other_der).token
    store.revoke(tombstone)  # its tombstone still answers 410: its downloads stay
    directory, host = store.directory / "counts", certdrop.counts_host()
    directory.mkdir(parents=True)
    stopped = next(pid for pid in range(99_999, 4_000_000, 7) if not certdrop.is_running(pid))
    counted = {token: {"android": [2, NOW]} for token in (live, tombstone, "gonegone", "Not A Token")}
    (directory / f"{host}-{stopped}.json").write_text(json.dumps({"format": 1, "counts": counted}))
    assert certdrop.fold_stopped_counts(store) == 1
    assert set(certdrop.read_counts(store.directory)) == {live, tombstone}
    archive = directory / f"{host}-stopped.json"
    archive.write_text(json.dumps({"format": 1, "folded": [], "counts": counted}))
    assert certdrop.fold_stopped_counts(store) == 0  # nothing stopped since, but the archive is pruned at start
    assert set(certdrop.read_counts_file(archive)) == {live, tombstone}
    counts = certdrop.DownloadCounts(store.directory, clock=clock, has_entry=store.has_entry_file)
    counts.path.write_text(json.dumps({"format": 1, "counts": counted}))
    counts.bump_for(live, "windows", "")()
    assert counts.write() == 1 and set(certdrop.read_counts_file(counts.path)) == set(counted)  # not due yet
    monkeypatch.setattr(certdrop, "COUNTS_PRUNE_SECONDS", 0)
    assert counts.write() == 0  # nothing new counted: pruned all the same
    assert certdrop.read_counts_file(counts.path) == {live: {"android": (2, NOW), "windows": (1, NOW)},
                                                      tombstone: {"android": (2, NOW)}}


def test_counts_that_could_not_be_written_are_written_with_the_next_write(tmp_path):
    counts = certdrop.DownloadCounts(tmp_path / "data", clock=lambda: NOW)
    bump = counts.bump_for("abcdefgh", "android", "")
    bump(), bump()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "counts").write_text("a file where the directory belongs")
    assert counts.write() == 0
    (tmp_path / "data" / "counts").unlink()
    bump()
    assert counts.write() == 3
    assert certdrop.read_counts(tmp_path / "data") == {"abcdefgh": {"android": (3, NOW)}}


def test_list_shows_downloads_and_list_json_gives_the_interfaces_fields(ini, cert_file, capsys, tmp_path):
    token, _ = cli_add(ini, cert_file, capsys)
    app = certdrop.make_app(certdrop.load_config(str(ini)), clock=lambda: NOW)
    fetch(client(app), token, ADMIN_AGENTS["android"], 2)
    app.counts.write()
    assert cli(ini, "list") == 0
    listed = capsys.readouterr().out
    assert re.search(rf"^{token}  live .* Example Root CA  \S+/c/{token}  \(downloads android 2\)$", listed, re.M)
    assert cli(ini, "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["version"] == 1 and listed["links"][0]["token"] == token
    assert listed["links"][0]["fetches"]["android"]["count"] == 2 and listed["links"][0]["state"] == "live"


def test_what_needs_attention_is_logged(config, store, clock, pki, caplog):
    soon = add(store, der_of(pki.root), days=2).token
    add(store, der_of(pki.intermediate), days=60)
    text = certdrop.warn_of_attention(certdrop.AdminIndex(store), config, clock)
    assert soon in text and len(text.splitlines()) == 1
    assert f"needs attention: The link" in caplog.text and soon in caplog.text


def test_the_daily_warning_gives_the_same_link_as_list_and_show(config, store, clock, pki, machine, capsys):
    soon = add(store, der_of(pki.root), days=2).token
    text = certdrop.warn_of_attention(certdrop.AdminIndex(store), config, clock)
    offer = certdrop.cli_offer(config, soon)
    assert offer.url.startswith("http://192.168.1.5:") and f"{offer.url} " in text
    assert "127.0.0.1" not in text


# -- faults: a full or read-only data directory -----------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """Return a 256 KiB tmpfs mounted for this test (the suite runs as root, as CI does)."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(mountpoint)], check=True,
                   capture_output=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def fill(directory):
    """Fill the file system of *directory* to the last byte; return the filler file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as file, contextlib.suppress(OSError):
        while True:
            file.write(b"\0" * 4096)
    return filler


def disk_app(small_disk, clock):
    config = certdrop.Config(data_dir=small_disk / "data", allowed_hosts=TEST_HOSTS)
    return client(certdrop.make_app(config, certdrop.make_store(config, clock), clock)), config


@pytest.mark.slow
def test_a_full_data_directory_answers_503_keeps_links_working_and_recovers(small_disk, clock, root_der, other_der):
    app, config = disk_app(small_disk, clock)
    token = uploaded_token(app, root_der)
    before = files_under(config.data_dir)
    filler = fill(small_disk)
    refusal = upload(app, other_der, status=503)
    assert "data directory is full, so nothing was stored" in html_text(refusal)
    assert files_under(config.data_dir) == before, "nothing half-written is left behind"
    fresh, _ = disk_app(small_disk, clock)  # a process with nothing cached reads the link from the full disk
    assert fresh.get(f"/c/{token}", headers={"User-Agent": S60_AGENTS["e61i"]}).body == root_der
    filler.unlink()
    upload(app, other_der, status=201)


@pytest.mark.slow
def test_a_read_only_data_directory_answers_503_and_recovers_when_writable(small_disk, clock, root_der, other_der):
    app, config = disk_app(small_disk, clock)
    token = uploaded_token(app, root_der)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    refusal = upload(app, other_der, status=503)
    assert "read-only file system" in html_text(refusal)
    fresh, _ = disk_app(small_disk, clock)
    assert fresh.get(f"/c/{token}", headers={"User-Agent": S60_AGENTS["e61i"]}).body == root_der
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    upload(app, other_der, status=201)


@pytest.mark.slow
def test_healthz_answers_503_when_there_is_room_for_a_byte_but_not_for_an_upload(small_disk, clock, root_der):
    app, config = disk_app(small_disk, clock)
    config.data_dir.mkdir()
    filler = fill(small_disk)
    os.truncate(filler, filler.stat().st_size // 4096 * 4096 - 4096)  # one block free
    assert "is full" in app.get("/healthz", status=503, headers={"User-Agent": "curl/8.5.0"}).text
    upload(app, root_der, status=503)


@pytest.mark.slow
def test_healthz_names_a_failed_upload_until_an_upload_works_again(small_disk, clock, root_der, other_der):
    app, config = disk_app(small_disk, clock)
    upload(app, root_der)
    filler = fill(small_disk)
    upload(app, other_der, status=503)
    health = app.get("/healthz", status=503, headers={"User-Agent": "curl/8.5.0"}).text
    assert "is full: the last write failed, and none has worked since" in health
    filler.unlink()
    upload(app, other_der, status=201)
    assert app.get("/healthz").text == "ok\n"


@pytest.mark.slow
def test_the_command_line_says_why_it_cannot_store(small_disk, capsys, root_pem):
    (small_disk / "certdrop.ini").write_text("[certdrop]\ndata_dir = data\n")
    (small_disk / "ca.pem").write_bytes(root_pem)
    fill(small_disk)
    assert certdrop.main(["-c", str(small_disk / "certdrop.ini"), "add", str(small_disk / "ca.pem")]) == 1
    assert "data directory is full" in capsys.readouterr().err


# -- hostile certificate text: one matrix of names, every place a name can go ---------------------------------

HOSTILE_NAMES = {
    "script": ('<script>alert("x")</script>', _ASN1Type.UTF8String),
    "quotes-and-amp": ("\"quoted' & <b>bold</b>", _ASN1Type.UTF8String),
    "javascript-url": ("javascript:alert(1)", _ASN1Type.UTF8String),
    "shell": ('x" ; touch /tmp/pwned ; echo "$(id) `id`', _ASN1Type.UTF8String),
    "crlf": ("line\r\nforged line", _ASN1Type.UTF8String),
    "control-characters": ("bell\x07 escape\x1b[31m nul\x00 del\x7f", _ASN1Type.UTF8String),
    "right-to-left": ("\u202eAC tooR", _ASN1Type.UTF8String),
    "line-separator": ("one\u2028two\u2029three", _ASN1Type.UTF8String),
    "bidi-isolates-and-marks": ("\u2067Root\u2069 \u202aCA\u202c \u202b\u202d\u200e\u200f\u061c", _ASN1Type.UTF8String),
    "invisible-format": ("Root\u200bCA\u200d\u2060\ufeff\u00ad\U000e0041 \u0085", _ASN1Type.UTF8String),
    "dollar": ("$(name) $$", _ASN1Type.UTF8String),
    "very-long": ("x" * 10000, _ASN1Type.UTF8String),
    "printable-string": ("Printable (CA) = x'y", _ASN1Type.PrintableString),
    "numeric-string": ("0123 <456>", _ASN1Type.NumericString),
    "ia5-string": ("<ia5> \x1b]0;title\x07", _ASN1Type.IA5String),
    "t61-string": ("<t61> \u00e9", _ASN1Type.T61String),
    "visible-string": ("<visible> $(id)", _ASN1Type.VisibleString),
    "universal-string": ("<universal> \u202e\U0001f512", _ASN1Type.UniversalString),
    "bmp-string": ("<bmp> \u2028\u00e9", _ASN1Type.BMPString),
    "octet-string": ("<octet>\r\n", _ASN1Type.OctetString),
}
HOSTILE = pytest.mark.parametrize("hostile", HOSTILE_NAMES, ids=HOSTILE_NAMES, indirect=True)

#: What must not reach a page from a name: format characters (bidi controls, zero-width ones), line and paragraph
#: separators, and controls beyond ASCII.
def invisible_characters(text):
    return [f"U+{ord(char):04X}" for char in text if unicodedata.category(char) in ("Cf", "Zl", "Zp")
            or unicodedata.category(char) == "Cc" and not char.isascii()]


#: What must not reach a terminal line: controls, bidi controls, line separators.
TERMINAL_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def hostile_certificate(name, string_type, ca=True, issuer=None):
    with warnings.catch_warnings():  # the library warns about names longer than X.509's 64 characters
        warnings.simplefilter("ignore")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name, _type=string_type, _validate=False)])
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
            .public_key(key.public_key()).serial_number(5).not_valid_before(datetime.datetime(2025, 1, 1))
            .not_valid_after(datetime.datetime(2035, 1, 1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return der_of(cert)


class Hostile(typing.NamedTuple):
    name: str
    string_type: _ASN1Type
    der: bytes  # a root CA whose CN is *name*


@pytest.fixture
def hostile(request):
    name, string_type = HOSTILE_NAMES[request.param]
    return Hostile(name, string_type, hostile_certificate(name, string_type))


@pytest.fixture
def hostile_token(testapp, hostile):
    return uploaded_token(testapp, hostile.der)


@pytest.mark.slow  # one upload per hostile name: with the rest of the matrix about 3 s
@HOSTILE
def test_hostile_names_leave_html_pages_well_formed_and_inert(testapp, hostile, hostile_token):
    pages = [upload(testapp, hostile.der, status=200)]
    pages += [testapp.get(f"/c/{hostile_token}", headers={"User-Agent": USER_AGENTS[agent][0]})
              for agent in ("android-chrome", "iphone-safari", "macos-chrome", "windows-edge", "linux-chrome",
                            "linux-firefox")]
    pages += [testapp.get(path) for path in ("/admin", f"/admin/link/{hostile_token}",
                                             f"/admin/link/{hostile_token}/revoke")]
    for page in pages:
        ET.fromstring(page.body)
        assert b"<script>" not in page.body and b"<b>bold" not in page.body and b"<ia5>" not in page.body


@pytest.mark.slow  # one upload per hostile name: with the rest of the matrix about 3 s
@HOSTILE
def test_hostile_names_leave_nokia_pages_well_formed_and_wml_variables_escaped(testapp, hostile_token):
    for accept in ("application/vnd.wap.xhtml+xml", "text/vnd.wap.wml"):
        page = s40_page(testapp, hostile_token, accept)
        ET.fromstring(page.body)
        assert b"<script>" not in page.body
        if accept == "text/vnd.wap.wml":
            assert not re.search(rb"(?<!\$)\$(?!\$)", page.body.replace(b"$$", b"")), "a lone $ starts a WML variable"


@pytest.mark.slow  # one upload per hostile name: with the rest of the matrix about 3 s
@HOSTILE
def test_hostile_names_cannot_reorder_or_break_html_xhtml_mp_or_wml_pages(testapp, hostile, hostile_token):
    desktop = {"User-Agent": USER_AGENTS["windows-edge"][0]}
    leaf = hostile_certificate(hostile.name, hostile.string_type, ca=False, issuer=make_name("Some Issuing CA"))
    pages = {"upload result": upload(testapp, hostile.der, status=200),
             "refusal": testapp.post("/", upload_files=[("cert", "leaf.cer", leaf)], status=422),
             "landing": testapp.get(f"/c/{hostile_token}", headers=desktop),
             "card": testapp.get(f"/c/{hostile_token}/card", headers=desktop),
             "developer": testapp.get(f"/c/{hostile_token}/dev", headers=desktop),
             "xhtml-mp": s40_page(testapp, hostile_token, "application/vnd.wap.xhtml+xml"),
             "wml": s40_page(testapp, hostile_token, "text/vnd.wap.wml"),
             "admin": testapp.get("/admin", headers=desktop),
             "admin link": testapp.get(f"/admin/link/{hostile_token}", headers=desktop)}
    for where, page in pages.items():
        assert not invisible_characters(page.text), where
    shown = {ascii(char)[1:-1] for char in hostile.name if invisible_characters(char)}
    assert all(escape in pages["landing"].text and escape in pages["wml"].text for escape in shown)


@pytest.mark.slow  # one upload per hostile name: with the rest of the matrix about 3 s
@HOSTILE
def test_hostile_names_keep_profiles_parseable_and_on_one_line(testapp, hostile_token):
    profile = plistlib.loads(testapp.get(f"/c/{hostile_token}/ca.mobileconfig").body)
    for name in (profile["PayloadDisplayName"], profile["PayloadContent"][0]["PayloadDisplayName"]):
        assert not re.search("[\r\n\u2028\u2029\u202a-\u202e\u2066-\u2069]", name)


@pytest.mark.slow  # one upload per hostile name: with the rest of the matrix about 3 s
@HOSTILE
def test_hostile_names_never_reach_file_names(testapp, hostile_token):
    for query in ("der", "pem", "mobileconfig"):
        disposition = testapp.get(f"/c/{hostile_token}?format={query}").headers["Content-Disposition"]
        assert re.fullmatch(r'attachment; filename="[A-Za-z0-9._-]+\.(crt|mobileconfig)"', disposition)


@pytest.mark.slow  # one upload per hostile name: with the rest of the matrix about 3 s
@HOSTILE
def test_hostile_names_never_land_unquoted_in_a_command_shown_to_paste(testapp, hostile_token):
    page = testapp.get(f"/c/{hostile_token}", headers={"User-Agent": USER_AGENTS["linux-chrome"][0]})
    steps = [li.get_text() for li in page.html.find_all("li")]
    nss = next(step for step in steps if "certutil -d" in step)
    command = shlex.split(nss[nss.index("certutil -d"):nss.index(" (certutil comes")])
    assert command[:8] == ["certutil", "-d", "sql:$db", "-A", "-t", "C,,", "-n", command[7]]
    assert re.fullmatch(r"[A-Za-z0-9._-]+", command[7]) and command[8:] == ["-i", "$d/ca.der"]


@HOSTILE
def test_hostile_names_in_refusals_stay_one_line_for_curl_and_exact_in_json(testapp, hostile):
    leaf = hostile_certificate(hostile.name, hostile.string_type, ca=False, issuer=make_name("Some Issuing CA"))
    files = [("cert", "leaf.cer", leaf)]
    text = testapp.post("/", upload_files=files, headers={"User-Agent": "curl/8.5.0"}, status=422)
    assert text.content_type == "text/plain" and text.text.count("\n") == 1 and text.text.endswith("\n")
    assert not TERMINAL_UNSAFE.search(text.text[:-1])
    answer = testapp.post("/", upload_files=files, headers={"Accept": "application/json"}, status=422).json
    assert hostile.name in answer["error"]["message"]


@pytest.mark.slow  # each hostile name through every command: with the rest of the matrix about 3 s
@HOSTILE
def test_hostile_names_stay_on_one_terminal_line_in_every_command(tmp_path, capsys, hostile):
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\ndata_dir = data\npublic_url = http://ca.example.org\n")
    (tmp_path / "ca.der").write_bytes(hostile.der)
    run = lambda *args: certdrop.main(["-c", str(ini), *args], clock=lambda: NOW)  # noqa: E731
    assert run("add", str(tmp_path / "ca.der")) == 0
    added = capsys.readouterr().out
    token = re.search(r"/c/([a-z0-9]+)", added)[1]
    assert run("check", str(tmp_path / "ca.der")) in (0, 1)
    checked = capsys.readouterr().out
    assert run("list") == 0
    listed = capsys.readouterr().out
    assert run("show", token) == 0
    shown = capsys.readouterr().out
    assert listed.count("\n") == 1, "one entry, one line"
    for output in (added, checked, listed, shown):
        assert not TERMINAL_UNSAFE.search(output.replace("\n", ""))


@HOSTILE
def test_hostile_names_are_exact_in_json_reports(tmp_path, capsys, hostile):
    (tmp_path / "ca.der").write_bytes(hostile.der)
    certdrop.main(["check", "--json", str(tmp_path / "ca.der")])
    report = json.loads(capsys.readouterr().out)
    assert report[0]["certificates"][0]["name"] == hostile.name


@HOSTILE
def test_hostile_names_stay_on_one_line_in_the_log(hostile):
    record = logging.LogRecord("certdrop", logging.INFO, __file__, 1, "new link %s for %r", ("abcdefgh", hostile.name),
                               None)
    line = certdrop.TerminalFormatter("%(levelname)s %(message)s").format(record)
    assert not TERMINAL_UNSAFE.search(line)


def test_terminal_lines_show_controls_and_bidi_characters_escaped():
    assert certdrop.term("a\r\nb\x1b[31m\u202ec\u2028") == "a\\r\\nb\\x1b[31m\\u202ec\\u2028"
    name = os.fsdecode(b"n\xff.pem")  # a file name's undecodable byte: a lone surrogate no UTF-8 terminal takes
    assert certdrop.term(name) == "n\\udcff.pem" and certdrop.term(name).encode("utf-8")


@pytest.mark.slow
@pytest.mark.parametrize(("arguments", "message"), [
    (["--port", "99999"], "is not a port number"),  # waitress alone would listen on 34463
    (["--port", "-1"], "is not a port number"),
    (["--host", "256.1.1.1", "--port", "0"], "cannot listen on 256.1.1.1"),
])
def test_serve_refuses_an_address_it_cannot_listen_on_as_bad_usage(ini, arguments, message):
    refused = run_cli(ini, "serve", *arguments)  # a process: one that serves after all ends in a time-out
    assert refused.returncode == certdrop.CHECK_ERROR and message in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.slow
def test_check_reads_no_more_of_a_file_than_may_be_uploaded(ini):
    def at_most_a_gigabyte():
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    refused = subprocess.run([sys.executable, str(HERE / "certdrop.py"), "-c", str(ini), "check", "/dev/zero"],
                             capture_output=True, text=True, timeout=60, preexec_fn=at_most_a_gigabyte)
    assert refused.returncode != 0 and "larger than max_upload" in refused.stderr  # endless, yet read to 1 MiB


def test_an_ini_file_name_that_cannot_be_read_is_one_safe_line(tmp_path, capsys):
    assert certdrop.main(["-c", str(tmp_path / "\x1b[31mx.ini"), "list"]) == certdrop.CHECK_ERROR
    error = capsys.readouterr().err
    assert "\x1b" not in error and "\\x1b[31mx.ini" in error and error.count("\n") == 1


def test_file_names_keep_accented_letters_and_never_join_two_cas_of_other_scripts():
    def stem(name, serial):
        return certdrop.inspect_certificate(make_certificate(name, serial=serial)[0]).file_stem

    assert stem("Zweite Wurzel-CA \u00dcmlaut", 1) == "Zweite_Wurzel-CA_Umlaut"
    first = stem("\u041a\u043e\u0440\u043d\u0435\u0432\u043e\u0439 CA", 2)  # Cyrillic words, then CA
    second = stem("\u041a\u043e\u0440\u0435\u043d\u044c CA", 3)
    assert first != second and re.fullmatch(r"CA-[0-9a-f]{8}", first) and re.fullmatch(r"CA-[0-9a-f]{8}", second)
    assert re.fullmatch(r"ca-[0-9a-f]{8}", stem("\u6839\u8bc1\u4e66", 4)) and stem("Example Root CA", 5) == \
        "Example_Root_CA"


# -- command line ----------------------------------------------------------------------------------------------


@pytest.fixture
def cert_file(tmp_path, root_pem):
    path = tmp_path / "ca.pem"
    path.write_bytes(root_pem)
    return path


def list_lines_without_links(out):
    """Return the lines of ``list`` without their last column (the link) and the note that follows them."""
    return [line.rsplit("  ", 1)[0] for line in out.splitlines() if not line.startswith("note: ")]


def cli_add(ini, cert_file, capsys, *options):
    assert cli(ini, "add", str(cert_file), *options) == 0
    out = capsys.readouterr().out
    return re.search(r"/c/([a-z0-9]+)", out)[1], out


def test_add_prints_the_link_and_fingerprints(ini, cert_file, capsys, root):
    token, out = cli_add(ini, cert_file, capsys, "--ttl", "12h")
    assert out.startswith(f"http://ca.example.org:8080/c/{token}\n")
    assert root[0].fingerprint(hashes.SHA256()).hex(":").upper() in out


def test_a_loopback_public_url_still_leads_and_add_names_the_machines_address_beside_it(tmp_path, cert_file, capsys,
                                                                                         machine):
    ini = tmp_path / "local.ini"
    ini.write_text("[certdrop]\ndata_dir = data\npublic_url = http://localhost:8080\n")
    token, out = cli_add(ini, cert_file, capsys)
    assert out.startswith(f"http://localhost:8080/c/{token}\n")
    assert ("  Phones cannot open localhost: it is this server's own loopback name. It is public_url in certdrop.ini, "
            "so it leads all the same: set public_url to a name phones can open, such as http://192.168.1.5:8080.\n"
            ) in out
    assert f"  also http://192.168.1.5:8080/c/{token}\n  also http://server.corp.example:8080/c/{token}\n" in out


def test_sweep_does_not_push_hot_entries_out_of_the_cache(config, clock, root_der, other_der):
    store = certdrop.Store(config.data_dir, clock=clock, cache_entries=1)
    add(store, other_der, days=1)
    hot = add(store, root_der, days=30)
    clock.advance(2 * DAY)
    assert store.sweep()["expired"] == 1
    assert list(store.memory._cache) == [hot.token]


def test_add_of_a_missing_file_fails_with_a_one_line_reason(ini, tmp_path, capsys):
    assert cli(ini, "add", str(tmp_path / "nope.pem")) == 1
    err = capsys.readouterr().err
    assert err.startswith("certdrop: cannot read") and err.count("\n") == 1


def test_add_refuses_a_private_key(ini, tmp_path, key_pem, capsys):
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(key_pem)
    assert cli(ini, "add", str(key_file)) == 1
    assert "private key" in capsys.readouterr().err
    assert files_under(tmp_path / "data") == []


def test_list_shows_links_and_their_state(ini, cert_file, capsys):
    token, _ = cli_add(ini, cert_file, capsys)
    assert cli(ini, "list") == 0
    assert re.search(rf"^{token}  live .* Example Root CA  http://ca.example.org:8080/c/{token}$",
                     capsys.readouterr().out, re.M)


def test_show_prints_the_certificate_facts(ini, cert_file, capsys):
    token, _ = cli_add(ini, cert_file, capsys)
    assert cli(ini, "show", token.upper()) == 0
    out = capsys.readouterr().out
    assert "CN=Example Root CA,O=Example Org" in out and "live until" in out


def test_revoke_stops_a_link(ini, cert_file, capsys):
    token, _ = cli_add(ini, cert_file, capsys)
    assert cli(ini, "revoke", token) == 0
    assert cli(ini, "show", token) == 0
    assert "revoked on" in capsys.readouterr().out
    assert cli(ini, "revoke", token) == 1


def test_an_ended_link_still_says_which_certificate_it_was(ini, cert_file, capsys, root):
    token, _ = cli_add(ini, cert_file, capsys)
    assert cli(ini, "revoke", token) == 0 and cli(ini, "list") == 0
    assert list_lines_without_links(capsys.readouterr().out)[-1].endswith("  Example Root CA")
    assert cli(ini, "show", token) == 0
    shown = capsys.readouterr().out
    assert "name      Example Root CA" in shown and root[0].fingerprint(hashes.SHA256()).hex(":").upper() in shown


def test_a_store_written_by_the_previous_release_keeps_working(tmp_path, capsys, root_der):
    """Entries as 0.1.0 wrote them: a live one, and a tombstone that remembers nothing of its certificate."""
    data = tmp_path / "data"
    for token, record in {
        "abcdefgh": {"format": 1, "token": "abcdefgh", "created": NOW, "expires": NOW + DAY, "revoked": None,
                     "sha256": hashlib.sha256(root_der).hexdigest(), "der": base64.b64encode(root_der).decode()},
        "bcdefghj": {"format": 1, "token": "bcdefghj", "created": NOW - DAY, "expires": NOW, "revoked": NOW - 60},
    }.items():
        (data / token[:2]).mkdir(parents=True, exist_ok=True)
        (data / token[:2] / f"{token}.json").write_text(json.dumps(record, indent=1) + "\n")
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\ndata_dir = data\n")
    assert cli(ini, "list") == 0
    assert list_lines_without_links(capsys.readouterr().out) == [
        f"abcdefgh  live     {certdrop.format_time(NOW + DAY)}  Example Root CA",
        f"bcdefghj  revoked  {certdrop.format_time(NOW - 60)}  -"]
    assert cli(ini, "show", "bcdefghj") == 0 and "revoked on" in capsys.readouterr().out
    app = client(certdrop.make_app(certdrop.load_config(str(ini)), clock=FakeClock()))
    assert app.get("/c/abcdefgh", headers={"User-Agent": S60_AGENTS["e61i"]}).body == root_der
    app.get("/c/bcdefghj", status=410)


def test_a_store_written_by_certdrop_0_2_keeps_working_and_is_rewritten_as_it_changes(tmp_path, capsys, root_der,
                                                                                       other_der):
    """Entries in format 1 as 0.2 wrote them: live links with a revocation hash, and a tombstone that remembers."""
    data, secret = tmp_path / "data", "s3cret-from-the-result-page"
    records = {
        "abcdefgh": {"format": 1, "token": "abcdefgh", "created": NOW, "expires": NOW + DAY, "revoked": None,
                     "sha256": hashlib.sha256(root_der).hexdigest(), "der": base64.b64encode(root_der).decode(),
                     "revoke_sha256": hashlib.sha256(secret.encode()).hexdigest()},
        "bcdefghj": {"format": 1, "token": "bcdefghj", "created": NOW - DAY, "expires": NOW + 60, "revoked": None,
                     "sha256": hashlib.sha256(other_der).hexdigest(), "der": base64.b64encode(other_der).decode()},
        "cdefghjk": {"format": 1, "token": "cdefghjk", "created": NOW - DAY, "expires": NOW, "revoked": NOW - 60,
                     "was": {"name": "Old CA", "sha256": "ab" * 32, "not_before": NOW - 9 * DAY,
                             "not_after": NOW + 9 * DAY}},
    }
    for token, record in records.items():
        (data / token[:2]).mkdir(parents=True, exist_ok=True)
        (data / token[:2] / f"{token}.json").write_text(json.dumps(record, indent=1) + "\n")
    (data / "sha256").mkdir()
    (data / "sha256" / hashlib.sha256(root_der).hexdigest()).write_text("abcdefgh")
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\ndata_dir = data\nallowed_hosts = ca.example.org\n")
    assert cli(ini, "list") == 0
    assert list_lines_without_links(capsys.readouterr().out) == [
        f"abcdefgh  live     {certdrop.format_time(NOW + DAY)}  Example Root CA",
        f"bcdefghj  live     {certdrop.format_time(NOW + 60)}  Second CA",
        f"cdefghjk  revoked  {certdrop.format_time(NOW - 60)}  Old CA"]
    clock = FakeClock()
    app = client(certdrop.make_app(certdrop.load_config(str(ini)), clock=clock))
    assert app.get("/c/abcdefgh", headers={"User-Agent": S60_AGENTS["e61i"]}).body == root_der
    assert "Example Root CA" in app.get("/c/abcdefgh", headers={"User-Agent": USER_AGENTS["android-chrome"][0]})
    app.get("/c/cdefghjk", status=410)
    # the same certificate uploaded for longer keeps its link; the entry is rewritten in the new format
    again = upload(app, root_der, ttl="30d", status=200)
    assert token_of(again) == "abcdefgh"
    rewritten = json.loads((data / "ab" / "abcdefgh.json").read_text())
    assert rewritten["format"] == 2 and rewritten["revoke_sha256"] == records["abcdefgh"]["revoke_sha256"]
    assert rewritten["certificate"]["self_signed"] is True and rewritten["expires"] == NOW + 30 * DAY
    app.post("/c/abcdefgh/revoke", {"secret": secret}, headers={"User-Agent": "curl/8.5.0"})
    app.get("/c/abcdefgh", status=410)
    clock.advance(120)  # the old entry that expires is swept into a tombstone that remembers its certificate
    assert certdrop.main(["-c", str(ini), "gc"], clock=clock) == 0
    tombstone = json.loads((data / "bc" / "bcdefghj.json").read_text())
    assert "der" not in tombstone and tombstone["was"]["name"] == "Second CA"


def test_add_with_port_0_says_no_address_is_known(tmp_path, cert_file, capsys):
    ini = tmp_path / "zero.ini"
    ini.write_text("[certdrop]\ndata_dir = data\nport = 0\n")
    assert cli(ini, "add", str(cert_file)) == 0
    out = capsys.readouterr().out
    assert "No address is known for these links" in out and ":0/" not in out
    assert re.search(r"^/c/[a-z2-9]{8}$", out, re.MULTILINE)


def test_gc_reports_what_it_removed(ini, cert_file, capsys):
    cli_add(ini, cert_file, capsys)
    assert cli(ini, "gc") == 0
    assert capsys.readouterr().out == "0 expired, 0 deleted, 0 temporary files removed\n"


def test_show_of_an_unknown_token_fails(ini, capsys):
    assert cli(ini, "show", "abcdefgh") == 1
    assert "no link" in capsys.readouterr().err


def test_list_show_and_gc_report_a_damaged_entry_and_carry_on(ini, cert_file, tmp_path, capsys, other_der):
    token, _ = cli_add(ini, cert_file, capsys)
    (tmp_path / "other.der").write_bytes(other_der)
    other, _ = cli_add(ini, tmp_path / "other.der", capsys)
    damage(certdrop.Store(tmp_path / "data"), token, expires=1e300)
    assert cli(ini, "list") == 0
    listed = capsys.readouterr().out.splitlines()
    assert sorted(listed) == sorted([f"{token}  damaged  (not served; the log says why)",
                                     next(line for line in listed if line.startswith(other))])
    assert cli(ini, "show", token) == 1
    assert "is damaged" in capsys.readouterr().err
    assert cli(ini, "gc") == 0
    assert "1 damaged entry left as it is" in capsys.readouterr().out


DEEP = 100_000


def entry_file(change=lambda record: record, raw=b""):
    """Return a writer of an entry file: its record as *change* makes it, with *raw* JSON text where it put "RAW"."""
    def write(path, record):
        path.write_bytes(json.dumps(change(record)).encode().replace(b'"RAW"', raw))
    return write


def entry_bytes(data):
    return lambda path, record: path.write_bytes(data)


def entry_node(make):
    """Return a writer that puts what *make* makes (a directory, a FIFO) where the entry file was."""
    def write(path, record):
        path.unlink()
        make(path)
    return write


def every_field(value):
    return entry_file(lambda record: dict.fromkeys(record, value))


def in_facts(raw=b"", **facts):
    return entry_file(lambda record: {**record, "certificate": {**record["certificate"], **facts}}, raw)


def as_tombstone(**was):
    def change(record):
        kept = {name: value for name, value in record.items() if name not in ("der", "sha256", "certificate")}
        return {**kept, "was": {"name": "CA", "sha256": "0" * 64, "not_before": 0, "not_after": 1, **was}}
    return entry_file(change)


HOSTILE_ENTRY_FILES = {
    "arrays-nested-100000-deep": entry_bytes(b"[" * DEEP + b"]" * DEEP),
    "objects-nested-100000-deep": entry_bytes(b'{"a":' * DEEP + b"1" + b"}" * DEEP),
    "facts-nested-100000-deep": entry_file(lambda record: {**record, "certificate": "RAW"},
                                           b"[" * DEEP + b"]" * DEEP),
    "tombstone-memory-nested-100000-deep": entry_file(lambda record: {**record, "was": "RAW"},
                                                      b'{"a":' * DEEP + b"1" + b"}" * DEEP),
    "expiry-1e400": entry_file(lambda record: {**record, "expires": "RAW"}, b"1e400"),
    "creation-an-integer-of-100000-digits": entry_file(lambda record: {**record, "created": "RAW"}, b"9" * DEEP),
    "key-size-an-integer-of-100000-digits": in_facts(b"9" * DEEP, key_bits="RAW"),
    "serial-not-hex": in_facts(serial="0x1f"),
    "token-ten-million-characters": entry_file(lambda record: {**record, "token": "a" * 10 ** 7}),
    "certificate-ten-million-characters-of-base64": entry_file(lambda record: {**record, "der": "A" * 10 ** 7}),
    "end-date-ten-million-digits": in_facts(not_after="9" * 10 ** 7),
    "tombstone-name-of-a-million-characters": as_tombstone(name="x" * 10 ** 6),
    "tombstone-fingerprint-not-hex": as_tombstone(sha256="zz" * 32),
    "name-with-a-lone-surrogate": in_facts(subject="CN=\ud800", common_names=["\ud800"]),
    "format-true": entry_file(lambda record: {**record, "format": True}),
    "format-two-point-zero": entry_file(lambda record: {**record, "format": 2.0}),
    "key-size-true": in_facts(key_bits=True),
    "every-field-null": every_field(None),
    "every-field-true": every_field(True),
    "every-field-a-number": every_field(1.5),
    "every-field-text": every_field("x"),
    "every-field-a-list": every_field([]),
    "every-field-an-object": every_field({}),
    "not-utf-8": entry_bytes(b'{"format": 2, "token": "\xff\xfe"}'),
    "a-list": entry_bytes(b"[1, 2, 3]"),
    "a-string": entry_bytes(b'"entry"'),
    "a-number": entry_bytes(b"2"),
    "null": entry_bytes(b"null"),
    "empty": entry_bytes(b""),
    "a-directory": entry_node(Path.mkdir),
    "a-fifo": entry_node(os.mkfifo),
}


def node_state(path):
    status = os.lstat(path)
    return status.st_ino, status.st_mode, status.st_size, status.st_mtime_ns


@pytest.mark.slow  # files of ten million characters, about 1.5 s together
@pytest.mark.parametrize("write", HOSTILE_ENTRY_FILES.values(), ids=HOSTILE_ENTRY_FILES)
def test_a_hostile_entry_file_is_damaged_everywhere_and_crashes_nothing(write, ini, config, clock, root_der,
                                                                        other_der, capsys):
    store = certdrop.make_store(config, clock)
    token = add(store, root_der).token
    store.add(certdrop.load_der(other_der), clock() - 1)  # ended: the sweep makes it a tombstone
    path = store.path_for(token)
    write(path, json.loads(path.read_text()))
    before = node_state(path)
    client(certdrop.make_app(config, clock=clock)).get(f"/c/{token}", status=404)
    assert certdrop.make_store(config, clock).sweep()["expired"] == 1, "the other entries are swept"
    assert cli(ini, "list") == 0
    assert f"{token}  damaged  (not served; the log says why)" in capsys.readouterr().out.splitlines()
    assert cli(ini, "gc") == 0
    assert node_state(path) == before


def test_the_background_sweep_logs_an_unexpected_error_and_sweeps_again(store, monkeypatch, caplog):
    stop, sweeps = threading.Event(), []

    def sweep():
        sweeps.append("sweep")
        if len(sweeps) == 1:
            raise RecursionError("maximum recursion depth exceeded")
        stop.set()
        return {"expired": 0, "deleted": 0, "temporary": 0, "damaged": 0}

    monkeypatch.setattr(store, "sweep", sweep)
    certdrop.sweep_forever(store, 0.01, stop)
    assert len(sweeps) == 2
    failure = next(record for record in caplog.records if "sweep failed" in record.getMessage())
    assert failure.levelno == logging.ERROR and failure.exc_info[0] is RecursionError


@pytest.mark.slow
@pytest.mark.parametrize("package", ["cryptography", "multipart"])
def test_a_missing_dependency_is_one_line_saying_how_to_install_it(tmp_path, package):
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text(
        f"raise ModuleNotFoundError({'No module named ' + package!r}, name={package!r})\n")
    result = subprocess.run([sys.executable, str(HERE / "certdrop.py"), "list"], capture_output=True, text=True,
                            timeout=30, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and f"package {package!r} is missing" in result.stderr
    assert ".venv/bin/pip install -r requirements.txt" in result.stderr


@pytest.mark.slow
def test_list_piped_into_head_stays_quiet(ini, tmp_path):
    store = certdrop.Store(tmp_path / "data")
    was = certdrop.Remembered("A CA with a name long enough to fill the pipe sooner", bytes(32), NOW, NOW)
    for number in range(1500):  # more lines than a pipe holds, so the writer meets the closed end
        token = f"zz{number:04d}".translate(str.maketrans("01", "yx")) + "ab"
        store._write(certdrop.Entry(token, NOW, NOW, revoked=NOW, was=was), remember=False)
    result = subprocess.run(f"{shlex.quote(sys.executable)} {shlex.quote(str(HERE / 'certdrop.py'))} -c "
                            f"{shlex.quote(str(ini))} list | head -1", shell=True, capture_output=True, text=True,
                            timeout=30)
    assert result.stderr == "" and result.stdout.count("\n") == 1


def test_bad_config_fails_naming_the_key(tmp_path, capsys):
    ini = tmp_path / "bad.ini"
    ini.write_text("[certdrop]\nmax_upload = lots\n")
    assert certdrop.main(["-c", str(ini), "list"]) == 3
    assert "'max_upload'" in capsys.readouterr().err


# -- real processes --------------------------------------------------------------------------------------------


#: What starts a real process or program. A test that names one of these, itself or through a fixture or helper of
#: this file that does (followed to any depth), carries @pytest.mark.slow, so `pytest -m "not slow"` starts none
#: but the one below.
PROCESS_STARTERS = frozenset({
    "subprocess", "multiprocessing", "pty", "os.fork", "os.system", "os.popen", "os.posix_spawn",  # any program
    "Controller",  # aiosmtpd's SMTP server, on a thread and a port of its own
    "webdriver",  # headless Chromium through chromedriver
    "Server", "run_cli", "smtp_server", "small_disk", "browser",  # this file's own, found anyway: named for the reader
})
#: Left out on purpose: the session's PKI runs openssl a few times, once a run (about 0.6 s), for the doctor tests;
#: they are the heart of the fast run, and marking every test that uses it would leave the doctor out.
STARTS_ONCE_PER_SESSION = frozenset({"PKI"})


def names_in(node):
    """Return every name *node* mentions: variables, parameters (so fixtures) and ``module.attribute`` pairs."""
    names = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Name):
            names.add(child.id)
        elif isinstance(child, ast.arg):
            names.add(child.arg)
        elif isinstance(child, ast.Attribute) and isinstance(child.value, ast.Name):
            names.add(f"{child.value.id}.{child.attr}")
    return names


def test_every_test_that_starts_a_process_is_marked_slow():
    definitions = {node.name: node for node in ast.parse(Path(__file__).read_text()).body
                   if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    mentions = {name: names_in(node) for name, node in definitions.items()}
    starters, grown = set(PROCESS_STARTERS), True
    while grown:  # a fixture or helper that uses a starter is one, and so is whatever uses that
        found = {name for name, names in mentions.items() if not name.startswith("test_")
                 and name not in STARTS_ONCE_PER_SESSION and names & starters}
        grown = not found <= starters
        starters |= found
    starting = [name for name, names in mentions.items() if name.startswith("test_") and names & starters]
    unmarked = [name for name in starting
                if "pytest.mark.slow" not in map(ast.unparse, definitions[name].decorator_list)]
    assert "test_real_server_uploads_serves_s60_follows_the_cli_and_stops_cleanly" in starting  # the scan sees them
    assert unmarked == [], "these start a process, so mark them @pytest.mark.slow: " + ", ".join(unmarked)


class Server:
    """A real ``certdrop.py serve`` on a free loopback port."""

    def __init__(self, ini, host="127.0.0.1"):
        self.ini = ini
        self.process = subprocess.Popen([sys.executable, str(HERE / "certdrop.py"), "-c", str(ini), "serve",
                                         "--host", host, "--port", "0"],
                                        stderr=subprocess.PIPE, text=True)
        self.log = []
        for line in self.process.stderr:
            self.log.append(line)
            match = re.search(r"serving on (http://\S+?)/ ", line)
            if match:
                self.url = match[1].replace("//0.0.0.0:", "//127.0.0.1:")  # on every interface: ask by loopback
                break
        else:
            raise RuntimeError("server did not start:\n" + "".join(self.log))
        self._drain = threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True)
        self._drain.start()

    def request(self, path, data=None, headers=None):
        request = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def stop(self, signum=signal.SIGTERM):
        self.process.send_signal(signum)
        code = self.process.wait(timeout=10)
        self._drain.join(timeout=5)
        self.process.stderr.close()
        return code


def oversize_status(url, length):
    """Announce a body of *length* bytes, send none of it, and return the status the server answers with."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as connection:
        connection.sendall(f"POST / HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: text/plain\r\n"
                           f"Content-Length: {length}\r\n\r\n".encode())
        return int(connection.recv(4096).split(b" ", 2)[1])


def run_cli(ini, *args):
    return subprocess.run([sys.executable, str(HERE / "certdrop.py"), "-c", str(ini), *args],
                          capture_output=True, text=True, timeout=30)


def links_a_server_gives(server, pem):
    """Return (token, {where: (link, note, alternatives)}) of an upload to *server* as text, as JSON and as a page."""
    _, headers, body = server.request("/", pem, {"Content-Type": "application/x-pem-file", "User-Agent": "curl/8.5"})
    text = body.decode()
    token = re.search(r"/c/([a-z0-9]+)", text)[1]
    _, _, body = server.request("/", pem, {"Content-Type": "application/x-pem-file", "Accept": "application/json"})
    data = json.loads(body)["links"][0]
    _, _, body = server.request("/", pem, {"Content-Type": "application/x-pem-file", "User-Agent": "Mozilla/5.0"})
    page = bs4.BeautifulSoup(body, "html.parser")
    note = page.find("p", class_="warn")
    return token, {
        "location": (headers["Location"], None, None),
        "text": (text.splitlines()[0], (text.splitlines()[3].strip() if text.splitlines()[3].startswith("  Phones")
                                        else None), [line.strip()[5:] for line in text.splitlines()
                                                     if line.startswith("  also ")]),
        "json": (data["url"], data["url_note"], data["alternatives"]),
        "page": (page.find("p", class_="link").get_text(), note.get_text(" ") if note else None, None)}


@pytest.mark.slow
def test_add_show_list_and_every_answer_give_one_link_on_the_port_serve_recorded(tmp_path, root_pem, other_der):
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\ndata_dir = data\nport = 8080\n")  # the port the ini names, not the one in use
    server = Server(ini, host="0.0.0.0")
    try:
        port = int(server.url.rsplit(":", 1)[1])
        assert json.loads((tmp_path / "data" / "listening").read_text())["port"] == port != 8080
        token, links = links_a_server_gives(server, root_pem)
        offer = certdrop.offer_link(f"http://127.0.0.1:{port}/c/{token}", "0.0.0.0")
        alternatives = [url for url, _ in offer.alternatives]
        assert links["location"][0] == links["text"][0] == links["json"][0] == links["page"][0] == offer.url
        assert links["json"][1:] == (offer.note, alternatives) and links["text"][1:] == (offer.note, alternatives)
        assert " ".join(links["page"][1].split()).startswith(offer.note)
        shown = run_cli(ini, "show", token).stdout.splitlines()
        assert shown[0] == f"link      {offer.url}" and shown[1] == f"          {offer.note}"
        listed = next(line for line in run_cli(ini, "list").stdout.splitlines() if line.startswith(token))
        assert listed.endswith(f"  {offer.url}")
        (tmp_path / "other.cer").write_bytes(other_der)
        added = run_cli(ini, "add", "--no-qr", str(tmp_path / "other.cer")).stdout.splitlines()
        new_token = re.search(r"/c/([a-z0-9]+)", added[0])[1]
        new_offer = certdrop.offer_link(f"http://127.0.0.1:{port}/c/{new_token}", "0.0.0.0")
        assert added[0] == new_offer.url and (not offer.note or added[1] == f"  {new_offer.note}")
        assert f":{port}/c/" in added[0]
    finally:
        assert server.stop() == 0
    assert not (tmp_path / "data" / "listening").exists()


@pytest.mark.slow
def test_a_server_on_loopback_only_offers_no_machine_address_in_any_answer_or_command(tmp_path, root_pem):
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\ndata_dir = data\n")
    server = Server(ini)  # --host 127.0.0.1
    try:
        token, links = links_a_server_gives(server, root_pem)
        url = f"{server.url}/c/{token}"
        assert {link for link, _, _ in links.values()} == {url}
        assert links["json"][2] == [] and links["text"][2] == []
        assert "This server listens only on 127.0.0.1, which no other device can reach" in links["json"][1]
        shown = run_cli(ini, "show", token).stdout.splitlines()
        assert shown[0] == f"link      {url}" and shown[1].strip() == links["json"][1] == links["text"][1]
    finally:
        server.stop()


@pytest.mark.slow
def test_real_server_uploads_serves_s60_follows_the_cli_and_stops_cleanly(tmp_path, root_pem, root_der, other_der):
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\ndata_dir = data\nlog_level = info\n")
    server = Server(ini)
    try:
        token = server_upload(server, root_pem)
        status, headers, body = server.request(f"/c/{token}", headers={"User-Agent": S60_AGENTS["e61i"]})
        assert (status, headers["Content-Type"], body) == (200, "application/x-x509-ca-cert", root_der)
        assert "Content-Disposition" not in headers
        # An HTTP/1.0 phone that sends no Host gets links on the address the server listens on
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(f"GET /c/{token} HTTP/1.0\r\nUser-Agent: {USER_AGENTS['windows-edge'][0]}\r\n\r\n"
                               .encode())
            reply = b"".join(iter(lambda: connection.recv(65536), b""))
        assert reply.startswith(b"HTTP/1.0 200") and f"{server.url}/c/{token}".encode() in reply, reply[:300]
        assert b"waitress.invalid" not in reply

        other = tmp_path / "other.der"
        other.write_bytes(other_der)
        added = run_cli(ini, "add", str(other))
        assert added.returncode == 0, added.stderr
        other_token = re.search(r"/c/([a-z0-9]+)", added.stdout)[1]
        assert server.request(f"/c/{other_token}")[2] == other_der

        form = {"Content-Type": "application/x-www-form-urlencoded"}
        status, _, body = server.request("/", b"pem=" + b"A" * (1536 * 1024), form)
        assert status == 413 and b"larger than the limit of 1 MiB" in body
        assert oversize_status(server.url, 64 * 1024 * 1024) == 413  # waitress refuses it from Content-Length

        assert run_cli(ini, "revoke", token).returncode == 0
        deadline = time.monotonic() + 2.0
        while server.request(f"/c/{token}")[0] != 410:
            assert time.monotonic() < deadline, "revocation not seen within 2 seconds"
            time.sleep(0.1)
    finally:
        code = server.stop()
    assert code == 0
    assert "certdrop stopped" in "".join(server.log)


def wait_for_log(server, text, seconds=10):
    deadline = time.monotonic() + seconds
    while not any(text in line for line in server.log):
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{''.join(server.log)}"
        time.sleep(0.05)
    return next(line for line in server.log if text in line)


@pytest.mark.slow
def test_serve_prints_a_new_upload_key_once_and_scripts_upload_with_it(tmp_path, root_pem):
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\ndata_dir = data\nupload_auth = always\n")
    server = Server(ini)
    try:
        line = wait_for_log(server, "upload key ")
        key = (tmp_path / "data" / "upload.key").read_text().strip()
        assert f"upload key {key} (new, sign in at " in line
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        body = urllib.parse.urlencode({"pem": root_pem.decode()}).encode()
        assert server.request("/", body, form)[0] == 401
        auth = {"Authorization": "Basic " + base64.b64encode(f"certdrop:{key}".encode()).decode()}
        assert server.request("/", body, {**form, **auth})[0] == 201
    finally:
        server.stop()
    again = Server(ini)
    try:
        wait_for_log(again, "the upload key is in")
        assert not any(key in line for line in again.log), "a key that is not new is not printed to a log"
    finally:
        again.stop()


@pytest.mark.slow
def test_serve_removes_temporary_files_left_by_a_killed_writer_at_start(tmp_path):
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\ndata_dir = data\nupload_auth = none\n")
    (tmp_path / "data" / "ab").mkdir(parents=True)
    stale, fresh = tmp_path / "data" / "ab" / ".abcdefgh.json.1a2b.tmp", tmp_path / "data" / ".upload.key.3c4d.tmp"
    for path in (stale, fresh):
        path.write_bytes(b"half an entry")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    server = Server(ini)
    server.stop()
    assert not stale.exists() and fresh.exists()


def hold_connections(url, count, stop, source="127.0.0.1"):
    """Open *count* connections to *url* from *source* that never finish a request: a third idle, a third sending a
    request's headers one byte every half second, a third sending a 2 MB upload's body that way, without a key.
    Return the sockets; the trickle stops when *stop* is set."""
    parts = urllib.parse.urlsplit(url)
    sockets = []
    for number in range(count):
        with contextlib.suppress(OSError):
            connection = socket.create_connection((parts.hostname, parts.port), timeout=5,
                                                  source_address=(source, 0))
            if number % 3 == 1:
                connection.sendall(b"GET / HTTP/1.1\r\n")
            elif number % 3 == 2:
                connection.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/pkix-cert\r\n"
                                   b"Content-Length: 2000000\r\n\r\n")
            sockets.append(connection)

    def trickle():
        while not stop.wait(0.5):
            for connection in sockets[1::3] + sockets[2::3]:
                with contextlib.suppress(OSError):
                    connection.sendall(b"E")
    threading.Thread(target=trickle, daemon=True).start()
    return sockets


@pytest.mark.slow
def test_one_clients_thousand_idle_slow_header_and_slow_body_connections_leave_others_answered_within_1_s(
        tmp_path, root_der):
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\ndata_dir = data\nupload_auth = always\n")
    (tmp_path / "ca.der").write_bytes(root_der)
    token = re.search(r"/c/([a-z0-9]+)", run_cli(ini, "add", str(tmp_path / "ca.der")).stdout)[1]
    server, stop = Server(ini), threading.Event()
    port = int(server.url.rpartition(":")[2])
    try:
        held = hold_connections(server.url, 1000, stop, source="127.0.0.2")
        time.sleep(1.0)  # let the server see them all
        for _ in range(5):
            started = time.monotonic()
            status, _, body = fetch_from("127.0.0.1", port, f"/c/{token}", headers={"User-Agent": S60_AGENTS["e61i"]})
            assert (status, body) == (200, root_der) and time.monotonic() - started < 1.0
            time.sleep(0.5)
    finally:
        stop.set()
        for connection in held:
            connection.close()
        server.stop()


@pytest.mark.slow
def test_a_classroom_of_64_connections_from_one_address_is_served_and_the_65th_is_told_why(tmp_path, root_der):
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\ndata_dir = data\nlookup_limit = 0\n")
    server = Server(ini)
    parts = urllib.parse.urlsplit(server.url)
    classroom = [http.client.HTTPConnection(parts.hostname, parts.port, timeout=10) for _ in range(64)]
    try:
        for connection in classroom:
            connection.request("GET", "/c/abcdefgh")
            response = connection.getresponse()
            assert response.status == 404
            response.read()
        with socket.create_connection((parts.hostname, parts.port), timeout=5) as extra:
            extra.sendall(b"GET /c/abcdefgh HTTP/1.1\r\nHost: x\r\n\r\n")
            assert extra.recv(4096).startswith(b"HTTP/1.1 429 ")
        classroom.pop().close()
        time.sleep(0.2)
        assert fetch_from("127.0.0.1", parts.port, "/c/abcdefgh")[0] == 404
    finally:
        for connection in classroom:
            connection.close()
        server.stop()


@pytest.mark.slow
def test_a_keyless_upload_is_answered_401_from_its_headers_without_100_continue_and_its_body_never_read(
        tmp_path):
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\ndata_dir = data\nupload_auth = always\n")
    server = Server(ini)
    parts = urllib.parse.urlsplit(server.url)
    try:
        for path in (b"/", b"//", b"///"):  # waitress gives the app "//" as "/": the screen sees it so too
            with socket.create_connection((parts.hostname, parts.port), timeout=5) as connection:
                connection.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/"
                                   b"pkix-cert\r\nContent-Length: 2000000\r\nExpect: 100-continue\r\n"
                                   b"User-Agent: curl/8.5.0\r\n\r\n")
                answer = b"".join(iter(lambda: connection.recv(65536), b""))  # the server ends its side after it
                assert answer.startswith(b"HTTP/1.1 401 ") and b"100 Continue" not in answer, (path, answer[:200])
                assert b"Connection: close" in answer and b"upload key" in answer
        with socket.create_connection((parts.hostname, parts.port), timeout=5) as connection:  # no Expect: sent
            connection.sendall(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/pkix-cert\r\n"
                               b"Content-Length: 2000000\r\nUser-Agent: curl/8.5.0\r\n\r\n" + b"x" * 200_000)
            assert connection.recv(65536).startswith(b"HTTP/1.1 401 ")  # the answer, not a reset
    finally:
        server.stop()


@pytest.mark.slow
def test_requests_hidden_in_a_refused_body_are_never_screened_or_counted(tmp_path, root_pem):
    ini = tmp_path / "certdrop.ini"
    ini.write_text(f"[certdrop]\ndata_dir = data\nupload_auth = always\nupload_password = {KEY}\n")
    server = Server(ini)
    parts = urllib.parse.urlsplit(server.url)
    wrong = (b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\nAuthorization: "
             + basic("a wrong key")["Authorization"].encode() + b"\r\n\r\n")
    hidden = wrong * (certdrop.SIGN_IN_FAILURE_BURST + 2)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=5) as connection:
            connection.sendall(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/pkix-cert\r\n"
                               b"Content-Length: %d\r\n\r\n" % len(hidden) + hidden)
            answer = b"".join(iter(lambda: connection.recv(65536), b""))
        assert answer.count(b"HTTP/1.1 ") == 1 and answer.startswith(b"HTTP/1.1 401 ")
        # had the hidden requests been screened, their wrong keys would have this address waiting now
        status, _, body = server.request("/", root_pem, {"Content-Type": "application/x-pem-file",
                                                         **basic(KEY), "Accept": "application/json"})
        assert status in (200, 201), body[:300]
    finally:
        server.stop()


def seconds_until_closed(url, first, trickle, most=8.0):
    """Send *first* to *url*, then *trickle* every 0.4 s; return how long the server took to close the connection
    (*most* if it did not)."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as connection:
        connection.sendall(first)
        started = time.monotonic()
        while time.monotonic() - started < most:
            time.sleep(0.4)
            try:
                connection.sendall(trickle)
                if connection.recv(1, socket.MSG_DONTWAIT) == b"":
                    break
            except BlockingIOError:
                continue
            except OSError:
                break
        return time.monotonic() - started


@pytest.mark.slow
def test_request_headers_that_trickle_in_are_cut_off_after_header_timeout(tmp_path):
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\ndata_dir = data\nheader_timeout = 2s\n")
    server = Server(ini)
    try:
        assert seconds_until_closed(server.url, b"GET / HTTP/1.1\r\n", b"X-A: b\r\n") < 5
        # blank lines instead of a request line: half an empty request at a time, or a whole one each time
        for blank in (b"\r\n", b"\r\n\r\n"):
            assert seconds_until_closed(server.url, blank, blank) < 5, blank
    finally:
        server.stop()


def screening_environ(path="/", **headers):
    """Return what the fair server hands App.screen once a POST's headers are in."""
    return {"REQUEST_METHOD": "POST", "PATH_INFO": path, "QUERY_STRING": "", "SCRIPT_NAME": "", "REMOTE_ADDR": REMOTE,
            "wsgi.url_scheme": "http", "SERVER_NAME": "ca.example.org", "SERVER_PORT": "8080",
            "HTTP_HOST": "ca.example.org:8080", "CONTENT_LENGTH": "100", **headers}


def test_the_screen_refuses_a_keyless_upload_from_its_headers_and_lets_a_keyed_one_through(keyed):
    refusal, _ = keyed.screen(screening_environ())
    assert refusal.code == 401 and b"upload key" in refusal.body[0]
    assert keyed.screen(screening_environ(HTTP_AUTHORIZATION=basic(KEY)["Authorization"])) == (None, 1024 * 1024)
    refusal, _ = keyed.screen(screening_environ(HTTP_AUTHORIZATION=basic(KEY)["Authorization"], CONTENT_LENGTH="9" * 9))
    assert refusal.code == 413


def test_the_screen_makes_no_check_its_handler_does_not_make(keyed):
    for _ in range(certdrop.LOOKUP_BURST + 1):  # a classroom behind one address that mistyped links
        client(keyed, REMOTE_ADDR=REMOTE).get("/c/abcdefgh", status="*")
    assert keyed.screen(screening_environ("/signin")) == (None, certdrop.SMALL_BODY)
    assert keyed.screen(screening_environ("/signout")) == (None, certdrop.SMALL_BODY)
    assert keyed.screen(screening_environ("/c/abcdefgh/revoke"))[0].code == 429  # removing does count lookups


def test_nothing_the_screen_meets_escapes_into_waitress(config, store, clock, keyed):
    config.data_dir.mkdir(exist_ok=True)
    (config.data_dir / certdrop.SignOuts.FILE).mkdir()  # the sign-outs cannot be read: the app answers 503
    cookie = f"{certdrop.SESSION_COOKIE}={keyed.gate.session_value(int(NOW) + 60, 'a' * 32)}"
    refusal, _ = keyed.screen(screening_environ(HTTP_COOKIE=cookie))
    assert refusal.code == 503
    proxied_app = app_with(config, store, clock, trusted_proxy="192.168.1.20", upload_password=KEY)
    assert proxied_app.screen(screening_environ(HTTP_X_FORWARDED_PROTO="gopher")) == (None, certdrop.SMALL_BODY)


def test_a_rate_limit_table_full_of_limited_clients_makes_room_once_until_one_is_free(monkeypatch):
    monkeypatch.setattr(certdrop.RateLimiter, "MAX_CLIENTS", 4)
    clock = FakeClock()
    limiter, calls = certdrop.RateLimiter(60, 1, clock), []
    for number in range(4):
        limiter.spend(f"10.0.0.{number}")
    make_room = limiter._make_room
    monkeypatch.setattr(limiter, "_make_room", lambda now: calls.append(now) or make_room(now))
    for number in range(50):
        limiter.spend(f"10.0.1.{number}")
    assert len(calls) == 1
    clock.advance(2)
    limiter.spend("10.0.2.1")
    assert len(calls) == 2 and "10.0.2.1" in limiter._buckets


def test_only_the_trusted_proxys_own_address_goes_uncapped_not_its_neighbours(monkeypatch):
    server = certdrop.fair_server_class()(lambda environ, start_response: [], screen=None, per_client=1,
                                          header_seconds=10, exempt="fd00::99", host="127.0.0.1", port=0)
    arriving, ends, listener = [], [], socket.create_server(("127.0.0.1", 0))

    def accept():  # a real TCP connection, said to come from the next address in *arriving*
        ends.append(socket.create_connection(listener.getsockname(), timeout=5))
        return listener.accept()[0], arriving.pop(0)

    monkeypatch.setattr(server, "accept", accept)
    try:
        for address in ("fd00::99", "fd00::99", "fd00::99", "fd00::2", "fd00::3"):
            arriving.append((address, 40000, 0, 0))
            server.handle_accept()
        assert server.clients == {"fd00::99": 3, "fd00::/64": 1}  # the proxy apart, its /64 neighbours capped
        assert ends[4].recv(4096).startswith(b"HTTP/1.1 429 ")  # fd00::3, past the /64's one connection
        ends[3].settimeout(0.3)
        with pytest.raises(TimeoutError):
            ends[3].recv(1)  # fd00::2: accepted, and waiting for its request
    finally:
        for channel in list(server.active_channels.values()) + list(server._map.values()):
            with contextlib.suppress(Exception):
                channel.close()
        for end in ends:
            end.close()
        listener.close()
        server.close()


def test_waitress_internals_that_the_fair_server_relies_on_are_still_there():
    """The fair server subclasses waitress's server, channel and parser (see certdrop's "Fair shares" section):
    an upgrade of waitress that renames what it relies on must fail here, not in production."""
    from waitress.channel import HTTPChannel
    from waitress.parser import HTTPRequestParser
    from waitress.server import BaseWSGIServer
    from waitress.task import ErrorTask
    assert importlib.metadata.version("waitress") == "3.0.2", "check the fair server against this version"
    for name in ("received", "readable", "handle_close", "del_channel", "parser_class", "request", "requests",
                 "will_close", "close_when_flushed", "addr", "server", "connected"):
        assert hasattr(HTTPChannel, name) or name in HTTPChannel.__init__.__code__.co_names, name
    for name in ("received", "headers_finished", "body_rcv", "content_length", "expect_continue", "completed",
                 "error", "body_bytes_received", "headers", "command", "path", "query", "url_scheme"):
        assert hasattr(HTTPRequestParser, name) or name in HTTPRequestParser.parse_header.__code__.co_names, name
    for name in ("handle_accept", "maintenance", "accept", "fix_addr", "set_socket_options", "channel_class"):
        assert hasattr(BaseWSGIServer, name), name
    server = certdrop.fair_server_class()(lambda environ, start_response: [], screen=None, per_client=1,
                                          header_seconds=1, exempt="", host="127.0.0.1", port=0)
    try:
        for name in ("active_channels", "effective_port", "server_name", "_map", "adj"):
            assert hasattr(server, name), name
    finally:
        server.close()
    assert "to_response" in ErrorTask.execute.__code__.co_names and "parser_class" in \
        HTTPChannel.received.__code__.co_names and "del_channel" in HTTPChannel.__dict__
    assert certdrop.fair_server_class().__mro__[1] is importlib.import_module("waitress.server").TcpWSGIServer


@pytest.mark.slow
@pytest.mark.parametrize("level", ["info", "debug"])
def test_a_busy_server_logs_no_queue_warning_per_request_except_at_debug_level(tmp_path, root_der, level):
    ini = tmp_path / "certdrop.ini"
    ini.write_text(f"[certdrop]\ndata_dir = data\nthreads = 1\naccess_log = no\nlog_level = {level}\n")
    (tmp_path / "ca.der").write_bytes(root_der)
    token = re.search(r"/c/([a-z0-9]+)", run_cli(ini, "add", str(tmp_path / "ca.der")).stdout)[1]
    server, statuses = Server(ini), []
    try:
        def fetch_many():
            for _ in range(50):
                statuses.append(server.request(f"/c/{token}", headers={"User-Agent": S60_AGENTS["e61i"]})[0])
        clients = [threading.Thread(target=fetch_many) for _ in range(8)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
    finally:
        server.stop()
    assert statuses == [200] * 400
    warned = any("Task queue depth" in line for line in server.log)
    assert warned == (level == "debug")


def upload_der(url, der):
    """POST *der* to a real server as a script would; return the token, or None if it was not acknowledged."""
    body = urllib.parse.urlencode({"pem": base64.b64encode(der).decode()}).encode()
    request = urllib.request.Request(url + "/", data=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.headers["Location"].rsplit("/", 1)[1] if response.status in (200, 201) else None
    except (OSError, urllib.error.URLError, http.client.HTTPException):
        return None


@pytest.mark.slow
def test_a_server_killed_mid_upload_20_times_loses_no_acknowledged_upload(tmp_path, many_roots):
    import random
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\ndata_dir = data\nupload_limit = 0\n")
    acknowledged, pending = {}, list(many_roots)
    for _ in range(20):
        server, stop = Server(ini), threading.Event()

        def keep_uploading(url=server.url):
            while pending and not stop.is_set():
                der = pending[0]
                token = upload_der(url, der)
                if token is None:
                    return
                acknowledged[token] = pending.pop(0)
        uploader = threading.Thread(target=keep_uploading)
        uploader.start()
        time.sleep(random.uniform(0.0, 0.15))
        server.stop(signal.SIGKILL)
        stop.set()
        uploader.join(timeout=10)
    assert len(acknowledged) >= 20, "the test must exercise real uploads"
    survivor = Server(ini)
    try:
        for token, der in acknowledged.items():
            assert survivor.request(f"/c/{token}", headers={"User-Agent": S60_AGENTS["e61i"]})[2] == der
        for path in (tmp_path / "data").glob("??/*.json"):
            certdrop.Entry.from_json(path.stem, path.read_bytes())  # every entry file is whole
    finally:
        survivor.stop()


@pytest.mark.slow
def test_two_servers_sharing_a_data_directory_lose_nothing_and_see_revocations(tmp_path, many_roots):
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\ndata_dir = data\nupload_limit = 0\n")
    servers = [Server(ini), Server(ini)]
    try:
        results = {}

        def upload_share(number):
            for index in range(number, 48, 6):
                results[index] = upload_der(servers[number % 2].url, many_roots[index])
        threads = [threading.Thread(target=upload_share, args=(number,)) for number in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert len(results) == 48 and None not in results.values()
        for index, token in results.items():
            for server in servers:
                assert server.request(f"/c/{token}", headers={"User-Agent": S60_AGENTS["e61i"]})[2] == many_roots[index]
        assert run_cli(ini, "revoke", results[0]).returncode == 0
        deadline = time.monotonic() + 2.0
        while any(server.request(f"/c/{results[0]}")[0] != 410 for server in servers):
            assert time.monotonic() < deadline, "a revocation was not seen by both servers within 2 seconds"
            time.sleep(0.1)
    finally:
        for server in servers:
            server.stop()


@pytest.mark.slow
def test_the_server_answers_431_itself_past_32_kib_of_headers_and_414_past_8_kib_of_address(tmp_path):
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\ndata_dir = data\n")
    server = Server(ini)
    try:
        assert server.request("/c/abcdefgh", headers={"X-Padding": "x" * 20_000})[0] == 404
        assert server.request("/c/abcdefgh", headers={"X-Padding": "x" * 40_000})[0] == 431
        assert server.request("/c/abcdefgh?" + "q" * 9000)[0] == 414
    finally:
        server.stop()


@pytest.mark.slow
def test_a_sign_out_on_one_server_holds_on_another_within_2_seconds_and_after_its_restart(tmp_path, root_der):
    ini = tmp_path / "certdrop.ini"
    ini.write_text(f"[certdrop]\ndata_dir = data\nupload_password = {KEY}\nupload_auth = always\n")
    servers = [Server(ini), Server(ini)]
    try:
        port = int(servers[0].url.rpartition(":")[2])
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        status, headers, _ = fetch_from("127.0.0.1", port, "/signin", "POST", f"key={KEY}", form)
        assert status == 303
        cookie = headers["Set-Cookie"].partition(";")[0]
        upload = {"Cookie": cookie, "Content-Type": "application/pkix-cert"}
        assert servers[1].request("/", root_der, upload)[0] in (200, 201)
        assert fetch_from("127.0.0.1", port, "/signout", "POST", "", {**form, "Cookie": cookie})[0] == 303
        deadline = time.monotonic() + 2.0
        while servers[1].request("/", root_der, upload)[0] != 401:
            assert time.monotonic() < deadline, "a sign-out was not seen by the other server within 2 seconds"
            time.sleep(0.1)
        servers[1].stop()
        servers[1] = Server(ini)
        assert servers[1].request("/", root_der, upload)[0] == 401
    finally:
        for server in servers:
            server.stop()


@pytest.mark.slow
def test_sigterm_finishes_an_upload_in_flight_and_loses_nothing(tmp_path, root_pem):
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\ndata_dir = data\n")
    server = Server(ini)
    body = urllib.parse.urlencode({"pem": root_pem.decode(), "ttl": "1d"}).encode()
    parts = urllib.parse.urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as connection:
        connection.sendall(f"POST / HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/x-www-form-"
                           f"urlencoded\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:100])
        time.sleep(0.3)  # the server has the first bytes of the request when it is told to stop
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        connection.sendall(body[100:])
        answer = connection.recv(65536)
    assert answer.startswith(b"HTTP/1.1 201 ")
    token = re.search(rb"Location: http://[^/]+/c/([a-z0-9]+)", answer)[1].decode()
    assert server.process.wait(timeout=15) == 0
    server.stop()
    assert run_cli(ini, "show", token).returncode == 0


@pytest.mark.slow
def test_what_root_writes_for_the_service_stays_the_services_own(root_pem):
    """sudo certdrop.py add/revoke/upload-key on the service's data leave files its own user can change."""
    service = 65534  # nobody: any user but root will do
    top = Path(tempfile.mkdtemp(prefix="certdrop-owner-"))
    try:
        top.chmod(0o755)
        (top / "data").mkdir()
        os.chown(top / "data", service, service)
        (top / "certdrop.ini").write_text("[certdrop]\ndata_dir = data\n")
        (top / "ca.pem").write_bytes(root_pem)
        added = run_cli(top / "certdrop.ini", "add", str(top / "ca.pem"))
        token = re.search(r"/c/([a-z0-9]+)", added.stdout)[1]
        assert run_cli(top / "certdrop.ini", "upload-key").returncode == 0
        owners = {(path.stat().st_uid, path.stat().st_gid) for path in (top / "data").rglob("*")}
        assert owners == {(service, service)}
        as_service = multiprocessing.get_context("fork").Process(target=revoke_as, args=(service, top / "data", token))
        as_service.start()
        as_service.join(30)
        assert as_service.exitcode == 0, "the service's user could not revoke what root stored"
    finally:
        shutil.rmtree(top)


def revoke_as(uid, directory, token):
    """Child process: become *uid* and revoke *token*, as the service would (exit status 0 if that worked)."""
    for encoding in ("ascii", "latin-1"):  # loaded lazily, from where root installed Python: load them now
        codecs.lookup(encoding)
    os.setgid(uid)
    os.setuid(uid)
    certdrop.Store(directory).revoke(token)
    certdrop.Store(directory).sweep()


@pytest.mark.slow
def test_the_systemd_unit_rates_2_or_lower_and_verifies_cleanly(tmp_path):
    unit = HERE / "systemd" / "certdrop.service"
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True,
                              text=True, timeout=60)
    exposure = float(re.search(r"Overall exposure level for certdrop\.service: ([\d.]+)", security.stdout)[1])
    assert exposure <= 2.0
    # verify checks that ExecStart's program exists: point the unit's paths at a tree made here
    (tmp_path / "opt/certdrop/.venv/bin").mkdir(parents=True)
    (tmp_path / "opt/certdrop/.venv/bin/python").symlink_to(os.path.realpath(sys.executable))
    shutil.copy(HERE / "certdrop.py", tmp_path / "opt/certdrop/certdrop.py")
    moved = tmp_path / "certdrop.service"
    moved.write_text(unit.read_text().replace("/opt/certdrop", str(tmp_path / "opt/certdrop"))
                     .replace("/etc/certdrop", str(tmp_path / "etc/certdrop")))
    verify = subprocess.run(["systemd-analyze", "verify", str(moved)], capture_output=True, text=True, timeout=60)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")


APACHE_CONFIG = """
Listen 127.0.0.1:{port}
ServerName localhost
PidFile {directory}/apache.pid
ErrorLog {directory}/error.log
LoadModule mpm_event_module /usr/lib/apache2/modules/mod_mpm_event.so
LoadModule authz_core_module /usr/lib/apache2/modules/mod_authz_core.so
LoadModule headers_module /usr/lib/apache2/modules/mod_headers.so
LoadModule proxy_module /usr/lib/apache2/modules/mod_proxy.so
LoadModule proxy_http_module /usr/lib/apache2/modules/mod_proxy_http.so
User www-data
Group www-data
ProxyPass /naive/ http://{naive}/
ProxyPass /certdrop/ http://{upstream}/
RequestHeader set X-Forwarded-Prefix /certdrop
RequestHeader set X-Forwarded-Proto http
"""


def fetch_from(source, port, path, method="GET", body=None, headers=None):
    """Return (status, headers, body) for a request to 127.0.0.1:*port* sent from the address *source*."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


NGINX_CONFIG = """
daemon off;
master_process off;
user root;
pid {directory}/nginx.pid;
error_log {directory}/error.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {directory}/nginx-body;
    proxy_temp_path {directory}/nginx-proxy;
    fastcgi_temp_path {directory}/nginx-fastcgi;
    uwsgi_temp_path {directory}/nginx-uwsgi;
    scgi_temp_path {directory}/nginx-scgi;
    server {{
        listen 127.0.0.1:{port};
        location /naive/ {{
            proxy_pass http://{naive}/;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
        location /certdrop/ {{
            proxy_pass http://{upstream}/;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Prefix /certdrop;
            client_max_body_size 2m;
        }}
    }}
}}
"""

#: How each reverse proxy runs in the foreground on a configuration file made for the test.
PROXIES = {
    "apache": (APACHE_CONFIG, lambda conf: ["/usr/sbin/apache2", "-X", "-f", str(conf)],
               "trusted_proxy_headers = x-forwarded-for x-forwarded-host x-forwarded-proto\n"),
    "nginx": (NGINX_CONFIG, lambda conf: ["/usr/sbin/nginx", "-c", str(conf), "-p", str(conf.parent)],
              "trusted_proxy_headers = x-forwarded-for x-forwarded-proto\n"),
}


@pytest.mark.slow
@pytest.mark.parametrize("proxy", PROXIES)
def test_behind_a_reverse_proxy_under_a_prefix_every_link_works_and_the_log_names_the_client(tmp_path, root_pem,
                                                                                              root_der, proxy):
    config_template, command, headers_setting = PROXIES[proxy]
    ini = tmp_path / "certdrop.ini"
    ini.write_text(f"[certdrop]\ndata_dir = data\ntrusted_proxy = 127.0.0.1\nupload_password = {KEY}\n"
                   + headers_setting)
    naive_ini = tmp_path / "naive.ini"  # a certdrop whose administrator did not name the proxy
    naive_ini.write_text(f"[certdrop]\ndata_dir = naive\nupload_password = {KEY}\n")
    server, naive, port = Server(ini), Server(naive_ini), free_port()
    conf = tmp_path / f"{proxy}.conf"
    conf.write_text(config_template.format(port=port, directory=tmp_path, upstream=server.url.split("//")[1],
                                           naive=naive.url.split("//")[1]))
    front = subprocess.Popen(command(conf), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert front.poll() is None and time.monotonic() < deadline, (tmp_path / "error.log").read_text()
                time.sleep(0.1)
        form = urllib.parse.urlencode({"pem": root_pem.decode()}).encode()
        plain = {"Content-Type": "application/x-www-form-urlencoded"}
        assert fetch_from("127.0.0.2", port, "/naive/", "POST", form, plain)[0] == 401, "the proxy is no loophole"
        assert fetch_from("127.0.0.2", port, "/certdrop/", "POST", form, plain)[0] == 401
        status, headers, page = fetch_from("127.0.0.2", port, "/certdrop/", "POST", form, {**plain, **basic(KEY)})
        assert status == 201, page
        link = headers["Location"]
        assert link.startswith(f"http://127.0.0.1:{port}/certdrop/c/")
        pages = [("/certdrop/", page)]
        for agent in ("android-chrome", "windows-edge", "iphone-safari", "linux-chrome"):
            pages.append((link, fetch_from("127.0.0.2", port, urllib.parse.urlsplit(link).path,
                                           headers={"User-Agent": USER_AGENTS[agent][0]})[2]))
        followed = 0
        for base, body in pages:
            for kind, href in re.findall(rb'(href|action)="((?!mailto:)[^"]+)"', body):
                target = urllib.parse.urlsplit(urllib.parse.urljoin(base, href.decode()))
                status, answered, _ = fetch_from("127.0.0.2", port,
                                                 target.path + ("?" + target.query if target.query else ""))
                if target.path.startswith("/certdrop/lang/"):  # the language picker sends the reader back, inside
                    assert status == 303, target.path
                    assert urllib.parse.urlsplit(answered["Location"]).path.startswith("/certdrop/"), answered
                    continue
                # a form's address may take POST only (405 to a GET), but it must exist
                assert status in ((200, 304) if kind == b"href" else (200, 405)), f"{target.path}: {status}"
                followed += 1
        assert followed >= 20
        status, _, der = fetch_from("127.0.0.2", port, urllib.parse.urlsplit(link).path,
                                    headers={"User-Agent": S60_AGENTS["e61i"]})
        assert (status, der) == (200, root_der)
    finally:
        front.terminate()
        front.wait(10)
        front.stderr.close()
        server.stop()
        naive.stop()
    log = "".join(server.log)
    assert " 127.0.0.2 POST /certdrop/ 201 " in log and " 127.0.0.2 GET /certdrop/c/" in log
    assert " 127.0.0.1 " not in log.split("serving on")[1], "the log names the proxy instead of the client"


def served_counts(server, token):
    """Return the downloads of *token* per device class as the server's JSON interface gives them."""
    status, _, body = server.request("/admin/api/v1/links")
    assert status == 200, body
    link, = (link for link in json.loads(body)["links"] if link["token"] == token)
    return {device: fetches["count"] for device, fetches in link["fetches"].items()}


def server_upload(server, pem):
    """Upload *pem* for a day to a real server, as a form; return the token."""
    form = urllib.parse.urlencode({"pem": pem.decode(), "ttl": "1d"}).encode()
    status, headers, body = server.request("/", form, {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 201, body
    return headers["Location"].rsplit("/", 1)[1]


def server_fetch(server, token, agent, times):
    for _ in range(times):
        assert server.request(f"/c/{token}", headers={"User-Agent": agent})[0] == 200


@pytest.mark.slow
def test_download_counts_survive_sigterm_and_a_restart(tmp_path, root_pem):
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\ndata_dir = data\ncount_interval = 1d\n")  # only the stop writes
    server = Server(ini)
    try:
        token = server_upload(server, root_pem)
        server_fetch(server, token, ADMIN_AGENTS["android"], 3)
        server_fetch(server, token, ADMIN_AGENTS["windows"], 2)
        server_fetch(server, token, ADMIN_AGENTS["iphone"], 1)
        server_fetch(server, token, "facebookexternalhit/1.1", 2)
        assert served_counts(server, token) == {}  # in memory until the interval or the stop
    finally:
        assert server.stop(signal.SIGTERM) == 0
    assert "wrote 6 downloads" in "".join(server.log)
    server = Server(ini)
    try:
        assert served_counts(server, token) == {"android": 3, "windows": 2, "ios": 1}
        server_fetch(server, token, ADMIN_AGENTS["android"], 1)
    finally:
        assert server.stop(signal.SIGTERM) == 0
    listed = json.loads(run_cli(ini, "list", "--json").stdout)["links"][0]
    assert {device: value["count"] for device, value in listed["fetches"].items()} == {
        "android": 4, "windows": 2, "ios": 1}
    # the first process's file was folded into one for stopped processes when the second started
    assert sorted(path.name.split("-")[-1] for path in (tmp_path / "data" / "counts").glob("*.json")) == [
        f"{server.process.pid}.json", "stopped.json"]


#: make_app's app under another WSGI server (the standard library's), as README offers: no `serve`.
#: wsgiref's server, stopped by SIGINT between requests: a KeyboardInterrupt raised while it handles one would be
#: swallowed by wsgiref's catch-all (its handler turns any exception into a 500), and the process would run on.
OTHER_WSGI_SERVER = """
import signal, sys, threading, wsgiref.simple_server
import certdrop

class Quiet(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args):
        pass

app = certdrop.make_app(certdrop.load_config(sys.argv[1]))
server = wsgiref.simple_server.make_server("127.0.0.1", 0, app, handler_class=Quiet)
signal.signal(signal.SIGINT, lambda signum, frame: threading.Thread(target=server.shutdown).start())
print(server.server_port, flush=True)
server.serve_forever()
"""


@pytest.mark.slow
def test_under_another_wsgi_server_counts_are_written_every_interval_and_at_exit(tmp_path, cert_file):
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\ndata_dir = data\npublic_url = http://ca.example.org:8080\ncount_interval = 5s\n")
    token = re.search(r"/c/([a-z0-9]+)", run_cli(ini, "add", str(cert_file)).stdout)[1]
    process = subprocess.Popen([sys.executable, "-c", OTHER_WSGI_SERVER, str(ini)], cwd=HERE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{process.stdout.readline().strip()}/c/{token}"

        def fetch_times(agent, times):
            for _ in range(times):
                with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": agent}), timeout=10):
                    pass

        fetch_times(ADMIN_AGENTS["android"], 3)
        deadline = time.monotonic() + 15
        while certdrop.read_counts(tmp_path / "data").get(token, {}).get("android", (0,))[0] != 3:
            assert time.monotonic() < deadline, "no count written within the interval"  # the lazily started writer
            time.sleep(0.5)
        fetch_times(ADMIN_AGENTS["windows"], 2)
    finally:
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=10)
    assert process.returncode == 0, errors
    counts = certdrop.read_counts(tmp_path / "data")[token]
    assert {device: count for device, (count, _last) in counts.items()} == {"android": 3, "windows": 2}  # at exit


@pytest.mark.slow
def test_two_servers_counts_add_up_and_a_sigkill_loses_at_most_the_last_interval(tmp_path, root_pem):
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\ndata_dir = data\ncount_interval = 5s\n")
    first, second = Server(ini), Server(ini)
    try:
        token = server_upload(first, root_pem)
        server_fetch(first, token, ADMIN_AGENTS["android"], 3)
        server_fetch(second, token, ADMIN_AGENTS["android"], 4)
        server_fetch(second, token, ADMIN_AGENTS["windows"], 1)
        deadline = time.monotonic() + 15
        while served_counts(first, token) != {"android": 7, "windows": 1}:  # both wrote within their interval
            assert time.monotonic() < deadline, served_counts(first, token)
            time.sleep(0.5)
        assert served_counts(second, token) == {"android": 7, "windows": 1}
        server_fetch(second, token, ADMIN_AGENTS["windows"], 1)  # within the interval the SIGKILL cuts short
    finally:
        second.stop(signal.SIGKILL)
        assert first.stop(signal.SIGTERM) == 0
    listed = json.loads(run_cli(ini, "list", "--json").stdout)["links"][0]
    fetched = {device: value["count"] for device, value in listed["fetches"].items()}
    assert fetched["android"] == 7 and fetched["windows"] in (1, 2)


# -- e-mail over real SMTP (aiosmtpd in this process) -----------------------------------------------------------


class Mailbox:
    """An aiosmtpd handler that keeps what it receives, or refuses every recipient (or those starting with *refuse*)."""

    def __init__(self, refuse=False):
        self.refuse = refuse
        self.messages = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.refuse is True or self.refuse and address.startswith(self.refuse):
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 Message accepted"


@pytest.fixture(scope="session")
def smtp_tls(tmp_path_factory):
    """Return (CA file, server SSL context) of a throwaway CA and its certificate for 127.0.0.1."""
    directory = tmp_path_factory.mktemp("smtp-tls")
    ca, ca_key = make_certificate("Throwaway Mail CA")
    key = ec.generate_private_key(ec.SECP256R1())
    server = (x509.CertificateBuilder().subject_name(make_name("127.0.0.1")).issuer_name(ca.subject)
              .public_key(key.public_key()).serial_number(9).not_valid_before(datetime.datetime(2025, 1, 1))
              .not_valid_after(datetime.datetime(2035, 1, 1))
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
              .sign(ca_key, hashes.SHA256()))
    (directory / "ca.pem").write_bytes(pem_of(ca))
    (directory / "server.pem").write_bytes(pem_of(server) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / "server.pem")
    return directory / "ca.pem", context


@contextlib.contextmanager
def smtp_server(mailbox, **options):
    from aiosmtpd.controller import Controller
    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port(), **options)
    controller.start()
    try:
        yield controller.port
    finally:
        controller.stop()


def mail_app(config, store, clock, port, **settings):
    settings = {"mail_security": "none", "mail_sender": "certdrop@ca.example.org", "mail_timeout": 10, **settings}
    return client(app_with(config, store, clock, mail_host="127.0.0.1", mail_port=port, **settings))


def mail_form(page):
    return next(form for form in page.forms.values() if form.action.endswith("/mail"))


@pytest.mark.slow
def test_the_result_page_mails_the_links_as_plain_text(config, store, clock, pki):
    mailbox = Mailbox()
    with smtp_server(mailbox) as port:
        app = mail_app(config, store, clock, port)
        result = upload(app, pem_of(pki.root, pki.intermediate))
        form = mail_form(result)
        form["to"] = "alice@example.com, bob@example.org"
        assert "The message was sent" in html_text(form.submit(status=200))
    (sender, recipients, content), = mailbox.messages
    message = email.message_from_bytes(content, policy=email.policy.default)
    assert sender == "certdrop@ca.example.org" and recipients == ["alice@example.com", "bob@example.org"]
    assert message["Subject"] == "Install the CA certificate Example Root CA" and not message.is_multipart()
    body = message.get_content()
    for link in result.html.select("p.link a"):
        assert link["href"] in body
    assert pki.root.fingerprint(hashes.SHA256()).hex(":").upper() in body
    assert pki.root.fingerprint(hashes.SHA1()).hex(":").upper() in body
    assert re.search(r"Nokia Series 40 code: (\d{6} ){4}\d{6}", body) and body.count("Nokia Series 40 code") == 1
    assert "The link works until 2027-01-22 08:00 UTC." in body and "To install: open the link" in body


@pytest.mark.slow
def test_every_loopback_address_is_one_mail_client(config, store, clock, root_der):
    mailbox = Mailbox()
    with smtp_server(mailbox) as port:
        app = certdrop.make_app(dataclasses.replace(
            config, mail_host="127.0.0.1", mail_port=port, mail_security="none", mail_timeout=10), store, clock)
        token = uploaded_token(client(app, REMOTE_ADDR="127.0.0.2"), root_der)
        statuses = [client(app, REMOTE_ADDR=address).post("/mail", {"to": "a@example.com", "tokens": token},
                                                          status="*").status_int
                    for address in ("127.0.0.1", "127.9.8.7", "::1", "::ffff:127.0.0.3", "127.0.0.4", "127.0.0.5")]
    assert statuses == [200] * certdrop.UPLOAD_BURST + [429] and len(mailbox.messages) == certdrop.UPLOAD_BURST


@pytest.mark.slow
def test_the_mail_budget_holds_for_the_whole_server_whoever_asks(config, store, clock, root_der):
    mailbox = Mailbox()
    with smtp_server(mailbox) as port:
        app = certdrop.make_app(dataclasses.replace(
            config, mail_host="127.0.0.1", mail_port=port, mail_security="none", mail_timeout=10, mail_per_hour=2,
            upload_auth="none", upload_limit=0), store, clock)
        token = uploaded_token(client(app), root_der)
        statuses = [client(app, REMOTE_ADDR=f"192.168.1.{number}").post(
            "/mail", {"to": "alice@example.com", "tokens": token}, headers={"Accept": "application/json"},
            status="*") for number in range(20, 24)]
    assert [answer.status_int for answer in statuses] == [200, 200, 429, 429] and len(mailbox.messages) == 2
    assert "per_hour" in statuses[2].json["error"]["message"]


@pytest.mark.slow
def test_control_bidi_and_separator_characters_never_reach_the_subject(config, store, clock):
    name = "Evil\x1cCA\x1d\x1e\x1b[31m\x07\x00\u202e\u2028\u2066Corp"
    der = make_certificate(name)[0].public_bytes(serialization.Encoding.DER)
    mailbox = Mailbox()
    with smtp_server(mailbox) as port:
        app = mail_app(config, store, clock, port)
        token = uploaded_token(app, der)
        app.post("/mail", {"to": "alice@example.com", "tokens": token}, status=200)
    (_, _, content), = mailbox.messages
    subject = email.message_from_bytes(content, policy=email.policy.default)["Subject"]
    assert subject == "Install the CA certificate EvilCA[31m Corp"


@pytest.mark.slow
def test_a_link_in_a_mail_comes_from_an_accepted_host(config, store, clock, root_der):
    mailbox = Mailbox()
    with smtp_server(mailbox) as port:
        app = mail_app(config, store, clock, port)
        token = uploaded_token(app, root_der)
        app.post("/mail", {"to": "alice@example.com", "tokens": token}, headers={"Host": "evil.example"}, status=400)
        app.post("/mail", {"to": "alice@example.com", "tokens": token}, headers={"Host": "certs.example.net"})
    (_, _, content), = mailbox.messages
    assert f"http://certs.example.net/c/{token}" in content.decode() and b"evil" not in content


@pytest.mark.slow
def test_mail_goes_over_starttls_to_a_server_whose_ca_is_configured(config, store, clock, root_der, smtp_tls):
    cafile, context = smtp_tls
    mailbox = Mailbox()
    with smtp_server(mailbox, tls_context=context, require_starttls=True) as port:
        app = mail_app(config, store, clock, port, mail_security="starttls", mail_cafile=str(cafile))
        form = mail_form(upload(app, root_der))
        form["to"] = "alice@example.com"
        form.submit(status=200)
        untrusted = mail_app(config, store, clock, port, mail_security="starttls")
        form = mail_form(upload(untrusted, root_der, status=200))
        form["to"] = "alice@example.com"
        refused = form.submit(status=502)
    assert len(mailbox.messages) == 1
    assert "The TLS connection to 127.0.0.1" in html_text(refused)


@pytest.mark.slow
@pytest.mark.parametrize("to", ["alice@example.com\r\nBcc: eve@example.net", "Alice <alice@example.com>",
                                "alice@example.com\nSubject: hi", "not an address", "",
                                ", ".join(f"user{number}@example.com" for number in range(11))],
                         ids=["crlf-bcc", "display-name", "lf-subject", "no-at", "empty", "too-many"])
def test_addresses_with_header_tricks_are_refused_and_nothing_is_sent(config, store, clock, root_der, to):
    mailbox = Mailbox()
    with smtp_server(mailbox) as port:
        app = mail_app(config, store, clock, port)
        form = mail_form(upload(app, root_der))
        form["to"] = to
        refusal = form.submit(status=400)
    assert "Nothing was sent" in html_text(refusal) and mailbox.messages == []


@pytest.mark.parametrize(("settings", "reason"), [
    ({}, "Nothing answers at 127.0.0.1:"),  # nothing listens on the port
    ({"mail_cafile": "no-such-ca.pem"}, "no-such-ca.pem"),  # [mail] cafile is not there
], ids=["server-down", "cafile-missing"])
def test_a_mail_server_that_is_down_gets_a_clear_message_and_the_links_stay(config, store, clock, root_der,
                                                                            settings, reason):
    app = mail_app(config, store, clock, free_port(), **settings)
    result = upload(app, root_der)
    form = mail_form(result)
    form["to"] = "alice@example.com"
    failed = form.submit(status=502)
    assert reason in html_text(failed)
    assert [a["href"] for a in failed.html.select("main li a")] == [a["href"] for a in result.html.select("p.link a")]


@pytest.mark.slow
def test_only_the_recipients_the_mail_server_took_are_named_as_sent(config, store, clock, root_der):
    mailbox = Mailbox(refuse="bad")
    with smtp_server(mailbox) as port:
        app = mail_app(config, store, clock, port)
        form = mail_form(upload(app, root_der))
        form["to"] = "good@example.com, bad@example.com"
        sent = form.submit(status=200, headers={"Accept": "application/json"})
    assert sent.json["sent_to"] == ["good@example.com"] and mailbox.messages[0][1] == ["good@example.com"]


@pytest.mark.slow
def test_mail_per_hour_counts_only_messages_that_go(config, store, clock, root_der):
    mailbox = Mailbox()
    with smtp_server(mailbox) as port:
        app = mail_app(config, store, clock, port, mail_per_hour=2, upload_limit=0)  # per_hour alone counts
        page = upload(app, root_der)
        for to in ("not an address", "x", "", "alice@example.com", "bob@example.com"):  # three refused, two sent
            form = mail_form(page)
            form["to"] = to
            form.submit(status="*")
        form = mail_form(page)
        form["to"] = "carol@example.com"
        form.submit(status=429)
    assert [recipients for _, recipients, _ in mailbox.messages] == [["alice@example.com"], ["bob@example.com"]]


@pytest.mark.slow  # waits 1 s for the time-out
def test_a_mail_server_that_never_answers_times_out_with_a_clear_message(config, store, clock, root_der):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        app = mail_app(config, store, clock, silent.getsockname()[1], mail_timeout=1)
        form = mail_form(upload(app, root_der))
        form["to"] = "alice@example.com"
        started = time.monotonic()
        failed = form.submit(status=502)
    assert "did not answer in time" in html_text(failed) and time.monotonic() - started < 10


@pytest.mark.slow
def test_a_mail_server_that_refuses_the_recipients_says_so(config, store, clock, root_der):
    with smtp_server(Mailbox(refuse=True)) as port:
        app = mail_app(config, store, clock, port)
        form = mail_form(upload(app, root_der))
        form["to"] = "alice@example.com"
        assert "refused the addresses (550)" in html_text(form.submit(status=502))


@pytest.mark.slow
def test_sending_mail_needs_the_upload_key_and_refuses_cross_site_requests(config, store, clock, root_der):
    mailbox = Mailbox()
    with smtp_server(mailbox) as port:
        app = mail_app(config, store, clock, port, upload_password=KEY)
        token = uploaded_token(app, root_der)
        fields = {"to": "alice@example.com", "tokens": token}
        client(app.app, REMOTE_ADDR=REMOTE).post("/mail", fields, status=401)
        app.post("/mail", fields, headers={"Origin": "http://evil.example"}, status=403)
        answer = app.post("/mail", fields, headers={"Accept": "application/json"}, status=200).json
    assert answer == {"version": 1, "sent_to": ["alice@example.com"]} and len(mailbox.messages) == 1


def test_without_a_mail_server_the_page_offers_a_mailto_link_with_the_same_text(testapp, root_der, root):
    result = upload(testapp, root_der)
    mailto = next(a["href"] for a in result.html.find_all("a") if a["href"].startswith("mailto:"))
    fields = urllib.parse.parse_qs(urllib.parse.urlsplit(mailto).query)
    assert fields["subject"] == ["Install the CA certificate Example Root CA"]
    assert result.headers["Location"] in fields["body"][0]
    assert root[0].fingerprint(hashes.SHA256()).hex(":").upper() in fields["body"][0]
    assert not any(form.action.endswith("/mail") for form in result.forms.values())
    testapp.post("/mail", {"to": "alice@example.com", "tokens": token_of(result)}, status=404)


@pytest.mark.slow
def test_what_needs_attention_is_mailed_to_admin_mail(config, store, clock, pki):
    soon = add(store, der_of(pki.root), days=2).token
    mailbox = Mailbox()
    with smtp_server(mailbox) as port:
        settings = dict(mail_host="127.0.0.1", mail_port=port, mail_security="none", mail_timeout=10,
                        mail_sender="certdrop@ca.example.org", admin_mail="admin@example.com")
        certdrop.warn_of_attention(certdrop.AdminIndex(store), dataclasses.replace(config, **settings), clock)
    (sender, recipients, content), = mailbox.messages
    message = email.message_from_bytes(content, policy=email.policy.default)
    assert recipients == ["admin@example.com"] and "end soon" in message["Subject"]
    assert f"/c/{soon}" in message.get_content() and "ends on" in message.get_content()


@pytest.mark.slow
def test_the_admin_page_mails_a_link_again(config, store, clock, root_der):
    mailbox = Mailbox()
    token = add(store, root_der).token
    with smtp_server(mailbox) as port:
        app = mail_app(config, store, clock, port)
        form = next(form for form in app.get("/admin").forms.values()
                    if form.action.endswith("/mail") and form["tokens"].value == token)
        form["to"] = "alice@example.com"
        assert "The message was sent" in html_text(form.submit(status=200))
    (sender, recipients, content), = mailbox.messages
    assert recipients == ["alice@example.com"] and f"/c/{token}" in content.decode()

# -- in a real browser: headless Chromium driven through WebDriver ----------------------------------------------

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic", "--hide-scrollbars")

#: (name, User-Agent, width, height) of the devices a person opens the link on.
BROWSER_DEVICES = (
    ("iphone", USER_AGENTS["iphone-safari"][0], 360, 740),
    ("android", USER_AGENTS["android-chrome"][0], 360, 740),
    ("desktop", USER_AGENTS["windows-edge"][0], 1280, 800),
    ("series40", USER_AGENTS["s40-6500s"][0], 176, 220),
)


@pytest.fixture
def browser(tmp_path):
    """Return a fresh headless Chromium (Debian's chromium and chromium-driver, installed by .ci/run)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    driver.set_page_load_timeout(20)
    driver.implicitly_wait(10)  # a click that submits a form returns before the next page is there
    try:
        yield driver
    finally:
        driver.quit()


def as_device(driver, agent, width, height):
    driver.execute_cdp_cmd("Emulation.setUserAgentOverride", {"userAgent": agent})
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 800})


def screenshot(driver, directory, name):
    path = directory / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


def console_problems(driver):
    """Return the console's CSP violations, script errors and failed loads."""
    return [entry["message"] for entry in driver.get_log("browser")
            if "Content Security Policy" in entry["message"] or entry["level"] == "SEVERE"]


def download(url, agent):
    """Return what following *url* downloads for a device with *agent* (a page's CSP forbids fetch() in it)."""
    with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": agent}), timeout=10) as answer:
        return answer.read()


def certificate_in(name, body, der):
    """Return whether the file *name* that a page offers carries the certificate *der* in its format."""
    if name.endswith((".crt", ".cer", ".der")):
        return body == der
    if name.endswith(".pem"):
        return base64.b64decode("".join(body.decode().splitlines()[1:-1])) == der
    if name.endswith(".mobileconfig"):
        return plistlib.loads(body)["PayloadContent"][0]["PayloadContent"] == der
    return name.endswith(".whc") and body[0] == 1 and der in body


@pytest.mark.slow
def test_in_a_real_browser_sign_in_upload_and_install_on_every_device(tmp_path, browser, root_pem, root_der, root):
    from selenium.webdriver.common.by import By
    ini = tmp_path / "certdrop.ini"
    ini.write_text(f"[certdrop]\ndata_dir = data\nupload_auth = always\nupload_password = {KEY}\n"
                   "contact = IT help desk, room 12, ext. 4711\n[mail]\nhost = 127.0.0.1\n")
    (tmp_path / "ca.pem").write_bytes(root_pem)
    server = Server(ini)
    try:
        as_device(browser, *BROWSER_DEVICES[2][1:])
        browser.get(server.url + "/")
        browser.find_element(By.ID, "key").send_keys(KEY)
        browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        browser.find_element(By.ID, "cert").send_keys(str(tmp_path / "ca.pem"))
        browser.find_element(By.CSS_SELECTOR, "form[enctype='multipart/form-data'] button[type=submit]").click()
        screenshot(browser, tmp_path, "result")
        link = browser.find_element(By.CSS_SELECTOR, "p.link a").text
        token = link.rsplit("/", 1)[1]
        assert link == certdrop.lead_url(f"{server.url}/c/{token}", "127.0.0.1")  # listening on loopback only
        for width, height in ((1280, 800), (360, 740)):  # the desktop it was made on, then a phone's width
            as_device(browser, BROWSER_DEVICES[2][1], width, height)
            browser.execute_script("window.scrollTo(0, 0)")
            screenshot(browser, tmp_path, f"result-{width}")
            places = result_page_places(browser)
            assert list(places) == sorted(places, key=lambda name: places[name][0]), f"{width}: {places}"
            for name in ("link", "qr"):
                assert 0 <= places[name][0] and places[name][1] <= height, f"{width}: {name} not on the first screen"
            assert browser.execute_script("return document.documentElement.scrollWidth") <= width, (
                f"{width}: the result page scrolls sideways")
        as_device(browser, *BROWSER_DEVICES[2][1:])
        page = browser.find_element(By.TAG_NAME, "main").text
        assert root[0].fingerprint(hashes.SHA256()).hex(":").upper() in page.replace("\n", "")
        assert root[0].fingerprint(hashes.SHA1()).hex(":").upper() in page.replace("\n", "")
        qr = browser.find_element(By.CSS_SELECTOR, ".qr svg")
        assert qr.is_displayed() and qr.size["width"] > 50 and qr.size["height"] > 50
        assert browser.find_element(By.CSS_SELECTOR, "form[action$='/mail'] input[name=to]").is_displayed()
        assert console_problems(browser) == []
        for name, agent, width, height in BROWSER_DEVICES:
            as_device(browser, agent, width, height)
            browser.get(f"{server.url}/c/{token}")
            screenshot(browser, tmp_path, name)
            first = browser.find_element(By.CSS_SELECTOR, "a.button, body a")
            top, bottom = browser.execute_script(
                "const r = arguments[0].getBoundingClientRect(); return [r.top, r.bottom];", first)
            assert 0 <= top and bottom <= height, f"{name}: the first button is not on the first screen"
            assert browser.execute_script("return document.documentElement.scrollWidth") <= width, (
                f"{name}: the page scrolls sideways")
            for anchor in browser.find_elements(By.CSS_SELECTOR, "a[href*='/c/']"):
                href = anchor.get_attribute("href")
                if re.search(r"\.(crt|cer|der|pem|mobileconfig|whc)$", href):
                    assert certificate_in(href, download(href, agent), root_der), f"{name}: {href}"
            assert console_problems(browser) == [], name
        as_device(browser, *BROWSER_DEVICES[2][1:])
        assert printed_pages(browser, f"{server.url}/c/{token}/card") == {"A4": 1, "Letter": 1}
    finally:
        server.stop()


@pytest.mark.slow
def test_in_a_real_browser_the_in_app_ipad_and_intermediate_pages_fit_a_phone(tmp_path, browser, pki):
    from selenium.webdriver.common.by import By
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\ndata_dir = data\n")
    server = Server(ini)
    try:
        tokens = {}
        for kind, cert in (("root", pki.root), ("intermediate", pki.intermediate)):
            status, headers, _ = server.request("/", pem_of(cert), {"Content-Type": "application/x-pem-file"})
            assert status == 201, kind
            tokens[kind] = headers["Location"].rsplit("/", 1)[1]
        pages = (  # name, User-Agent, token, what the first screen must show first
            ("in-app", IN_APP_AGENTS["instagram-ios"][0], tokens["root"], ".way-out .copy"),
            ("web-view-android", IN_APP_AGENTS["web-view-android"][0], tokens["root"], ".way-out .copy"),
            ("ipad", USER_AGENTS["ipados-as-mac"][0], tokens["root"], "a.button"),
            ("intermediate", USER_AGENTS["iphone-safari"][0], tokens["intermediate"], "a.button"),
        )
        for name, agent, token, first_action in pages:
            as_device(browser, agent, 360, 740)
            browser.get(f"{server.url}/c/{token}")
            screenshot(browser, tmp_path, name)
            for selector in (first_action, "a.button"):
                element = browser.find_element(By.CSS_SELECTOR, selector)
                top, bottom = browser.execute_script(
                    "const r = arguments[0].getBoundingClientRect(); return [r.top, r.bottom];", element)
                assert 0 <= top and bottom <= 740, f"{name}: {selector} is not on the first screen"
            assert browser.execute_script("return document.documentElement.scrollWidth") <= 360, (
                f"{name}: the page scrolls sideways")
            assert console_problems(browser) == [], name
        command_pages = (  # the pages with the longest commands, on a phone and on a desktop
            ("dev-phone", USER_AGENTS["android-chrome"][0], "/dev", 360, 740),
            ("dev-desktop", USER_AGENTS["windows-edge"][0], "/dev", 1280, 800),
            ("linux-phone-width", USER_AGENTS["linux-chrome"][0], "", 360, 740),
            ("linux-desktop", USER_AGENTS["linux-chrome"][0], "", 1280, 800),
        )
        for name, agent, rest, width, height in command_pages:
            as_device(browser, agent, width, height)
            browser.get(f"{server.url}/c/{tokens['root']}{rest}")
            screenshot(browser, tmp_path, name)
            assert browser.execute_script("return document.documentElement.scrollWidth") <= width, (
                f"{name}: the page scrolls sideways")
            blocks = browser.find_elements(By.CSS_SELECTOR, "code.cmd")
            assert len(blocks) >= 5, name
            for block in blocks:  # each command stays inside the page and scrolls inside its own box
                right, inner, outer, overflow = browser.execute_script(
                    "const b = arguments[0]; return [b.getBoundingClientRect().right, b.scrollWidth, b.clientWidth, "
                    "getComputedStyle(b).overflowX];", block)
                assert right <= width and (inner <= outer or overflow in ("auto", "scroll")), (name, block.text[:60])
            assert console_problems(browser) == [], name
    finally:
        server.stop()


@pytest.mark.slow
def test_in_a_real_browser_russian_and_polish_phone_pages_fit_the_first_screen(tmp_path, browser, root_pem):
    from selenium.webdriver.common.by import By
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\ndata_dir = data\n")
    server = Server(ini)
    try:
        status, headers, _ = server.request("/", root_pem, {"Content-Type": "application/x-pem-file"})
        assert status == 201
        token = headers["Location"].rsplit("/", 1)[1]
        for code in ("ru", "pl"):
            for device in ("iphone-safari", "android-chrome"):
                as_device(browser, USER_AGENTS[device][0], 360, 740)
                browser.get(f"{server.url}/lang/{code}?next=/c/{token}")  # the picker, as a reader would use it
                assert browser.find_element(By.TAG_NAME, "html").get_attribute("lang") == code
                screenshot(browser, tmp_path, f"{device}-{code}")
                button = browser.find_element(By.CSS_SELECTOR, "a.button")
                top, bottom = browser.execute_script(
                    "const r = arguments[0].getBoundingClientRect(); return [r.top, r.bottom];", button)
                assert 0 <= top and bottom <= 740, f"{device} in {code}: the first action is not on the first screen"
                assert browser.execute_script("return document.documentElement.scrollWidth") <= 360, (
                    f"{device} in {code}: the page scrolls sideways")
                assert console_problems(browser) == [], (device, code)
    finally:
        server.stop()


#: What the result page shows, in the order people hand it out (JavaScript that finds each one's box).
RESULT_PAGE_PLACES = {
    "link": "document.querySelector('p.link')",
    "qr": "document.querySelector('.qr svg')",
    "mail": "document.querySelector(\"form[action$='/mail']\")",
    "steps": "[...document.querySelectorAll('h2')].find(h => h.textContent === 'How to install it')",
    "old nokia": "[...document.querySelectorAll('h2')].find(h => h.textContent.startsWith('Only for old Nokia'))",
}


def result_page_places(driver):
    """Return {name: (top, bottom)} of RESULT_PAGE_PLACES, in CSS pixels from the top of the screen."""
    return {name: tuple(driver.execute_script(f"const r = ({find}).getBoundingClientRect(); return [r.top, r.bottom];"))
            for name, find in RESULT_PAGE_PLACES.items()}


def printed_pages(driver, url):
    """Return how many pages *url* prints on, on A4 and on US Letter (Chromium's own print to PDF)."""
    from selenium.webdriver.common.print_page_options import PrintOptions
    driver.get(url)
    pages = {}
    for paper, (width, height) in {"A4": (21.0, 29.7), "Letter": (21.59, 27.94)}.items():
        options = PrintOptions()
        options.page_width, options.page_height = width, height
        pdf = base64.b64decode(driver.print_page(options))
        pages[paper] = len(re.findall(rb"/Type\s*/Page(?!s)", pdf))
    return pages


@pytest.mark.slow
def test_mail_goes_over_implicit_tls_with_a_login(config, store, clock, root_der, smtp_tls):
    from aiosmtpd.smtp import AuthResult, LoginPassword
    cafile, context = smtp_tls
    logins = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        good = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (b"relay", b"s3cret")
        logins.append(good)
        return AuthResult(success=good)

    mailbox = Mailbox()
    with smtp_server(mailbox, ssl_context=context, authenticator=authenticator, auth_require_tls=False) as port:
        app = mail_app(config, store, clock, port, mail_security="tls", mail_cafile=str(cafile), mail_user="relay",
                       mail_password="s3cret")
        form = mail_form(upload(app, root_der))
        form["to"] = "alice@example.com"
        form.submit(status=200)
        wrong = mail_app(config, store, clock, port, mail_security="tls", mail_cafile=str(cafile), mail_user="relay",
                         mail_password="guess", mail_timeout=2)
        form = mail_form(upload(wrong, root_der, status=200))
        form["to"] = "alice@example.com"
        assert "The message was not sent" in html_text(form.submit(status=502))
    assert logins[0] is True and False in logins and len(mailbox.messages) == 1


def test_the_developer_page_gives_each_tool_a_checked_line(testapp, root_token, root_der):
    page = testapp.get(f"/c/{root_token}/dev", headers={"User-Agent": USER_AGENTS["linux-chrome"][0]})
    commands = [code.get_text() for code in page.html.find_all("code", class_="cmd")]
    sha256 = hashlib.sha256(root_der).hexdigest()
    assert len(commands) == len(certdrop.DEVELOPER_TOOLS)
    assert all(f'curl -fsSL -o "$d/ca.der" http://ca.example.org:8080/c/{root_token}/Example_Root_CA.crt' in command
               and f"= {sha256} ]" in command for command in commands)
    text = html_text(page)
    for needle in ("SSL_CERT_FILE=", "REQUESTS_CA_BUNDLE=", "NODE_EXTRA_CA_CERTS=", "keytool -importcert",
                   "-cacerts", "http.sslCAInfo", "/etc/docker/certs.d/$reg/ca.crt", ".curlrc", ".wgetrc"):
        assert needle in text
    assert "NODE_EXTRA_CA_CERTS=\"$HOME/.local/share/certdrop/\"Example_Root_CA.pem" in text
    assert "SSL_CERT_FILE=\"$HOME/.local/share/certdrop/\"Example_Root_CA-bundle.pem" in text


# -- install commands, run for real --------------------------------------------------------------------------------

def tls_site(name, serial):
    """Return (CA PEM, server SSL context) of a fresh CA named *name* and the certificate it issued for 127.0.0.1:
    with the key identifiers and key usages OpenSSL's strict checks (Python 3.13's default) ask for."""
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    start, end = datetime.datetime(2025, 1, 1), datetime.datetime(2035, 1, 1)
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(make_name(name)).issuer_name(make_name(name))
          .public_key(ca_key.public_key()).serial_number(serial).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), True)
          .add_extension(ca_ski, False).sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder().subject_name(make_name("127.0.0.1")).issuer_name(ca.subject)
              .public_key(key.public_key()).serial_number(serial + 1).not_valid_before(start).not_valid_after(end)
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
              .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), True)
              .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False)
              .sign(ca_key, hashes.SHA256()))
    directory = Path(tempfile.mkdtemp())
    (directory / "server.pem").write_bytes(pem_of(server) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / "server.pem")
    shutil.rmtree(directory)
    return pem_of(ca), context


@contextlib.contextmanager
def https_site(context):
    """Serve 404 for every path over TLS on 127.0.0.1 with *context*; yield its https:// base."""
    import http.server

    class NotHere(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotHere)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def page_commands(url, user_agent):
    """Return the commands a real page shows, as a reader copies them: the text of each code block, unescaped."""
    with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": user_agent}), timeout=10) as page:
        body = page.read().decode()
    return [html.unescape(code) for code in re.findall(r'<code class="cmd">(.*?)</code>', body, re.S)]


def bash(script, home, **env):
    """Run *script* with bash as a user whose home is *home*, nothing else of the machine's user set."""
    environ = {"PATH": os.environ["PATH"], "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
               "LANG": "C.UTF-8", **env}
    return subprocess.run(["bash", "-c", script], env=environ, capture_output=True, text=True, timeout=60)


@pytest.fixture
def served_cas(tmp_path):
    """Yield (certdrop's URL, {name: token}, the https:// site the first CA's certificate serves, that CA's PEM): a
    real certdrop holding two CAs, the first of which issued the site's certificate."""
    ca_pem, context = tls_site("Site CA", 1001)
    other_pem, _context = tls_site("Other CA", 2001)
    ini = tmp_path / "certdrop.ini"
    ini.write_text("[certdrop]\ndata_dir = data\n")
    # On every address: the pages' links lead with one of the machine's addresses rather than loopback (lead_url).
    server = Server(ini, host="0.0.0.0")
    server.url = server.url.replace("0.0.0.0", "127.0.0.1")
    try:
        tokens = {}
        for name, pem in (("site", ca_pem), ("other", other_pem)):
            form = urllib.parse.urlencode({"pem": pem.decode(), "ttl": "1d"}).encode()
            status, _headers, body = server.request("/", form, {"Content-Type": "application/x-www-form-urlencoded"})
            assert status == 201
            tokens[name] = re.search(rb"/c/([a-z0-9]+)", body)[1].decode()
        with https_site(context) as site:
            yield server.url, tokens, site, ca_pem
    finally:
        server.stop()


DEV_CHECKS = {
    # tool -> (its line on the developer page starts with, the check that reaches the site, what fails says)
    "curl": ("curl and wget", 'curl -sS -o /dev/null "$SITE/"'),
    "python": ("Python", f'{shlex.quote(sys.executable)} -c "import sys, urllib.request, urllib.error\n'
                         'try: urllib.request.urlopen(sys.argv[1])\nexcept urllib.error.HTTPError: pass" "$SITE/"'),
    # past the handshake, the site's 404 reads "not found"; before it, git names the certificate
    "git": ("git", 'out="$(git ls-remote "$SITE/repo.git" 2>&1)"; echo "$out"; '
                   '! echo "$out" | grep -qi certificate && echo "$out" | grep -qiE "not found|404"'),
}


@pytest.mark.slow
@pytest.mark.parametrize("tool", sorted(DEV_CHECKS))
def test_the_developer_pages_lines_make_curl_python_and_git_trust_the_ca_and_refuse_another(served_cas, tmp_path,
                                                                                            tool):
    url, tokens, site, _ca_pem = served_cas
    label, check = DEV_CHECKS[tool]
    with urllib.request.urlopen(f"{url}/c/{tokens['site']}/dev", timeout=10) as page:
        sections = re.findall(r"<h2>(.*?)</h2><p>.*?<code class=\"cmd\">(.*?)</code>", page.read().decode(), re.S)
    line = html.unescape(dict(sections)[label])
    home = tmp_path / "home"
    home.mkdir()
    before = bash(check, home, SITE=site)
    assert before.returncode != 0, before
    swapped = line.replace(f"/c/{tokens['site']}/", f"/c/{tokens['other']}/")
    assert swapped != line
    refused = bash(swapped, home)
    assert refused.returncode != 0 and refused.stderr.startswith("certdrop: nothing installed"), refused.stderr
    assert sorted(path.name for path in home.rglob("*")) == [] and bash(check, home, SITE=site).returncode != 0
    installed = bash(f"{line} && {check}", home, SITE=site)  # exports last for the rest of the line, as in a shell
    assert installed.returncode == 0, installed.stderr
    bundle = next(home.rglob("*-bundle.pem")).read_text()
    assert bundle.count("BEGIN CERTIFICATE") > 1  # the system's CAs are still there


@pytest.mark.slow
def test_the_debian_line_installs_the_ca_into_a_temporary_root_and_refuses_another(served_cas, tmp_path):
    url, tokens, site, ca_pem = served_cas
    ubuntu_firefox = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:131.0) Gecko/20100101 Firefox/131.0"
    commands = page_commands(f"{url}/c/{tokens['site']}", ubuntu_firefox)
    debian = [command for command in commands if "update-ca-certificates" in command]
    assert len(debian) == 1 and not any("update-ca-trust" in command for command in commands)  # Ubuntu's line alone
    root = tmp_path / "root"
    for directory in ("etc/ssl/certs", "usr/share/ca-certificates", "usr/local/share/ca-certificates"):
        (root / directory).mkdir(parents=True)
    (root / "etc/ca-certificates.conf").write_text("")
    # The page's line, run against the temporary root: update-ca-certificates takes it as --sysroot; no sudo.
    line = (debian[0].replace("sudo ", "").replace(" /usr/local/share/", f" {root}/usr/local/share/")
            .replace("&&\nupdate-ca-certificates", f"&&\nupdate-ca-certificates --sysroot {root}"))
    assert line.endswith(f"update-ca-certificates --sysroot {root}") and "sudo" not in line
    swapped = bash(line.replace(f"/c/{tokens['site']}/", f"/c/{tokens['other']}/"), tmp_path)
    assert swapped.returncode != 0 and swapped.stderr.startswith("certdrop: nothing installed"), swapped.stderr
    assert list((root / "usr/local/share/ca-certificates").iterdir()) == []
    installed = bash(line, tmp_path)
    assert installed.returncode == 0, installed.stderr
    bundle = root / "etc/ssl/certs/ca-certificates.crt"
    assert ca_pem.decode().strip() in bundle.read_text()
    reached = bash(f'curl -sS -o /dev/null --cacert {bundle} "$SITE/"', tmp_path, SITE=site)
    assert reached.returncode == 0, reached.stderr


@pytest.mark.parametrize("name", ["$(touch /tmp/certdrop-pwned)", "O'Brien \"Quote\" CA `id`", "Back\\slash; rm -rf ~"])
def test_hostile_names_stay_one_quoted_word_in_every_command(name, tmp_path):
    der = make_certificate(name)[0].public_bytes(serialization.Encoding.DER)
    certificate = certdrop.load_der(der)
    link = "http://ca.example.org/c/abcd2345?x='1'&y=$(id)"
    values = certdrop.command_values(certificate, f"{link}/{certificate.file_stem}.crt")
    assert shlex.split(values["nickname"]) == [certificate.file_stem]  # safe characters only
    assert re.fullmatch(r"[A-Za-z0-9._-]+", certificate.file_stem)
    assert all(len(shlex.split(values[key])) == 1 for key in ("crt", "pem", "bundle"))
    assert f"{link}/{certificate.file_stem}.crt" in shlex.split(values["get"].split(" && ")[1])  # the URL: one word
    assert f"-Uri {certdrop.ps_quote(link + '/' + certificate.file_stem + '.crt')} -OutFile" in values["ps_machine"]
    assert certdrop.ps_quote("it's \u2018x\u2019") == "'it''s \u2018\u2018x\u2019\u2019'"


@pytest.mark.slow
def test_bash_runs_nothing_of_a_hostile_name_in_a_command(tmp_path):
    name = "$(touch /tmp/certdrop-pwned)`id`'\";x"
    certificate = certdrop.load_der(make_certificate(name)[0].public_bytes(serialization.Encoding.DER))
    values = certdrop.command_values(certificate, "http://ca.example.org/c/abcd2345/$(touch /tmp/certdrop-pwned)")
    marker = Path("/tmp/certdrop-pwned")
    marker.unlink(missing_ok=True)
    shown = bash(f"printf '%s\\n' {values['nickname']} {values['crt']} {values['get'].split(' && ')[1][26:]}",
                 tmp_path)
    assert shown.stdout.splitlines() == [certificate.file_stem, f"certdrop-{certificate.file_stem}.crt",
                                         "http://ca.example.org/c/abcd2345/$(touch /tmp/certdrop-pwned)"]
    assert not marker.exists()


@pytest.mark.parametrize(("user_agent", "system"), [
    ("Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:131.0) Gecko/20100101 Firefox/131.0", "debian"),
    ("Mozilla/5.0 (X11; Fedora; Linux x86_64; rv:126.0) Gecko/20100101 Firefox/126.0", "fedora"),
    ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36", ""),
    ("Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0", ""),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:131.0) Gecko/20100101 Firefox/131.0", ""),  # not Linux at all
    ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Mobile "
     "Safari/537.36 Ubuntu", ""),  # an Android phone is never given a Linux distribution
], ids=["ubuntu-firefox", "fedora-firefox", "linux-chrome", "linux-firefox", "windows-firefox", "android"])
def test_the_linux_distribution_is_picked_from_the_user_agent_only_where_it_says(user_agent, system):
    assert certdrop.identify(user_agent, "", False).system == system


def test_a_page_for_ubuntu_shows_the_debian_line_alone_and_a_plain_linux_page_every_distribution(testapp, root_token):
    ubuntu = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:131.0) Gecko/20100101 Firefox/131.0"
    text = html_text(testapp.get(f"/c/{root_token}", headers={"User-Agent": ubuntu}))
    assert "Debian, Ubuntu, Linux Mint:" in text and "Fedora, RHEL" not in text and "trust anchor" not in text
    text = html_text(testapp.get(f"/c/{root_token}", headers={"User-Agent": USER_AGENTS["linux-chrome"][0]}))
    for label in ("Debian, Ubuntu, Linux Mint:", "Fedora, RHEL", "Arch Linux, Manjaro:", "openSUSE, SUSE",
                  "Alpine Linux"):
        assert label in text
    assert "/etc/pki/ca-trust/source/anchors/" in text and "/etc/pki/trust/anchors/" in text
    assert "wget -qO" in text and "libnss3-tools" in text


@pytest.mark.parametrize("device", ["windows-edge", "macos-chrome", "linux-chrome", "android-chrome"])
def test_desktop_pages_link_the_developer_page_and_say_what_their_commands_check(testapp, root_token, root_der,
                                                                                device):
    page = testapp.get(f"/c/{root_token}", headers={"User-Agent": USER_AGENTS[device][0]})
    desktop = device != "android-chrome"
    assert bool(page.html.find("a", href=f"/c/{root_token}/dev")) == desktop
    note = page.html.find("p", class_="commands-note")
    assert bool(note) == desktop  # the Android page has no command to check
    if desktop:
        assert hashlib.sha256(root_der).digest().hex(":").upper() in note.get_text() and "card" in note.get_text()


def test_the_result_page_links_the_developer_page_and_its_commands_download_from_the_link(testapp, root_pem):
    result = upload(testapp, root_pem)
    token = token_of(result)
    assert result.html.find("a", href=re.compile(rf"/c/{token}/dev$"))
    commands = [code.get_text() for code in result.html.find_all("code", class_="cmd")]
    assert any(f"/c/{token}/Example_Root_CA.crt" in command and "update-ca-certificates" in command
               for command in commands)


def test_the_developer_page_is_kept_apart_from_the_card(testapp, root_token):
    card = testapp.get(f"/c/{root_token}/card")
    dev = testapp.get(f"/c/{root_token}/dev")
    again = testapp.get(f"/c/{root_token}/card")
    assert "for developers and scripts" in dev.text and "for developers" not in card.text
    assert again.body == card.body and testapp.get(f"/c/{root_token}/dev").body == dev.body


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("certutil"), reason="NSS's certutil (libnss3-tools) is not installed")
def test_the_chrome_line_on_the_linux_page_adds_the_ca_to_the_nss_database_and_refuses_another(served_cas, tmp_path):
    url, tokens, _site, ca_pem = served_cas
    nss = [command for command in page_commands(f"{url}/c/{tokens['site']}", USER_AGENTS["linux-chrome"][0])
           if "certutil -d" in command]
    assert len(nss) == 1
    home = tmp_path / "home"
    home.mkdir()
    swapped = bash(nss[0].replace(f"/c/{tokens['site']}/", f"/c/{tokens['other']}/"), home)
    assert swapped.returncode != 0 and swapped.stderr.startswith("certdrop: nothing installed")
    assert list(home.iterdir()) == []
    installed = bash(nss[0], home)
    assert installed.returncode == 0, installed.stderr
    # No database yet: the line made Chrome 146's, and the CA is in it, trusted to issue server certificates.
    listed = bash('certutil -d "sql:$HOME/.local/share/pki/nssdb" -L -n Site_CA', home)
    assert listed.returncode == 0 and "Valid CA" in listed.stdout and "Trusted CA" in listed.stdout, listed.stdout


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("certutil"), reason="NSS's certutil (libnss3-tools) is not installed")
def test_the_firefox_line_adds_the_ca_to_every_firefox_profile(served_cas, tmp_path):
    url, tokens, _site, _ca_pem = served_cas
    ubuntu_firefox = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:131.0) Gecko/20100101 Firefox/131.0"
    line, = [command for command in page_commands(f"{url}/c/{tokens['site']}", ubuntu_firefox)
             if ".mozilla/firefox" in command]
    home = tmp_path / "home"
    profiles = [home / ".mozilla/firefox/abcd.default-release", home / "snap/firefox/common/.mozilla/firefox/x.default"]
    for profile in profiles:
        profile.mkdir(parents=True)
        assert bash(f'certutil -N -d "sql:{profile}" --empty-password', home).returncode == 0
    installed = bash(line, home)
    assert installed.returncode == 0, installed.stderr
    for profile in profiles:
        listed = bash(f'certutil -d "sql:{profile}" -L -n Site_CA', home)
        assert listed.returncode == 0 and "Trusted CA" in listed.stdout, (profile, listed.stdout)


# -- the version, and words counted right ------------------------------------------------------------------------


def test_the_version_is_0_3_0_everywhere_it_is_shown(testapp, capsys):
    assert certdrop.__version__ == "0.3.0"
    with pytest.raises(SystemExit):
        certdrop.main(["--version"])
    assert capsys.readouterr().out == "certdrop 0.3.0\n"
    assert "certdrop 0.3.0" in testapp.get("/").html.find("footer").get_text()
    assert "0.3.0" in (HERE / "README.md").read_text()


@pytest.mark.parametrize(("wait", "words"), [(0.2, "Try again in 1 second."), (1, "Try again in 1 second."),
                                            (1.5, "Try again in 2 seconds.")], ids=["part", "one", "two"])
def test_the_wait_is_counted_in_singular_and_plural(wait, words):
    assert certdrop.TooManyRequests(wait).message.endswith(words)


@pytest.mark.slow
def test_in_a_real_browser_sign_in_open_admin_revoke_one_link_and_extend_another(tmp_path, browser, many_roots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    ini = tmp_path / "certdrop.ini"
    ini.write_text(f"[certdrop]\ndata_dir = data\nupload_auth = always\nupload_password = {KEY}\n"
                   "[mail]\nhost = 127.0.0.1\n")
    server = Server(ini)
    try:
        tokens = []
        for der in many_roots[:4]:
            status, headers, _ = server.request("/?ttl=7d", der, {"Content-Type": "application/pkix-cert", **basic(KEY)})
            assert status == 201
            tokens.append(headers["Location"].rsplit("/", 1)[1])
        signed_in = False
        for (name, agent, width, height), (revoked, extended) in zip(
                (BROWSER_DEVICES[1], BROWSER_DEVICES[2]), (tokens[:2], tokens[2:])):
            as_device(browser, agent, width, height)
            browser.get(server.url + "/admin")
            if not signed_in:
                browser.find_element(By.ID, "key").send_keys(KEY)
                browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
                signed_in = True
            assert browser.find_element(By.ID, f"link-{revoked}").is_displayed()
            screenshot(browser, tmp_path, f"admin-{name}")
            assert browser.execute_script("return document.documentElement.scrollWidth") <= width, (
                f"{name}: the page scrolls sideways")
            browser.find_element(By.CSS_SELECTOR, f"a[href$='/admin/link/{revoked}/revoke']").click()
            screenshot(browser, tmp_path, f"admin-revoke-question-{name}")
            browser.find_element(By.CSS_SELECTOR, "button[name=revoke]").click()
            assert "was revoked" in browser.find_element(By.TAG_NAME, "main").text
            assert server.request(f"/c/{revoked}")[0] == 410
            browser.get(server.url + "/admin")
            form = browser.find_element(By.CSS_SELECTOR, f"form[action$='/admin/link/{extended}/extend']")
            Select(form.find_element(By.TAG_NAME, "select")).select_by_value("90d")
            form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
            screenshot(browser, tmp_path, f"admin-extended-{name}")
            assert "now works until" in browser.find_element(By.TAG_NAME, "main").text
            assert browser.execute_script("return document.documentElement.scrollWidth") <= width
            assert console_problems(browser) == [], name
        listed = {link["token"]: link for link in json.loads(
            server.request("/admin/api/v1/links", headers=basic(KEY))[2])["links"]}
        assert [listed[token]["state"] for token in tokens] == ["revoked", "live", "revoked", "live"]
        for token in (tokens[1], tokens[3]):
            ends = datetime.datetime.fromisoformat(listed[token]["expires"].replace("Z", "+00:00"))
            created = datetime.datetime.fromisoformat(listed[token]["created"].replace("Z", "+00:00"))
            assert 89 <= (ends - created).days <= 90  # extended from 7 days to 90
    finally:
        server.stop()
