"""What one request has produced so far, kept outside any one (prefill, decode) pair so the request can move to
another pair mid-stream; and which failures may move it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from services.contracts.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TandemError,
    Unavailable,
)
from services.gateway.textstream import TextStream


@dataclass(slots=True)
class Progress:
    """What a request has produced so far; it survives moving the request to another pair."""

    stream: TextStream
    deadline: float  # on time.perf_counter()
    generated: list[int] = field(default_factory=list)  # counted output tokens, in order (all sent or held back)
    times: list[float] = field(default_factory=list)  # seconds since received, one per generated token
    first_at: float | None = None  # seconds since received of the first event (TTFT)
    first_decode: float = 0.0
    pr: Any = None  # the prefill result of the pair that produced the first token (the TTFT split)
    attempts: int = 0
    decoding: bool = False  # the current pair is past its prefill
    stalled: str = ""  # the worker whose call just went silent for stall_s (no heartbeat / no token)
    outcome: str = "error"
    last_error: TandemError | None = None


def retryable(exc: TandemError, st: Progress, cancel: threading.Event) -> bool:
    """A worker-side failure another pair can make good (not the client's input, nor its deadline)."""
    if cancel.is_set() or time.perf_counter() >= st.deadline or st.outcome == "cancelled":
        return False
    if isinstance(exc, InvalidArgument):  # the client's input was checked at the edge; a bad KV push was not
        return exc.message.startswith("KV push to")
    return isinstance(exc, Unavailable | ResourceExhausted | NotFound | DeadlineExceeded)
