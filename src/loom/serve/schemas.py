"""Request bodies at the HTTP edge (pydantic). Unknown fields are refused by name, so a
client relying on a parameter Loom does not implement hears about it instead of being ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from loom.conversations.io import MAX_CONTEXT_FILES, ContextDocument, ConversationDocument

# OpenAI allows 4 stop sequences; long or many stops would be matched on every token of the
# shared engine thread, so both are bounded.
StopString = Annotated[str, Field(min_length=1, max_length=256)]
StopList = Annotated[list[StopString], Field(max_length=4)]
Seed = Annotated[int, Field(ge=0, le=2**62)]
# As vLLM does, a temperature under 1e-5 is greedy decoding: dividing logits by 1e-300 makes
# them inf, and inf - inf the NaN that fails sampling.
SAMPLING_EPS = 1e-5
Temperature = Annotated[float, Field(ge=0, le=2), AfterValidator(lambda t: 0.0 if t < SAMPLING_EPS else t)]


def _not_a_path(value: str) -> str:
    # The registry refuses paths too, but parsing one first expands "~user" (an unknown user is
    # a RuntimeError): a name from a request must never reach the filesystem at all.
    if value.startswith(("/", "./", "../", "~", "\\")) or value in (".", ".."):
        raise ValueError(
            f"{value[:64]!r} is a path; HTTP requests name only the base, an agent or a store adapter "
            "(name or name@version): see GET /v1/models"
        )
    return value


ModelName = Annotated[str, AfterValidator(_not_a_path)]
# Logits are divided or multiplied by it: 1e-300 or 1e300 overflow them the same way.
RepetitionPenalty = Annotated[float, Field(ge=0.01, le=100)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str = "response"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(_Body):
    """The sampling parameters shared by chat and text completions (OpenAI + vLLM extensions)."""

    model: ModelName | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: Temperature | None = None
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    n: int = Field(default=1, ge=1, le=16)
    stop: StopString | StopList | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=0, le=0)  # accepted only as 0: not implemented
    frequency_penalty: float | None = Field(default=None, ge=0, le=0)
    repetition_penalty: RepetitionPenalty | None = None
    ignore_eos: bool = False
    user: str | None = None

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    response_format: ResponseFormat | None = None
    logprobs: Literal[False] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: None = None


class GenerateRequest(_Body):
    prompt: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    adapter: ModelName | None = None
    agent: ModelName | None = None
    temperature: Temperature = 0.0
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: StopList = Field(default_factory=list)
    seed: Seed | None = None


SessionId = Annotated[str, Field(max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]


class ChatRequest(_Body):
    """One message of a /chat session. Without ``session_id`` a new session starts, talking to
    ``agent`` or ``adapter`` (kept for the session) with ``context_files`` (documents sent by
    value, kept for the session); with it, the session continues."""

    message: str = Field(min_length=1)
    context: str | None = None  # this turn only, not kept
    session_id: SessionId | None = None
    agent: ModelName | None = None
    adapter: ModelName | None = None
    context_files: Annotated[list[ContextDocument], Field(max_length=MAX_CONTEXT_FILES)] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: Temperature = 0.0


class ConversationImport(ConversationDocument):
    """POST /conversation/import: an exported document (loom.conversations.io); it gets a new id."""

    model: ModelName | None = Field(default=None, max_length=256)


class ConversationMessage(BaseModel):
    role: str
    content: str
    time: float
    incomplete: bool = False  # an answer cut off mid-stream: the text it had reached


class Conversation(BaseModel):
    """GET /conversation."""

    session_id: str
    model: str | None
    context_files: list[str]  # their names; GET /conversation/export has their text
    messages: list[ConversationMessage]


class ConversationSummary(BaseModel):
    session_id: str
    model: str | None
    created: float
    updated: float
    messages: int
    preview: str  # the start of the first kept message (normally the first question)


class ConversationList(BaseModel):
    """GET /conversations: the caller's sessions, most recently updated first."""

    sessions: list[ConversationSummary]


class ConversationDeleted(BaseModel):
    session_id: str
    deleted: bool


class ConversationImported(BaseModel):
    session_id: str
    messages: int  # kept
    dropped_messages: int  # the oldest, beyond the server's --max-session-messages


class PoolCreate(_Body):
    agent: ModelName | None = None
    base: ModelName | None = None
    adapter: ModelName | None = None
    warm_size: int = Field(default=1, ge=0)


class PoolSwap(_Body):
    version: Annotated[ModelName, Field(min_length=1)]


class LoadLoraRequest(_Body):
    lora_name: str = Field(min_length=1)
    lora_path: Annotated[ModelName, Field(min_length=1)]
    load_inplace: bool = False


class UnloadLoraRequest(_Body):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


class AgentRunRequest(_Body):
    """One payload (``input``) or a batch (``inputs``) for an agent."""

    input: dict[str, Any] | None = None
    inputs: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=256)] | None = None
