"""Token selection: the batch sampler and its message types."""

from tokenforge.sample.sampler import Sampler, SamplerOutput, SamplingState, TokenLogprobs

__all__ = ["Sampler", "SamplerOutput", "SamplingState", "TokenLogprobs"]
