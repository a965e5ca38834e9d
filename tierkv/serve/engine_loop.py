"""The engine's own thread: it owns the LLM, takes requests and aborts from the HTTP side, steps while there is work,
and hands every request's cumulative output to the asyncio queue of the HTTP request that waits for it."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future

from tierkv.errors import TierKVError
from tierkv.llm import LLM
from tierkv.outputs import RequestOutput


def _deliver(loop: asyncio.AbstractEventLoop, sink: asyncio.Queue, item) -> bool:
    """Hand `item` to `sink` on its event loop; False if that loop has closed."""
    try:
        loop.call_soon_threadsafe(sink.put_nowait, item)
    except RuntimeError:  # "Event loop is closed"
        return False
    return True


class QueueFull(TierKVError):
    """More requests wait than the server takes (`max_waiting`)."""


class EngineLoop:
    """Runs `llm` on a thread of its own. `generate` is the HTTP side's way in (an async iterator of the request's
    outputs, which aborts the request if its consumer goes away); `call` runs a function on the engine's thread
    (stats); `close` stops taking work, lets the running requests finish (up to `drain_s`) and closes the LLM."""

    def __init__(self, llm: LLM, max_waiting: int = 1024) -> None:
        self.llm = llm
        self.max_waiting = max_waiting
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._done = threading.Event()
        self._next_id = 0
        self._id_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="tierkv-engine", daemon=True)
        self.thread.start()

    # -- the HTTP side -------------------------------------------------------------------------------------------
    def new_id(self, prefix: str) -> str:
        with self._id_lock:
            self._next_id += 1
            return f"{prefix}-{self._next_id}"

    async def generate(self, request_id: str, prompt, params, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """The request's outputs as it runs (cumulative), the last one finished. Errors in the request (a bad value,
        no room in any tier, a full queue) are raised at the first iteration, before any output. `priority`: lower
        runs first, under the engine's "priority" scheduling policy."""
        if self._stopping:
            raise QueueFull("the server is shutting down and takes no new requests")
        loop = asyncio.get_running_loop()
        sink: asyncio.Queue = asyncio.Queue()
        self._inbox.put(("add", request_id, prompt, params, priority, loop, sink))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await sink.get()
                if isinstance(item, BaseException):
                    finished = True  # nothing to abort: it never ran, or the engine already dropped it
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:  # the client went away (or the consumer stopped early): free its blocks now
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def call(self, fn: Callable[[LLM], object]) -> Future:
        """Run `fn(llm)` on the engine's thread between two steps; its result (or error) in the future."""
        fut: Future = Future()
        self._inbox.put(("call", fn, fut))
        self._wake.set()
        return fut

    def close(self, drain_s: float = 30.0) -> None:
        """Refuse new requests, let the running ones finish (at most `drain_s`), abort the rest, close the LLM."""
        self._stopping = True
        self._inbox.put(("stop", drain_s))
        self._wake.set()
        self._done.wait()
        self.thread.join()

    # -- the engine's thread -------------------------------------------------------------------------------------
    def _send(self, request_id: str, item, last: bool = False) -> None:
        target = self._sinks.pop(request_id, None) if last else self._sinks.get(request_id)
        if target is not None and not _deliver(*target, item):
            self._sinks.pop(request_id, None)  # its event loop is gone: nobody waits for it any more
            self.llm.abort([request_id])

    def _take_inbox(self, deadline: list) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            kind = msg[0]
            if kind == "add":
                _, rid, prompt, params, priority, loop, sink = msg
                if self._stopping:
                    _deliver(loop, sink, QueueFull("the server is shutting down"))
                    continue
                waiting = len(self.llm.scheduler.waiting)
                if waiting >= self.max_waiting:
                    _deliver(loop, sink, QueueFull(f"{waiting} requests are waiting already; retry later"))
                    continue
                try:
                    self.llm.submit([prompt], params, [rid], priority=[priority])
                except Exception as exc:  # noqa: BLE001 - a bad request: its own error, the engine goes on
                    _deliver(loop, sink, exc)
                    continue
                self._sinks[rid] = (loop, sink)
            elif kind == "abort":
                if self._sinks.pop(msg[1], None) is not None:
                    self.llm.abort([msg[1]])
            elif kind == "call":
                _, fn, fut = msg
                try:
                    fut.set_result(fn(self.llm))
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(exc)
            elif kind == "stop":
                deadline.append(threading.TIMEOUT_MAX if msg[1] is None else msg[1])

    def _run(self) -> None:
        deadline: list = []
        stop_at = None
        try:
            while True:
                self._take_inbox(deadline)
                if deadline and stop_at is None:
                    stop_at = time.monotonic() + deadline[0]
                if stop_at is not None and (not self._sinks or time.monotonic() > stop_at):
                    for rid in list(self._sinks):
                        self.llm.abort([rid])
                        self._send(rid, QueueFull("the server shut down before this request finished"), last=True)
                    return
                if not self.llm.has_unfinished():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                try:
                    outputs = self.llm.step_outputs()
                except Exception as exc:  # noqa: BLE001 - the step's requests were aborted; the others go on
                    for rid in getattr(exc, "aborted_request_ids", []):
                        self._send(rid, TierKVError(f"the engine step failed: {type(exc).__name__}: {exc}"), last=True)
                    continue
                for out in outputs:
                    self._send(out.request_id, out, last=out.finished)
        finally:
            try:
                self.llm.close()
            finally:
                self._done.set()
