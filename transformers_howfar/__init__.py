"""The Transformer and the ideas that take it further, in literate JAX."""
__version__ = "0.1.0"
