"""tokenforge: an LLM inference engine with continuous batching over a paged KV cache."""

from tokenforge.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name):
    # The engine pulls in the model code; import it only when asked for, so light users stay light.
    if name == "LLM":
        from tokenforge.llm import LLM

        return LLM
    raise AttributeError(f"module 'tokenforge' has no attribute {name!r}")
