"""ParameterError: a request parameter is invalid (torch-free; the API layer makes it a 400)."""

from __future__ import annotations


class ParameterError(ValueError):
    """A request parameter is invalid. `param` names it (as in OpenAI's error body)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ParameterError(param, message)
