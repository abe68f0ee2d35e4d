"""ip2p: train and run instruction-following image editors in the manner of InstructPix2Pix."""

import logging as _logging

__version__ = "0.1.0"


class _TorchvisionFallbackFilter(_logging.Filter):
    """Drops transformers' notice that an image processor falls back to its PIL version because torchvision is not
    installed. ip2p does not use torchvision (it is not in requirements.txt) and the PIL version is the one it wants,
    so the notice, printed by every command that imports diffusers' pipelines, would only alarm users."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


_logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackFilter())
