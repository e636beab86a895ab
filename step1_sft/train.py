"""Stage 1 training: SFT on the category question, with ``config.yaml`` beside this file.

    python -m step1_sft.train [--config step1_sft/config.yaml] [--flag value ...]
"""
from pathlib import Path

from occmllm.sft import main

if __name__ == "__main__":
    main(default_config=Path(__file__).with_name("config.yaml"))
