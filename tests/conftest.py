"""Session-wide test set-up and the shared tokenizer fixtures.

On a machine without CUDA the Triton kernels can only run in Triton's interpreter, and
TRITON_INTERPRET is read when triton is first imported: set it here, before any test module
(or the code it imports) loads triton.

The rwkv package (the oracle) turns TF32 matmuls on for the whole process when `rwkv.model` is imported
and when an RWKV model is built; every test starts from the flags as they were before that.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_TF32_FLAGS = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)


@pytest.fixture(autouse=True)
def _restore_tf32_flags():
    """Each test sees the process's own TF32 settings, whatever an earlier import or test set."""
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = _TF32_FLAGS
    yield


@pytest.fixture(scope="session")
def tok():
    """Our World tokenizer (tables built once per session)."""
    from tokenizer import WorldTokenizer

    return WorldTokenizer()


@pytest.fixture(scope="session")
def ref():
    """The oracle: the rwkv package's TRIE_TOKENIZER over the same vocab file."""
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from tokenizer import VOCAB_PATH

    return TRIE_TOKENIZER(str(VOCAB_PATH))
