"""ekmesh: Mixture-of-Experts language models served on a peer-to-peer mesh of ordinary machines."""

__version__ = "0.1.0"
