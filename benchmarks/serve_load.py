"""Serving throughput and latency of `peftlab serve` with 1 to 64 adapters on one base model, LoRA alone and a mix.

    python benchmarks/serve_load.py [--requests 1200] [--rounds 6] [--clients 16] [--poisoning-only]

Every case is a real ``peftlab serve --eager --max-loaded 0`` process on a free port, with only that case's
adapters in its folder (random adapters on minilm-l6 from ``serve_memory.make_adapters``: LoRA r=8 on
query/value, IA3 on key/value/FFN output, prompt tuning with 8 virtual tokens; each with its classifier head).
Cases: 1, 4, 16 and 64 LoRA adapters; 16 LoRA adapters with the batching window off (``0 ms``); one IA3 and one
prompt-tuning adapter alone; and 16 adapters of the three methods mixed (6 LoRA, 5 IA3, 5 prompt tuning).

All the servers are started first, then measured in interleaved rounds (each round sends every case
``--requests / --rounds`` requests in turn), so that the shared machine's changing load falls on every case
alike: the ratios between cases are the result, the absolute numbers are this machine's at that hour.
``--clients`` threads, each with its own keep-alive HTTP connection, send one-text ``/v1/classify`` requests;
request i goes to adapter ``i mod k``, so concurrent requests mix adapters, with a text drawn at random
(seeded, the same sequence in every case) from eight short reviews. Reported per case: requests/s, p50
and p95 latency, the forward passes and batches the server counted, and its resident memory (psutil) after.

In this process: for 16 adapters of each of LoRA, IA3 and prompt tuning and for the 16-adapter mix, one batch
of rows (8, 16 and 64 texts, every adapter present for 16 and 64) through the registry in each mixing mode (one
gathered pass for all rows, prompt rows apart, one per method, one per adapter), and the same texts with one
adapter per method (the reference), the reference and one gathered pass also with the padding computed, in
interleaved rounds; and one forward pass of a merged LoRA model against the same adapter unmerged.
Prints one JSON line. The load generator shares the machine's cores with the server, as a client on the same
host would.

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
import random
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
# Request i's text, drawn independently of its adapter (i mod the adapters): with TEXTS[i mod 8] each of 16
# adapters would always get the same text, and the prompt-tuning adapters of the mix always the same lengths.
TEXT_OF = random.Random(0).choices(range(len(TEXTS)), k=4096)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(adapters: Path, window_ms: float, threads: int = 1) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "peftlab.cli", "-q", "serve", "--base", "minilm-l6", "--adapters", str(adapters),
               "--eager", "--max-loaded", "0", "--port", str(port), "--batch-window-ms", str(window_ms)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600  # 64 adapters on a busy 2-core machine
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
    raise RuntimeError("server did not become ready in 600 s")


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
                body = {"adapter": names[index % len(names)], "texts": [TEXTS[TEXT_OF[index % len(TEXT_OF)]]]}
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


def poisoning(root: Path, folders: list[Path], requests: int, clients: int, every_s: float = 0.2,
              threads: int = 1) -> dict[str, Any]:
    """Valid traffic from ``clients`` threads on 16 adapters while one more client sends an invalid text
    every ``every_s`` seconds; counts the valid requests that failed (the issue's red-team setup)."""
    import httpx

    served = root / "case-poisoning"
    served.mkdir()
    for folder in folders[:16]:
        shutil.copytree(folder, served / folder.name)
    server, url = start_server(served, 5.0, threads)
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


MIX = {"lora": 6, "ia3": 5, "prompt_tuning": 5}  # the 16-adapter mix
# label -> (adapters per method, batching window in ms)
CASES: dict[str, tuple[dict[str, int], float]] = {
    "lora-1": ({"lora": 1}, 5.0), "lora-4": ({"lora": 4}, 5.0), "lora-16": ({"lora": 16}, 5.0),
    "lora-64": ({"lora": 64}, 5.0), "lora-16, no window": ({"lora": 16}, 0.0),
    "ia3-1": ({"ia3": 1}, 5.0), "prompt_tuning-1": ({"prompt_tuning": 1}, 5.0),
    "mix-16": (MIX, 5.0),
}


def cases(root: Path, folders: dict[str, list[Path]], requests: int, rounds: int, clients: int,
          threads: int) -> list[dict[str, Any]]:
    """Start a server per case, then load them in interleaved rounds; one result per case."""
    import httpx
    import psutil

    running: dict[str, tuple[subprocess.Popen, str, list[str]]] = {}
    try:
        for label, (counts, window_ms) in CASES.items():
            served = root / f"case-{len(running)}"
            served.mkdir()
            for method, count in counts.items():
                for folder in folders[method][:count]:
                    shutil.copytree(folder, served / folder.name)
            server, url = start_server(served, window_ms, threads)
            names = sorted(p.name for p in served.iterdir())
            running[label] = (server, url, names)
            load(url, names, max(4 * clients, 2 * len(names)), clients)  # warm-up: every adapter, every code path
        before = {label: httpx.get(f"{url}/health").json() for label, (_, url, _) in running.items()}
        latencies: dict[str, list[float]] = {label: [] for label in running}
        wall = dict.fromkeys(running, 0.0)
        for _ in range(rounds):
            for label, (_, url, names) in running.items():
                started = time.perf_counter()
                latencies[label] += load(url, names, requests // rounds, clients)
                wall[label] += time.perf_counter() - started
        out = []
        for label, (server, url, names) in running.items():
            after = httpx.get(f"{url}/health").json()
            times = sorted(latencies[label])
            counts, window_ms = CASES[label]
            out.append({"case": label, "methods": counts, "adapters": len(names), "batch_window_ms": window_ms,
                        "requests": len(times), "clients": clients, "rounds": rounds,
                        "requests_per_s": len(times) / wall[label], "p50_ms": 1000 * statistics.median(times),
                        "p95_ms": 1000 * times[int(0.95 * (len(times) - 1))],
                        "forward_passes": after["forward_passes"] - before[label]["forward_passes"],
                        "batches": after["batches"] - before[label]["batches"],
                        "server_rss_bytes": psutil.Process(server.pid).memory_info().rss})
        return out
    finally:
        for server, _, _ in running.values():
            stop(server)


def mixing_modes(root: Path, folders: dict[str, list[Path]], rounds: int = 7) -> dict[str, Any]:
    """One batch of 8, 16 or 64 texts over 16 adapters, through the registry, in each mixing mode
    (serve.mixed.MODES): one gathered pass for every row, prompt rows apart, one per method, one per adapter (no
    gathering); against the same texts with one adapter per method (the reference); the reference and one
    gathered pass also with the padding computed (``skip_padding=False``). For 16 adapters of each method and for
    the 16-adapter mix. Medians of interleaved rounds after a warm-up round."""
    from peftlab.serve.registry import AdapterRegistry

    sets = {method: {method: 16} for method in ("lora", "ia3", "prompt_tuning")}
    sets["mix"] = MIX
    out: dict[str, Any] = {}
    for label, counts in sets.items():
        served = root / f"modes-{label}"
        served.mkdir()
        for method, count in counts.items():
            for folder in folders[method][:count]:
                shutil.copytree(folder, served / folder.name)
        registry = AdapterRegistry("minilm-l6", served, max_loaded=0)
        registry.start(eager=True)
        assert registry.ready, registry.error
        names = sorted(registry.entries)
        modes = ("one", "tokens", "method", "adapter") if len(counts) > 1 else ("one", "adapter")
        firsts = {method: next(n for n in names if n.startswith(f"{method}-")) for method in counts}
        for texts in (8, 16, 64):
            # Text i for adapter 7i mod 16: 8 texts reach adapters of every method, 16 and more every adapter.
            rows = [(names[7 * i % len(names)], TEXTS[TEXT_OF[i]]) for i in range(texts)]
            # The reference: the same texts, each method's rows all for one adapter of it (as many rows per
            # method as in the mix), so one plain pass per method.
            singles = {method: [(firsts[method], text) for (name, text) in rows if name.startswith(f"{method}-")]
                       for method in counts}
            singles = {method: batch for method, batch in singles.items() if batch}
            # "padded": the same with every position computed (skip_padding=False), what padfree is worth.
            runs = (*modes, "single", "one padded", "single padded")
            times: dict[str, list[float]] = {mode: [] for mode in runs}
            passes: dict[str, int] = {}
            for round_ in range(rounds + 1):
                for mode in runs:
                    registry.mixing = "one" if mode.startswith("single") else mode.split()[0]
                    registry.skip_padding = not mode.endswith("padded")
                    before = registry.forward_passes
                    started = time.perf_counter()
                    batches = list(singles.values()) if mode.startswith("single") else [rows]
                    for batch in batches:
                        results = registry.classify(batch)
                        assert all(isinstance(r, dict) for r in results), results[:2]
                    elapsed = time.perf_counter() - started
                    passes[mode] = registry.forward_passes - before
                    if round_:  # the first round is the warm-up
                        times[mode].append(elapsed)
            out[f"{label}_batch{texts}"] = {
                "set": label, "methods": counts, "texts": texts, "rounds": rounds,
                "ms": {mode: 1000 * statistics.median(times[mode]) for mode in modes},
                "single_ms": 1000 * statistics.median(times["single"]), "single_passes": passes.pop("single"),
                "padded_ms": {"one": 1000 * statistics.median(times["one padded"]),
                              "single": 1000 * statistics.median(times["single padded"])},
                "passes": {mode: passes[mode] for mode in modes}}
        del registry
    return out


def merged_vs_unmerged(folder: Path, repeats: int = 20) -> dict[str, Any]:
    """Forward-pass time of one adapter left as LoRA against the same adapter merged into the weights."""
    import torch

    from peftlab.predict import load_predictor

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
    parser.add_argument("--requests", type=int, default=1200, help="timed requests per case, over all rounds")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds the requests are split into")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per server and in this process (OMP_NUM_THREADS). 1: the cases are "
                             "8 servers and 16 client threads on one machine; on 2 cores that other jobs also "
                             "use, 2 threads made a forward pass 10x slower in wall time than 1 (threads waiting "
                             "for each other at every parallel op)")
    parser.add_argument("--poisoning-only", action="store_true", help="run only the poisoning case")
    args = parser.parse_args()

    import transformers

    from peftlab.models import resolve_model_path

    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="peftlab-serve-load-") as scratch:
        root = Path(scratch)
        base = resolve_model_path("minilm-l6")
        if args.poisoning_only:
            lora = make_adapters(base, root / "all", 16, 8)
            print(json.dumps({"poisoning": poisoning(root, lora, args.requests, args.clients, threads=args.threads)}))
            return
        needed = {m: max(c.get(m, 0) for c, _ in CASES.values()) for m in ("lora", "ia3", "prompt_tuning")}
        needed = {m: max(n, 16) for m, n in needed.items()}  # 16 of each for the gathered-pass comparison
        folders = {m: make_adapters(base, root / "all", n, 8, method=m) for m, n in needed.items()}
        import torch

        torch.set_num_threads(args.threads)
        modes = mixing_modes(root, folders)
        forward = merged_vs_unmerged(folders["lora"][0])
        load_before = os.getloadavg()[0]  # the machine is shared: how busy it was is part of the result
        measured = cases(root, folders, args.requests, args.rounds, args.clients, args.threads)
        load_after = os.getloadavg()[0]
        poisoned = poisoning(root, folders["lora"], args.requests // 3, args.clients, threads=args.threads)
    print(json.dumps({"cases": measured, "modes": modes, "forward": forward, "poisoning": poisoned,
                      "load_average": [load_before, load_after], "cpus": len(os.sched_getaffinity(0)),
                      "threads": args.threads}))


if __name__ == "__main__":
    main()
