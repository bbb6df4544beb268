"""``loom.client``: the Python SDK for Loom servers, with endpoint failover.

    from loom.client import Client

    client = Client(["http://desktop.lan:8000", "https://vps.example.org"], api_key="...")
    reply = client.chat("What's on my calendar?")
    again = client.chat("And tomorrow?", session_id=reply.session_id)
    intent = client.agents.run("intent", {"text": "play some jazz"})
    print(intent.output, intent.model_version, intent.endpoint)

Calls go to the first endpoint that is up and fail over when one refuses, hangs past the timeout
or is loading; a request that may already have run is not re-sent unless it is idempotent or the
call says ``retry_unsafe=True`` (:mod:`loom.client.dispatch`)."""

from loom.client.async_client import AsyncClient
from loom.client.client import Client
from loom.client.dispatch import RetryPolicy
from loom.client.endpoints import EndpointState
from loom.client.errors import (
    AllEndpointsFailed,
    EndpointFailure,
    LoomAPIError,
    LoomClientError,
    LoomConnectionError,
)
from loom.client.results import (
    AdminReply,
    AgentInfo,
    AgentRun,
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
    Usage,
)
from loom.client.streams import AsyncStream, Stream

__all__ = [
    "AdminReply",
    "AgentInfo",
    "AgentRun",
    "AllEndpointsFailed",
    "AsyncClient",
    "AsyncStream",
    "ChatReply",
    "Client",
    "Conversation",
    "ConversationSummary",
    "Deleted",
    "EndpointFailure",
    "EndpointState",
    "FeedbackReceipt",
    "Generation",
    "Health",
    "Info",
    "LoomAPIError",
    "LoomClientError",
    "LoomConnectionError",
    "ModelCard",
    "Pool",
    "RetryPolicy",
    "Stream",
    "Usage",
]
