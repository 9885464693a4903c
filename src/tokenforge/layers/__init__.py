"""Model building blocks shared by every architecture.

Importing the package registers the ggml block formats' layers with the linear factory."""

from tokenforge.layers import quant_linear  # noqa: F401
