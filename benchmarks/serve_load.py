"""Serving throughput and latency of `peftlab serve` with 1, 4 and 16 LoRA adapters on one base model.

    python benchmarks/serve_load.py [--requests 600] [--clients 16] [--poisoning-only]

For each case a real ``peftlab serve --eager`` process is started on a free port, with only that case's
adapters in its folder (random LoRA r=8 adapters on minilm-l6, from ``serve_memory.make_adapters``).
``--clients`` threads, each with its own keep-alive HTTP connection, send one-text ``/v1/classify``
requests; request i goes to adapter ``i mod k``, so concurrent requests mix adapters. After a warm-up
the benchmark times ``--requests`` requests: requests/s, p50 and p95 latency, the forward passes and
batches the server reports, and the server's resident memory (psutil) after the load.

Cases: 1 adapter; 4 and 16 adapters mixed; 16 adapters with the batching window off (``0 ms``), to show
what sharing forward passes is worth. Then, in this process, the alternative of one merged model per
task: time of one forward pass of a merged LoRA model against the same adapter unmerged, at 1 and 32
texts. Prints one JSON line. The load generator shares the machine's cores with the server, as a
client on the same host would.

Poisoning (the reliability issue's red-team case): the same 16 clients of valid traffic on 16 adapters,
plus one client that sends a request with an invalid text (a lone surrogate, an empty or a blank text,
beside a valid one) every 0.2 s. Reported: failed valid requests (must be 0: an invalid text fails only
its own request, with a 422) and the statuses the poisoning requests got. ``--poisoning-only`` runs just
this case (with ``--requests 200`` it takes about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve_memory import make_adapters  # noqa: E402

TEXTS = ["a wonderful film", "dull and messy, I left early", "the acting was fine but the plot goes nowhere",
         "one of the best thrillers of the decade", "not bad", "a tedious, overlong and joyless experience",
         "charming", "I have mixed feelings about the ending"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(adapters: Path, window_ms: float) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "peftlab.cli", "-q", "serve", "--base", "minilm-l6", "--adapters", str(adapters),
               "--eager", "--port", str(port), "--batch-window-ms", str(window_ms)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    expected = len(list(adapters.iterdir()))
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited: {server.stderr.read()[-2000:] if server.stderr else ''}")
        try:
            health = httpx.get(f"{url}/health", timeout=2)
            if health.status_code == 200 and health.json()["loaded"] == expected:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise RuntimeError("server did not become ready in 180 s")


POISONS = ["ab\ud800c", "\udfff", "", " ", "\t\n"]


def stop(server: subprocess.Popen) -> None:
    """Stop a server; kill it if it has not exited 30 s after SIGTERM (e.g. a request still hanging)."""
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=30)


def load(url: str, names: list[str], requests: int, clients: int, errors: list[str] | None = None) -> list[float]:
    """Send ``requests`` one-text requests from ``clients`` threads; return each request's latency in seconds.

    Failed requests raise at the end, or are appended to ``errors`` when it is given.
    """
    import httpx

    collect = errors is not None
    errors = [] if errors is None else errors
    latencies: list[float] = []
    counter = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                body = {"adapter": names[index % len(names)], "texts": [TEXTS[index % len(TEXTS)]]}
                started = time.perf_counter()
                response = http.post("/v1/classify", json=body)
                elapsed = time.perf_counter() - started
                if response.status_code != 200:
                    errors.append(response.text[:300])
                with lock:
                    latencies.append(elapsed)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors and not collect:
        raise RuntimeError(f"{len(errors)} failed requests, first: {errors[0]}")
    return latencies


def poisoning(root: Path, folders: list[Path], requests: int, clients: int, every_s: float = 0.2) -> dict[str, Any]:
    """Valid traffic from ``clients`` threads on 16 adapters while one more client sends an invalid text
    every ``every_s`` seconds; counts the valid requests that failed (the issue's red-team setup)."""
    import httpx

    served = root / "case-poisoning"
    served.mkdir()
    for folder in folders[:16]:
        shutil.copytree(folder, served / folder.name)
    server, url = start_server(served, 5.0)
    statuses: dict[int, int] = {}
    done = threading.Event()

    def poisoner() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            index = 0
            while not done.wait(every_s):
                items = [{"adapter": names[index % len(names)], "text": POISONS[index % len(POISONS)]},
                         {"adapter": names[0], "text": TEXTS[0]}]
                # json.dumps escapes a lone surrogate as \ud800, as a browser's JSON.stringify does
                response = http.post("/v1/classify", content=json.dumps({"items": items}),
                                     headers={"content-type": "application/json"})
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                index += 1

    try:
        names = sorted(p.name for p in served.iterdir())
        load(url, names, max(4 * clients, 32), clients)  # warm-up, without the poisoner
        errors: list[str] = []
        bad = threading.Thread(target=poisoner)
        bad.start()
        started = time.perf_counter()
        try:
            load(url, names, requests, clients, errors)
        finally:
            done.set()
            bad.join()
        wall = time.perf_counter() - started
    finally:
        stop(server)
    return {"adapters": 16, "clients": clients, "valid_requests": requests, "failed_valid_requests": len(errors),
            "first_failure": errors[0] if errors else None, "requests_per_s": requests / wall,
            "poisoning_every_s": every_s, "poisoning_statuses": {str(k): v for k, v in sorted(statuses.items())}}


def case(root: Path, folders: list[Path], count: int, window_ms: float, requests: int, clients: int) -> dict[str, Any]:
    import httpx
    import psutil

    served = root / f"case-{count}-{window_ms:g}"
    served.mkdir()
    for folder in folders[:count]:
        shutil.copytree(folder, served / folder.name)
    server, url = start_server(served, window_ms)
    try:
        names = sorted(p.name for p in served.iterdir())
        load(url, names, max(4 * clients, 2 * count), clients)  # warm-up: every adapter, every code path
        before = httpx.get(f"{url}/health").json()
        started = time.perf_counter()
        latencies = sorted(load(url, names, requests, clients))
        wall = time.perf_counter() - started
        after = httpx.get(f"{url}/health").json()
        rss = psutil.Process(server.pid).memory_info().rss
    finally:
        stop(server)
    return {"adapters": count, "batch_window_ms": window_ms, "requests": requests, "clients": clients,
            "requests_per_s": requests / wall, "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))],
            "forward_passes": after["forward_passes"] - before["forward_passes"],
            "batches": after["batches"] - before["batches"], "server_rss_bytes": rss}


def merged_vs_unmerged(folder: Path, repeats: int = 20) -> dict[str, Any]:
    """Forward-pass time of one adapter left as LoRA against the same adapter merged into the weights."""
    import torch

    from peftlab.predict import load_predictor

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    predictor = load_predictor(folder, device="cpu")
    out: dict[str, Any] = {}
    for label, model in (("unmerged", predictor.model), ("merged", None)):
        if model is None:
            model = predictor.model.merge_and_unload()
        for size in (1, 32):
            batch = predictor.tokenizer((TEXTS * 4)[:size], padding=True, return_tensors="pt")
            with torch.inference_mode():
                model(**batch)
                started = time.perf_counter()
                for _ in range(repeats):
                    model(**batch)
            out[f"{label}_batch{size}_ms"] = 1000 * (time.perf_counter() - started) / repeats
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--poisoning-only", action="store_true", help="run only the poisoning case")
    args = parser.parse_args()

    import transformers

    from peftlab.models import resolve_model_path

    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="peftlab-serve-load-") as scratch:
        root = Path(scratch)
        folders = make_adapters(resolve_model_path("minilm-l6"), root / "all", 16, 8)
        if args.poisoning_only:
            print(json.dumps({"poisoning": poisoning(root, folders, args.requests, args.clients)}))
            return
        forward = merged_vs_unmerged(folders[0])
        cases = [case(root, folders, count, window, args.requests, args.clients)
                 for count, window in ((1, 5.0), (4, 5.0), (16, 5.0), (16, 0.0))]
        poisoned = poisoning(root, folders, args.requests, args.clients)
    print(json.dumps({"cases": cases, "forward": forward, "poisoning": poisoned}))


if __name__ == "__main__":
    main()
