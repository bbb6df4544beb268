"""Agents: task-specialised adapters with their prompts, outputs and citations."""
