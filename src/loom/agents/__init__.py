"""Agents: agent map, JSON agents, citations, conversations, fallbacks."""
