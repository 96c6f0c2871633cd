"""User-facing errors: anything a user can cause is one of these, shown as one line (CLI) or a 4xx (server).

Internal bugs stay ordinary exceptions so they keep their tracebacks.
"""

from __future__ import annotations

from collections.abc import Iterable


class KVEngineError(Exception):
    """Base of every error a user can cause. `param` names the offending field when there is one."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ModelLoadError(KVEngineError):
    """A model path that does not exist, a corrupt file, an unsupported architecture."""

    code_default = "model_load_error"


class ConfigError(KVEngineError):
    """An engine or model configuration that cannot work (unknown dtype, missing config field...)."""


class RequestError(KVEngineError):
    """A bad request: prompt too long, max_tokens below 1, bad sampling values."""


class ModelNotFoundError(KVEngineError):
    status_code = 404
    error_type = "not_found_error"


class AuthenticationError(KVEngineError):
    status_code = 401
    error_type = "authentication_error"


class OverloadedError(KVEngineError):
    status_code = 429
    error_type = "rate_limit_error"


def first_outside_vocab(ids: Iterable[int], vocab_size: int) -> int | None:
    """The first of `ids` outside [0, vocab_size), or None."""
    return next((t for t in ids if not 0 <= t < vocab_size), None)


def check_token_ids(ids: Iterable[int], vocab_size: int, param: str, what: str = "token ids") -> None:
    """Token ids a user sent must lie in [0, vocab_size); else a RequestError naming the field `param`."""
    if first_outside_vocab(ids, vocab_size) is not None:
        raise RequestError(f"{what} must be in [0, {vocab_size})", param=param)
