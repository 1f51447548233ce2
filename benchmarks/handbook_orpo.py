"""The plain ORPO path: the alignment-handbook's `scripts/orpo.py` reduced like `handbook_sft.py` (the same steps,
with TRL's ORPOTrainer, which tokenizes the pairs in its __init__; `messages` dropped and pad = eos as scripts/orpo.py
does), launched with `accelerate launch --config_file recipes/accelerate_configs/zero3.yaml benchmarks/handbook_orpo.py RECIPE.yaml`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from handbook_sft import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1], method="orpo")
