"""An input the model must not receive, said once in a shape every check shares."""

from __future__ import annotations

from dataclasses import dataclass

# A message never quotes more of the client's input than this (error bodies must not echo
# large or sensitive input back).
MAX_QUOTED_CHARS = 40


@dataclass(frozen=True, slots=True)
class Violation:
    """Why a request body is refused: HTTP status, a stable code, the JSON field, a reason.

    `field` is a JSON path in the request body (`messages[2].content[0].image_url`), or "" for
    the body as a whole. `message` is shown to the client: it explains, and never carries more
    than MAX_QUOTED_CHARS of the client's own input.
    """

    status: int
    code: str
    field: str
    message: str


def quoted(value: object) -> str:
    """A short, safe rendering of a client value for an error message."""
    text = repr(value)
    return text if len(text) <= MAX_QUOTED_CHARS else text[: MAX_QUOTED_CHARS - 3] + "..."
