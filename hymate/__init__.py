"""HyMaTE: the model, selective-scan backends, EHR data, local training, metrics.

Knows nothing of Flower: a researcher can train HyMaTE with this package alone.
"""

__version__ = "0.1.0"
