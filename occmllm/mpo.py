"""Mixed Preference Optimization of InternVL on preference records (stage 3), with TRL's DPOTrainer.

MPO (InternVL 2.5's preference stage) is a weighted sum of three losses, which TRL computes when
given ``DPOConfig(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])``:
DPO's preference loss, BCO's quality loss and the SFT loss on the chosen answer. The reference
model is explicit: a frozen second copy of the starting checkpoint (``occmllm.stage.reference_model``).
This module supplies the dataset mapping and the trainer; the training loop, the losses, DeepSpeed
and checkpointing are TRL's and the HF Trainer's, and the stage command is ``occmllm.stage``'s.

How a preference record ``{"id", "image", "question", "chosen", "rejected"}`` (and an optional
``history`` of answered turns before the question) reaches TRL: its vision collator
(``DataCollatorForVisionPreference``) takes rows of ``images``, ``prompt``, ``chosen`` and
``rejected`` and runs the processor on the prompt text with the images, which expands each image
token into the image's tiles. The prompt (history and question) is given rendered ("standard"
format) by the checkpoint's own chat template, with each ``<image>`` placeholder where the record
puts it, and each answer is the template's assistant turn (answer and end-of-turn token): so the
tokens are exactly those of SFT and inference (``occmllm.conversation``). TRL's conversational
format is not used because it moves every image to the front of the first user turn, and this
recipe's questions put the image after the text (``What's the object in the hand?\\n<image>``).

    python -m occmllm.mpo --config step3_mpo/config.yaml [--flag value ...]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import datasets
from trl import DPOConfig, DPOTrainer

from occmllm import records
from occmllm.conversation import to_messages
from occmllm.errors import OccError
from occmllm.fileio import resolve_in_root
from occmllm.model import ImageOnlyInternVLProcessor, ResumesInternVL
from occmllm.questions import IMAGE_TOKEN
from occmllm.stage import ModelArguments, build_model, fit, reference_model, stage_commands


@dataclass
class PreferenceDataArguments:
    train_data: str = field(default="outputs/demo/stages/step3_train.jsonl", metadata={
        "help": "preference JSONL (id, image, question, chosen, rejected) or InternVL meta JSON"})
    data_root: str | None = field(default=None, metadata={
        "help": "image root for a JSONL (default: from the JSONL's .meta.json beside it)"})
    resume: bool = field(default=False, metadata={"help": "resume from the last checkpoint in output_dir"})


# --- data ------------------------------------------------------------------------------------

def question_with_images(question: str, n_images: int) -> str:
    """The question with one ``<image>`` per image: images without a placeholder go in front, one
    per line, as InternVL does for the reference's preference file (whose questions have none)."""
    missing = n_images - question.count(IMAGE_TOKEN)
    if missing < 0:
        raise ValueError(f"{question.count(IMAGE_TOKEN)} {IMAGE_TOKEN} placeholders for {n_images} image(s)")
    return f"{IMAGE_TOKEN}\n" * missing + question


def preference_turns(rec: dict, n_images: int) -> list[dict]:
    """The record's human/gpt turns up to its question (its ``history``, then the question), with
    the images that have no placeholder in front of the first human turn."""
    turns = [*rec.get("history", []), {"from": "human", "value": rec["question"]}]
    placed = records.placeholders(turns[1:])
    return [{**turns[0], "value": question_with_images(turns[0]["value"], n_images - placed)}, *turns[1:]]


class PreferenceFormatter:
    """Prompt and answer texts for TRL, rendered by the checkpoint's chat template."""

    def __init__(self, processor):
        self.tokenizer = processor.tokenizer
        self.image_token = processor.image_token  # expanded into the image's tiles by the processor
        # each distinct conversation's text, rendered once: pairs share few (the demo's 6,640 pairs
        # have 33 prompts and 701 prompt-answer pairs), and the template is most of a row's time
        self._rendered: dict[tuple, str] = {}

    def _render(self, turns: list[dict], add_generation_prompt: bool) -> str:
        key = (tuple((turn["from"], turn["value"]) for turn in turns), add_generation_prompt)
        if key not in self._rendered:
            messages = [{**m, "content": m["content"].replace(IMAGE_TOKEN, self.image_token)}
                        for m in to_messages(turns)]
            self._rendered[key] = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                                     add_generation_prompt=add_generation_prompt)
        return self._rendered[key]

    def prompt(self, turns: list[dict]) -> str:
        """The conversation up to the assistant's answer to its last (human) turn."""
        return self._render(turns, add_generation_prompt=True)

    def answer(self, prompt: str, turns: list[dict], answer: str) -> str:
        """The assistant turn after ``prompt``: the answer and the end-of-turn token (the newline
        after it is not supervised, as in SFT)."""
        full = self._render([*turns, {"from": "gpt", "value": answer}], add_generation_prompt=False)
        if not full.startswith(prompt):
            raise OccError("the checkpoint's chat template renders a user turn differently with and without the "
                           "assistant's answer; preference training needs the prompt to be a prefix")
        return full[len(prompt):].rstrip("\n")

    def row(self, root: Path, rec: dict) -> dict:
        images = [str(resolve_in_root(root, p, rec["id"])) for p in records.images_of(rec)]
        turns = preference_turns(rec, len(images))
        prompt = self.prompt(turns)
        return {"id": str(rec["id"]), "images": images, "prompt": prompt,
                "chosen": self.answer(prompt, turns, rec["chosen"]),
                "rejected": self.answer(prompt, turns, rec["rejected"])}


FEATURES = datasets.Features({"id": datasets.Value("string"), "images": datasets.List(datasets.Image(mode="RGB")),
                              "prompt": datasets.Value("string"), "chosen": datasets.Value("string"),
                              "rejected": datasets.Value("string")})


def preference_dataset(train_data, data_root: str | None, processor) -> datasets.Dataset:
    """Rows for DPOTrainer from preference records: ``images`` (decoded as RGB when a batch is
    built), ``prompt``, ``chosen``, ``rejected``. Every image is checked to exist and decode first,
    so a bad file stops here with its file and line, not mid-training."""
    items = records.load_training_records(train_data, data_root, kind="preference", verify_images=True)
    formatter = PreferenceFormatter(processor)
    return datasets.Dataset.from_list([formatter.row(root, rec) for root, rec in items], features=FEATURES)


# --- model -----------------------------------------------------------------------------------

class MPOTrainer(ResumesInternVL, DPOTrainer):
    """TRL's DPOTrainer, resuming InternVL weights correctly (``occmllm.model.ResumesInternVL``)."""


def build_trainer(model_args: ModelArguments, data_args: PreferenceDataArguments, config: DPOConfig):
    """The stage's MPOTrainer (policy, frozen reference, preference dataset) and the processor it saves."""
    if config.precompute_ref_log_probs:
        raise OccError("precompute_ref_log_probs is not supported by TRL for image data; leave it false")
    processor = ImageOnlyInternVLProcessor.from_folder(model_args.model_name_or_path)
    dataset = preference_dataset(data_args.train_data, data_args.data_root, processor)
    model = build_model(model_args, config)
    ref = reference_model(model_args.model_name_or_path, model)
    trainer = MPOTrainer(model=model, ref_model=ref, args=config, train_dataset=dataset, processing_class=processor)
    return trainer, processor


def train(model_args: ModelArguments, data_args: PreferenceDataArguments, config: DPOConfig) -> Path:
    trainer, processor = build_trainer(model_args, data_args, config)
    return fit(trainer, processor, data_args.resume)


run, main = stage_commands(train, (ModelArguments, PreferenceDataArguments, DPOConfig))


if __name__ == "__main__":
    main()
