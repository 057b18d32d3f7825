"""The active policy set: loaded whole, swapped atomically, the last good set kept on error."""

from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)


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
        # Raises on an invalid set: the server refuses to start with it.
        self.current: PolicySet = load_policy_set(directory, self.resources)

    def reload(self) -> bool:
        """Load again; keep the last good set when the new one is invalid. True if swapped."""
        resources = CompileResources(
            api_keys=self.resources.api_keys,
            environ=self.resources.environ,
            key_sources=dict(self.resources.key_sources),
        )
        try:
            new = load_policy_set(self.directory, resources)
        except PolicyLoadError as exc:
            log.error(
                "policy reload rejected; keeping revision %s:\n%s", self.current.revision, exc
            )
            return False
        if new.revision == self.current.revision:
            return False
        self.resources, self.current = resources, new
        log.info("policy revision %s active (%d policies)", new.revision, len(new.policies))
        return True
