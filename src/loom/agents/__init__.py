"""Agents: a structured input, run through an adapter with exactly the prompt it was trained with,
returning validated output, the version that produced it, citations, and a safe fallback.

    from loom.agents import load_agents
    agents = load_agents("AGENT_MODEL_MAP.json", engine=engine)
    agents["intent"].run({"text": "play jazz"}).output   # {"intent": "PlayMusic"}
"""

from loom.agents.agent import Agent
from loom.agents.loader import Agents, BoundAgent, load_agents
from loom.agents.result import AgentFailed, AgentResult, Answered
from loom.agents.spec import AgentEntry, AgentMapFile, load_map_file

__all__ = [
    "Agent",
    "AgentEntry",
    "AgentFailed",
    "AgentMapFile",
    "AgentResult",
    "Agents",
    "Answered",
    "BoundAgent",
    "load_agents",
    "load_map_file",
]
