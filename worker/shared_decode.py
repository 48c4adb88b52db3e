"""Decode once per (file, preprocessing spec), whichever jobs ask: the shared-decode layer.

Why: routing rules can send one study to several models, and each model is its own job (its
own state, retries and findings). Without this layer every job decoded every image of the
study again, although models with the same input and preprocessing take the very same
tensor: a study routed to 4 chest models cost 4 decodes of each 7 MB frame, and decoding, not
the model, is the wall of a node whose model runs on a GPU.

Design: :class:`SharedDecoder` sits in front of the decode pool and keeps, per worker process,
the tensors of in-flight studies keyed by ``(path, spec)`` (:func:`spec_key`: the manifest
fields :func:`lightbox.preprocess.prepare_file` reads; two models with equal keys get equal
tensors by construction).

- In flight: the first job to ask submits the decode; every other job asking for the same key
  while it runs is attached to the same decode. Each caller gets its *own* proxy future, so
  one job's cancel (its first image failed) never cancels an image another job still waits
  for: the decode itself is cancelled only when every proxy on it was cancelled.
- Finished: the tensor stays in an LRU bounded by bytes (``LIGHTBOX_DECODE_SHARE_MB``), so
  the jobs of one study that start a little later (another Celery thread, the next batch of
  jobs) still find it; the oldest tensors are released first. A study's jobs are dispatched
  together, so a few hundred MB covers the studies in flight; nothing is ever written to disk.
- Failures are never kept: a failed or broken-pool decode is forgotten, so a retry decodes
  again. Shared tensors are read-only (the batcher copies them into its batch).
- ``LIGHTBOX_DECODE_SHARE_MB=0`` turns sharing off (every job decodes its own images): the
  baseline ``bench.pipeline --models 4`` measures against in the same run.

Counters (``decodes``, ``shared``) say how many decodes ran and how many requests were served
by another job's decode; the worker logs them and tests assert on them.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lightbox.manifest import Manifest

log = logging.getLogger(__name__)


class Decoder(Protocol):
    workers: int

    def submit(self, path: str | Path, manifest: Manifest) -> Future[np.ndarray]: ...

    def submit_call(self, fn: Callable[..., Any], *args: Any) -> Future[Any]: ...

    def warm_up(self) -> None: ...

    def close(self) -> None: ...


def spec_key(manifest: Manifest) -> str:
    """What a prepared tensor depends on besides the file: equal keys, equal tensors."""
    features = ",".join(f.model_dump_json() for f in manifest.features)
    return (f"{manifest.kind}|{manifest.input.model_dump_json()}|"
            f"{manifest.preprocessing.model_dump_json()}|{features}")


@dataclass
class _InFlight:
    source: Future[np.ndarray]
    proxies: list[Future[np.ndarray]] = field(default_factory=list)


def _settle(proxy: Future[np.ndarray], source: Future[np.ndarray]) -> None:
    """Give ``proxy`` the decode's outcome unless its job cancelled it meanwhile."""
    try:
        if source.cancelled():
            proxy.cancel()
        elif (exc := source.exception()) is not None:
            proxy.set_exception(exc)
        else:
            proxy.set_result(source.result())
    except InvalidStateError:  # the proxy's job cancelled it: nothing to deliver
        pass


class SharedDecoder:
    """``submit(path, manifest) -> Future[tensor]``, one decode per ``(path, spec)``."""

    def __init__(self, inner: Decoder, max_bytes: int) -> None:
        self.inner = inner
        self.max_bytes = max(0, int(max_bytes))
        self._lock = threading.Lock()
        self._running: dict[tuple[str, str], _InFlight] = {}
        self._done: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._done_bytes = 0
        self.decodes = 0  # decodes submitted to the pool
        self.shared = 0  # requests answered by another request's decode

    @property
    def workers(self) -> int:
        return self.inner.workers

    def submit(self, path: str | Path, manifest: Manifest) -> Future[np.ndarray]:
        if self.max_bytes == 0:
            with self._lock:
                self.decodes += 1
            return self.inner.submit(path, manifest)
        key = (str(path), spec_key(manifest))
        proxy: Future[np.ndarray] = Future()
        with self._lock:
            tensor = self._done.get(key)
            if tensor is not None:
                self._done.move_to_end(key)
                self.shared += 1
                proxy.set_result(tensor)
                return proxy
            entry = self._running.get(key)
            if entry is None:
                self.decodes += 1
                entry = self._running[key] = _InFlight(self.inner.submit(path, manifest))
                first = True
            else:
                self.shared += 1
                first = False
            entry.proxies.append(proxy)
        proxy.add_done_callback(partial(self._maybe_cancel, key, entry))
        if first:
            entry.source.add_done_callback(partial(self._finished, key, entry))
        elif entry.source.done():  # finished between the lookup and the append
            _settle(proxy, entry.source)
        return proxy

    def _finished(self, key: tuple[str, str], entry: _InFlight,
                  source: Future[np.ndarray]) -> None:
        with self._lock:
            if self._running.get(key) is entry:
                del self._running[key]
            proxies = list(entry.proxies)
            if not source.cancelled() and source.exception() is None:
                tensor = source.result()
                tensor.flags.writeable = False  # shared between jobs: nobody writes it
                self._keep(key, tensor)
        for proxy in proxies:
            _settle(proxy, source)

    def _keep(self, key: tuple[str, str], tensor: np.ndarray) -> None:
        if tensor.nbytes > self.max_bytes:
            return
        self._done[key] = tensor
        self._done_bytes += tensor.nbytes
        while self._done_bytes > self.max_bytes:
            _, old = self._done.popitem(last=False)
            self._done_bytes -= old.nbytes

    def _maybe_cancel(self, key: tuple[str, str], entry: _InFlight,
                      proxy: Future[np.ndarray]) -> None:
        """The decode is cancelled only when every job waiting on it cancelled."""
        if not proxy.cancelled():
            return
        with self._lock:
            if entry.source.done() or not all(p.cancelled() for p in entry.proxies):
                return
            if self._running.get(key) is entry:
                del self._running[key]
        entry.source.cancel()

    def held_bytes(self) -> int:
        with self._lock:
            return self._done_bytes

    def submit_call(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Other work for the pool (a volume job's slices): passed through, never shared."""
        return self.inner.submit_call(fn, *args)

    def warm_up(self) -> None:
        self.inner.warm_up()

    def close(self) -> None:
        with self._lock:
            self._done.clear()
            self._done_bytes = 0
        self.inner.close()
