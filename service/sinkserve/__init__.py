"""sinkserve: endless multi-round LLM conversations with StreamingLLM attention sinks."""

__version__ = "0.1.0"
