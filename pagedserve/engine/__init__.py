"""The engine layer: the step loop (EngineCore), the async API over it
(AsyncLLMEngine), and the model resolution both need."""
