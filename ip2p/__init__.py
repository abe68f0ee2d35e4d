"""ip2p: train and run instruction-following image editors in the manner of InstructPix2Pix."""

__version__ = "0.1.0"
