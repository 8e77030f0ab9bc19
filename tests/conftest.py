"""Session-wide test set-up.

On a machine without CUDA the Triton kernels can only run in Triton's interpreter, and
TRITON_INTERPRET is read when triton is first imported: set it here, before any test module
(or the code it imports) loads triton.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
