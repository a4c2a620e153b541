"""The engine layer: the step loop (EngineCore) and the async API over it
(AsyncLLMEngine); the model it runs is resolved in pagedserve/model."""
