"""The sinkserve engine: StreamingLLM session slots with in-flight batching.

The public API is `sinkserve.engine.engine.Engine`; the data that crosses it lives in
`sinkserve.engine.types`. This package imports nothing eagerly, so the torch-free parts
(`scheduler`, `slots`, `types`) stay importable without torch.
"""
