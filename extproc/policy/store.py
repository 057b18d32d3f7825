"""The active policy set: loaded whole, swapped atomically, the last good set kept on error."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from extproc.authn.apikey import ApiKeyStore
from extproc.policy.compile import CompileResources, compile_policy_set
from extproc.policy.compiled import PolicySet
from extproc.policy.load import (
    NO_PLATFORM,
    PolicyError,
    PolicyLoadError,
    read_platform_file,
    read_policy_dir,
)
from extproc.telemetry import metrics

log = logging.getLogger(__name__)

# The watcher stats at most this many files under the policy directory per poll.
MAX_WATCHED_FILES = 2000


def fingerprint(directory: Path) -> tuple[tuple[str, int, int, int], ...]:
    """What changes when any file under the directory changes: names, sizes, times, inodes.

    Stat follows symlinks, so a Kubernetes ConfigMap update (an atomic swap of the `..data`
    link) shows as a change too. Reading and hashing happen only after a change.
    """
    found: list[tuple[str, int, int, int]] = []
    for root, dirs, names in os.walk(directory, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            if len(found) >= MAX_WATCHED_FILES:
                return tuple(found)
            path = os.path.join(root, name)
            try:
                st = os.stat(path)
            except OSError:
                continue  # vanished between listing and stat: the next poll sees it
            found.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(found)


def load_policy_set(directory: Path, resources: CompileResources) -> PolicySet:
    """Read, validate and compile every policy file and the platform's. Raises
    PolicyLoadError with the errors of all of them."""
    errors: list[PolicyError] = []
    platform = NO_PLATFORM
    try:
        platform = read_platform_file(directory)
    except PolicyLoadError as exc:
        errors.extend(exc.errors)
    try:
        files = read_policy_dir(directory)
    except PolicyLoadError as exc:
        raise PolicyLoadError(errors + exc.errors) from None
    if errors:
        raise PolicyLoadError(errors)
    return compile_policy_set(files, resources, platform)


class PolicyStore:
    """Holds the current PolicySet. Readers take `current` once per request: a plain attribute
    read, so a swap is atomic for them and a request sees one revision from start to end."""

    def __init__(self, directory: Path, api_keys: ApiKeyStore, environ: Mapping[str, str]) -> None:
        self.directory = directory
        self.resources = CompileResources(api_keys=api_keys, environ=environ)
        self._seen = fingerprint(directory)  # what `current` was read from
        # Raises on an invalid set: the server refuses to start with it.
        self.current: PolicySet = load_policy_set(directory, self.resources)
        self.reloads = 0  # revisions applied since start
        self.rejected = 0  # invalid changes refused
        self._reloading = asyncio.Lock()
        metrics.policy_revision(self.current.revision)

    def reload(self) -> bool:
        """Load again; keep the last good set when the new one is invalid. True if swapped."""
        return self._swap(self._load())

    async def reload_async(self) -> bool:
        """reload() with the reading and compiling off the event loop (a detector or schema
        can take a second to compile); the swap itself happens on the loop."""
        async with self._reloading:
            return self._swap(await asyncio.to_thread(self._load))

    async def watch(self, interval_seconds: float = 1.0) -> None:
        """Poll the directory every `interval_seconds` until cancelled; reload on a change."""
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                if fingerprint(self.directory) != self._seen:
                    await self.reload_async()
            except Exception:  # keep watching whatever happens; the last good set serves
                log.exception("policy watch failed; keeping revision %s", self.current.revision)

    def _load(self) -> tuple[CompileResources, PolicySet] | None:
        # Taken before reading: a change made while loading shows as a change next time.
        self._seen = fingerprint(self.directory)
        resources = CompileResources(
            api_keys=self.resources.api_keys,
            environ=self.resources.environ,
            key_sources=dict(self.resources.key_sources),
        )
        try:
            return resources, load_policy_set(self.directory, resources)
        except PolicyLoadError as exc:
            self.rejected += 1
            metrics.POLICY_RELOADS.labels("rejected").inc()
            log.error(
                "policy reload rejected; keeping revision %s:\n%s", self.current.revision, exc
            )
            return None

    def _swap(self, loaded: tuple[CompileResources, PolicySet] | None) -> bool:
        if loaded is None:
            return False
        resources, new = loaded
        if new.revision == self.current.revision:
            return False
        # One attribute assignment: a request reads `current` once and keeps its revision.
        old = self.current.revision
        self.resources, self.current = resources, new
        self.reloads += 1
        metrics.POLICY_RELOADS.labels("applied").inc()
        metrics.policy_revision(new.revision, old)
        log.info("policy revision %s active (%d policies)", new.revision, len(new.policies))
        return True
