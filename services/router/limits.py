"""What one OpenAI front end accepts (serve and router): body size, requests waiting for a first token.
Kept apart from app.py so the command-line parsers can offer the flags without importing FastAPI."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_request_body_bytes: int = 32 << 20  # larger bodies: 413
    max_pending_requests: int = 1024  # submitted, no first output yet; beyond: 503 + Retry-After


def add_limit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-request-body-bytes", type=int, default=Limits.max_request_body_bytes,
                   help="larger request bodies are refused with 413")
    p.add_argument("--max-pending-requests", type=int, default=Limits.max_pending_requests,
                   help="requests waiting for their first token beyond this are refused with 503 + Retry-After "
                        "(a request of more prompts than this alone: 400)")


def limits_of(args: argparse.Namespace) -> Limits:
    """The flags' limits; 0 or less is a start-up error (it would refuse every request, a batch "of
    more prompts than 0"), as --max-num-seqs 0 is. Called before the model loads."""
    from pdserve.common.config import ConfigError
    for flag, value in (("--max-request-body-bytes", args.max_request_body_bytes),
                        ("--max-pending-requests", args.max_pending_requests)):
        if value <= 0:
            raise ConfigError(f"{flag} must be positive, got {value}")
    return Limits(max_request_body_bytes=args.max_request_body_bytes, max_pending_requests=args.max_pending_requests)
