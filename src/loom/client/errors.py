"""What the SDK raises: every error names the endpoint, what went wrong and what to do."""

from __future__ import annotations

from dataclasses import dataclass

from loom.errors import LoomError


class LoomClientError(LoomError):
    """Base class of the SDK's errors."""


class LoomAPIError(LoomClientError):
    """A Loom server answered with an error (OpenAI's shape: ``{"error": {message, type, code}}``)."""

    def __init__(
        self,
        status: int,
        message: str,
        endpoint: str,
        code: str | None = None,
        type_: str | None = None,
        param: str | None = None,
    ) -> None:
        self.status, self.message, self.endpoint = status, message, endpoint
        self.code, self.type, self.param = code, type_, param
        super().__init__(f"{endpoint} answered {status}{f' ({code})' if code else ''}: {message}")


class LoomConnectionError(LoomClientError):
    """No usable answer came back from ``endpoint`` (refused, reset, timed out, cut mid-stream).
    ``may_have_run`` says whether the server may have received the whole request."""

    def __init__(self, endpoint: str, message: str, may_have_run: bool) -> None:
        self.endpoint, self.message, self.may_have_run = endpoint, message, may_have_run
        super().__init__(f"{endpoint}: {message}")


@dataclass(frozen=True)
class EndpointFailure:
    """Why one endpoint did not answer one call."""

    endpoint: str
    reason: str
    status: int | None = None  # the HTTP status, when the server answered at all


class AllEndpointsFailed(LoomClientError):
    """Every endpoint was tried (with the retries the policy allows) and none answered."""

    def __init__(self, failures: list[EndpointFailure], hint: str = "") -> None:
        self.failures = failures
        lines = "\n".join(f"  - {f.endpoint}: {f.reason}" for f in failures) or "  (no endpoint was tried)"
        fix = hint or "start a server (loom serve), check the URLs, or raise the timeout"
        super().__init__(f"no Loom endpoint answered:\n{lines}\n{fix}")
