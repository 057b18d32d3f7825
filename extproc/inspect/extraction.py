"""Model-extraction defences on responses: coarser scores, fewer of them, no log-probabilities.

Exact, complete confidence scores let a client train a copy of the model (or invert it) with
far fewer queries. The rules here make each response say less: round scores, keep them away from
exact 0 and 1, keep only the top k, drop OpenAI log-probabilities, and strip fields a model
server leaks (debug data, internal ids).

Paths are dot-separated: `outputs.*.data`. A segment is an object key, or a list index when the
value there is a list and the segment is digits; `*` is every list element or object value;
`key=value` is every list element (or object value) that is an object whose `key` is the string
`value`: `outputs.name=probabilities.data` picks an Open Inference Protocol output by name,
wherever the client's request put it in the list.

Order: strip, then logprobs, then for each score field: top_k, clamp, round. The rules also
apply to a single streamed chunk (`chat.completion.chunk`), which has the same `choices`.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeGuard, cast

# Values the rules visit in one document (list elements, object values): a response this large
# is not rewritten partially, `apply_extraction` raises instead.
MAX_WALK_ITEMS = 1_000_000
MAX_PATH_SEGMENTS = 32
MAX_PATH_CHARS = 256
# Keys of an object in a list of scored results (e.g. [{"label": "cat", "score": 0.9}]).
SCORE_KEYS = ("score", "probability", "confidence")
# Log-probabilities OpenAI-compatible servers return per choice (vLLM adds prompt_logprobs).
_LOGPROB_KEYS = ("logprobs", "top_logprobs", "prompt_logprobs")
_SEGMENT = re.compile(r"\*|[^.*\[\]\s]+")

Path = tuple[str, ...]
Container = dict[str, Any] | list[Any]
Key = str | int
Slot = tuple[Container, Key]  # the value at container[key]


class ExtractionLimitError(ValueError):
    """The response has more values than the rules may visit: it must not be forwarded as is."""


def parse_path(path: str) -> Path:
    """`outputs.*.data` as ("outputs", "*", "data"); ValueError says what is wrong."""
    if not path:
        raise ValueError("a path must not be empty")
    if len(path) > MAX_PATH_CHARS:
        raise ValueError(f"a path is at most {MAX_PATH_CHARS} characters long")
    segments = tuple(path.split("."))
    if len(segments) > MAX_PATH_SEGMENTS:
        raise ValueError(f"{path!r}: at most {MAX_PATH_SEGMENTS} segments")
    for segment in segments:
        if not segment:
            raise ValueError(f"{path!r}: an empty segment (two dots, or a dot at an end)")
        if not _SEGMENT.fullmatch(segment) or segment.startswith("=") or segment.count("=") > 1:
            raise ValueError(
                f"{path!r}: bad segment {segment!r} (write list elements as `items.0` or "
                "`items.*`; `*` stands alone; no spaces or brackets)"
            )
    return segments


@dataclass(frozen=True, slots=True)
class ExtractionRules:
    """How to coarsen a response. Paths are checked (and parsed) when the rules are made."""

    score_fields: tuple[str, ...] = ()
    decimals: int | None = None  # round numbers in score fields
    clamp: tuple[float, float] | None = None  # e.g. (0.01, 0.99): no exact 0/1 confidences
    # Number lists: the k largest kept, others 0.0 (shape kept). Lists of scored objects: the
    # k best objects kept.
    top_k: int | None = None
    allow_logprobs: bool = False  # else OpenAI choices' logprobs are set to null
    strip_fields: tuple[str, ...] = ()  # removed entirely
    _scores: tuple[Path, ...] = field(init=False, repr=False, compare=False)
    _strips: tuple[Path, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        strips = tuple(parse_path(path) for path in self.strip_fields)
        for path in strips:
            if path[-1] == "*":
                raise ValueError(f"{'.'.join(path)!r}: a stripped path names a key, not `*`")
        if self.decimals is not None and not 0 <= self.decimals <= 15:
            raise ValueError("decimals must be between 0 and 15")
        if self.clamp is not None:
            low, high = self.clamp
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise ValueError("clamp must be (low, high) with low <= high")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be at least 1")
        object.__setattr__(self, "_scores", tuple(parse_path(p) for p in self.score_fields))
        object.__setattr__(self, "_strips", strips)

    def active(self) -> bool:
        """Whether the rules can change anything (the defaults do: logprobs are removed)."""
        coarsens = self.decimals is not None or self.clamp is not None or self.top_k is not None
        scores = bool(self.score_fields) and coarsens
        return scores or bool(self.strip_fields) or not self.allow_logprobs


def apply_extraction(doc: object, rules: ExtractionRules) -> bool:
    """Apply `rules` to a parsed response in place; whether anything changed.

    Raises ExtractionLimitError when the document has more than MAX_WALK_ITEMS values to visit.
    """
    if not isinstance(doc, dict | list):
        return False
    walk = _Walk()
    changed = False
    for path in rules._strips:
        for container, key in walk.select(doc, path[:-1]):
            target = _get(container, key)
            if isinstance(target, dict) and path[-1] in target:
                del target[path[-1]]
                changed = True
    if not rules.allow_logprobs and isinstance(doc, dict):
        changed = _drop_logprobs(doc) or changed
    if rules.decimals is not None or rules.clamp is not None or rules.top_k is not None:
        for path in rules._scores:
            for container, key in walk.select(doc, path):
                changed = _coarsen(container, key, rules, walk) or changed
    return changed


def _drop_logprobs(doc: dict[str, Any]) -> bool:
    changed = False
    if doc.get("prompt_logprobs") is not None:
        doc["prompt_logprobs"] = None
        changed = True
    choices = doc.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        for key in _LOGPROB_KEYS:
            if choice.get(key) is not None:
                choice[key] = None
                changed = True
    return changed


def _get(container: Container, key: Key) -> Any:
    return cast(Any, container)[key]


def _set(container: Container, key: Key, value: object) -> None:
    cast(Any, container)[key] = value


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class _Walk:
    """Path selection over one document, within MAX_WALK_ITEMS values visited."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MAX_WALK_ITEMS

    def spend(self, items: int) -> None:
        self.left -= items
        if self.left < 0:
            raise ExtractionLimitError(
                f"the response has more than {MAX_WALK_ITEMS} values to inspect"
            )

    def select(self, doc: Container, path: Path) -> list[Slot]:
        """(container, key) of every value `path` names; the empty path names `doc` itself."""
        level: list[Slot] = [([doc], 0)]
        for segment in path:
            following: list[Slot] = []
            for container, key in level:
                following.extend(self._children(_get(container, key), segment))
            level = following
        return level

    def _children(self, node: object, segment: str) -> list[Slot]:
        if "=" in segment and isinstance(node, dict | list):
            name, _, wanted = segment.partition("=")
            slots: list[Slot] = (
                [(node, key) for key in node] if isinstance(node, dict)
                else [(node, at) for at in range(len(node))]
            )  # fmt: skip
            self.spend(len(slots))
            return [
                slot for slot in slots
                if isinstance(item := _get(*slot), dict) and item.get(name) == wanted
            ]  # fmt: skip
        if isinstance(node, dict):
            if segment == "*":
                self.spend(len(node))
                return [(node, key) for key in node]
            return [(node, segment)] if segment in node else []
        if isinstance(node, list):
            if segment == "*":
                self.spend(len(node))
                return [(node, at) for at in range(len(node))]
            if segment.isdigit() and int(segment) < len(node):
                return [(node, int(segment))]
        return []


def _coarsen(container: Container, key: Key, rules: ExtractionRules, walk: _Walk) -> bool:
    """top_k, clamp and round for the score value at container[key]."""
    value = _get(container, key)
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        walk.spend(len(value))
        return _coarsen_objects(value, rules)
    changed = False
    for group in _number_groups(container, key, walk):
        if rules.top_k is not None:
            changed = _top_k(group, rules.top_k) or changed
        for holder, at in group:
            changed = _clamp_and_round(holder, at, rules) or changed
    return changed


def _number_groups(container: Container, key: Key, walk: _Walk) -> Iterator[list[Slot]]:
    """The numbers at container[key], in the groups top_k ranks within.

    A number is its own group; the numbers of an object are one group; a flat list is one group,
    or one per row when a sibling `shape` describes it (OIP: top_k for each item of a batch); a
    nested list is one group per innermost list. Other values are left alone.
    """
    value = _get(container, key)
    if _is_number(value):
        yield [(container, key)]
    elif isinstance(value, dict):
        walk.spend(len(value))
        yield [(value, name) for name, item in value.items() if _is_number(item)]
    elif isinstance(value, list):
        walk.spend(len(value))
        if any(isinstance(item, list) for item in value):
            for at, item in enumerate(value):
                if isinstance(item, list):
                    yield from _number_groups(value, at, walk)
            return
        row = _row_length(container, len(value))
        groups: list[list[Slot]] = [[] for _ in range(-(-len(value) // row))]
        for at, item in enumerate(value):
            if _is_number(item):
                groups[at // row].append((value, at))
        yield from groups


def _row_length(container: Container, length: int) -> int:
    """The last dimension of a sibling OIP `shape`, when that shape describes this flat list."""
    shape = container.get("shape") if isinstance(container, dict) else None
    if (
        isinstance(shape, list)
        and len(shape) >= 2
        and all(isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 for dim in shape)
        and math.prod(shape) == length
    ):
        return cast(int, shape[-1])
    return max(length, 1)


def _top_k(group: list[Slot], k: int) -> bool:
    """Keep the k largest numbers of a group; the others become 0.0."""
    if len(group) <= k:
        return False
    # nlargest is stable: among equal values the earlier are kept.
    kept = set(heapq.nlargest(k, range(len(group)), key=lambda at: _get(*group[at])))
    changed = False
    for at, (holder, index) in enumerate(group):
        if at not in kept and _get(holder, index) != 0:
            _set(holder, index, 0.0)
            changed = True
    return changed


def _clamp_and_round(holder: Container, key: Key, rules: ExtractionRules) -> bool:
    value = _get(holder, key)
    new = value
    if rules.clamp is not None:
        new = min(max(new, rules.clamp[0]), rules.clamp[1])
    if rules.decimals is not None and isinstance(new, float):
        new = round(new, rules.decimals)
    if new == value and type(new) is type(value):
        return False
    _set(holder, key, new)
    return True


def _score_key(item: dict[str, Any]) -> str | None:
    return next((key for key in SCORE_KEYS if _is_number(item.get(key))), None)


def _coarsen_objects(items: list[dict[str, Any]], rules: ExtractionRules) -> bool:
    """[{"label": .., "score": ..}, ...]: keep the k best scored objects, coarsen their scores.
    Objects without a numeric score are left alone."""
    changed = False
    if rules.top_k is not None:
        scored = [at for at, item in enumerate(items) if _score_key(item) is not None]
        if len(scored) > rules.top_k:
            best = heapq.nlargest(
                rules.top_k, scored, key=lambda at: items[at][cast(str, _score_key(items[at]))]
            )
            dropped = set(scored) - set(best)
            items[:] = [item for at, item in enumerate(items) if at not in dropped]
            changed = True
    for item in items:
        name = _score_key(item)
        if name is not None:
            changed = _clamp_and_round(item, name, rules) or changed
    return changed
