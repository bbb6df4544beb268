"""The async client: the same surface as :class:`loom.client.Client`, awaited."""

from __future__ import annotations

import asyncio
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
from loom.client.streams import AsyncStream, decoder_for

if TYPE_CHECKING:
    import openai

T = TypeVar("T")


class AsyncClient(BaseClient):
    """``AsyncClient([...], api_key=...)``: as :class:`loom.client.Client`, with ``await``."""

    def _open(self) -> None:
        self._http = httpx.AsyncClient()
        self.agents, self.pools, self.admin = AsyncAgents(self), AsyncPools(self), AsyncAdmin(self)

    # ------------------------------------------------------------- the failover loop
    async def _send(self, call: Call[Any]) -> tuple[httpx.Response, str]:
        dispatch = self._dispatch(call)
        while (step := dispatch.next()) is not None:
            if isinstance(step, Wait):
                await asyncio.sleep(step.seconds)
                continue
            if step.probe and not await self._probe(dispatch, step.url):
                continue
            try:
                request = self._request(self._http, step.url, call)
                response = await self._http.send(request, stream=call.stream is not None)
                if not answered(response, call):
                    await response.aread()
                    await response.aclose()
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

    async def _probe(self, dispatch: Dispatch, url: str) -> bool:
        try:
            response = await self._http.send(self._probe_request(self._http, url))
        except httpx.TransportError as exc:
            dispatch.probe_failed(url, type(exc).__name__)
            return False
        if response.status_code != 200:
            dispatch.probe_failed(url, f"{response.status_code} {response.text[:100]}")
            return False
        dispatch.succeeded(url)
        return True

    async def _call(self, call: Call[T]) -> T:
        response, url = await self._send(call)
        result: T = self._done(call, response, url)
        return result

    async def _stream(self, call: Call[Any]) -> AsyncStream[Any]:
        response, url = await self._send(call)
        assert call.stream is not None
        on_done = (lambda r: self.sessions.remember(r.session_id, url)) if call.stream == "chat" else None
        return AsyncStream(response, decoder_for(call.stream, url, response.headers), on_done)

    # ------------------------------------------------------------- generation
    async def generate(self, prompt: str, **kw: Unpack[GenerateArgs]) -> Generation:
        return await self._call(calls.generate(prompt, **kw))

    async def generate_stream(self, prompt: str, **kw: Unpack[CompletionArgs]) -> AsyncStream[Generation]:
        return await self._stream(calls.generate_stream(prompt, **kw))

    async def chat(self, message: str, **kw: Unpack[ChatArgs]) -> ChatReply:
        return await self._call(calls.chat(message, **kw))

    async def chat_stream(self, message: str, **kw: Unpack[ChatArgs]) -> AsyncStream[ChatReply]:
        return await self._stream(calls.chat_stream(message, **kw))

    # ------------------------------------------------------------- conversations
    async def conversation(self, session_id: str, **kw: Unpack[CallOptions]) -> Conversation:
        return await self._call(calls.conversation(session_id, **kw))

    async def delete_conversation(self, session_id: str, **kw: Unpack[CallOptions]) -> bool:
        return await self._call(calls.delete_conversation(session_id, **kw))

    async def conversations(self, **kw: Unpack[CallOptions]) -> list[ConversationSummary]:
        return await self._call(calls.conversations(**kw))

    async def export_conversation(self, session_id: str, **kw: Unpack[CallOptions]) -> Conversation:
        return await self._call(calls.export_conversation(session_id, **kw))

    async def import_conversation(
        self, conv: Conversation | dict[str, Any], **kw: Unpack[CallOptions]
    ) -> Conversation:
        return await self._call(calls.import_conversation(conv, **kw))

    # ------------------------------------------------------------- the server
    async def models(self, **kw: Unpack[CallOptions]) -> list[ModelCard]:
        return await self._call(calls.models(**kw))

    async def health(self, **kw: Unpack[CallOptions]) -> Health:
        return await self._call(calls.health(**kw))

    async def info(self, **kw: Unpack[CallOptions]) -> Info:
        return await self._call(calls.info(**kw))

    async def feedback(
        self,
        response: str | Answer | AgentRun,
        rating: int,
        corrected_answer: Any = None,
        comment: str | None = None,
        **kw: Unpack[CallOptions],
    ) -> FeedbackReceipt:
        return await self._call(calls.feedback(response, rating, corrected_answer, comment, **kw))

    async def openai(self, **kwargs: Any) -> openai.AsyncOpenAI:
        """An ``openai.AsyncOpenAI`` for the best endpoint now (``<endpoint>/v1``, this client's key)."""
        import openai

        url = (await self.health()).endpoint
        key = self.api_key or "none"
        return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, timeout=self.timeout, **kwargs)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncAgents:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def run(self, name: str, payload: dict[str, Any], **kw: Unpack[CallOptions]) -> AgentRun:
        return await self._client._call(calls.agent_run(name, payload, **kw))

    async def batch(
        self, name: str, payloads: list[dict[str, Any]], **kw: Unpack[CallOptions]
    ) -> list[AgentRun]:
        return await self._client._call(calls.agent_batch(name, payloads, **kw))

    async def list(self, **kw: Unpack[CallOptions]) -> list[AgentInfo]:
        return await self._client._call(calls.agents(**kw))

    async def get(self, name: str, **kw: Unpack[CallOptions]) -> AgentInfo:
        return await self._client._call(calls.agent(name, **kw))


class AsyncPools:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def list(self, **kw: Unpack[CallOptions]) -> list[Pool]:
        return await self._client._call(calls.pools(**kw))

    async def create(
        self,
        agent: str | None = None,
        adapter: str | None = None,
        base: str | None = None,
        warm_size: int = 1,
        **kw: Unpack[CallOptions],
    ) -> Pool:
        return await self._client._call(calls.pool_create(agent, adapter, base, warm_size, **kw))

    async def swap(self, pool_id: str, version: str, **kw: Unpack[CallOptions]) -> Pool:
        return await self._client._call(calls.pool_swap(pool_id, version, **kw))

    async def delete(self, pool_id: str, **kw: Unpack[CallOptions]) -> Deleted:
        return await self._client._call(calls.pool_delete(pool_id, **kw))


class AsyncAdmin:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def load_adapter(self, name: str, ref: str, **kw: Unpack[CallOptions]) -> AdminReply:
        return await self._client._call(calls.load_adapter(name, ref, **kw))

    async def unload_adapter(self, name: str, **kw: Unpack[CallOptions]) -> AdminReply:
        return await self._client._call(calls.unload_adapter(name, **kw))
