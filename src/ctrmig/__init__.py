"""ctrmig: checkpoint running containers with CRIU and move them."""

__version__ = "0.1.0"
