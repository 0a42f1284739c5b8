"""jaxslim: composable model compression for JAX."""

from jaxslim import prune, structures
from jaxslim.structures import NM, Blocks, Channels, Unstructured

__version__ = "0.1.0"

__all__ = ["prune", "structures", "Unstructured", "Channels", "NM", "Blocks"]
