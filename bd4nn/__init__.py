"""bd4nn: a benchmark of backdoor-infected CNNs with neuron-level ground truth."""

__version__ = "0.1.0"
