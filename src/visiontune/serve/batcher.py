"""Micro-batching: concurrent requests share one model call, so throughput rises with load.

Admission is counted in images: a request reserves its images once its body has arrived (a slow client holds
no place), and the reservation is held until its answer is ready. A reservation over `capacity` is refused
(QueueFull), so the number of decoded crops and waiting futures in memory never exceeds it, however many clients
connect; the bodies being received are bounded apart, in bytes (`uploads.BodyBudget`).

One worker task feeds the model: it takes the first waiting item, then keeps collecting until the batch
is full, or until no other admitted request could still join (they are all in this batch or already at the
model), or until `max_wait_ms` has passed. The model runs on its own threads, up to `streams` batches at once
(each engine call on its share of the cores), so the event loop keeps accepting, reading and decoding the next
requests meanwhile; those form the next batch. Several narrow calls at once beat one wide call here: a call
spread over every core waits at each layer for its slowest thread, and on a server the decoding threads and the
event loop take cores from it all the time (BENCHMARKS.md, "Serving").
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np


class QueueFull(Exception):
    """More images are admitted than the server holds at once."""


@dataclass
class _Item:
    crops: np.ndarray  # n x S x S x 3 uint8
    future: asyncio.Future


class Reservation:
    """Places in the batcher, held from when the body is in until the answer is ready."""

    def __init__(self, batcher: "MicroBatcher"):
        self._batcher = batcher
        self.count = 0

    def grow(self, total: int) -> None:
        """Hold `total` places (a batch request learns how many images it has only after reading its body)."""
        extra = total - self.count
        if extra > 0:
            self._batcher._take(extra)
            self.count = total

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self._batcher._reserved -= self.count
        self.count = 0


class MicroBatcher:
    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], *, max_batch: int, max_wait_ms: float,
                 capacity: int, streams: int = 1):
        self._infer = infer
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self.capacity = max(1, capacity)
        self.streams = max(1, streams)
        self._reserved = 0
        self._at_model = 0  # images of the batches being computed
        self._queue: asyncio.Queue[_Item] | None = None
        self._worker: asyncio.Task | None = None
        self._slots: asyncio.Semaphore | None = None
        self._running: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(max_workers=self.streams, thread_name_prefix="model")
        self.batches = 0  # model calls made, and the images they took (how well batching works)
        self.images = 0

    @property
    def reserved(self) -> int:
        return self._reserved

    def reserve(self, count: int = 1) -> Reservation:
        reservation = Reservation(self)
        reservation.grow(count)
        return reservation

    def _take(self, count: int) -> None:
        if self._reserved + count > self.capacity:
            raise QueueFull(f"the server is busy: {self._reserved} image(s) in flight, room for {self.capacity}")
        self._reserved += count

    def start(self) -> None:
        self._queue = asyncio.Queue()  # bounded by the reservations, not by maxsize: put never blocks
        self._slots = asyncio.Semaphore(self.streams)
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        for task in [self._worker, *self._running]:
            if task is None:
                continue
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def submit(self, crops: np.ndarray):
        """n x S x S x 3 crops -> n rows of the model's output (of each of its outputs, when it returns a tuple),
        computed together with other requests'."""
        assert self._queue is not None, "MicroBatcher.start() was not called"
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(crops, future))
        return await future

    async def _collect(self) -> list[_Item]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        size = len(batch[0].crops)
        deadline = loop.time() + self.max_wait
        while size < self.max_batch:
            if self._queue.empty():
                # Everything admitted is already here or at the model: waiting would only add latency.
                if self._reserved - self._at_model <= size:
                    break
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            else:
                item = self._queue.get_nowait()
            batch.append(item)
            size += len(item.crops)
        return batch

    async def _run(self) -> None:
        while True:
            await self._slots.acquire()  # a stream is free: the next batch forms while the others compute
            try:
                batch = await self._collect()
            except BaseException:
                self._slots.release()
                raise
            size = sum(len(item.crops) for item in batch)
            self._at_model += size
            task = asyncio.get_running_loop().create_task(self._compute(batch, size))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _compute(self, batch: list[_Item], size: int) -> None:
        try:
            crops = np.concatenate([item.crops for item in batch])
            try:
                out = await asyncio.get_running_loop().run_in_executor(self._executor, self._infer, crops)
            except Exception as exc:  # the requests report it; the worker keeps serving
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                return
            self.batches += 1
            self.images += len(crops)
            start = 0
            for item in batch:
                end = start + len(item.crops)
                if not item.future.done():  # a request cancelled meanwhile (graceful-shutdown timeout)
                    item.future.set_result(_rows(out, start, end))
                start = end
            # Let the answered requests run and give back their places before the next batch is
            # collected, or it would wait for them as if they were still coming.
            await asyncio.sleep(0)
        finally:
            self._at_model -= size
            self._slots.release()


def _rows(out, start: int, end: int):
    """Rows start:end of the model's output, or of each array of a tuple of outputs (None stays None)."""
    if isinstance(out, tuple):
        return tuple(None if part is None else part[start:end] for part in out)
    return out[start:end]
