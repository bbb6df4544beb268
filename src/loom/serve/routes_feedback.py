"""``POST /v1/feedback``: a rating (and optionally the right answer) on one logged response.

Body: ``{"response_id": ..., "rating": -1 | 0 | 1, "corrected_answer"?: text or JSON, "comment"?: ...}``.
The rating scale is -1 (bad), 0 (neutral), 1 (good). The feedback goes into the server's request
log (table ``feedback``), from where ``loom feedback export`` turns corrections into training rows.
"""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from loom.serve.auth import require_key
from loom.serve.errors import APIError
from loom.serve.requestlog import RATINGS, RESPONSE_ID_HEADER, Feedback
from loom.serve.stamp import request_log_of

router = APIRouter()


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    response_id: str = Field(min_length=1, max_length=200)
    rating: int
    corrected_answer: str | dict[str, Any] | list[Any] | None = None
    comment: str | None = Field(default=None, max_length=10_000)

    @field_validator("rating", mode="before")
    @classmethod
    def _scale(cls, v: Any) -> Any:
        if type(v) is not int or v not in RATINGS:  # a bool is an int to Python, not a rating
            raise PydanticCustomError(
                "rating", "give -1 (bad), 0 (neutral) or 1 (good); got {got}", {"got": repr(v)[:40]}
            )
        return v

    @field_validator("corrected_answer")
    @classmethod
    def _not_empty(cls, v: Any) -> Any:
        if v is not None and (v == "" or (isinstance(v, str) and not v.strip())):
            raise PydanticCustomError("empty", "is empty; omit it, or give the right answer")
        return v


@router.post("/v1/feedback", dependencies=[Depends(require_key)])
async def post_feedback(body: FeedbackRequest, request: Request) -> dict[str, Any]:
    log = request_log_of(request)
    if log is None:
        # a 404, not a 5xx: this server cannot know the response, and retrying will not help
        raise APIError(
            404,
            f"no response {body.response_id!r}: this server keeps no request log (started with "
            "--request-log off), so feedback cannot be tied to a response; restart it with "
            "--request-log PATH",
            "not_found_error",
            "request_log_off",
            "response_id",
        )
    feedback = Feedback(body.response_id, body.rating, body.corrected_answer, body.comment)
    stored = await anyio.to_thread.run_sync(log.add_feedback, feedback)  # SQLite: off the loop
    if not stored:
        raise APIError(
            404,
            f"no response {body.response_id!r} in this server's request log; give the id from the "
            f"{RESPONSE_ID_HEADER} header (the body's id or response_id). Only the newest "
            f"{log.retention} responses are kept (and those with feedback)",
            "not_found_error",
            "response_not_found",
            "response_id",
        )
    return {
        "object": "feedback",
        "id": feedback.feedback_id,
        "response_id": feedback.response_id,
        "rating": feedback.rating,
        "stored": True,
    }
