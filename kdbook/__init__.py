"""A literate replication of 'Does Knowledge Distillation Really Work?' (Stanton et al., NeurIPS 2021): KD losses, fidelity metrics and a fast distillation engine."""

__version__ = "0.1.0"
