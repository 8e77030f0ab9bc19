"""Model architectures for the trainer (x070 first) and official-checkpoint loading."""
from .checkpoint import CheckpointError, load_official, official_shapes
from .rwkv7 import PRESETS, RWKV7, RWKV7Config, l2wrap

__all__ = ["RWKV7", "RWKV7Config", "PRESETS", "l2wrap", "load_official", "official_shapes", "CheckpointError"]
