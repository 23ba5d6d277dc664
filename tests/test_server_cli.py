"""`wmgen generate --server URL`: the same run on a server writes exactly what a
local run writes (text, `--format jsonl` and `json`, `--stats`, exit codes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from serving import Served

TIMINGS = ("prefill_s", "first_token_s", "elapsed_s", "tokens_per_s")


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    server = Served(tiny_dir, tmp_path_factory.mktemp("serve-cli-home"))
    yield server
    server.stop()


def wmgen(*args: str, home, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """A wmgen process with one torch thread, as the test server has: logprobs summed
    by another number of threads differ in their last bits."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("WMGEN_")} | {"WMGEN_HOME": str(home), "OMP_NUM_THREADS": "1"} | (env or {})
    return subprocess.run([sys.executable, "-m", "wmgen", *args], capture_output=True, text=True, timeout=timeout,
                          env=environ, stdin=subprocess.DEVNULL)


def without_timings(records: list[dict]) -> list[dict]:
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k not in TIMINGS}
        if "stats" in r:
            r["stats"] = {k: v for k, v in r["stats"].items() if k not in TIMINGS}
        out.append(r)
    return out


def local_and_remote(served, tiny_dir, tmp_path, *args: str):
    local = wmgen("generate", "--model", str(tiny_dir), *args, home=tmp_path / "local")
    remote = wmgen("generate", "--server", served.url, *args, home=tmp_path / "client")
    return local, remote


@pytest.mark.parametrize("fmt", ["text", "jsonl", "json"])
def test_a_run_on_the_server_writes_what_a_local_run_writes(served, tiny_dir, tmp_path, fmt):
    args = ("-n", "25", "-t", "0.9", "--seed", "5", "--capacity", "20", "--evict", "4", "--ignore-eos", "--no-save",
            "--format", fmt, "Once upon a time")
    local, remote = local_and_remote(served, tiny_dir, tmp_path, *args)
    assert (local.returncode, remote.returncode) == (0, 0), remote.stderr
    if fmt == "text":
        assert remote.stdout == local.stdout
    elif fmt == "jsonl":
        a, b = (without_timings([json.loads(line) for line in r.stdout.splitlines()]) for r in (local, remote))
        assert b == a
        assert any(r["type"] == "eviction" for r in b)  # the memory's own events cross too
    else:
        assert without_timings([json.loads(remote.stdout)]) == without_timings([json.loads(local.stdout)])
    assert remote.stderr == local.stderr == ""


def test_stats_and_echo(served, tiny_dir, tmp_path):
    local, remote = local_and_remote(served, tiny_dir, tmp_path, "-n", "8", "-t", "0", "--no-save", "--stats", "--echo", "Hello")
    assert remote.stdout == local.stdout and remote.stdout.startswith("Hello")
    strip = lambda s: s.split("first token")[0] + s.split("tokens/s")[1]  # noqa: E731
    assert strip(remote.stderr) == strip(local.stderr)


def test_continuing_a_session_on_the_server(served, tiny_dir, tmp_path):
    common = ("-t", "0.8", "-n", "6")
    for args in [("--seed", "1", "-s", "tale", "The lighthouse"), ("--seed", "2", "-s", "tale", "-c", " Then")]:
        local = wmgen("generate", "--model", str(tiny_dir), *common, *args, home=tmp_path / "local")
        remote = wmgen("generate", "--server", served.url, *common, *args, home=tmp_path / "client")
        assert remote.returncode == local.returncode == 0, remote.stderr
        assert remote.stdout == local.stdout
    shown_local = wmgen("inspect-memory", "-s", "tale", "--text", home=tmp_path / "local").stdout
    shown_server = wmgen("inspect-memory", "-s", "tale", "--text", home=served.home).stdout
    assert shown_server == shown_local and shown_local


def test_errors_exit_as_a_local_run_does(served, tiny_dir, tmp_path):
    bad = wmgen("generate", "--server", served.url, "-t", "-1", "x", home=tmp_path)
    assert bad.returncode == 2 and "--temperature" in bad.stderr and len(bad.stderr.splitlines()) == 1
    missing = wmgen("generate", "--server", served.url, "-c", "-s", "never-made", "x", home=tmp_path)
    assert missing.returncode == 1 and "never-made" in missing.stderr
    hostile = wmgen("generate", "--server", served.url, "-s", "../up", "x", home=tmp_path)
    assert hostile.returncode == 2
    gone = wmgen("generate", "--server", "http://127.0.0.1:9", "x", home=tmp_path)
    assert gone.returncode == 1 and "cannot reach" in gone.stderr
    url = wmgen("generate", "--server", "localhost:8000", "x", home=tmp_path)
    assert url.returncode == 2 and "URL" in url.stderr
    for result in (bad, missing, hostile, gone, url):
        assert "Traceback" not in result.stderr and result.stdout == ""


def test_the_server_comes_from_the_environment_and_an_api_key_too(tiny_dir, tmp_path):
    server = Served(tiny_dir, tmp_path / "served", env={"WMGEN_API_KEY": "k3y"})
    try:
        without = wmgen("generate", "-n", "3", "x", home=tmp_path, env={"WMGEN_SERVER": server.url})
        assert without.returncode == 2 and "WMGEN_API_KEY" in without.stderr
        ok = wmgen("generate", "-n", "3", "-t", "0", "x", home=tmp_path, env={"WMGEN_SERVER": server.url, "WMGEN_API_KEY": "k3y"})
        assert ok.returncode == 0 and ok.stderr == ""
    finally:
        server.stop()


def test_ctrl_c_stops_the_run_on_the_server_and_keeps_it(served, tmp_path):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("WMGEN_")} | {"WMGEN_HOME": str(tmp_path)}
    process = subprocess.Popen([sys.executable, "-m", "wmgen", "generate", "--server", served.url, "-n", "1000000", "--ignore-eos",
                                "--format", "jsonl", "-s", "stopped", "Forever"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=environ, stdin=subprocess.DEVNULL)
    lines = []
    while len(lines) < 5:
        lines.append(process.stdout.readline())
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    records = [json.loads(line) for line in lines + out.splitlines()]
    assert process.returncode == 130
    assert records[-1]["type"] == "end" and records[-1]["reason"] == "interrupted" and records[-1]["saved"] is True
    assert "interrupted" in err and "Traceback" not in err
    time.sleep(0.2)
    assert served.health()["rows"] == 0
    saved = wmgen("inspect-memory", "-s", "stopped", "--json", home=served.home)
    assert json.loads(saved.stdout)["fill"] > 1
