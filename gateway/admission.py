"""The gateway's bounded queue in front of the engine.

At most `capacity` sequences (the engine's max_num_seqs) are in the engine at once; up to
`max_queued` requests wait here, by priority (vLLM's: lower values first) and then first come
first served, and beyond that a request is refused
at once (429) rather than left to time out. Waiting here rather than in the engine's own queue
makes the queue time measurable, lets streaming responses send keep-alive pings while they wait,
and lets the shutdown drain refuse newcomers while queued requests still get their turn.
"""
from __future__ import annotations

import asyncio
from collections import deque

from gateway.protocol import QueueFull, Unavailable


class Admission:
    def __init__(self, capacity: int, max_queued: int, retry_after_s: int = 1) -> None:
        assert capacity >= 1 and max_queued >= 0
        self.capacity = capacity
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self.num_in_use = 0
        self.is_closed = False
        self._waiters: deque[Ticket] = deque()
        self._num_entered = 0

    @property
    def num_waiting(self) -> int:
        return len(self._waiters)

    def enter(self, num_seqs: int, priority: int = 0) -> Ticket:
        """A ticket that holds or waits for `num_seqs` slots; raises 429/503 when refused now."""
        assert 1 <= num_seqs <= self.capacity
        if self.is_closed:
            raise Unavailable("the server is shutting down", code="shutting_down")
        self._num_entered += 1
        ticket = Ticket(self, num_seqs, (priority, self._num_entered))
        if not self._waiters and self.num_in_use + num_seqs <= self.capacity:
            self.num_in_use += num_seqs
            ticket.is_granted = True
        elif len(self._waiters) >= self.max_queued:
            raise QueueFull(f"the server is at capacity ({self.max_queued} requests queued); "
                            "retry later", headers={"Retry-After": str(self.retry_after_s)})
        else:
            ticket.granted = asyncio.get_running_loop().create_future()
            i = len(self._waiters)     # from the back: first come, first served is one step
            while i > 0 and self._waiters[i - 1].order > ticket.order:
                i -= 1
            self._waiters.insert(i, ticket)
        return ticket

    def close(self) -> None:
        """Refuse new tickets (shutdown); queued ones keep their place."""
        self.is_closed = True

    def fail_waiting(self) -> None:
        """The drain ran out of time: every queued request gets a 503 (as an error event)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            assert waiter.granted is not None
            if not waiter.granted.done():
                waiter.granted.set_exception(
                    Unavailable("the server is shutting down", code="shutting_down"))

    def _release(self, ticket: Ticket) -> None:
        if ticket.is_granted:
            self.num_in_use -= ticket.num_seqs
        elif ticket in self._waiters:
            self._waiters.remove(ticket)
        while self._waiters and self.num_in_use + self._waiters[0].num_seqs <= self.capacity:
            waiter = self._waiters.popleft()
            self.num_in_use += waiter.num_seqs
            waiter.is_granted = True
            assert waiter.granted is not None
            if not waiter.granted.done():
                waiter.granted.set_result(None)


class Ticket:
    """A place in the queue or a held slot; `release()` is idempotent and safe in any state."""

    def __init__(self, admission: Admission, num_seqs: int,
                 order: tuple[int, int] = (0, 0)) -> None:
        self._admission = admission
        self.num_seqs = num_seqs
        self.order = order           # (priority, arrival): the place in the queue
        self.is_granted = False
        self.is_released = False
        self.granted: asyncio.Future[None] | None = None

    async def wait(self) -> None:
        if not self.is_granted:
            assert self.granted is not None
            await asyncio.shield(self.granted)

    def release(self) -> None:
        if not self.is_released:
            self.is_released = True
            self._admission._release(self)
