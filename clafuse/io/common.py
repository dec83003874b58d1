"""Names and helpers the checkpoint reader, the lazy reader and the writer share.

Kept apart so that none of those modules imports another just for a constant (no import circle).
"""

from __future__ import annotations

import torch

SAFETENSORS_EXTS = (".safetensors",)
TORCH_EXTS = (".pt", ".pth", ".bin", ".ckpt")
INDEX_SUFFIX = ".safetensors.index.json"
DDP_PREFIX = "module."  # what DataParallel / DistributedDataParallel put before every key

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def one_line(exc: BaseException) -> str:
    """The first sentence of an exception's message on one line, at most 200 characters."""
    text = " ".join(str(exc).split()).split(". ")[0]
    if len(text) > 200:
        text = text[:197] + "..."
    return text or type(exc).__name__
