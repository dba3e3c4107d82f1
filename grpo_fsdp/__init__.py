"""grpo-fsdp: GRPO, SFT and DPO post-training on PyTorch FSDP2 (see README.md and DESIGN.md)."""

import logging as _logging


class _KnownImportNoise(_logging.Filter):
    """Drops two log lines that every model build prints once torchao (the NF4 base, quant.py) is installed,
    because transformers imports it for its quantizer registry: torchao's 'Failed to load <CUDA-only
    extension>.so' on a CPU torch, and torch's deprecation note on torchao's enums. Nothing else is hidden."""

    def filter(self, record: _logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("Failed to load ") and ".so" in msg) and "is an Enum subclass and is now natively" not in msg


_logging.getLogger("torchao").addFilter(_KnownImportNoise())
_logging.getLogger("torch.utils._pytree").addFilter(_KnownImportNoise())
