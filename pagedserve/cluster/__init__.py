"""Ray Serve cluster: OpenAI-compatible ingress, LLMServer replicas, wire protocol."""
