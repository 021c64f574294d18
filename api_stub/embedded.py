"""Embedded mode: the worker and the reconciler run in threads of ``clientela serve``.

The same Celery tasks run as in production, consumed from an in-process broker by a single-threaded
("solo") worker; the reconciler is a loop instead of Celery beat.
"""

from __future__ import annotations

import logging
import threading

from celery.worker import WorkController

from worker.config import Settings
from worker.reconciler import overdue_chunks
from worker.tasks import app, enqueue_chunks, reconcile_task

log = logging.getLogger(__name__)


class EmbeddedRuntime:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._stopping = threading.Event()
        self._worker = WorkController(
            app=app,
            pool="solo",
            concurrency=1,
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            loglevel="WARNING",
        )
        self._threads = [
            threading.Thread(target=self._worker.start, name="clientela-worker", daemon=True),
            threading.Thread(target=self._reconcile_forever, name="clientela-reconciler", daemon=True),
        ]

    def start(self) -> None:
        # The in-process broker starts empty: the chunks a stopped or killed server left pending would
        # otherwise wait out their lease before the reconciler hands them out.
        left = overdue_chunks(self._settings, every_pending=True)
        if left:
            log.info("enqueued %d chunks left pending by an earlier run", len(left))
            enqueue_chunks(left)
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._worker.stop(in_sighandler=False)
        for thread in self._threads:
            thread.join(timeout=10)

    def _reconcile_forever(self) -> None:
        while not self._stopping.wait(self._settings.reconcile_interval_seconds):
            try:
                reconcile_task()
            except Exception:
                log.exception("reconciler pass failed; trying again next interval")
