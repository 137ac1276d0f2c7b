"""The engine thread: one continuous batch serving requests that arrive from the event loop."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from s2t.engine import Request, Scheduler

logger = logging.getLogger(__name__)


@dataclass
class Ticket:
    """A submitted request: the engine thread puts ``(step, text)`` per new token (its
    :class:`~s2t.engine.StepOutput`, and the answer's text that may be sent with it), then its
    :class:`~s2t.engine.Generation` (or the exception that ended it), on ``events``, an asyncio queue
    of the submitting loop.

    ``text`` detokenizes on the engine thread, which ends the request at its first stop string before
    the next step: the tokens and cost of a stopped answer never depend on timing. (Without one, each
    step's text is ``""``.)"""

    request: Request
    loop: asyncio.AbstractEventLoop
    text: Any = None  # a serving.app.TextStream: add(token) -> str, and .stopped
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    request_id: int | None = None  # the scheduler's id, set by the engine thread

    def deliver(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop has closed (server shutting down): nobody is listening
            pass


class EngineWorker:
    """Runs ``scheduler`` in a background thread. :meth:`submit` and :meth:`cancel` may be called from
    the event loop at any time; the thread applies them between decoding steps."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.counts = {"finished": 0, "cancelled": 0, "failed": 0}
        self._commands: queue.Queue = queue.Queue()
        self._tickets: dict[int, Ticket] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="s2t-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._commands.put(None)  # wake the thread if it is waiting for work
        self._thread.join(timeout)

    async def submit(self, request: Request, text=None) -> Ticket:
        """Queue ``request``; ``text`` (a ``TextStream``) turns its tokens into the answer's text and
        ends it at a stop string (see :class:`Ticket`)."""
        ticket = Ticket(request, asyncio.get_running_loop(), text)
        self._commands.put(("add", ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Free the request's batch slot: a client went away (or an error ended its answer)."""
        self._commands.put(("cancel", ticket))

    async def call(self, function: Callable[[], Any]) -> Any:
        """Run ``function`` on the engine thread between decoding steps (the models are not shared
        between threads); returns its result or raises its exception."""
        future = asyncio.get_running_loop().create_future()
        self._commands.put(("call", (function, future)))
        return await future

    def alive(self) -> bool:
        """Whether the engine thread is running (``/health`` answers 503 once it is not)."""
        return self._thread.is_alive()

    def load(self) -> dict:
        """Running, waiting and prefilling sequences, and how many requests ended each way."""
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "prefilling": len(self.scheduler.prefilling),  # long prompts being read chunk by chunk
            **self.counts,
        }

    def _apply(self, command) -> None:
        if command is None:
            return
        kind, ticket = command
        if kind == "call":
            function, future = ticket
            try:
                result, error = function(), None
            except Exception as failure:
                result, error = None, failure
            loop = future.get_loop()
            deliver = future.set_exception if error is not None else future.set_result
            try:
                loop.call_soon_threadsafe(lambda: future.done() or deliver(error or result))
            except RuntimeError:  # the loop has closed
                pass
        elif kind == "add":
            try:
                ticket.request_id = self.scheduler.add(ticket.request)
            except Exception as error:  # a request the engine cannot take fails alone
                logger.exception("a request could not be added to the batch")
                self.counts["failed"] += 1
                ticket.deliver(error)
                return
            self._tickets[ticket.request_id] = ticket
        elif ticket.request_id in self._tickets:
            self.scheduler.cancel(ticket.request_id)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:  # block only while there is nothing to decode
                self._apply(self._commands.get(block=not self.scheduler.has_work()))
                while True:
                    self._apply(self._commands.get_nowait())
            except queue.Empty:
                pass
            except Exception:  # a command that failed in a way not handled above: the thread goes on
                logger.exception("a server command failed")
            if self._stop.is_set() or not self.scheduler.has_work():
                continue
            try:
                outputs = self.scheduler.step()
            except Exception as error:  # one bad step must not take the server down
                logger.exception("decoding step failed; dropping the batch")
                for request_id in self.scheduler.abort():
                    self.counts["failed"] += 1
                    self._tickets.pop(request_id).deliver(error)
                continue
            for out in outputs:
                ticket = self._tickets.get(out.request_id)
                if ticket is None:
                    continue
                if out.token is not None:
                    if ticket.text is None:
                        ticket.deliver((out, ""))
                    elif not ticket.text.stopped:
                        ticket.deliver((out, ticket.text.add(out.token)))
                        if ticket.text.stopped and out.generation is None:  # ends before the next step
                            self.scheduler.cancel(out.request_id)
                if out.generation is not None:
                    del self._tickets[out.request_id]
                    stopped = ticket.text is not None and ticket.text.stopped  # counted finished
                    cancelled = out.generation.finish_reason == "cancelled" and not stopped
                    self.counts["cancelled" if cancelled else "finished"] += 1
                    ticket.deliver(out.generation)
