"""Score a checkpoint on held-out text, from any folder: prints one JSON object (loss, perplexity, bits/byte, ...).

    python /path/to/this/project/evaluate.py --model_path checkpoints_new/final_step_50000.pt \
        --data validation_0.jsonl.gz

The same command as `python -m trm.evaluate` (which needs the project folder as the working directory): Python puts
this file's folder on the import path, so the relative paths of the users' data folder just work.
"""
import sys

from trm.cli import quiet_interrupt
from trm.evaluate import main

if __name__ == "__main__":
    quiet_interrupt()
    sys.exit(main())
