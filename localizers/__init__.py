"""Neuron localizers (see issue 4)."""
