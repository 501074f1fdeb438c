"""Loopback plumbing shared by tests: HTTP fakes served from a thread, and lowtune servers run as subprocesses."""

from __future__ import annotations

import http.server
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path


def serve_in_thread(handler: type[http.server.BaseHTTPRequestHandler]) -> http.server.ThreadingHTTPServer:
    """A started HTTP server on 127.0.0.1 (a free port); stop it with `stop_server`."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def server_url(server: http.server.ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


def stop_server(server: http.server.ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Until `url` answers 200; fails with the process's log if it exits or never answers."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"server did not answer {url} in {timeout}s:\n{log.read_text()}")


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def start_process(command: list[str], log: Path, env: dict, cwd: Path | None = None) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)


@contextmanager
def running(command: list[str], ready_url: str, log: Path, env: dict) -> Iterator[subprocess.Popen]:
    """A server process, yielded once `ready_url` answers, stopped afterwards."""
    proc = start_process(command, log, env)
    try:
        wait_for(ready_url, proc, log)
        yield proc
    finally:
        stop_process(proc)


def concurrent_load(one: Callable[[int], tuple[float, str]], clients: int = 64) -> tuple[list, str]:
    """Run `one(i)` (returns seconds taken, answer text) for every client at once; the results and a line with
    requests/s and latency p50 / p99 / max."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(one, range(clients)))
    wall = time.perf_counter() - started
    latencies = sorted(seconds for seconds, _ in results)
    p50, p99 = statistics.median(latencies), statistics.quantiles(latencies, n=100)[98]
    return results, (f"{clients / wall:.1f} requests/s, wall {wall:.2f}s, latency p50 {p50:.2f}s p99 {p99:.2f}s "
                     f"max {latencies[-1]:.2f}s")
