"""Dataset URLs reach only public hosts, over https, within a deadline.

Each test is an attack on the worker's download: real servers on loopback (see
loopback_sites), nothing of urllib, http.client or socket replaced.
"""

from __future__ import annotations

import ipaddress
import socket
import time

import pytest

from finetune_worker.checks.urlguard import (
    Guard,
    GuardedHTTPSConnection,
    Refused,
    address_problem,
    host_allowed,
)
from finetune_worker.checks.validation import validate_job
from finetune_worker.contract import errors
from finetune_worker.contract.errors import JobError
from finetune_worker.contract.settings import REPO_ROOT, WorkerSettings, parse_allowed_hosts
from finetune_worker.data.download import DownloadRules, download
from finetune_worker.host.hardware import CPU_ONLY
from finetune_worker.plan.config import localise_datasets
from loopback_sites import Site, drip, file, make_cert, redirect

WHERE = "args.datasets[0]"
BODY = b'{"instruction": "q", "output": "a"}\n' * 10
ADVICE = "Put the file on the volume or the Hub, or ask the operator to allow the host with FINETUNE_ALLOWED_PRIVATE_HOSTS"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    cert_and_key = make_cert(tmp_path_factory.mktemp("tls"))
    https, plain = Site(cert_and_key), Site()
    yield https, plain, cert_and_key[0]
    https.close()
    plain.close()


def fresh(site: Site) -> Site:
    site.routes.clear()
    site.hits.clear()
    site.routes["/data.jsonl"] = file(BODY)
    return site


@pytest.fixture
def site(servers, monkeypatch):
    """An HTTPS server on 127.0.0.1 (certificate for localhost and 127.0.0.1), trusted by the client."""
    monkeypatch.setenv("SSL_CERT_FILE", str(servers[2]))
    return fresh(servers[0])


@pytest.fixture
def plain_site(servers):
    return fresh(servers[1])


def rules(env: dict[str, str]) -> DownloadRules:
    """The download rules as the worker reads them from its environment."""
    return DownloadRules.from_settings(WorkerSettings.from_env({"BASE_VOLUME": "/tmp/unused", **env}))


def refused(url: str, tmp_path, env: dict[str, str] | None = None) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    with pytest.raises(JobError) as caught:
        download(url, tmp_path / "d.jsonl", WHERE, rules(env or {}))
    assert caught.value.code == errors.DATASET_ERROR
    assert not list(tmp_path.glob("d.jsonl*"))
    return caught.value.message


# -- which addresses are public ---------------------------------------------------


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("127.0.0.1", "a loopback address"),
        ("127.8.9.10", "a loopback address"),
        ("::1", "a loopback address"),
        ("10.1.2.3", "a private address"),
        ("172.16.0.1", "a private address"),
        ("192.168.1.1", "a private address"),
        ("fd12:3456::1", "a private address"),
        ("169.254.169.254", "a link-local address"),  # the cloud metadata service
        ("fe80::1", "a link-local address"),
        ("100.64.0.1", "a shared (carrier-grade NAT) address"),
        ("0.0.0.0", "an unspecified address"),
        ("::", "an unspecified address"),
        ("224.0.0.1", "a multicast address"),
        ("ff02::1", "a multicast address"),
        ("ff0e::1", "a multicast address"),
        ("::ffff:127.0.0.1", "a loopback address"),  # IPv4-mapped IPv6
        ("::ffff:10.0.0.1", "a private address"),
        ("::ffff:169.254.169.254", "a link-local address"),
        ("64:ff9b::a9fe:a9fe", "a link-local address"),  # NAT64 of 169.254.169.254
        ("2002:7f00:1::", "a 6to4 address of 127.0.0.1, a loopback address"),
        ("0.1.2.3", "a special-purpose address, not a public one"),
        ("192.0.2.1", "a special-purpose address, not a public one"),  # documentation
        ("198.18.0.1", "a special-purpose address, not a public one"),  # benchmarking
        ("240.0.0.1", "a special-purpose address, not a public one"),  # reserved
        ("255.255.255.255", "a special-purpose address, not a public one"),
        ("2001:db8::1", "a special-purpose address, not a public one"),
        ("2001::1", "a special-purpose address, not a public one"),  # Teredo
        ("::7f00:1", "a special-purpose address, not a public one"),  # IPv4-compatible, deprecated
        ("fec0::1", "a special-purpose address, not a public one"),  # site-local, deprecated
    ],
)
def test_addresses_that_are_not_public_are_refused(address, problem):
    assert address_problem(ipaddress.ip_address(address)) == problem


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "151.101.1.69", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_public_addresses_pass(address):
    assert address_problem(ipaddress.ip_address(address)) is None


def test_the_operator_names_private_hosts_with_or_without_a_port():
    allowed = parse_allowed_hosts(" Files.Internal. ,10.0.0.5:8443,,[fd00::1]:443")
    assert allowed == {"files.internal", "10.0.0.5:8443", "[fd00::1]:443"}
    assert host_allowed("FILES.internal", 443, allowed) and host_allowed("files.internal.", 8443, allowed)
    assert host_allowed("10.0.0.5", 8443, allowed) and not host_allowed("10.0.0.5", 443, allowed)
    assert host_allowed("fd00::1", 443, allowed) and not host_allowed("fd00::1", 80, allowed)
    assert not host_allowed("internal", 443, allowed)
    settings = WorkerSettings.from_env({"BASE_VOLUME": "/tmp/unused", "FINETUNE_ALLOWED_PRIVATE_HOSTS": "a.lan,b.lan:8443",
                                        "FINETUNE_DOWNLOAD_DEADLINE_S": "90"})
    assert (settings.allowed_private_hosts, settings.download_deadline_s) == ({"a.lan", "b.lan:8443"}, 90)
    defaults = WorkerSettings.from_env({"BASE_VOLUME": "/tmp/unused"})
    assert (defaults.allowed_private_hosts, defaults.download_deadline_s) == (frozenset(), 1800)


# -- loopback and private hosts ---------------------------------------------------


def test_a_name_that_resolves_to_loopback_is_refused(site, tmp_path):
    message = refused(site.url("/data.jsonl?X-Signature=secret"), tmp_path)
    assert message == (
        f"args.datasets[0].path: https://localhost:{site.port}/data.jsonl was refused: localhost resolves to 127.0.0.1, "
        f"a loopback address; dataset URLs must reach public hosts. {ADVICE}"
    )
    assert site.hits == []  # no request reached the server


def test_a_loopback_address_in_the_url_is_refused(site, tmp_path):
    message = refused(site.url("/data.jsonl", host="127.0.0.1"), tmp_path, {"FINETUNE_ALLOWED_PRIVATE_HOSTS": "localhost"})
    assert f"https://127.0.0.1:{site.port}/data.jsonl was refused: 127.0.0.1 is a loopback address;" in message
    assert site.hits == []


def test_the_check_is_made_when_connecting_and_no_connection_is_made(tmp_path):
    """The connection class itself refuses (so each redirect hop and each resolution is checked)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        connection = GuardedHTTPSConnection("localhost", port, guard=Guard())
        with pytest.raises(Refused, match="localhost resolves to 127.0.0.1, a loopback address"):
            connection.connect()
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody knocked
    finally:
        listener.close()


def test_the_operator_allows_a_named_private_host(site, tmp_path):
    dest = tmp_path / "d.jsonl"
    download(site.url("/data.jsonl?sig=x"), dest, WHERE, rules({"FINETUNE_ALLOWED_PRIVATE_HOSTS": "localhost"}))
    assert dest.read_bytes() == BODY
    download(site.url("/data.jsonl"), dest, WHERE, rules({"FINETUNE_ALLOWED_PRIVATE_HOSTS": f"other.lan,localhost:{site.port}"}))
    message = refused(site.url("/data.jsonl"), tmp_path / "x", {"FINETUNE_ALLOWED_PRIVATE_HOSTS": f"localhost:{site.port + 1}"})
    assert "localhost resolves to 127.0.0.1, a loopback address" in message
    assert site.hits == ["/data.jsonl", "/data.jsonl"]


# -- redirects --------------------------------------------------------------------


def test_a_redirect_to_plain_http_is_refused_even_on_an_allowed_host(site, plain_site, tmp_path):
    site.routes["/go"] = redirect(plain_site.url("/data.jsonl?token=secret"))
    message = refused(site.url("/go?sig=secret"), tmp_path, {"FINETUNE_ALLOWED_PRIVATE_HOSTS": "localhost"})
    assert message == (
        f"args.datasets[0].path: https://localhost:{site.port}/go was refused: it redirects to "
        f"http://localhost:{plain_site.port}/data.jsonl, and redirects must stay on https. Put the file on the volume or the Hub"
    )
    assert plain_site.hits == []


def test_a_redirect_to_an_address_that_is_not_allowed_is_refused(site, tmp_path):
    """localhost is allowed; the same server as 127.0.0.1 (its certificate names both) is not."""
    site.routes["/go"] = redirect(site.url("/data.jsonl?sig=secret", host="127.0.0.1"))
    message = refused(site.url("/go"), tmp_path, {"FINETUNE_ALLOWED_PRIVATE_HOSTS": "localhost"})
    assert message == (
        f"args.datasets[0].path: https://localhost:{site.port}/go (redirected to https://127.0.0.1:{site.port}/data.jsonl) "
        f"was refused: 127.0.0.1 is a loopback address; dataset URLs must reach public hosts. {ADVICE}"
    )
    assert site.hits == ["/go"]


def test_redirects_on_https_are_followed_at_most_five_times(site, tmp_path):
    for n in range(5):  # /r0 -> /r1 -> ... -> /r4 -> /data.jsonl: five redirects
        site.routes[f"/r{n}"] = redirect(f"/r{n + 1}" if n < 4 else "/data.jsonl", code=(301, 302, 303, 307, 308)[n])
    dest = tmp_path / "d.jsonl"
    download(site.url("/r0"), dest, WHERE, rules({"FINETUNE_ALLOWED_PRIVATE_HOSTS": "localhost"}))
    assert dest.read_bytes() == BODY
    site.routes["/r4"], site.routes["/r5"] = redirect("/r5"), redirect("/data.jsonl")  # six
    message = refused(site.url("/r0"), tmp_path / "x", {"FINETUNE_ALLOWED_PRIVATE_HOSTS": "localhost"})
    assert message.endswith("was refused: it redirects more than 5 times. Put the file on the volume or the Hub")


# -- the deadline -----------------------------------------------------------------


@pytest.mark.parametrize("in_headers", [False, True], ids=["body", "headers"])
def test_a_server_that_drips_bytes_hits_the_deadline(site, tmp_path, in_headers):
    site.routes["/slow.jsonl"] = drip(size=6, every=1.0, in_headers=in_headers)  # each read returns within a second
    started = time.monotonic()
    env = {"FINETUNE_ALLOWED_PRIVATE_HOSTS": "localhost", "FINETUNE_DOWNLOAD_DEADLINE_S": "1.5"}
    message = refused(site.url("/slow.jsonl?sig=secret"), tmp_path, env)
    assert time.monotonic() - started < 3
    assert message == (
        f"args.datasets[0].path: downloading https://localhost:{site.port}/slow.jsonl did not finish within the worker's "
        "1.5 s deadline; put the file on the volume or the Hub (the operator sets FINETUNE_DOWNLOAD_DEADLINE_S)"
    )


# -- no URL is left for Axolotl to fetch -----------------------------------------


def test_an_https_url_in_capitals_is_downloaded_by_the_worker_not_axolotl(tmp_path):
    config = {"datasets": [{"path": "HTTPS://127.0.0.1/train.jsonl?sig=x", "type": "alpaca"}]}
    sources = localise_datasets(config, tmp_path)
    assert [source.url for source in sources] == ["HTTPS://127.0.0.1/train.jsonl?sig=x"]
    assert config["datasets"][0]["path"] == str(tmp_path / "datasets-0.jsonl")


def test_an_https_url_is_refused_where_the_worker_does_not_download_it(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    settings = WorkerSettings(base_volume=tmp_path, examples_dir=REPO_ROOT / "examples")
    args = {"base_model": "examples/tiny-llama", "learning_rate": 1e-4, "streaming": True, "max_steps": 5,
            "datasets": [{"path": "train.jsonl", "type": "alpaca"}],
            "pretraining_dataset": [{"path": "https://127.0.0.1/corpus.jsonl", "type": "pretrain"}]}
    with pytest.raises(JobError) as caught:
        validate_job({"user_id": "u", "model_id": "m", "run_id": "r", "args": args}, settings, CPU_ONLY)
    assert caught.value.details == ["args.pretraining_dataset[0].path: this URL is not accepted here; use a Hub id or a path on the volume"]
