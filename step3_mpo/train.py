"""Stage 3 training: Mixed Preference Optimization from the stage-2 checkpoint, with
``config.yaml`` beside this file.

    python -m step3_mpo.train [--config step3_mpo/config.yaml] [--flag value ...]
"""
from pathlib import Path

from occmllm.mpo import main

if __name__ == "__main__":
    main(default_config=Path(__file__).with_name("config.yaml"))
