"""dcwdist: long-context LM training with Dynamic Context Windows attention."""
__version__ = "0.1.0"
