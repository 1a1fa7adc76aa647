"""edsft: label-efficient SFT through experimental design, on Ray."""

__version__ = "0.1.0"
