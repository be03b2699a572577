"""The micro-batcher: concurrent requests share forward passes on one inference thread.

Each request submits its items (one image (3, H, W) uint8 or one grid (h, w) int64 each) under an
operation name. Items wait on an in-memory queue, grouped by (operation, shape). Batching is
continuous, as in text-embeddings-inference and Triton with no queue delay: batches run one at a
time, and whenever the inference thread is free the dispatcher takes the group whose oldest item
has waited longest and runs it at once, as it is. Items that arrive while a batch runs queue up and
form the next batch, so under load batches fill without any waiting, and an idle service answers a
lone request with no delay. ``max_wait_ms`` (0 by default) makes an idle dispatcher wait that long
for company before a batch that is not yet full.

A batch is bounded twice: at most ``max_batch_size`` items, and at most ``max_batch_cost`` in the
operation's cost (pixels of the images an encode reads or a decode writes: TEI's
``--max-batch-tokens``), so small images form large batches and large ones small batches; an item
that alone exceeds the budget runs alone.

The queue is bounded: a submission that would take it past ``max_queue_depth`` items is refused
at once with ``QueueFull`` (429), never parked.

Every tensor operation of a batch (stacking the items, the model, the outputs) runs on the one inference
thread, the thread the engine was loaded on (``executor``): PyTorch's CPU build keeps one OpenMP thread team
per thread that starts parallel work, and as soon as the teams together hold more threads than there are
cores, libgomp stops letting its idle workers spin between parallel regions, so every convolution waits for
its workers to wake. Measured on 2 cores: a batch of 16 32x32 images took 9.1 ms on the inference thread once
another thread had run parallel work, 5.4 ms otherwise (``bench/inference_thread.py``).

The dispatcher never dies of a batch: any exception while stacking, running or answering one batch
goes to that batch's requests and dispatching goes on. Should the dispatcher task end anyway,
``alive`` turns False (readiness reports 503) and every waiting request gets ``NotReady`` (503).
Every submission has a deadline: past it, its items leave the queue and it gets ``DeadlineExceeded``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from vqtok.service.errors import DeadlineExceeded, InferenceFailed, NotReady, QueueFull

logger = logging.getLogger("vqtok.service.batching")

BatchFunction = Callable[[torch.Tensor], torch.Tensor]
BatchObserver = Callable[[str, int, float], None]  # (operation, batch size, inference seconds)


def inference_executor() -> ThreadPoolExecutor:
    """The one thread that runs every tensor operation of the model: load the engine on it, then hand it to
    ``MicroBatcher(executor=...)`` (which shuts it down on ``stop``)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="vqtok-inference")


def _stack_and_run(function: BatchFunction, tensors: list[torch.Tensor]) -> torch.Tensor:
    """``function`` over the items stacked into one (B, ...) tensor, both on the calling (inference) thread."""
    return function(torch.stack(tensors))


@dataclass(eq=False)  # items are compared by identity (a queue removes exactly this one)
class _Item:
    tensor: torch.Tensor
    future: asyncio.Future[torch.Tensor]
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    finished: float = 0.0
    batch_size: int = 0


@dataclass(frozen=True)
class BatchResult:
    """Outputs of one submission, in order, and how long it waited and ran (seconds, worst item)."""

    outputs: list[torch.Tensor]
    queue_seconds: float
    inference_seconds: float
    batch_sizes: list[int]


class MicroBatcher:
    """Groups same-shaped items from concurrent requests into batches bounded by count and cost."""

    def __init__(
        self,
        operations: dict[str, BatchFunction],
        max_batch_size: int,
        max_wait_ms: float,
        max_queue_depth: int,
        observe_batch: BatchObserver | None = None,
        deadline_seconds: float | None = None,
        item_cost: dict[str, Callable[[torch.Tensor], int]] | None = None,
        max_batch_cost: int | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.operations = operations
        self.max_batch_size = max_batch_size
        self.item_cost = item_cost or {}
        self.max_batch_cost = max_batch_cost
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue_depth = max_queue_depth
        self.observe_batch = observe_batch
        self.deadline_seconds = deadline_seconds
        self.failure: str | None = None  # why the dispatcher stopped, if it ever did on its own
        self._groups: OrderedDict[tuple[str, tuple[int, ...]], deque[_Item]] = OrderedDict()
        self._depth = 0
        self._arrived = asyncio.Event()
        # The inference thread: given (the one the engine was loaded on, see ``inference_executor``) or our own.
        self._executor = executor or inference_executor()
        self._task: asyncio.Task[None] | None = None
        self._running: list[_Item] = []

    @property
    def depth(self) -> int:
        """Items waiting (not counting the batch being computed)."""
        return self._depth

    @property
    def alive(self) -> bool:
        """True while the dispatcher runs (False before ``start``, after ``stop`` or if it ever ended)."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._dispatch_forever(), name="vqtok-batcher")
            self._task.add_done_callback(self._dispatcher_ended)

    def _dispatcher_ended(self, task: asyncio.Task[None]) -> None:
        """The dispatcher ended without ``stop``: record why and answer everyone waiting with 503."""
        if task is not self._task:
            return  # stop() already took over
        reason = "cancelled" if task.cancelled() else repr(task.exception())
        self.failure = f"the batcher stopped ({reason})"
        logger.critical("%s; the service is no longer ready", self.failure)
        self._fail_waiting(NotReady(f"{self.failure}; the service is not ready"))

    def _fail_waiting(self, error: Exception) -> None:
        for item in [*self._running, *(item for items in self._groups.values() for item in items)]:
            if not item.future.done():
                item.future.set_exception(error)
        self._running = []
        self._groups.clear()
        self._depth = 0

    async def stop(self) -> None:
        """Stop dispatching, fail whatever still waits with 503, and release the inference thread."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # a dispatcher that died was reported
                await task
        self._fail_waiting(NotReady("the service is shutting down"))
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    @property
    def busy(self) -> bool:
        """A batch is running on the inference thread."""
        return bool(self._running)

    def run_in_inference_thread(self, function: Callable[[], object]) -> asyncio.Future[object]:
        """Run ``function`` on the inference thread (for work that must not race a batch)."""
        return asyncio.get_running_loop().run_in_executor(self._executor, function)

    async def submit(self, operation: str, tensors: Sequence[torch.Tensor]) -> BatchResult:
        """Queue ``tensors`` (each one item, no batch dimension) for ``operation``; await their outputs."""
        if not self.alive:
            raise NotReady(f"{self.failure}; the service is not ready" if self.failure else "the model is not ready")
        if operation not in self.operations:
            raise KeyError(operation)
        if self._depth + len(tensors) > self.max_queue_depth:
            raise QueueFull(
                f"queue full: {self._depth} items waiting, this request adds {len(tensors)}, "
                f"the limit is {self.max_queue_depth}; retry shortly",
                headers={"Retry-After": "1"},
            )
        loop = asyncio.get_running_loop()
        items = [_Item(tensor=t, future=loop.create_future()) for t in tensors]
        for item in items:
            key = (operation, tuple(item.tensor.shape))
            self._groups.setdefault(key, deque()).append(item)
        self._depth += len(items)
        self._arrived.set()
        try:
            async with asyncio.timeout(self.deadline_seconds):
                outputs = [await item.future for item in items]
        except (asyncio.CancelledError, TimeoutError) as exc:
            self._withdraw(operation, items)
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded(
                    f"not answered within the request deadline of {self.deadline_seconds:g} s; "
                    f"the service is overloaded, retry later", headers={"Retry-After": "1"},
                ) from None
            raise
        return BatchResult(
            outputs=outputs,
            queue_seconds=max(item.started - item.enqueued for item in items),
            inference_seconds=max(item.finished - item.started for item in items),
            batch_sizes=sorted({item.batch_size for item in items}),
        )

    def _withdraw(self, operation: str, items: list[_Item]) -> None:
        """Take a gone request's waiting items out of the queue at once, so they hold no queue capacity
        (a running batch finishes; its answer for them is dropped)."""
        for item in items:
            item.future.cancel()
            key = (operation, tuple(item.tensor.shape))
            queue = self._groups.get(key)
            if queue is not None and item in queue:
                queue.remove(item)
                self._depth -= 1
                if not queue:
                    del self._groups[key]

    def _oldest_group(self) -> tuple[str, tuple[int, ...]] | None:
        oldest_key, oldest_time = None, float("inf")
        for key, items in self._groups.items():
            if items and items[0].enqueued < oldest_time:
                oldest_key, oldest_time = key, items[0].enqueued
        return oldest_key

    def _cost(self, operation: str, item: _Item) -> int:
        cost = self.item_cost.get(operation)
        return cost(item.tensor) if cost is not None else 0

    def _is_full(self, key: tuple[str, tuple[int, ...]]) -> bool:
        """The group holds a whole batch: ``max_batch_size`` items, or ``max_batch_cost`` of cost."""
        items = self._groups[key]
        if len(items) >= self.max_batch_size:
            return True
        # Items of one group share a shape, so they share a cost.
        return self.max_batch_cost is not None and len(items) * self._cost(key[0], items[0]) >= self.max_batch_cost

    async def _wait_for_batch(self) -> tuple[str, tuple[int, ...]]:
        """The key of the next group to run. Called only when the inference thread is free.

        The oldest group (by its head's arrival) runs at once when it is full or ``max_wait`` is 0 (or
        has passed for it); while it waits for company, a full group may run first, so no group waits
        longer than ``max_wait`` behind others and none starves.
        """
        while True:
            key = self._oldest_group()
            if key is None:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            remaining = self._groups[key][0].enqueued + self.max_wait - time.perf_counter()
            if remaining <= 0 or self._is_full(key):
                return key
            full = [k for k in self._groups if self._is_full(k)]
            if full:
                return min(full, key=lambda k: self._groups[k][0].enqueued)
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout=remaining)

    def _take(self, key: tuple[str, tuple[int, ...]]) -> list[_Item]:
        """Up to ``max_batch_size`` live items of the group within ``max_batch_cost`` (at least one);
        cancelled ones are dropped."""
        queue = self._groups[key]
        taken: list[_Item] = []
        cost = self._cost(key[0], queue[0]) if queue else 0
        while queue and len(taken) < self.max_batch_size:
            if taken and self.max_batch_cost is not None and (len(taken) + 1) * cost > self.max_batch_cost:
                break
            item = queue.popleft()
            self._depth -= 1
            if not item.future.done():
                taken.append(item)
        if not queue:
            del self._groups[key]
        return taken

    async def _dispatch_forever(self) -> None:
        while True:
            key = await self._wait_for_batch()
            items = self._take(key)
            if not items:
                continue
            self._running = items
            try:
                await self._run_batch(key[0], items)
            except asyncio.CancelledError:
                raise  # stop(): it answers the items in self._running
            except Exception as exc:  # hand the failure to each waiting request; keep dispatching
                logger.exception("batch of %d for %s failed", len(items), key[0])
                failure = InferenceFailed(
                    f"{key[0]} failed on a batch of {len(items)} ({type(exc).__name__}: {exc}); retry",
                    headers={"Retry-After": "1"},
                )
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(failure)
            self._running = []

    async def _run_batch(self, operation: str, items: list[_Item]) -> None:
        """Stack the items into one (B, ...) tensor, run ``operation`` on the inference thread, answer each."""
        started = time.perf_counter()
        for item in items:
            item.started = started
            item.batch_size = len(items)
        outputs = await asyncio.get_running_loop().run_in_executor(
            self._executor, _stack_and_run, self.operations[operation], [item.tensor for item in items])
        finished = time.perf_counter()
        if self.observe_batch is not None:
            self.observe_batch(operation, len(items), finished - started)
        for index, item in enumerate(items):
            item.finished = finished
            if not item.future.done():
                item.future.set_result(outputs[index])
