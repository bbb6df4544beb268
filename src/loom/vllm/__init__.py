"""vLLM as a serving backend: ``loom serve --backend vllm`` runs vLLM's OpenAI server as a
supervised child process and keeps Loom's server in front of it as the gateway."""
