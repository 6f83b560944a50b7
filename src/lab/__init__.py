"""updatelab: a test lab that drives the real MeshAgent through self-updates."""

__version__ = "0.1.0"
