"""The local web pages (the annotation page of ``al``, the review page of a night): one
writer per folder and an aiohttp server, bound to 127.0.0.1 unless told otherwise.

The pages have no login, so loopback is the default and anything else is warned about. A
folder is served by one server only (a lock file holding the server's process id: a lock
left by a process that is gone is taken over), so two servers cannot overwrite each
other's answers; the tabs of one server share its state. Local folders only: an
``s3://`` folder cannot be locked and says so.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable

from reid_ray import io as rio
from reid_ray.errors import ConfigError

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def warn_unless_loopback(host: str, page: str) -> None:
    if host not in LOOPBACK:
        logger.warning("the %s has no login; serving on %s exposes it", page, host)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(path: str) -> int | None:
    try:
        return int(open(path).read().strip())
    except (OSError, ValueError):
        return None


class PidLock:
    """A lock file at ``path`` holding this process's id; ``busy(pid, path)`` is the
    message when a live process (this one included) holds it. ``path`` None or remote:
    no lock, with a warning."""

    def __init__(self, path: str | None, busy: Callable[[int, str], str]):
        self.path, self.busy, self.held = path, busy, False

    def acquire(self) -> PidLock:
        if self.path is None or rio.is_remote(self.path):
            logger.warning("%s is remote: no lock against a second server", self.path)
            return self
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pid = _read_pid(self.path)
                if pid is not None and _alive(pid):
                    raise ConfigError(self.busy(pid, self.path)) from None
                os.remove(self.path)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return self
        raise ConfigError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


class BackgroundServer:
    """An aiohttp ``app`` served on a background thread (tests, notebooks): ``url`` once
    started, ``stop()``; a failure to start is one ``ConfigError``."""

    def __init__(self, app, host: str, port: int, name: str):
        from aiohttp import web

        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(app)
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._runner.setup())
                site = web.TCPSite(self._runner, host, port)
                self._loop.run_until_complete(site.start())
                bound = site._server.sockets[0].getsockname()  # noqa: SLF001 - port 0
                self.url = f"http://{host}:{bound[1]}/"
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                errors.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()
        ready.wait(30)
        if errors:
            raise ConfigError(f"could not start the {name}: {errors[0]}")

    def stop(self) -> None:
        async def close():
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)


__all__ = ["LOOPBACK", "BackgroundServer", "PidLock", "warn_unless_loopback"]
