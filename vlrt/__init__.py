"""vlrt: streaming video loopback renderer."""
__version__ = "0.1.0"
