"""AsyncLLMEngine: the engine loop on a background thread, driven from asyncio.

Why a thread: the HTTP event loop must keep accepting, validating and streaming while the
model runs, and torch releases the GIL inside its kernels, so an engine thread and the event
loop thread share the machine well.  After ``start()`` only the engine thread touches the
``LLMEngine``; everyone else talks to it through a command queue that the loop drains at
every step boundary.  So a new request joins the running batch at the next step (continuous
batching holds under the server), and an abort frees the request's KV blocks before the
next step runs.

Requests are validated in the caller's thread (``LLMEngine.make_request`` builds a request
without touching engine state), so a bad field raises ``InvalidRequestError`` from
``add_request`` itself, before any stream exists.

Outputs travel back with ``loop.call_soon_threadsafe`` into one ``RequestStream`` per
request.  A ``RequestOutput`` is cumulative (text, token ids and logprobs so far), so a stream
keeps only the newest one: a slow consumer costs one output of memory, never one per token,
and loses nothing.

A failing step must not take the server down.  When ``engine.step()`` raises, every request
is parked (its blocks freed, its tokens kept), each request the failed step ran is probed
alone for one step, the ones that fail alone get the error, and everyone else resumes by
recompute, as after a preemption.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import queue
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

from pagedllm.gc_freeze import frozen_gc
from pagedllm.outputs import RequestOutput
from pagedllm.request import Request, RequestStatus
from pagedllm.sampling_params import InvalidRequestError, SamplingParams

# After this many failed steps in a row that no single request explains, the requests of
# the failing batch are failed together, so a batch-dependent fault cannot loop forever.
MAX_UNEXPLAINED_FAILURES = 3
IDLE_POLL_S = 0.25  # how long an idle engine thread sleeps between looks at its deadlines


class EngineOverloadedError(RuntimeError):
    """More requests are waiting than ``max_waiting`` allows; retry later (HTTP 503)."""

    def __init__(self, num_waiting: int, max_waiting: int):
        super().__init__(f"the server is overloaded: {num_waiting} requests are waiting "
                         f"(max_waiting {max_waiting}); retry later")
        self.num_waiting = num_waiting
        self.max_waiting = max_waiting


class EngineStoppedError(RuntimeError):
    """The engine is shutting down or has stopped; it accepts no new requests (HTTP 503)."""


class EngineDeadError(EngineStoppedError):
    """The engine thread crashed; no request can be served any more."""


class RequestFailedError(RuntimeError):
    """This request made an engine step fail; the other requests went on (HTTP 500)."""

    def __init__(self, request_id: str, cause: BaseException):
        super().__init__(f"request {request_id} failed in the engine: "
                         f"{type(cause).__name__}: {cause}")
        self.request_id = request_id
        self.cause = cause


class EngineObserver(Protocol):
    """Called on the engine thread for every output delivered; must be quick and
    thread-safe (the metrics use it).  ``interval`` is the time since this request's
    previous tokens, None for its first."""

    def on_output(self, output: RequestOutput, num_new_tokens: int,
                  interval: float | None) -> None: ...


class RequestStream:
    """The outputs of one request, as an async iterator; the last one has ``finished``.

    Cancelling the task that iterates, ``abort()``, or leaving ``async with`` early aborts
    the request in the engine (its KV blocks are freed before the next step).
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop,
                 abort: Callable[[str], None]):
        self.request_id = request_id
        self._loop = loop
        self._abort = abort
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._event = asyncio.Event()
        self._closed = False  # the consumer has seen the end, or gave up
        self.finished = False  # the engine delivered the final output (engine thread sets it)

    # -- the engine side, run on the stream's event loop ---------------------------------
    def _put(self, output: RequestOutput) -> None:
        self._latest = output
        self._event.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._event.set()

    # -- the consumer side -----------------------------------------------------------------
    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._closed:
            raise StopAsyncIteration
        try:
            await self._event.wait()
        except asyncio.CancelledError:
            self.abort()
            raise
        self._event.clear()
        out, self._latest = self._latest, None
        if out is not None:
            if out.finished:
                self._closed = True
            elif self._error is not None:
                self._event.set()  # the error comes after this output
            return out
        self._closed = True
        raise self._error  # type: ignore[misc]  # the event is only set with one of the two

    def abort(self) -> None:
        """Stop the request (no-op once it finished); idempotent, never blocks."""
        if not self._closed:
            self._closed = True
            if not self.finished:
                self._abort(self.request_id)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.abort()


@dataclasses.dataclass
class _Add:
    requests: list[Request]
    streams: list[RequestStream]


@dataclasses.dataclass
class _Abort:
    request_id: str


_WAKE = object()  # a command that only wakes the engine thread


def _dispatch(items: list) -> None:
    """Run on a consumer's event loop: hand a step's outputs to their streams."""
    for _stream, fn, arg in items:
        fn(arg)


@dataclasses.dataclass
class _Progress:
    """What the engine thread remembers about a live request between its outputs."""

    stream: RequestStream
    num_tokens: int = 0
    last_time: float | None = None


class AsyncLLMEngine:
    """An ``LLMEngine`` served from a background thread to asyncio consumers.

    ``max_waiting`` bounds the requests admitted but not yet running (``add_request``
    raises ``EngineOverloadedError`` beyond it), so memory stays bounded under overload.
    """

    def __init__(self, engine, *, max_waiting: int | None = None,
                 observer: EngineObserver | None = None, log: Callable[[str], None] | None = None):
        if max_waiting is not None and max_waiting < 1:
            raise ValueError(f"max_waiting: must be >= 1 (or None for no limit), got {max_waiting}")
        self.engine = engine
        self.max_waiting = max_waiting
        self.observer = observer
        self.log = log or getattr(engine, "log", None) or (
            lambda msg: print(f"pagedllm: {msg}", file=sys.stderr))
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _progress membership and _num_queued
        self._progress: dict[str, _Progress] = {}  # every request not finished yet
        self._num_queued = 0  # sub-requests sent to the engine thread but not yet handed over
        self._live: dict[str, Request] = {}  # engine thread only: requests given to the engine
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._stop = False
        self._accepting = True
        self._drain_deadline: float | None = None
        self._drain_logged = False
        self._dead: BaseException | None = None
        self._unexplained_failures = 0
        self._ids = itertools.count()
        # Published by the engine thread after every step; read by any thread.
        self._num_waiting = 0
        self._stats: dict[str, Any] = dict(engine.stats())
        self.num_steps = 0
        self.num_failed_steps = 0
        self.num_drain_aborts = 0

    @classmethod
    def from_config(cls, config, **kwargs) -> AsyncLLMEngine:
        from pagedllm.engine import LLMEngine

        return cls(LLMEngine(config), **kwargs)

    # ---- what the engine exposes unchanged ---------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="pagedllm-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def accepting(self) -> bool:
        return self._accepting and self.is_running

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    def begin_drain(self, timeout: float | None = None) -> None:
        """Stop accepting requests; the running ones go on, and whatever is left after
        ``timeout`` seconds is aborted (their streams end with finish_reason "abort").
        Thread-safe and non-blocking, so a signal handler may call it."""
        self._accepting = False
        if timeout is not None:
            deadline = time.monotonic() + max(0.0, timeout)
            if self._drain_deadline is None or deadline < self._drain_deadline:
                self._drain_deadline = deadline
        self._commands.put(_WAKE)

    async def drain(self, timeout: float | None = None) -> bool:
        """``begin_drain`` and wait until no request is left; True if none had to be
        aborted."""
        aborted_before = self.num_drain_aborts
        self.begin_drain(timeout)
        while self.num_unfinished:
            if not self.is_running:
                return False
            await asyncio.sleep(0.02)
        return self.num_drain_aborts == aborted_before

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; requests still running are aborted.  Blocks until the
        thread exits (at most ``timeout`` seconds, to end the current step)."""
        self._accepting = False
        self._stop = True
        self._commands.put(_WAKE)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ---- requests -------------------------------------------------------------------------
    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    priority: int = 0) -> RequestStream:
        """Validate and submit one request; return its stream of outputs.

        Must be called from the event loop thread that will consume the stream.  Raises
        ``InvalidRequestError`` (bad field), ``EngineOverloadedError`` (too many waiting),
        ``EngineStoppedError`` (draining or stopped).
        """
        return self.add_requests([(request_id, prompt, params or SamplingParams(), priority)])[0]

    def add_requests(self, items: Sequence[tuple]) -> list[RequestStream]:
        """Validate and submit several requests together: either all of them are accepted
        or none is (a bad one raises before any starts).  ``items`` are
        ``(request_id, prompt, params[, priority])``."""
        loop = asyncio.get_running_loop()
        self._check_accepting()
        requests = []
        for index, item in enumerate(items):
            request_id, prompt, params = item[:3]
            priority = item[3] if len(item) > 3 else 0
            try:
                requests.append(self.engine.make_request(request_id, prompt, params, priority))
            except InvalidRequestError as exc:
                exc.index = index  # which item, for callers that submit several
                raise
        streams = [RequestStream(r.request_id, loop, self.abort) for r in requests]
        with self._lock:
            self._check_accepting()
            for r in requests:
                if r.request_id in self._progress:
                    raise InvalidRequestError("request_id", f"{r.request_id!r} is already running")
            if self.max_waiting is not None:
                waiting = self._num_queued + self._num_waiting
                if waiting + len(requests) > self.max_waiting:
                    raise EngineOverloadedError(waiting, self.max_waiting)
            self._num_queued += len(requests)
            for r, s in zip(requests, streams):
                self._progress[r.request_id] = _Progress(s)
        self._commands.put(_Add(requests, streams))
        return streams

    def _check_accepting(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine has stopped after an internal error: {self._dead!r}")
        if not self._accepting or self._thread is None or not self._thread.is_alive():
            raise EngineStoppedError("the engine is shutting down or not running")

    async def generate(self, prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """``add_request`` as an async generator, for code that wants one call."""
        stream = self.add_request(request_id or self.new_request_id(), prompt, params)
        async with stream:
            async for out in stream:
                yield out

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, non-blocking; a no-op for unknown ids)."""
        self._commands.put(_Abort(request_id))

    # ---- what the engine thread publishes ----------------------------------------------
    @property
    def num_unfinished(self) -> int:
        """Requests accepted and not finished (waiting, running or queued)."""
        return len(self._progress)

    @property
    def num_waiting(self) -> int:
        """Requests accepted but not running yet: queued for the engine thread or waiting
        in the scheduler."""
        return self._num_queued + self._num_waiting

    def stats(self) -> dict[str, Any]:
        """``LLMEngine.stats()`` as of the end of the last step (the engine thread takes it,
        so reading it never races the step), plus ``num_waiting`` counting queued ones."""
        s = dict(self._stats)
        s["num_waiting"] = self.num_waiting
        s["num_steps"] = self.num_steps
        s["num_failed_steps"] = self.num_failed_steps
        return s

    # ---- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        with frozen_gc():  # see gc_freeze: no full collections over the loaded model
            self._loop()

    def _loop(self) -> None:
        engine = self.engine
        try:
            while not self._stop:
                busy = engine.has_unfinished_requests()
                self._handle(self._take_commands(wait=not busy))
                if self._stop:
                    break
                self._check_drain_deadline()
                self._flush()
                if not self._accepting and not self._drain_logged:
                    self._drain_logged = True
                    left = "" if self._drain_deadline is None else \
                        f" for up to {max(0.0, self._drain_deadline - time.monotonic()):.0f} s"
                    self.log(f"draining: no new requests; {len(self._live)} unfinished "
                             f"request(s) go on{left}")
                if engine.has_unfinished_requests():
                    try:
                        outputs = engine.step()
                    except Exception as exc:  # noqa: BLE001 - isolate it, keep serving
                        self.num_failed_steps += 1
                        self._recover(exc)
                    else:
                        self.num_steps += 1
                        self._unexplained_failures = 0
                        # Publish first: whoever reads an output sees stats at least as new.
                        self._publish()
                        self._deliver(outputs)
                        self._flush()
                        continue
                self._publish()
                self._flush()
        except BaseException as exc:  # noqa: BLE001 - a bug here must not hang consumers
            self._dead = exc
            self.log(f"engine loop crashed: {exc!r}\n{traceback.format_exc()}")
        finally:
            self._accepting = False
            self._close_all()

    def _take_commands(self, wait: bool) -> list:
        commands = []
        if wait:
            try:
                commands.append(self._commands.get(timeout=IDLE_POLL_S))
            except queue.Empty:
                return commands
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _handle(self, commands: list) -> None:
        for cmd in commands:
            if isinstance(cmd, _Add):
                for req in cmd.requests:
                    self._admit(req)
                self._num_waiting = self.engine.scheduler.num_waiting
                with self._lock:
                    self._num_queued -= len(cmd.requests)
            elif isinstance(cmd, _Abort):
                self._abort_now(cmd.request_id, "abort")

    def _admit(self, req: Request) -> None:
        progress = self._progress.get(req.request_id)
        if progress is None or progress.stream._closed:
            # Aborted (or its consumer gone) before it ever reached the engine.
            self._forget(req.request_id)
            return
        self.engine.submit(req)
        self._live[req.request_id] = req

    def _abort_now(self, request_id: str, why: str) -> None:
        req = self._live.pop(request_id, None)
        out = self.engine.abort_request(request_id) if req is not None else None
        progress = self._progress.get(request_id)
        if progress is None:
            return
        if out is None:  # never reached the engine: still queued
            self._forget(request_id)
            progress.stream.finished = True
            return
        self._publish()  # the blocks are free: say so before the consumer hears of it
        self._send(progress, out, time.monotonic())

    def _check_drain_deadline(self) -> None:
        if self._drain_deadline is None or time.monotonic() < self._drain_deadline:
            return
        if self._live:
            self.log(f"shutdown timeout reached: aborting {len(self._live)} unfinished request(s)")
            self.num_drain_aborts += len(self._live)
            for request_id in list(self._live):
                self._abort_now(request_id, "shutdown")

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            if out.finished:
                self._live.pop(out.request_id, None)
            progress = self._progress.get(out.request_id)
            if progress is not None:
                self._send(progress, out, now)

    def _send(self, progress: _Progress, out: RequestOutput, now: float) -> None:
        num_tokens = sum(len(c.token_ids) for c in out.outputs)
        new = num_tokens - progress.num_tokens
        interval = None if progress.last_time is None else now - progress.last_time
        if new > 0:
            progress.num_tokens, progress.last_time = num_tokens, now
        if out.finished:
            progress.stream.finished = True
            self._forget(out.request_id)
        if self.observer is not None and (new > 0 or out.finished):
            try:
                self.observer.on_output(out, max(new, 0), interval if new > 0 else None)
            except Exception as exc:  # noqa: BLE001 - metrics must never break serving
                self.log(f"observer failed: {exc!r}")
        self._post(progress.stream, progress.stream._put, out)

    def _post(self, stream: RequestStream, fn, arg) -> None:
        """Queue ``fn(arg)`` for the stream's event loop; ``_flush`` hands the queue over."""
        self._outbox.setdefault(stream._loop, []).append((stream, fn, arg))

    def _flush(self) -> None:
        """One ``call_soon_threadsafe`` per event loop and step, not one per output: each
        call wakes the loop through its self-pipe (a system call, under the GIL)."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_dispatch, items)
            except RuntimeError:  # the consumers' loop is closed: nobody will read these
                for stream, _, _ in items:
                    if not stream.finished:
                        self.abort(stream.request_id)

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._progress.pop(request_id, None)

    def _fail(self, request_id: str, error: BaseException) -> None:
        progress = self._progress.get(request_id)
        self._live.pop(request_id, None)
        self._forget(request_id)
        if progress is not None:
            progress.stream.finished = True
            self._post(progress.stream, progress.stream._fail, error)

    def _publish(self) -> None:
        self._stats = dict(self.engine.stats())
        self._num_waiting = self.engine.scheduler.num_waiting

    def _close_all(self) -> None:
        """The loop is ending: abort what the engine still holds, fail what never got in."""
        for request_id in list(self._live):
            try:
                self._abort_now(request_id, "shutdown")
            except Exception:  # noqa: BLE001
                self._live.pop(request_id, None)
        error = (EngineDeadError(f"the engine stopped after an internal error: {self._dead!r}")
                 if self._dead is not None else EngineStoppedError("the engine was shut down"))
        for request_id in list(self._progress):
            self._fail(request_id, error)
        try:
            self._publish()
        except Exception:  # noqa: BLE001
            pass
        self._flush()

    # ---- recovery from a failed step -------------------------------------------------------
    def _recover(self, exc: BaseException) -> None:
        engine = self.engine
        self.log(f"engine step failed ({type(exc).__name__}: {exc}); isolating the request(s) "
                 f"that caused it\n{traceback.format_exc()}")
        # Requests the failed step finished before it broke: their result stands.
        for request_id, req in list(self._live.items()):
            if req.group.is_finished:
                self._deliver([engine.abort_request(request_id) or engine._output(req.group)])
        suspects = [r for r in self._live.values()
                    if any(s.status == RequestStatus.RUNNING for s in r.group.seqs)]
        parked = {rid: self._park(req) for rid, req in
                  sorted(self._live.items(), key=lambda kv: kv[1].arrival_index)}
        culprits: dict[str, BaseException] = {}
        for req in suspects:  # alone in the engine, one step each
            self._readmit(req, parked[req.request_id])
            try:
                outputs = engine.step()
            except Exception as probe_exc:  # noqa: BLE001
                engine.abort_request(req.request_id)
                culprits[req.request_id] = probe_exc
                continue
            self._deliver(outputs)
            if req.request_id in self._live:
                parked[req.request_id] = self._park(req)  # it resumes with the rest below
        if culprits:
            self._unexplained_failures = 0
        else:
            self._unexplained_failures += 1
            if self._unexplained_failures >= MAX_UNEXPLAINED_FAILURES:
                self.log(f"{self._unexplained_failures} failed steps in a row that no single "
                         f"request explains: failing the {len(suspects)} request(s) of the batch")
                culprits = {r.request_id: exc for r in suspects if r.request_id in self._live}
                self._unexplained_failures = 0
        for request_id, cause in culprits.items():
            self.log(f"request {request_id} fails alone: failing it ({cause!r})")
            self._fail(request_id, RequestFailedError(request_id, cause))
        for request_id, seqs in parked.items():
            req = self._live.get(request_id)
            if req is not None and request_id not in culprits:
                self._readmit(req, seqs)

    def _park(self, req: Request) -> list[Request]:
        """Take a request out of the engine, freeing its blocks; its tokens stay in its
        sequences.  Returns the sequences that were unfinished."""
        seqs = [s for s in req.group.seqs if not s.is_finished]
        self.engine.abort_request(req.request_id)
        return seqs

    def _readmit(self, req: Request, seqs: list[Request]) -> None:
        """Put a parked request back: its unfinished sequences recompute their prompt and
        tokens, as after a preemption, and continue where they stopped."""
        for s in seqs:
            s.finish_reason = None
            s.stop_reason = None
            s.num_computed_tokens = 0
            s.metrics.finished_time = None
            if s is req:
                self.engine.submit(s)
            else:
                self.engine.scheduler.add_request(s)
        if req not in seqs:  # only forked sequences are left: the group is still tracked
            self.engine._requests[req.request_id] = req.group
