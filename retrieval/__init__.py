"""cxr-retrieval: cross-modal chest X-ray retrieval and retrieval-augmented report generation."""

__version__ = "0.1.0"
