"""The RWKV World tokenizer: greedy longest match over UTF-8 bytes (vocab rwkv_vocab_v20230424)."""

from tokenizer.vocab import VOCAB_PATH, VOCAB_SHA256, VocabError
from tokenizer.world import TokenizerConfig, WorldTokenizer

__all__ = ["VOCAB_PATH", "VOCAB_SHA256", "TokenizerConfig", "VocabError", "WorldTokenizer"]
