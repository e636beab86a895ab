import pytest

from occmllm import questions as q


def test_strings_are_the_reference_ones():
    assert q.Q1 == "What's the object in the hand?\n<image>"
    assert q.Q6 == "Is it clear to identify the object in the hand?"
    assert q.Q0 == "Please analyze this image step by step.\n<image>"
    assert q.Q2 == "Is the object in hand round?" and q.Q3 == "Is the object in hand long?"
    assert q.Q4 == "Is the object in hand thin?" and q.Q5 == "Describe the object in the hand."
    assert q.category_answer("jar") == "The object is jar."
    assert q.Q0_PLAN.startswith("Step 1: I will analyze this RGB image") and "orignal" in q.Q0_PLAN
    assert set(q.CATEGORY_ATTRIBUTES) == set(q.CATEGORIES) and len(q.CATEGORIES) == 8


@pytest.mark.parametrize("text,expected", [
    ("The object is cellphone.", "cellphone"),
    ("the object is a Cellphone", "cellphone"),
    ("THE OBJECT IS KNIFE!", "knife"),
    ("A bottle.", "bottle"),
    ("jar", "jar"),
    ("It looks like a cell phone.", "cellphone"),
    ("The object is remote control.", "remote"),
    ("The object is bottle or jar.", None),
    ("I cannot tell.", None),
    ("", None),
])
def test_parse_category(text, expected):
    assert q.parse_category(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("Yes.", True), ("No.", False), ("yes", True), ("NO!", False), (" Yes, it is clear.", True),
    ("No, the hand hides it.", False), ("Maybe.", None), ("", None),
])
def test_parse_yes_no(text, expected):
    assert q.parse_yes_no(text) is expected


def test_description_and_answers():
    assert q.description("bottle", "red") == "A red bottle. It is round and long."
    assert q.description("camera", "orange") == "An orange camera."
    assert q.description("knife") == "A knife. It is long and thin."
    ans = q.answers_for("cellphone", "blue")
    assert ans == {"Q1": "The object is cellphone.", "Q2": "No.", "Q3": "No.", "Q4": "Yes.",
                   "Q5": "A blue cellphone. It is thin."}
    # Q5 is scored by the category it names.
    assert q.is_correct("Q5", "a cellphone, blue", ans["Q5"])
    assert not q.is_correct("Q5", "A blue remote.", ans["Q5"])
    assert q.is_correct("Q4", "yes", "Yes.") and not q.is_correct("Q4", "No.", "Yes.")


def test_question_ids():
    assert q.question_id(q.Q1) == "Q1"
    assert q.question_id("Is it clear to identify the object in the hand?\n") == "Q6"
    assert q.question_id("What is this?") is None
