"""In-process costs of body inspection and streamed redaction, without Envoy or gRPC.

    .venv/bin/python bench/inspect_micro.py [--iterations N] [--repeats R]

Prints the median over R repeats (time.perf_counter over bounded loops) of:
  (a) the inspect phase on bench/run.py's 2 KB and 200 KB chat bodies: parse_json then
      inspect_request, with bench/policies/bench-inspect.yaml's `input:` section;
  (b) SSE redaction per chunk: SseTransformer with bench-respond.yaml's `output.redact`, fed
      a stream of events with 4-character deltas (as the demo chat pod sends) cut into
      300-byte chunks, and a 300-byte chunk holding one whole event;
  (c) the same streams through an SseTransformer without redaction, and as plain bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench.run` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml

from bench.run import BODY_POLICY_TEMPLATES, chat_body
from extproc.inspect.body import parse_json
from extproc.inspect.plan import InputPlan, OutputPlan, compile_input, compile_output
from extproc.inspect.request import Inspected, inspect_request
from extproc.inspect.response import SseTransformer
from extproc.inspect.schema import Input, Output

CHUNK = 300


def timed(fn: Callable[[], object], iterations: int, repeats: int) -> float:
    """Median seconds per call."""
    fn()  # warm caches (regexes, detector state)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        runs.append((time.perf_counter() - start) / iterations)
    return statistics.median(runs)


def _inspect(plan: InputPlan, body: bytes) -> object:
    return inspect_request(plan, parse_json(body))


def _event(content: str) -> bytes:
    chunk = {
        "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
        "model": "bench",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }  # fmt: skip
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def sse_stream(events: int) -> bytes:
    text = (
        "Sure, here is the plan for your walk: start at the cathedral, follow the river front "
        "and write to jane.doe@example.com if anything changes. "
    )
    text = (text * (events * 4 // len(text) + 1))[: events * 4]
    parts = [_event(text[i : i + 4]) for i in range(0, len(text), 4)]
    return b"".join(parts) + b"data: [DONE]\n\n"


def one_event_chunk() -> bytes:
    base = len(_event(""))
    content = ("the river front, then lunch by the fountain " * 10)[: CHUNK - base]
    event = _event(content)
    assert len(event) == CHUNK, len(event)
    return event


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    iterations, repeats = args.iterations, args.repeats

    inspect_doc = yaml.safe_load(BODY_POLICY_TEMPLATES["inspect"].read_text())
    respond_doc = yaml.safe_load(BODY_POLICY_TEMPLATES["respond"].read_text())
    in_plan = compile_input(Input.model_validate(inspect_doc["input"]), Path("."), {}, True)
    out_plan = compile_output(Output.model_validate(respond_doc["output"]), {})
    plain_plan = compile_output(Output.model_validate({}), {})

    print(f"median of {repeats} repeats; µs per call")
    print("(a) inspect phase: parse_json + inspect_request (bench-inspect.yaml input:)")
    for label, size in (("2 KB", 2 * 1024), ("200 KB", 200 * 1024)):
        body = chat_body(size)
        result = inspect_request(in_plan, parse_json(body))
        assert isinstance(result, Inspected) and result.changed, result  # the email was masked
        n = iterations if size < 10_000 else max(iterations // 100, 5)
        parse = timed(partial(parse_json, body), n, repeats)
        whole = timed(partial(_inspect, in_plan, body), n, repeats)
        print(
            f"  {label:>6} ({len(body):>6} B, {n} iterations): parse_json {parse * 1e6:9.1f}"
            f"  parse+inspect {whole * 1e6:9.1f}  ({len(body) / whole / 1e6:.1f} MB/s)"
        )

    stream = sse_stream(1000)
    chunks = [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)]
    single = one_event_chunk()
    redacted = SseTransformer(out_plan).feed(stream, True)
    assert b"jane.doe@example.com" not in redacted.replace(b'"', b""), "email not masked"

    def whole_stream(plan: OutputPlan) -> Callable[[], object]:
        def run() -> None:
            transformer = SseTransformer(plan)
            for chunk in chunks:
                transformer.feed(chunk, False)
            transformer.feed(b"", True)

        return run

    def passthrough() -> None:
        out = bytearray()
        for chunk in chunks:
            out += chunk

    stream_n = max(iterations // 100, 5)
    print(
        f"(b/c) SSE stream: {len(stream)} B of 4-character deltas in {len(chunks)} chunks of "
        f"{CHUNK} B ({stream_n} streams per repeat)"
    )
    per_chunk = {}
    for label, fn in (
        ("redact (bench-respond.yaml)", whole_stream(out_plan)),
        ("SseTransformer, no redact", whole_stream(plain_plan)),
        ("plain pass-through (bytes)", passthrough),
    ):
        per_chunk[label] = timed(fn, stream_n, repeats) / len(chunks)
        print(f"  {label:<28} {per_chunk[label] * 1e6:8.2f} µs per chunk")

    print(
        f"(b/c) one {CHUNK}-byte chunk holding one event, fed repeatedly ({iterations} per repeat)"
    )
    for label, plan in (
        ("redact (bench-respond.yaml)", out_plan),
        ("SseTransformer, no redact", plain_plan),
    ):
        transformer = SseTransformer(plan)
        cost = timed(partial(transformer.feed, single, False), iterations, repeats)
        print(f"  {label:<28} {cost * 1e6:8.2f} µs per chunk")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
