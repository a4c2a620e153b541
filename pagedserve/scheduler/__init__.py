"""Scheduling: sequence state, the global block manager, the policy and EngineCore."""
