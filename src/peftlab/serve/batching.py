"""The batch queue: classify requests collected for a short window and run together on one worker thread.

It knows only the function it is given to run rows with (the registry's ``classify``), never the registry.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from peftlab.errors import PeftlabError
from peftlab.serve.errors import NotReadyError, TextError

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    rows: list[tuple[str, str]]
    future: Future


_STOP = object()


class BatchQueue:
    """Collect classify requests for a short window and run them together on one worker thread.

    A request waits at most ``window_s`` for others to join its batch, so under load
    concurrent requests share forward passes, and alone it pays only the window.

    Args:
        run: classifies rows (see :meth:`AdapterRegistry.classify`).
        window_s: how long the first request of a batch waits for more, in seconds.
        max_rows: stop collecting once a batch has this many rows.
    """

    def __init__(self, run: Callable[[list[tuple[str, str]]], list[Any]], *, window_s: float = 0.005,
                 max_rows: int = 64) -> None:
        self._run = run
        self.window_s = max(0.0, float(window_s))
        self.max_rows = max(1, int(max_rows))
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.batches = 0  # batches run, for tests and /health

    def start(self) -> None:
        """Start the worker thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="peftlab-batcher", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Finish the batch in progress, answer queued requests with :class:`NotReadyError`, stop the worker."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, rows: list[tuple[str, str]]) -> Future:
        """Queue ``rows``; the future resolves to their results (or the first row error)."""
        future: Future = Future()
        self._queue.put(_Job(list(rows), future))
        return future

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            jobs = [first]
            total = len(first.rows)
            deadline = time.monotonic() + self.window_s
            while total < self.max_rows:
                remaining = deadline - time.monotonic()
                try:
                    job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP:
                    stopping = True
                    break
                jobs.append(job)
                total += len(job.rows)
            self._run_jobs(jobs)
        while True:  # requests that arrived after the stop: answer them rather than leave them waiting
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP and job.future.set_running_or_notify_cancel():
                job.future.set_exception(NotReadyError("the server is shutting down"))

    def _run_jobs(self, jobs: list[_Job]) -> None:
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # a client gave up: skip its rows
        if not jobs:
            return
        self.batches += 1
        try:
            results = self._run([row for job in jobs for row in job.rows])
        except Exception as exc:
            if len(jobs) > 1:  # one request's failure must not fail the others: each request again, alone
                logger.info("a batch of %d requests failed (%s); running each request alone", len(jobs), exc)
                for job in jobs:
                    self._run_alone(job)
                return
            if not isinstance(exc, PeftlabError):
                logger.exception("batch of %d requests failed", len(jobs))
            jobs[0].future.set_exception(exc)
            return
        start = 0
        for job in jobs:
            self._resolve(job, results[start:start + len(job.rows)])
            start += len(job.rows)

    def _run_alone(self, job: _Job) -> None:
        try:
            results = self._run(job.rows)
        except Exception as exc:  # reported to this request only; the worker keeps serving
            if not isinstance(exc, PeftlabError):
                logger.exception("a request of %d rows failed", len(job.rows))
            job.future.set_exception(exc)
            return
        self._resolve(job, results)

    @staticmethod
    def _resolve(job: _Job, results: list[Any]) -> None:
        for index, result in enumerate(results):
            if isinstance(result, Exception):
                if isinstance(result, TextError):
                    result.index = index  # its position in this request, for the message
                job.future.set_exception(result)
                return
        job.future.set_result(results)
