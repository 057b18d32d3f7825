"""The ``oip`` demo pod: Open Inference Protocol v2 (KServe) with a deterministic iris classifier.

Request tensors are checked for real (datatype, shape, element count and element types), so the
pod refuses what a real inference server would.
"""

from __future__ import annotations

import math
import re
import struct
import sys
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from extproc.demo.pod_server import App, HttpError, PodKind, Request, Response, brief, json_object

_INT_RANGES: dict[str, tuple[int, int]] = {
    **{f"UINT{bits}": (0, 2**bits - 1) for bits in (8, 16, 32, 64)},
    **{f"INT{bits}": (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) for bits in (8, 16, 32, 64)},
}
_FLOAT_MAX: dict[str, float] = {
    "FP16": 65504.0,
    "FP32": 3.4028234663852886e38,
    "FP64": sys.float_info.max,
}
DATATYPES: frozenset[str] = frozenset({"BOOL", "BYTES", *_INT_RANGES, *_FLOAT_MAX})


@dataclass(frozen=True, slots=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: list[object]  # flattened, row-major


def _element_check(datatype: str) -> Callable[[object], bool]:
    """A predicate for one element of ``datatype`` as JSON carries it."""
    if datatype == "BOOL":
        return lambda v: isinstance(v, bool)
    if datatype == "BYTES":
        return lambda v: isinstance(v, str)
    if datatype in _INT_RANGES:
        low, high = _INT_RANGES[datatype]
        # bool is an int subclass in Python but not an integer in JSON.
        return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high
    limit = _FLOAT_MAX[datatype]
    # 1e400 parses to inf, which the range check also refuses.
    return lambda v: isinstance(v, int | float) and not isinstance(v, bool) and abs(v) <= limit


def _flatten(data: object, label: str) -> list[object]:
    """Row-major flattening of nested lists; iterative, so deep nesting cannot blow the stack."""
    if not isinstance(data, list):
        raise HttpError(400, f"{label}: data must be a list")
    flat: list[object] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _parse_shape(shape: object, label: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise HttpError(
            400, f"{label}: shape must be a list of non-negative integers, got {brief(shape)}"
        )
    return tuple(shape)


def parse_tensor(where: str, doc: object) -> Tensor:
    """Validate one request tensor: datatype known, element count and types match the shape."""
    if not isinstance(doc, dict):
        raise HttpError(400, f"{where} must be an object")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise HttpError(400, f"{where}: name must be a non-empty string")
    label = f"input {name!r}"
    datatype = doc.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise HttpError(
            400,
            f"{label}: unknown datatype {brief(datatype)}, expected one of "
            f"{', '.join(sorted(DATATYPES))}",
        )
    shape = _parse_shape(doc.get("shape"), label)
    if "data" not in doc:
        raise HttpError(400, f"{label}: data is required")
    data = _flatten(doc["data"], label)
    expected = math.prod(shape)
    if len(data) != expected:
        raise HttpError(
            400, f"{label}: shape {list(shape)} needs {expected} elements, data has {len(data)}"
        )
    check = _element_check(datatype)
    for index, value in enumerate(data):
        if not check(value):
            raise HttpError(
                400, f"{label}: element {index} ({brief(value)}) is not a valid {datatype}"
            )
    return Tensor(name, datatype, shape, data)


# Per-class feature means of Fisher's iris data (sepal length, sepal width, petal length,
# petal width, in cm). Scores are negative squared distances to each mean, so the softmax
# is a nearest-centroid classifier: deterministic, dependency-free and sensible on real rows.
IRIS_CLASSES = ("setosa", "versicolor", "virginica")
_IRIS_CENTROIDS = (
    (5.006, 3.428, 1.462, 0.246),
    (5.936, 2.770, 4.260, 1.326),
    (6.588, 2.974, 5.552, 2.026),
)
IRIS_INPUT = "input-0"


def _fp32(value: float) -> float:
    """Round to float32 precision: the output tensor claims FP32, so its values are FP32."""
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


def iris_probabilities(row: Sequence[float]) -> list[float]:
    logits = [
        -sum((x - c) ** 2 for x, c in zip(row, centroid, strict=True))
        for centroid in _IRIS_CENTROIDS
    ]
    top = max(logits)  # shift before exp so large inputs cannot overflow
    weights = [math.exp(logit - top) for logit in logits]
    total = sum(weights)
    return [_fp32(w / total) for w in weights]


def _iris_rows(model: str, inputs: list[Tensor]) -> list[list[float]]:
    names = [t.name for t in inputs]
    if names != [IRIS_INPUT]:
        raise HttpError(
            400, f"model {model!r} takes exactly one input {IRIS_INPUT!r}, got {brief(names)}"
        )
    tensor = inputs[0]
    if tensor.datatype != "FP32":
        raise HttpError(400, f"input {IRIS_INPUT!r}: datatype must be FP32, got {tensor.datatype}")
    if len(tensor.shape) != 2 or tensor.shape[1] != 4:
        raise HttpError(
            400, f"input {IRIS_INPUT!r}: shape must be [N, 4], got {list(tensor.shape)}"
        )
    values = [float(cast(float, v)) for v in tensor.data]
    return [values[i : i + 4] for i in range(0, len(values), 4)]


def _requested_outputs(doc: dict[str, object], available: Sequence[str]) -> list[str]:
    requested = doc.get("outputs")
    if requested is None:
        return list(available)
    if not isinstance(requested, list):
        raise HttpError(400, "outputs must be a list")
    names: list[str] = []
    for index, item in enumerate(requested):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or name not in available:
            raise HttpError(
                400,
                f"outputs[{index}]: unknown output {brief(name)}, expected one "
                f"of {', '.join(available)}",
            )
        names.append(name)
    return names


class OipApp(App):
    kind: PodKind = "oip"

    _MODEL = r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"

    def __init__(self, name: str, version: str) -> None:
        super().__init__(name, version)
        self.route("GET", r"/v2", self._server_metadata)
        self.route("GET", r"/v2/health/ready", lambda _r, _m: self.ok({"ready": True}))
        self.route("GET", r"/v2/health/live", lambda _r, _m: self.ok({"live": True}))
        self.route("GET", self._MODEL, self._metadata)
        self.route("GET", self._MODEL + r"/ready", self._model_ready)
        self.route("POST", self._MODEL + r"/infer", self._infer)

    def _check_model(self, match: re.Match[str]) -> None:
        model = urllib.parse.unquote(match["model"])
        if model != self.name:
            raise HttpError(404, f"unknown model {model!r}")
        version = match["version"]
        if version is not None and urllib.parse.unquote(version) != self.version:
            raise HttpError(404, f"model {model!r} has no version {version!r}")

    def _server_metadata(self, _req: Request, _m: re.Match[str]) -> Response:
        return self.ok({"name": "extproc-demo-oip", "version": self.version, "extensions": []})

    def _metadata(self, _req: Request, match: re.Match[str]) -> Response:
        self._check_model(match)
        return self.ok(
            {
                "name": self.name,
                "versions": [self.version],
                "platform": "extproc-demo",
                "inputs": [{"name": IRIS_INPUT, "datatype": "FP32", "shape": [-1, 4]}],
                "outputs": [
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
                    {"name": "label", "datatype": "INT64", "shape": [-1]},
                ],
            }
        )

    def _model_ready(self, _req: Request, match: re.Match[str]) -> Response:
        self._check_model(match)
        return self.ok({"name": self.name, "ready": True})

    def _infer(self, req: Request, match: re.Match[str]) -> Response:
        self._check_model(match)
        doc = json_object(req.body)
        request_id = doc.get("id", uuid.uuid4().hex)
        if not isinstance(request_id, str):
            raise HttpError(400, "id must be a string")
        inputs = doc.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise HttpError(400, "inputs must be a non-empty list of tensors")
        tensors = [parse_tensor(f"inputs[{i}]", t) for i, t in enumerate(inputs)]
        rows = _iris_rows(self.name, tensors)
        probabilities = [iris_probabilities(row) for row in rows]
        outputs = {
            "probabilities": {
                "name": "probabilities",
                "datatype": "FP32",
                "shape": [len(rows), 3],
                "data": [p for row in probabilities for p in row],
            },
            "label": {
                "name": "label",
                "datatype": "INT64",
                "shape": [len(rows)],
                "data": [row.index(max(row)) for row in probabilities],
            },
        }
        wanted = _requested_outputs(doc, list(outputs))
        return self.ok(
            {
                "model_name": self.name,
                "model_version": self.version,
                "id": request_id,
                "outputs": [outputs[n] for n in wanted],
            }
        )
