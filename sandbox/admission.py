"""Admission: which calls may wait, which may run, and the handle that cancels one at any stage.

``max_concurrency`` calls run at once; ``max_queue`` more may wait. A call is counted from the
moment it is admitted (:meth:`Admission.admit`, before any task of it runs) until it is over
(:meth:`Admission.over`), so calls submitted within one loop turn are bounded too, and so
are the tasks and memory they hold. The next one gets :class:`~sandbox.errors.Overloaded`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from sandbox.errors import Overloaded

if TYPE_CHECKING:
    from sandbox.execution import Execution

__all__ = ["Admission", "Ticket"]


class Ticket:
    """One admitted invocation's handle: lets its caller cancel it at any stage."""

    __slots__ = ("admitted", "cancelled", "entered", "execution", "finished", "started", "task")

    def __init__(self) -> None:
        self.cancelled = False
        self.execution: Execution | None = None
        #: the task running the call: its own (submit, stream) or the caller's (invoke)
        self.task: asyncio.Task[Any] | None = None
        #: counted by admission until the call is over (``finished``)
        self.admitted = False
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: its task has begun to run (a task cancelled before that never enters its body,
        #: so it could not answer CANCELLED: it finds ``cancelled`` set instead)
        self.entered = False
        #: set once the invocation is on a worker (or will never be)
        self.started = asyncio.Event()

    def cancel(self) -> None:
        """Kill its worker if it runs; else make it answer CANCELLED where it waits."""
        if self.cancelled:
            return
        self.cancelled = True
        if self.execution is not None:
            self.execution.cancel()
        elif self.task is not None and self.entered and not self.finished.done():
            self.task.cancel()  # still queued or starting: the dispatcher answers CANCELLED


class Admission:
    """The runtime's bounded queue in front of ``max_concurrency`` running calls."""

    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        #: admitted calls not over yet (queued, starting or running)
        self.admitted = 0
        self.running = 0
        #: the tickets of those calls
        self.inflight: set[Ticket] = set()
        self._slots: asyncio.Semaphore | None = None

    @property
    def queued(self) -> int:
        """Admitted calls not running yet."""
        return self.admitted - self.running

    def admit(self) -> Ticket:
        """A ticket for a new call, or :class:`Overloaded` when ``max_concurrency`` run and
        ``max_queue`` wait already."""
        if self.admitted >= self.max_concurrency + self.max_queue:
            raise Overloaded(f"{self.queued} invocations are queued (max_queue="
                             f"{self.max_queue}); try again later")
        ticket = Ticket()
        ticket.admitted = True
        self.admitted += 1
        self.inflight.add(ticket)
        return ticket

    def over(self, ticket: Ticket) -> None:
        """The call is over (answered, or its task ended before it ran). Idempotent."""
        if ticket.admitted:
            ticket.admitted = False
            self.admitted -= 1
            self.inflight.discard(ticket)
            ticket.started.set()
            if not ticket.finished.done():
                ticket.finished.set_result(None)

    async def acquire_slot(self) -> None:
        """Wait for one of the ``max_concurrency`` running slots (cancellable)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrency)
        await self._slots.acquire()
        self.running += 1

    def release_slot(self) -> None:
        assert self._slots is not None
        self.running -= 1
        self._slots.release()
