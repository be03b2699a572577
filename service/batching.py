"""The micro-batcher: concurrent requests share forward passes on one inference thread.

Each request submits its items (one image (3, H, W) uint8 or one grid (h, w) int64 each) under an
operation name. Items wait on an in-memory queue, grouped by (operation, shape); the dispatcher
task takes the group whose oldest item has waited longest, once that item has waited ``max_wait``
or the group holds ``max_batch_size`` items, stacks up to ``max_batch_size`` of them into one
(B, ...) tensor and runs the operation on the single inference thread. While a batch runs, new
items keep queueing, so under load batches fill without any waiting at all.

The queue is bounded: a submission that would take it past ``max_queue_depth`` items is refused
at once with ``QueueFull`` (429), never parked.
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

from vqtok.service.errors import NotReady, QueueFull

logger = logging.getLogger("vqtok.service.batching")

BatchFunction = Callable[[torch.Tensor], torch.Tensor]
BatchObserver = Callable[[str, int, float], None]  # (operation, batch size, inference seconds)


@dataclass
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
    """Groups same-shaped items from concurrent requests into batches of up to ``max_batch_size``."""

    def __init__(
        self,
        operations: dict[str, BatchFunction],
        max_batch_size: int,
        max_wait_ms: float,
        max_queue_depth: int,
        observe_batch: BatchObserver | None = None,
    ) -> None:
        self.operations = operations
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue_depth = max_queue_depth
        self.observe_batch = observe_batch
        self._groups: OrderedDict[tuple[str, tuple[int, ...]], deque[_Item]] = OrderedDict()
        self._depth = 0
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vqtok-inference")
        self._task: asyncio.Task[None] | None = None
        self._running: list[_Item] = []

    @property
    def depth(self) -> int:
        """Items waiting (not counting the batch being computed)."""
        return self._depth

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._dispatch_forever(), name="vqtok-batcher")

    async def stop(self) -> None:
        """Stop dispatching, fail whatever still waits with 503, and release the inference thread."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for item in [*self._running, *(item for items in self._groups.values() for item in items)]:
            if not item.future.done():
                item.future.set_exception(NotReady("the service is shutting down"))
        self._running = []
        self._groups.clear()
        self._depth = 0
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    def run_in_inference_thread(self, function: Callable[[], object]) -> asyncio.Future[object]:
        """Run ``function`` on the inference thread (for work that must not race a batch)."""
        return asyncio.get_running_loop().run_in_executor(self._executor, function)

    async def submit(self, operation: str, tensors: Sequence[torch.Tensor]) -> BatchResult:
        """Queue ``tensors`` (each one item, no batch dimension) for ``operation``; await their outputs."""
        if self._task is None:
            raise NotReady("the model is not ready")
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
            outputs = [await item.future for item in items]
        except asyncio.CancelledError:
            for item in items:
                item.future.cancel()  # the dispatcher skips cancelled items
            raise
        return BatchResult(
            outputs=outputs,
            queue_seconds=max(item.started - item.enqueued for item in items),
            inference_seconds=max(item.finished - item.started for item in items),
            batch_sizes=sorted({item.batch_size for item in items}),
        )

    def _oldest_group(self) -> tuple[str, tuple[int, ...]] | None:
        oldest_key, oldest_time = None, float("inf")
        for key, items in self._groups.items():
            if items and items[0].enqueued < oldest_time:
                oldest_key, oldest_time = key, items[0].enqueued
        return oldest_key

    async def _wait_for_batch(self) -> tuple[str, tuple[int, ...]]:
        """The key of the next group to run: its head has waited ``max_wait`` or the group is full."""
        while True:
            key = self._oldest_group()
            if key is None:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if any(len(items) >= self.max_batch_size for items in self._groups.values()):
                full = next(k for k, items in self._groups.items() if len(items) >= self.max_batch_size)
                return full
            remaining = self._groups[key][0].enqueued + self.max_wait - time.perf_counter()
            if remaining <= 0:
                return key
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout=remaining)

    def _take(self, key: tuple[str, tuple[int, ...]]) -> list[_Item]:
        """Up to ``max_batch_size`` live items from the group; cancelled ones are dropped."""
        queue = self._groups[key]
        taken: list[_Item] = []
        while queue and len(taken) < self.max_batch_size:
            item = queue.popleft()
            self._depth -= 1
            if not item.future.done():
                taken.append(item)
        if not queue:
            del self._groups[key]
        return taken

    async def _dispatch_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            key = await self._wait_for_batch()
            items = self._take(key)
            if not items:
                continue
            operation = key[0]
            started = time.perf_counter()
            for item in items:
                item.started = started
                item.batch_size = len(items)
            self._running = items
            batch = torch.stack([item.tensor for item in items])
            try:
                outputs = await loop.run_in_executor(self._executor, self.operations[operation], batch)
            except asyncio.CancelledError:
                raise  # stop(): it answers the items in self._running
            except Exception as exc:  # hand the failure to each waiting request; keep dispatching
                logger.exception("batch of %d for %s failed", len(items), operation)
                self._running = []
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            self._running = []
            finished = time.perf_counter()
            if self.observe_batch is not None:
                self.observe_batch(operation, len(items), finished - started)
            for index, item in enumerate(items):
                item.finished = finished
                if not item.future.done():
                    item.future.set_result(outputs[index])
