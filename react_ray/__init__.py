"""react-ray: REACT (retrieval-augmented CLIP customization) on Ray, at LAION scale."""

__version__ = "0.1.0"
