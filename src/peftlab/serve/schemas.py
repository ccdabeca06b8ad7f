"""The wire format: pydantic request and response models, the error body, and each server error's HTTP status.

Every error is JSON ``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from peftlab.errors import PeftlabError
from peftlab.serve.errors import (
    AdapterUnavailableError,
    InvalidAdapterError,
    InvalidAdapterNameError,
    NotReadyError,
    TextError,
    UnknownAdapterError,
    WrongTaskError,
)


class ApiError(Exception):
    """An error with its HTTP status and a short machine-readable code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


# -- request and response models

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown key is a typo, not something to ignore


class ClassifyItem(_Strict):
    """One text for one adapter."""

    adapter: str = Field(description="Adapter name (see GET /v1/adapters).", examples=["lora"])
    text: str = Field(description="Text to classify.", examples=["a wonderful film"])


class ClassifyRequest(_Strict):
    """Either ``adapter`` + ``texts`` (one adapter), or ``items`` (each names its adapter)."""

    adapter: str | None = Field(None, description="Adapter for every text in `texts`.", examples=["lora"])
    texts: list[str] | None = Field(None, description="Texts to classify with `adapter`.",
                                    examples=[["a wonderful film", "dull and messy"]])
    items: list[ClassifyItem] | None = Field(None, description="Mixed batch: each item names its adapter.")

    @model_validator(mode="after")
    def _one_form(self) -> "ClassifyRequest":
        if self.items is not None and (self.adapter is not None or self.texts is not None):
            raise ValueError("give either `items` or `adapter` + `texts`, not both")
        if self.items is None and (self.adapter is None or self.texts is None):
            raise ValueError("give `adapter` and `texts`, or `items` (a list of {adapter, text})")
        return self

    def rows(self) -> list[tuple[str, str]]:
        if self.items is not None:
            return [(item.adapter, item.text) for item in self.items]
        return [(self.adapter or "", text) for text in self.texts or []]


class Classification(BaseModel):
    """One text's result with its adapter's own class names."""

    adapter: str
    text: str
    label: str
    score: float = Field(description="Probability of `label`.")
    probabilities: dict[str, float] = Field(description="Every class's probability (fp32 softmax).")


class ClassifyResponse(BaseModel):
    results: list[Classification] = Field(description="One per text, in request order.")


class GenerateRequest(_Strict):
    """Greedy continuations from one causal-LM adapter."""

    adapter: str = Field(examples=["lora"])
    prompts: list[str] = Field(examples=[["Write a haiku about autumn."]])
    max_new_tokens: int = Field(32, ge=1, description="Tokens to generate per prompt.")


class Generation(BaseModel):
    adapter: str
    prompt: str
    text: str = Field(description="The generated continuation (without the prompt).")


class GenerateResponse(BaseModel):
    results: list[Generation]


class AdapterInfo(BaseModel):
    name: str
    method: str
    task: str
    labels: list[str]
    size_bytes: int = Field(description="Adapter weights on disk (tokenizer files excluded).")
    loaded: bool
    error: str | None = Field(None, description="Why it failed to load, if it did.")


class AdaptersResponse(BaseModel):
    adapters: list[AdapterInfo]


class Health(BaseModel):
    status: str
    base: str
    adapters: int
    loaded: int
    failed: int
    forward_passes: int
    batches: int


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in ((400, "Invalid adapter name or malformed JSON"),
                         (401, "Missing or wrong API key (only with --api-key)"), (404, "Unknown adapter"),
                         (413, "Too many texts or body too large"),
                         (422, "Invalid request or text, or an adapter whose files are unusable"),
                         (500, "Adapter failed to load, or internal error"), (503, "Not ready"),
                         (504, "No result within the request timeout"))
}


def error_response(status: int, code: str, message: str) -> JSONResponse:
    """The JSON reply ``{"error": {"code": ..., "message": ...}}`` with ``status``."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def as_api_error(exc: PeftlabError) -> ApiError:
    """The HTTP form of a server error (:mod:`peftlab.serve.errors`); any other PeftlabError is a 400."""
    for kind, status, code in ((InvalidAdapterNameError, 400, "invalid_adapter_name"),
                               (UnknownAdapterError, 404, "adapter_not_found"),
                               (WrongTaskError, 400, "wrong_task"),
                               (InvalidAdapterError, 422, "adapter_invalid"),  # before its base class
                               (AdapterUnavailableError, 500, "adapter_failed"),
                               (TextError, 422, "text_failed"),
                               (NotReadyError, 503, "not_ready")):
        if isinstance(exc, kind):
            return ApiError(status, code, str(exc))
    return ApiError(400, "bad_request", str(exc))
