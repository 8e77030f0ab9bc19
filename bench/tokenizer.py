"""World tokenizer benchmark: ours vs the `rwkv` reference vs pyrwkv-tokenizer (Rust).

Same as `python -m tokenizer bench`; the code lives in tokenizer/benchmark.py so the CLI works
from an installed package. Usage: `python bench/tokenizer.py [--mb 12] [--out bench/results/tokenizer.json]`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
