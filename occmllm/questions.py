"""The question set: prompts, answers, the attribute table and answer parsing.

Strings are the reference implementation's, verbatim (including its ``orignal`` typo in the Q0
plan), so models trained on its files and on ours answer the same prompts.
"""
from __future__ import annotations

import re

CATEGORIES = ("bottle", "bowl", "camera", "can", "cellphone", "jar", "knife", "remote")
IMAGE_TOKEN = "<image>"

Q0 = "Please analyze this image step by step.\n<image>"
Q1 = "What's the object in the hand?\n<image>"
Q2 = "Is the object in hand round?"
Q3 = "Is the object in hand long?"
Q4 = "Is the object in hand thin?"
Q5 = "Describe the object in the hand."
Q6 = "Is it clear to identify the object in the hand?"
QUESTIONS = {"Q0": Q0, "Q1": Q1, "Q2": Q2, "Q3": Q3, "Q4": Q4, "Q5": Q5, "Q6": Q6}

Q0_PLAN = (
    "Step 1: I will analyze this RGB image and identify the object in the hand. "
    "Step 2: I will assess whether the object in the hand can be clearly identified from the original image. "
    "Step 3: Based on the assessment in Step 2, if clear: I will describe the object based on orignal "
    "features present in the image; if unclear: I will apply a 3D reconstruction model to render an "
    "enhanced version of the image, then use this rendered image to identify the object."
)
YES, NO = "Yes.", "No."

# Geometric attributes per category, asked by Q2-Q4. Definitions (the SynthOcc generator keeps
# them for every instance it draws, and a test checks the meshes):
#   round: a solid of revolution (circular cross-sections about its axis);
#   long:  longest extent at least 2.3x the second longest;
#   thin:  smallest extent under 1.5 cm.
CATEGORY_ATTRIBUTES = {
    "bottle":    {"round": True,  "long": True,  "thin": False},
    "bowl":      {"round": True,  "long": False, "thin": False},
    "camera":    {"round": False, "long": False, "thin": False},
    "can":       {"round": True,  "long": False, "thin": False},
    "cellphone": {"round": False, "long": False, "thin": True},
    "jar":       {"round": True,  "long": False, "thin": False},
    "knife":     {"round": False, "long": True,  "thin": True},
    "remote":    {"round": False, "long": True,  "thin": False},
}
ATTRIBUTE_QUESTIONS = {"Q2": "round", "Q3": "long", "Q4": "thin"}

# Q5's colour words and the sRGB each names (SynthOcc paints its objects with them; renders of true
# meshes shade with them). One palette for every category, so colour never tells the category.
OBJECT_COLOURS = {
    "red": (200, 40, 40), "green": (50, 160, 60), "blue": (40, 80, 200), "yellow": (230, 200, 40),
    "orange": (235, 130, 30), "purple": (130, 60, 170), "white": (235, 235, 230), "black": (35, 35, 40),
    "gray": (130, 130, 135), "pink": (235, 140, 175), "brown": (120, 80, 45), "cyan": (40, 190, 200),
}


def category_answer(category: str) -> str:
    return f"The object is {category}."


def yes_no(flag: bool) -> str:
    return YES if flag else NO


def answer_in_history(answer: str) -> str:
    """A model's answer as it goes back into the conversation: without a literal ``<image>``, which
    the encoder would take for an image placeholder."""
    return answer.replace(IMAGE_TOKEN, "")


def _with_article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


# The pretrained base's alignment data (make base) asks for a caption, not a question of the
# recipe, so the base learns to read images without learning the recipe's answers. CLIP's text is
# the same caption without a colour.
CAPTION_PROMPT = "Write a short caption for this image.\n<image>"


def caption(category: str, colour: str | None = None, in_hand: bool = True) -> str:
    """``a photo of a bottle in a hand``; with a colour, ``a photo of an orange bottle in a hand``;
    without ``in_hand`` (the object's picture with the hand removed), ``a photo of a bottle``."""
    return f"a photo of {_with_article(f'{colour} {category}' if colour else category)}" + (" in a hand" if in_hand else "")


def description(category: str, colour: str | None = None) -> str:
    """Q5 answer composed from category, colour and attributes, e.g.
    ``A red bottle. It is round and long.``"""
    attrs = [name for name, on in CATEGORY_ATTRIBUTES[category].items() if on]
    text = _with_article(f"{colour} {category}" if colour else category).capitalize() + "."
    if attrs:
        text += " It is " + (" and ".join(attrs) if len(attrs) <= 2 else ", ".join(attrs[:-1]) + " and " + attrs[-1]) + "."
    return text


def answers_for(category: str, colour: str | None = None) -> dict[str, str]:
    """The reference answer to every image-fact question (Q1-Q5) for one object."""
    out = {"Q1": category_answer(category)}
    for qid, attr in ATTRIBUTE_QUESTIONS.items():
        out[qid] = yes_no(CATEGORY_ATTRIBUTES[category][attr])
    out["Q5"] = description(category, colour)
    return out


# --- parsing a model's free text -------------------------------------------------------------

_CATEGORY_ANSWERS = {category_answer(c): c for c in CATEGORIES}
_SYNONYMS = {"cell phone": "cellphone", "phone": "cellphone", "mobile phone": "cellphone",
             "smartphone": "cellphone", "remote control": "remote", "bottles": "bottle"}


def _normalise(text: str) -> str:
    text = text.strip().lower()
    text = re.sub(r"[\s]+", " ", text)
    return text.strip(" .!?,;:\"'")


def parse_category(text: str) -> str | None:
    """Map a model's answer to a category, or None when it names none or several.

    Exact reference answers first; then, case-insensitively and ignoring articles and trailing
    punctuation, ``the object is X`` or a bare ``X``; then the only category named anywhere.
    """
    if text in _CATEGORY_ANSWERS:
        return _CATEGORY_ANSWERS[text]
    norm = _normalise(text)
    norm = re.sub(r"^(the )?(object|item|thing)( in (the )?hand)? is ", "", norm)
    norm = re.sub(r"^(a|an|the) ", "", norm)
    if norm in CATEGORIES:
        return norm
    if norm in _SYNONYMS:
        return _SYNONYMS[norm]
    words = re.findall(r"[a-z]+", norm)
    found = {w for w in words if w in CATEGORIES}
    found |= {c for phrase, c in _SYNONYMS.items() if re.search(rf"\b{phrase}\b", norm)}
    return found.pop() if len(found) == 1 else None


def parse_yes_no(text: str) -> bool | None:
    """``Yes.``/``No.`` and their tolerant forms (case, punctuation, a leading yes/no word)."""
    if text == YES:
        return True
    if text == NO:
        return False
    norm = _normalise(text)
    first = re.match(r"[a-z]+", norm)
    if first is None:
        return None
    word = first.group(0)
    if word in ("yes", "yeah", "yep", "true"):
        return True
    if word in ("no", "nope", "false", "not"):
        return False
    return None


def question_id(text: str) -> str | None:
    """The id of a question string (its image placeholder and trailing whitespace ignored)."""
    key = text.replace(IMAGE_TOKEN, "").strip()
    for qid, q in QUESTIONS.items():
        if q.replace(IMAGE_TOKEN, "").strip() == key:
            return qid
    return None


def is_correct(qid: str, prediction: str, reference: str) -> bool:
    """Score one answer: category questions by parsed category, yes/no by parsed polarity,
    Q5 (free description) by the category it names, Q0 (a fixed plan) by exact text."""
    if qid == "Q1" or qid == "Q5":
        truth = parse_category(reference)
        return truth is not None and parse_category(prediction) == truth
    if qid in ("Q2", "Q3", "Q4", "Q6"):
        truth = parse_yes_no(reference)
        return truth is not None and parse_yes_no(prediction) == truth
    return _normalise(prediction) == _normalise(reference)
