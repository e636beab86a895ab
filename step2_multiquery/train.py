"""Stage 2 training: SFT from the stage-1 checkpoint on the multi-turn records (Q1-Q5),
with ``config.yaml`` beside this file.

    python -m step2_multiquery.train [--config step2_multiquery/config.yaml] [--flag value ...]
"""
from pathlib import Path

from occmllm.sft import main

if __name__ == "__main__":
    main(default_config=Path(__file__).with_name("config.yaml"))
