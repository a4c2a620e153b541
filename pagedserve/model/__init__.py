"""The model: where it comes from, what it is, and the memory it takes.

Locating and reading a model (a directory, a hub snapshot, a GGUF file, the
embedded or a random model), the record the engine resolves once
(`ModelInfo`), its shape (`ModelShape`) and the rules every layer reads off
it: tensor-parallel divisibility, max_model_len, dtype, KV bytes, the KV
budget (rules.py). The engine, the workers, the simulated GPU and the
planner all take these rules from here, so they cannot drift apart.

Nothing here imports the engine, the worker or the cluster; importing this
package loads no torch (its modules that need torch load it themselves).
"""
