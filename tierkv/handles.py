"""Completion handles: what a caller waits on for a batched transfer to finish.

A handle answers three questions: is it done (without blocking), wait for it on the host, and make a
CUDA stream wait for it without blocking the host where the work is on the device. On a machine
without CUDA every transfer completes before its call returns and its handle is `DONE`.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future


class Handle:
    """Completion of some work. Subclasses override the three methods."""

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        """Block the calling thread until the work is complete; re-raise its error if it failed."""

    def wait_on(self, stream) -> None:
        """Order `stream` (a torch.cuda.Stream) after the work; blocks the host only for host-side work."""


DONE = Handle()


class EventHandle(Handle):
    """Device work, complete when a CUDA event recorded after it has been reached."""

    __slots__ = ("event",)

    def __init__(self, event) -> None:
        self.event = event

    def done(self) -> bool:
        return self.event.query()

    def wait(self) -> None:
        self.event.synchronize()

    def wait_on(self, stream) -> None:
        stream.wait_event(self.event)


class LayeredHandle(EventHandle):
    """A host-to-GPU transfer done in layer groups, one event per group (`groups`: (first layer, end layer,
    event)), in layer order. As a handle it completes with the last group; a step's attention can instead wait,
    layer by layer, for just the group it is about to read (`wait_layer`), so compute on the first layers
    overlaps the transfer of the later ones."""

    __slots__ = ("groups",)

    def __init__(self, groups: list) -> None:
        super().__init__(groups[-1][2])
        self.groups = groups

    def wait_layer(self, layer: int, stream) -> None:
        for lo, hi, event in self.groups:
            if lo <= layer < hi:
                stream.wait_event(event)
                return


class FutureHandle(Handle):
    """Host work on a worker thread (NVMe I/O) whose result is a further handle for any device work it queued."""

    __slots__ = ("future",)

    def __init__(self, future: Future) -> None:
        self.future = future

    def done(self) -> bool:
        return self.future.done() and (self.future.exception() is not None or self._inner().done())

    def _inner(self) -> Handle:
        inner = self.future.result()
        return DONE if inner is None else inner

    def wait(self) -> None:
        self._inner().wait()

    def wait_on(self, stream) -> None:
        self._inner().wait_on(stream)


class AllOf(Handle):
    """Complete when every one of its parts is."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[Handle]) -> None:
        self.parts = parts

    def done(self) -> bool:
        return all(p.done() for p in self.parts)

    def wait(self) -> None:
        for p in self.parts:
            p.wait()

    def wait_on(self, stream) -> None:
        for p in self.parts:
            p.wait_on(stream)


class Settled(Handle):
    """The same work as `inner`, waited for as ordering only: its failure is not raised. For work that reads a slot
    or a block (a copy to disk, a copy-on-write source): once it has ended, failed or not, the slot may be reused
    and the block written. Waiting for the *bytes* of a transfer (a block's `ready`) keeps the failure: a block
    whose bytes never landed must not be read as if they had."""

    __slots__ = ("inner",)

    def __init__(self, inner: Handle) -> None:
        self.inner = inner

    def done(self) -> bool:
        return self.inner.done()

    def wait(self) -> None:
        try:
            self.inner.wait()
        except Exception:  # noqa: BLE001 - reported where the bytes are needed, not here
            pass

    def wait_on(self, stream) -> None:
        try:
            self.inner.wait_on(stream)
        except Exception:  # noqa: BLE001 - a failed host job queued no device work to wait for
            pass


def settled(handle: Handle) -> Handle:
    """`handle` as ordering only (see Settled)."""
    return handle if handle is DONE or isinstance(handle, (Settled, EventHandle)) else Settled(handle)


def all_of(handles: Iterable[Handle]) -> Handle:
    """One handle for many, dropping the ones already known complete and repeats (also among the parts of nested
    AllOfs: 2,048 blocks freed by one transfer carry 2,048 AllOfs of the same two events, and a stream must wait on
    each event once, not 4,096 times)."""
    parts: list[Handle] = []
    seen: set[int] = set()  # ids of handles kept in `parts` (alive, so an id cannot be reused meanwhile)
    for h in handles:
        if h is DONE:
            continue
        for p in h.parts if isinstance(h, AllOf) else (h,):
            if id(p) not in seen:
                seen.add(id(p))
                parts.append(p)
    if not parts:
        return DONE
    return parts[0] if len(parts) == 1 else AllOf(parts)
