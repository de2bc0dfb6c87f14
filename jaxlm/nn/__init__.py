"""Layers every model family is assembled from: parameters with logical axis names, norms, RoPE,
MLPs, Mixture of Experts, attention (the `attend` contract and the projection module), THE block,
and the stack runner. Each layer takes its own small frozen config, never the run's."""
