"""The sync client. Each method names one route; :mod:`loom.client.calls` builds the request and
:mod:`loom.client.dispatch` decides where it may go when an endpoint fails."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
from typing_extensions import Unpack

from loom.client import calls
from loom.client.base import BaseClient, answered, failure_body
from loom.client.calls import Call, CallOptions, ChatArgs, CompletionArgs, GenerateArgs
from loom.client.dispatch import Dispatch, Wait, status_verdict, transport_verdict
from loom.client.results import (
    AdminReply,
    AgentInfo,
    AgentRun,
    Answer,
    ChatReply,
    Conversation,
    ConversationSummary,
    Deleted,
    FeedbackReceipt,
    Generation,
    Health,
    Info,
    ModelCard,
    Pool,
)
from loom.client.streams import Stream, decoder_for

if TYPE_CHECKING:
    import openai

T = TypeVar("T")


class Client(BaseClient):
    """``Client(["http://desktop.lan:8000", "https://vps.example.org"], api_key=...)``: calls go to
    the first endpoint that is up and fail over to the next (see :class:`BaseClient` for options)."""

    def _open(self) -> None:
        self._http = httpx.Client()
        self.agents, self.pools, self.admin = Agents(self), Pools(self), Admin(self)

    # ------------------------------------------------------------- the failover loop
    def _send(self, call: Call[Any]) -> tuple[httpx.Response, str]:
        """The first answer some endpoint gives (a stream's body not yet read)."""
        dispatch = self._dispatch(call)
        while (step := dispatch.next()) is not None:
            if isinstance(step, Wait):
                time.sleep(step.seconds)
                continue
            if step.probe and not self._probe(dispatch, step.url):
                continue
            try:
                response = self._http.send(
                    self._request(self._http, step.url, call), stream=call.stream is not None
                )
                if not answered(response, call):
                    response.read()
                    response.close()
            except httpx.TransportError as exc:
                dispatch.failed(transport_verdict(step.url, exc))
                continue
            if answered(response, call):
                dispatch.succeeded(step.url)
                return response, step.url
            dispatch.failed(
                status_verdict(step.url, response.status_code, failure_body(response), response.headers)
            )
        raise dispatch.exhausted()

    def _probe(self, dispatch: Dispatch, url: str) -> bool:
        try:
            response = self._http.send(self._probe_request(self._http, url))
        except httpx.TransportError as exc:
            dispatch.probe_failed(url, type(exc).__name__)
            return False
        if response.status_code != 200:
            dispatch.probe_failed(url, f"{response.status_code} {response.text[:100]}")
            return False
        dispatch.succeeded(url)
        return True

    def _call(self, call: Call[T]) -> T:
        response, url = self._send(call)
        result: T = self._done(call, response, url)
        return result

    def _stream(self, call: Call[Any]) -> Stream[Any]:
        response, url = self._send(call)
        assert call.stream is not None
        on_done = (lambda r: self.sessions.remember(r.session_id, url)) if call.stream == "chat" else None
        return Stream(response, decoder_for(call.stream, url, response.headers), on_done)

    # ------------------------------------------------------------- generation
    def generate(self, prompt: str, **kw: Unpack[GenerateArgs]) -> Generation:
        """``POST /generate``: text for ``prompt`` from the base, an ``adapter`` or an ``agent``."""
        return self._call(calls.generate(prompt, **kw))

    def generate_stream(self, prompt: str, **kw: Unpack[CompletionArgs]) -> Stream[Generation]:
        """Text deltas as they are generated; ``.result`` afterwards (usage, model_version)."""
        return self._stream(calls.generate_stream(prompt, **kw))

    def chat(self, message: str, **kw: Unpack[ChatArgs]) -> ChatReply:
        """``POST /chat``; pass the reply's ``session_id`` back to continue the conversation."""
        return self._call(calls.chat(message, **kw))

    def chat_stream(self, message: str, **kw: Unpack[ChatArgs]) -> Stream[ChatReply]:
        return self._stream(calls.chat_stream(message, **kw))

    # ------------------------------------------------------------- conversations
    def conversation(self, session_id: str, **kw: Unpack[CallOptions]) -> Conversation:
        return self._call(calls.conversation(session_id, **kw))

    def delete_conversation(self, session_id: str, **kw: Unpack[CallOptions]) -> bool:
        return self._call(calls.delete_conversation(session_id, **kw))

    def conversations(self, **kw: Unpack[CallOptions]) -> list[ConversationSummary]:
        return self._call(calls.conversations(**kw))

    def export_conversation(self, session_id: str, **kw: Unpack[CallOptions]) -> Conversation:
        return self._call(calls.export_conversation(session_id, **kw))

    def import_conversation(
        self, conv: Conversation | dict[str, Any], **kw: Unpack[CallOptions]
    ) -> Conversation:
        return self._call(calls.import_conversation(conv, **kw))

    # ------------------------------------------------------------- the server
    def models(self, **kw: Unpack[CallOptions]) -> list[ModelCard]:
        return self._call(calls.models(**kw))

    def health(self, **kw: Unpack[CallOptions]) -> Health:
        """The first healthy endpoint's health; with ``endpoint=`` that one's, even if loading."""
        return self._call(calls.health(**kw))

    def info(self, **kw: Unpack[CallOptions]) -> Info:
        return self._call(calls.info(**kw))

    def feedback(
        self,
        response: str | Answer | AgentRun,
        rating: int,
        corrected_answer: Any = None,
        comment: str | None = None,
        **kw: Unpack[CallOptions],
    ) -> FeedbackReceipt:
        """A rating (-1, 0, 1) on a result (or its response_id), sent to the server that answered."""
        return self._call(calls.feedback(response, rating, corrected_answer, comment, **kw))

    def openai(self, **kwargs: Any) -> openai.OpenAI:
        """An ``openai.OpenAI`` for the best endpoint now (``<endpoint>/v1``, this client's key)."""
        import openai

        url = self.health().endpoint
        return openai.OpenAI(
            base_url=f"{url}/v1", api_key=self.api_key or "none", timeout=self.timeout, **kwargs
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Agents:
    def __init__(self, client: Client) -> None:
        self._client = client

    def run(self, name: str, payload: dict[str, Any], **kw: Unpack[CallOptions]) -> AgentRun:
        """One payload through agent ``name``; a chain that failed entirely is a LoomAPIError (502)."""
        return self._client._call(calls.agent_run(name, payload, **kw))

    def batch(self, name: str, payloads: list[dict[str, Any]], **kw: Unpack[CallOptions]) -> list[AgentRun]:
        """Payloads batched through the engine together; a failed one carries ``error``."""
        return self._client._call(calls.agent_batch(name, payloads, **kw))

    def list(self, **kw: Unpack[CallOptions]) -> list[AgentInfo]:
        return self._client._call(calls.agents(**kw))

    def get(self, name: str, **kw: Unpack[CallOptions]) -> AgentInfo:
        return self._client._call(calls.agent(name, **kw))


class Pools:
    """Warm worker pools. A pool lives on one server: pass ``endpoint=`` to pick which."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self, **kw: Unpack[CallOptions]) -> list[Pool]:
        return self._client._call(calls.pools(**kw))

    def create(
        self,
        agent: str | None = None,
        adapter: str | None = None,
        base: str | None = None,
        warm_size: int = 1,
        **kw: Unpack[CallOptions],
    ) -> Pool:
        return self._client._call(calls.pool_create(agent, adapter, base, warm_size, **kw))

    def swap(self, pool_id: str, version: str, **kw: Unpack[CallOptions]) -> Pool:
        return self._client._call(calls.pool_swap(pool_id, version, **kw))

    def delete(self, pool_id: str, **kw: Unpack[CallOptions]) -> Deleted:
        return self._client._call(calls.pool_delete(pool_id, **kw))


class Admin:
    """Runtime adapter loading (vLLM's routes), with the admin key."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def load_adapter(self, name: str, ref: str, **kw: Unpack[CallOptions]) -> AdminReply:
        return self._client._call(calls.load_adapter(name, ref, **kw))

    def unload_adapter(self, name: str, **kw: Unpack[CallOptions]) -> AdminReply:
        return self._client._call(calls.unload_adapter(name, **kw))
