"""The ``jaxslim demo`` report: MNIST-1D models compressed by each part of jaxslim."""
