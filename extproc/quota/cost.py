"""Cost expressions: what one request costs against a cost quota, written in CEL by policy owners.

A policy says how to price a request, e.g. `prompt_tokens + max_tokens * n`. The expression is
compiled once when the policy loads (`compile_cost`), evaluated on the request's facts at
admission to reserve (`request_facts`), and again on the response's usage to settle
(`usage_facts`).

CEL handling shared with other expression kinds is in `extproc.celx`. Macros (`all`, `exists`,
`exists_one`, `map`, `filter`, `has`) are switched off: the facts are scalars, so a comprehension
could only iterate over literals, and without them evaluation is linear in the (capped) expression
size.

Note CEL does not mix int and double: `prompt_tokens * 1.5` is a compile error; write
`double(prompt_tokens) * 1.5`. A double result is rounded up.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice

# The wheel ships cel.pyi but no py.typed marker; see the mypy override for cel_expr_python.
import cel_expr_python.cel as cel

from extproc import celx

Fact = int | float | str | bool

MAX_SOURCE_CHARS = celx.MAX_SOURCE_CHARS
MAX_COST = 2**40
# A hostile body must cost bounded time: messages, parts, prompt items and tensor inputs and
# dimensions visited, all together.
MAX_WALK_ITEMS = 10_000
# Model names are short; a capped string keeps string operations in an expression cheap.
MAX_MODEL_CHARS = 256
# Rough average for English text with OpenAI-style BPE tokenizers; only an estimate, settled later.
CHARS_PER_TOKEN = 4
# Keeps every fact inside CEL's int64 (a bigger count is meaningless next to MAX_COST anyway).
_FACT_MAX = 2**40
_DATA_URL_HEADER_MAX = 256

REQUEST_VARIABLES = frozenset(
    {
        "body_bytes",
        "prompt_chars",
        "prompt_tokens",
        "messages",
        "max_tokens",
        "n",
        "stream",
        "image_count",
        "image_bytes",
        "tensor_elements",
        "model",
    }
)
USAGE_VARIABLES = frozenset({"prompt_tokens", "completion_tokens", "total_tokens"})

# Declared types let the checker reject `model + 1` at load time; other names are dynamic.
_CEL_TYPES: dict[str, cel.Type] = {
    **{name: cel.Type.INT for name in REQUEST_VARIABLES | USAGE_VARIABLES},
    "model": cel.Type.STRING,
    "stream": cel.Type.BOOL,
}
_NUMBER_TYPES = (cel.Type.INT, cel.Type.UINT, cel.Type.DOUBLE)


class CostExpressionError(ValueError):
    """A cost expression that does not compile, or an evaluation that gave no usable cost.

    The message reads well after a "file: field.path: " prefix, e.g.
    "line 1, column 17: undeclared reference to 'foo' (variables: max_tokens, n)".
    """


class CostExpression:
    """A compiled cost expression; `evaluate` is safe to call on the request path."""

    __slots__ = ("_env", "_names", "_program", "source")

    def __init__(self, source: str, env: cel.Env, program: cel.Expression, names: frozenset[str]):
        self.source = source
        self._env = env  # the program is only used while its environment lives
        self._program = program
        # Variables whose names occur in the source: a superset of those the program reads,
        # and passing only these to CEL saves about a third of an evaluation.
        self._names = tuple(sorted(names))

    def evaluate(self, facts: Mapping[str, Fact]) -> int:
        """The cost: rounded up, at least 0 and at most MAX_COST. Raises CostExpressionError."""
        data = {name: facts[name] for name in self._names if name in facts}
        value, kind = celx.evaluate(self._program, data, error=CostExpressionError)
        if kind in (cel.Type.INT, cel.Type.UINT):
            number: int = value.value()
        elif kind == cel.Type.DOUBLE:
            number = _ceil(value.value())
        else:
            raise CostExpressionError(f"the result is {kind.name().lower()}, not a number")
        return min(max(number, 0), MAX_COST)

    def __repr__(self) -> str:
        return f"CostExpression({self.source!r})"


def compile_cost(source: str, variables: frozenset[str]) -> CostExpression:
    """Compile (and type-check) `source`, which may use only the names in `variables`."""
    env = _environment(variables)
    program = celx.compile_source(
        env, source, error=CostExpressionError, hint=functools.partial(_hint, variables)
    )
    result = program.return_type()
    if not any(result == kind for kind in (*_NUMBER_TYPES, cel.Type.DYN)):
        raise CostExpressionError(
            f"line 1, column 1: the expression gives {result.name().lower()}, "
            "not a number (int, uint or double)"
        )
    names = variables.intersection(celx.IDENTIFIER.findall(source))
    return CostExpression(source, env, program, names)


@functools.lru_cache(maxsize=64)
def _environment(variables: frozenset[str]) -> cel.Env:
    return celx.environment({name: _CEL_TYPES.get(name, cel.Type.DYN) for name in variables})


def _hint(variables: frozenset[str], undeclared: frozenset[str]) -> str:
    note = ""
    if undeclared & celx.MACROS:
        note += " (macros such as all, exists, map, filter and has are disabled)"
    if undeclared - celx.MACROS:
        note += f" (variables: {', '.join(sorted(variables)) or 'none'})"
    return note


def _ceil(number: float) -> int:
    if math.isnan(number):
        raise CostExpressionError("evaluation failed: the result is NaN")
    if math.isinf(number):
        return MAX_COST if number > 0 else 0
    return math.ceil(number)


# --- facts -----------------------------------------------------------------------------------


def _count(value: object) -> int | None:
    """A JSON count as a non-negative int capped at _FACT_MAX, or None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return min(max(value, 0), _FACT_MAX)
    if isinstance(value, float) and math.isfinite(value):
        return min(max(math.ceil(value), 0), _FACT_MAX)
    return None


class _Budget:
    """How many more list items the walk of one body may visit."""

    __slots__ = ("left",)

    def __init__(self, items: int) -> None:
        self.left = items

    def take(self, items: list[object]) -> Iterator[object]:
        taken = min(len(items), self.left)
        self.left -= taken
        return islice(items, taken)


@dataclass(slots=True)
class _Prompt:
    chars: int = 0
    images: int = 0
    image_bytes: int = 0

    def add_content(self, content: object, budget: _Budget) -> None:
        """A chat message's `content`: a string or a list of typed parts."""
        if isinstance(content, str):
            self.chars += len(content)
            return
        if not isinstance(content, list):
            return
        for part in budget.take(content):
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind == "text":
                text = part.get("text")
                if isinstance(text, str):
                    self.chars += len(text)
            elif kind == "image_url":
                # Every image counts (a remote one costs the model as much); only an inline
                # data: URL has a size we can know.
                self.images += 1
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                if isinstance(url, str):
                    self.image_bytes += _data_url_bytes(url)

    def add_prompt(self, prompt: object, budget: _Budget) -> None:
        """A completions `prompt` or embeddings `input`: text, texts, or token ids.

        A token id counts as CHARS_PER_TOKEN characters, so prompt_tokens is then exact.
        """
        if isinstance(prompt, str):
            self.chars += len(prompt)
            return
        if not isinstance(prompt, list):
            return
        for item in budget.take(prompt):
            if isinstance(item, str):
                self.chars += len(item)
            elif isinstance(item, list):
                self.chars += CHARS_PER_TOKEN * _count_token_ids(budget.take(item))
            elif isinstance(item, int) and not isinstance(item, bool):
                self.chars += CHARS_PER_TOKEN


def _count_token_ids(items: Iterable[object]) -> int:
    return sum(1 for item in items if isinstance(item, int) and not isinstance(item, bool))


def _data_url_bytes(url: str) -> int:
    """The decoded size of a data: URL, from its length alone (nothing is decoded)."""
    if url[:5].lower() != "data:":
        return 0
    comma = url.find(",", 5, 5 + _DATA_URL_HEADER_MAX)
    if comma < 0:
        return 0
    payload = len(url) - comma - 1
    if not url[5:comma].lower().endswith(";base64"):
        return payload  # percent-encoded text: its length bounds the decoded size
    padding = 2 if url.endswith("==") else 1 if url.endswith("=") else 0
    return max(payload - padding, 0) * 3 // 4


def _tensor_elements(inputs: object, budget: _Budget) -> int:
    """Open Inference Protocol `inputs[].shape`: the products, summed, saturating at _FACT_MAX."""
    if not isinstance(inputs, list):
        return 0
    total = 0
    for tensor in budget.take(inputs):
        shape = tensor.get("shape") if isinstance(tensor, dict) else None
        if not isinstance(shape, list):
            continue
        dims = list(budget.take(shape))
        if len(dims) < len(shape):
            continue  # cut short by the budget: a partial product would mean nothing
        product = 1
        for dim in dims:
            size = _count(dim) if isinstance(dim, int) else None
            if size is None:
                product = 0  # a malformed shape describes no tensor
                break
            product = min(product * size, _FACT_MAX)  # saturate so big ints never grow
        total = min(total + product, _FACT_MAX)
    return total


def request_facts(doc: object, body_bytes: int) -> dict[str, Fact]:
    """Facts about a parsed JSON request body (OpenAI chat, completions, embeddings; OIP v2).

    `prompt_tokens` is an estimate (ceil(prompt_chars / CHARS_PER_TOKEN)); the real count comes
    from the response's usage at settlement. Missing or malformed fields give 0 (`n` gives 1, its
    default), and at most MAX_WALK_ITEMS list items are visited.
    """
    if not isinstance(doc, dict):
        doc = {}
    budget = _Budget(MAX_WALK_ITEMS)
    prompt = _Prompt()
    messages = doc.get("messages")
    if isinstance(messages, list):
        for message in budget.take(messages):
            if isinstance(message, dict):
                prompt.add_content(message.get("content"), budget)
    prompt.add_prompt(doc.get("prompt"), budget)
    prompt.add_prompt(doc.get("input"), budget)
    chars = min(prompt.chars, _FACT_MAX)
    # Upstreams differ in which of the two wins when both are sent: reserve for the larger.
    limits = (_count(doc.get("max_completion_tokens")), _count(doc.get("max_tokens")))
    n = _count(doc.get("n"))
    model = doc.get("model")
    return {
        "body_bytes": _count(body_bytes) or 0,
        "prompt_chars": chars,
        "prompt_tokens": -(-chars // CHARS_PER_TOKEN),
        "messages": len(messages) if isinstance(messages, list) else 0,
        "max_tokens": max((limit for limit in limits if limit is not None), default=0),
        "n": n if n is not None and n >= 1 else 1,
        "stream": doc.get("stream") is True,
        "image_count": prompt.images,
        "image_bytes": min(prompt.image_bytes, _FACT_MAX),
        "tensor_elements": _tensor_elements(doc.get("inputs"), budget),
        "model": model[:MAX_MODEL_CHARS] if isinstance(model, str) else "",
    }


def usage_facts(usage: Mapping[str, object]) -> dict[str, int]:
    """Facts from an OpenAI `usage` object; a missing or malformed count is 0, and a missing or
    malformed `total_tokens` is the sum of the other two."""
    prompt = _count(usage.get("prompt_tokens")) or 0
    completion = _count(usage.get("completion_tokens")) or 0
    total = _count(usage.get("total_tokens"))
    if total is None:
        total = min(prompt + completion, _FACT_MAX)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}
