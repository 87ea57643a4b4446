"""``python -m lightws bench``: the load generator against real servers in other processes.

Only the shape of the reports is checked (positive counts, every connection open), never
timings: CI machines are too noisy for that.

The generator is only in extensions built with the ``loadgen`` cargo feature. Without it
the tests that need it skip, unless ``LIGHTWS_REQUIRE_LOADGEN=1`` (set by .ci/run, which
builds with the feature) makes them fail instead; the message the subcommand prints
without it is tested either way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from lightws import __main__ as cli
from lightws import _bench
from lightws._bench import parse_size
from support import LIGHTWS, free_port, run_lightws, start

TIMEOUT = 60

if not _bench.loadgen_available() and os.environ.get("LIGHTWS_REQUIRE_LOADGEN") == "1":
    raise RuntimeError(
        "LIGHTWS_REQUIRE_LOADGEN=1 but lightws._lightws has no run_bench: "
        "build with --features loadgen"
    )

needs_loadgen = pytest.mark.skipif(
    not _bench.loadgen_available(),
    reason="extension built without the load generator (cargo feature 'loadgen')",
)


def serve(*args: str) -> Iterator[int]:
    """``python -m lightws *args`` on a free port (``{port}`` in args), once listening."""
    port = free_port()
    proc = start([*LIGHTWS, *(a.replace("{port}", str(port)) for a in args)], ready="listening")
    try:
        yield port
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    yield from serve("echo", "--addr", "127.0.0.1:{port}")


@pytest.fixture(scope="module")
def floor_port() -> Iterator[int]:
    yield from serve("bench", "--floor-server", "127.0.0.1:{port}")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    d = tmp_path_factory.mktemp("tls")
    chain, key, ca_file = d / "chain.pem", d / "key.pem", d / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return chain, key, ca_file


@pytest.fixture(scope="module")
def tls_port(tls_files: tuple[Path, Path, Path]) -> Iterator[int]:
    chain, key, _ = tls_files
    yield from serve("echo", "--addr", "127.0.0.1:{port}", "--cert", str(chain), "--key", str(key))


def bench(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_lightws("bench", url, "--json", *args, timeout=TIMEOUT)


def report(url: str, *args: str) -> dict[str, Any]:
    out = bench(url, *args)
    assert out.returncode == 0, out.stderr
    r: dict[str, Any] = json.loads(out.stdout)
    assert r["errors"] == [], r["errors"]
    return r


@needs_loadgen
def test_echo_mode_reports_positive_throughput(echo_port: int) -> None:
    r = report(f"ws://127.0.0.1:{echo_port}/", "-c", "4", "-s", "64", "-d", "1", "--warmup", "0")
    assert r["mode"] == "echo"
    assert r["opened"] == 4 and r["failed"] == 0
    assert r["messages"] > 0 and r["msgs_per_s"] > 0
    # Payload bytes of the echoes: 64 per message, give or take one message in flight
    # per connection at the window's edges.
    assert abs(r["bytes"] - 64 * r["messages"]) <= 64 * 4


@needs_loadgen
def test_progress_goes_to_stderr_and_the_report_to_stdout(echo_port: int) -> None:
    out = run_lightws(
        *("bench", f"ws://127.0.0.1:{echo_port}/"),
        *("-c", "2", "-d", "1.5", "--warmup", "0", "-p", "4", "--text", "-s", "1KiB"),
        timeout=TIMEOUT,
    )
    assert out.returncode == 0, out.stderr
    assert "msgs/s" in out.stdout and "1024 B messages" in out.stdout
    assert "echo:" in out.stderr  # at least one progress line


@needs_loadgen
def test_large_messages_are_echoed_whole(echo_port: int) -> None:
    r = report(f"ws://127.0.0.1:{echo_port}/", "-c", "2", "-s", "1MiB", "-d", "1", "--warmup", "0")
    assert r["messages"] > 0 and r["mb_per_s"] > 0


@needs_loadgen
def test_rate_mode_reports_latency_percentiles(echo_port: int) -> None:
    r = report(
        f"ws://127.0.0.1:{echo_port}/",
        *("--mode", "rate", "-c", "5", "-r", "500", "-d", "1", "--warmup", "0.2"),
    )
    lat = r["latency"]
    assert r["sent"] > 0 and lat["count"] > 0
    assert 0 < lat["p50_us"] <= lat["p90_us"] <= lat["p99_us"] <= lat["p99_9_us"] <= lat["max_us"]


@needs_loadgen
def test_idle_mode_holds_connections_from_several_source_addresses(echo_port: int) -> None:
    r = report(
        f"ws://127.0.0.1:{echo_port}/", "--mode", "idle", "-c", "60", "--sources", "3", "-d", "0.5"
    )
    assert r["opened"] == 60 and r["open_at_end"] == 60


@needs_loadgen
def test_wss_with_a_ca_file_and_with_verification_off(
    tls_port: int, tls_files: tuple[Path, Path, Path]
) -> None:
    url = f"wss://127.0.0.1:{tls_port}/"
    r = report(url, "--cafile", str(tls_files[2]), "-c", "2", "-d", "0.5", "--warmup", "0")
    assert r["messages"] > 0
    r = report(url, "--insecure", "-c", "2", "-d", "0.5", "--warmup", "0")
    assert r["messages"] > 0


@needs_loadgen
def test_wss_rejects_an_untrusted_certificate(tls_port: int, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    out = bench(f"wss://127.0.0.1:{tls_port}/", "--cafile", str(other), "-c", "1", "-d", "0.2")
    assert out.returncode == 1
    assert "certificate" in out.stderr.lower()


@needs_loadgen
def test_floor_server_echoes(floor_port: int) -> None:
    url = f"ws://127.0.0.1:{floor_port}/"
    r = report(url, "-c", "3", "-s", "64KiB", "-d", "0.5", "--warmup", "0", "--text")
    assert r["messages"] > 0
    r = report(url, "--mode", "idle", "-c", "20", "-d", "0.2")
    assert r["open_at_end"] == 20


@pytest.fixture(scope="module")
def chat_port() -> Iterator[int]:
    """bench/chat_servers.py's lightws room: every message published to everyone."""
    port = free_port()
    script = Path(__file__).resolve().parent.parent / "bench" / "chat_servers.py"
    proc = start([sys.executable, str(script), "lightws", "--port", str(port)], ready="ready")
    try:
        yield port
    finally:
        proc.stop()


@needs_loadgen
def test_chat_mode_checks_that_every_subscriber_got_every_message(chat_port: int) -> None:
    r = report(
        f"ws://127.0.0.1:{chat_port}/",
        *("--mode", "chat", "-c", "20", "--stalled", "2", "--window", "4", "-d", "1"),
        *("--warmup", "0.2", "--sources", "2", "--threads", "2"),
    )
    assert r["mode"] == "chat"
    assert r["opened"] == r["connections"] == 23  # 20 + 2 never reading + the publisher
    assert (r["subscribers"], r["stalled"], r["window"], r["joined"]) == (20, 2, 4, 20)
    assert r["deliveries"] > 0 and r["messages"] > 0 and r["stalls"] == 0
    # A message is done when every subscriber has it: deliveries are 20 per message,
    # give or take the window at the edges of the measured time.
    assert abs(r["deliveries"] - 20 * r["messages"]) <= 20 * 4
    assert r["sent"] == r["completed"] > 0
    assert r["publisher_copies"] == r["sent"]
    check = r["check"]
    assert check["subscribers"] == check["complete"] == 20
    assert check["missing"] == check["duplicated"] == check["out_of_order"] == 0
    assert check["min_received"] == check["max_received"] == r["sent"]
    stalled = r["stalled_clients"]
    assert stalled["opened"] == 2 and stalled["messages"] > 0
    out = bench(f"ws://127.0.0.1:{chat_port}/", "--mode", "chat", "-c", "2", "-s", "4")
    assert out.returncode == 1 and "at least 8" in out.stderr


@needs_loadgen
def test_unreachable_server_is_an_error() -> None:
    out = bench(f"ws://127.0.0.1:{free_port()}/", "-c", "2", "-d", "0.2")
    assert out.returncode == 1
    assert "no connection could be opened" in out.stderr


@needs_loadgen
def test_bad_url_is_an_error() -> None:
    out = bench("http://127.0.0.1:1/", "-d", "0.2")
    assert out.returncode == 1
    assert "ws://" in out.stderr


class _NoLoadgen:
    """Stands in for an extension built without the feature: no ``run_bench``."""


def test_without_the_generator_bench_says_how_to_build_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_bench, "_lightws", _NoLoadgen())
    assert not _bench.loadgen_available()
    assert cli.main(["bench", "ws://127.0.0.1:1/", "-d", "0.2"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == _bench.LOADGEN_MISSING + "\n"  # one line
    assert "\n" not in _bench.LOADGEN_MISSING
    assert "--features loadgen" in err and "maturin develop" in err
    assert 'MATURIN_PEP517_ARGS="--features loadgen"' in err


@pytest.mark.skipif(_bench.loadgen_available(), reason="this extension has the load generator")
def test_an_extension_without_the_generator_exits_2() -> None:
    out = bench("ws://127.0.0.1:1/", "-d", "0.2")
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr == _bench.LOADGEN_MISSING + "\n"


@pytest.mark.parametrize(
    ("text", "value"),
    [("64", 64), ("1k", 1024), ("1KiB", 1024), ("2kb", 2000), ("1MiB", 1 << 20), ("3m", 3 << 20)],
)
def test_sizes_parse(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "1.5k", "-3", "10q"])
def test_bad_sizes_are_rejected(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)
