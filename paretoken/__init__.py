"""paretoken: search for the best token-compression plans of Vision Transformers."""
from paretoken.errors import ParetokenError

__all__ = ["ParetokenError"]
