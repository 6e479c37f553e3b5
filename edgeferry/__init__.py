"""edgeferry: the command line and the demo that wire edge, gateway and firmware_sim together."""

__all__ = ["__version__"]

__version__ = "0.1.0"
