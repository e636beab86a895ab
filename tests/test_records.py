"""Bad input gives a clear one-line error naming the file (and line), and leaves no output."""
import json
import os
import stat

import pytest
from PIL import Image

from data_tools import builders
from occmllm import fileio, records
from occmllm.dataset import load_dataset
from occmllm.errors import OccError

GOOD = {"id": "a", "image": "img/a.png",
        "conversations": [{"from": "human", "value": "What's the object in the hand?\n<image>"},
                          {"from": "gpt", "value": "The object is jar."}]}


@pytest.fixture
def root(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / "img/a.png")
    return tmp_path


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_good_record_reads(root):
    path = _write(root / "ok.jsonl", [json.dumps(GOOD)])
    assert records.read_records(path, root=root, verify_images=True) == [GOOD]


def test_malformed_line_names_file_and_line(root):
    path = _write(root / "bad.jsonl", [json.dumps(GOOD), "", '{"id": "b", "image": '])
    with pytest.raises(OccError, match=r"bad\.jsonl:3: not valid JSON"):
        records.read_records(path)


@pytest.mark.parametrize("change,message", [
    (lambda r: r["conversations"][0].update(value="What's the object in the hand?"), "no <image> placeholder"),
    (lambda r: r.update(image=["img/a.png", "img/a.png"]), "1 <image> placeholder"),
    (lambda r: r.pop("image"), "has no 'image'"),
    (lambda r: r["conversations"].reverse(), "starts with a gpt turn"),
    (lambda r: r["conversations"].insert(1, {"from": "human", "value": "Describe the object in the hand."}),
     "training records alternate human, gpt"),
    (lambda r: r["conversations"].append({"from": "gpt", "value": "Yes."}), "second gpt turn in a row"),
    (lambda r: r.update(conversations=[]), "no 'conversations'"),
])
def test_structural_errors(root, change, message):
    rec = json.loads(json.dumps(GOOD))
    change(rec)
    path = _write(root / "bad.jsonl", [json.dumps(GOOD | {"id": "z"}), json.dumps(rec)])
    with pytest.raises(OccError, match=rf"bad\.jsonl:2: .*{message}"):
        records.read_records(path)


@pytest.mark.parametrize("image,message", [
    ("../outside.png", "escapes the dataset root"),
    ("/etc/passwd", "is absolute"),
    ("img/missing.png", "not found"),
])
def test_image_path_errors(root, image, message):
    path = _write(root / "bad.jsonl", [json.dumps(GOOD | {"image": image})])
    with pytest.raises(OccError, match=rf"bad\.jsonl:1: .*{message}"):
        records.read_records(path, root=root, verify_images=True)


def test_links_out_of_the_root_are_refused(root, tmp_path_factory):
    """A file or a folder inside the root that links outside it escapes it; a link that stays
    inside is followed; and every path resolves as ``os.path.realpath`` resolves it."""
    import os
    outside = tmp_path_factory.mktemp("outside")
    Image.new("RGB", (8, 8)).save(outside / "o.png")
    (root / "img/file_link.png").symlink_to(outside / "o.png")
    (root / "folder_link").symlink_to(outside, target_is_directory=True)
    (root / "img/inside_link.png").symlink_to(root / "img/a.png")
    for relative in ("img/file_link.png", "folder_link/o.png", "img/../folder_link/o.png"):
        with pytest.raises(OccError, match="escapes the dataset root"):
            fileio.resolve_in_root(root, relative, "ctx")
    for relative in ("img/inside_link.png", "img/a.png", "img/../img/a.png", "img/", "."):
        assert str(fileio.resolve_in_root(root, relative, "ctx")) == os.path.realpath(root / relative)


def test_an_image_many_records_share_is_decoded_once(root, monkeypatch):
    """Each question of a view repeats its image: the file is decoded for its first record only,
    and a bad file that only a later record names still stops the read at that record's line."""
    decoded = []
    read_image = fileio.read_image
    monkeypatch.setattr(fileio, "read_image", lambda path, *a, **k: decoded.append(path) or read_image(path, *a, **k))
    lines = [json.dumps(GOOD | {"id": f"a{i}"}) for i in range(5)]
    assert len(records.read_records(_write(root / "ok.jsonl", lines), root=root, verify_images=True)) == 5
    assert [p.name for p in decoded] == ["a.png"]
    (root / "img/t.png").write_bytes(b"not a png")
    path = _write(root / "bad.jsonl", lines + [json.dumps(GOOD | {"id": "t", "image": "img/t.png"})])
    with pytest.raises(OccError, match=r"bad\.jsonl:6: image 'img/t.png' cannot be read"):
        records.read_records(path, root=root, verify_images=True)


def test_truncated_image(root):
    Image.new("RGB", (64, 64), (200, 10, 10)).save(root / "img/t.jpg", quality=95)
    data = (root / "img/t.jpg").read_bytes()
    (root / "img/t.jpg").write_bytes(data[: len(data) // 2])
    path = _write(root / "bad.jsonl", [json.dumps(GOOD | {"image": "img/t.jpg"})])
    with pytest.raises(OccError, match=r"bad\.jsonl:1: image 'img/t.jpg' cannot be read"):
        records.read_records(path, root=root, verify_images=True)


def test_preference_same_chosen_and_rejected(root):
    rec = {"image": "img/a.png", "question": "Is it clear?", "chosen": "Yes.", "rejected": "Yes."}
    path = _write(root / "pref.jsonl", [json.dumps(rec)])
    with pytest.raises(OccError, match="pref.jsonl:1: preference chosen and rejected are the same"):
        records.read_records(path, kind="preference")


def test_empty_file(root):
    path = _write(root / "empty.jsonl", [])
    with pytest.raises(OccError, match="empty"):
        records.read_records(path)


def test_failed_write_leaves_nothing(tmp_path):
    def gen():
        yield {"a": 1}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fileio.write_jsonl(tmp_path / "out.jsonl", gen())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_and_folders_get_the_usual_modes(tmp_path, umask):
    """Atomic writes go through private temporaries (mkstemp: 0600, mkdtemp: 0700); what they
    leave must be as readable as a plain open() or mkdir() would make it, under the umask in force."""
    previous = os.umask(umask)
    try:
        fileio.write_jsonl(tmp_path / "out.jsonl", [{"a": 1}])
        with fileio.replace_folder(tmp_path / "model") as tmp:
            (tmp / "config.json").write_text("{}")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "out.jsonl").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o777 & ~umask


def test_stage_file_with_bad_record_leaves_no_output(synth, tmp_path):
    ds = load_dataset(synth)
    recs = builders.stage1_records(ds.split("train"))
    recs[3]["image"] = "../../escape.png"
    out = tmp_path / "step1.jsonl"
    with pytest.raises(OccError, match="escapes the dataset root"):
        builders.write_stage(recs, out, ds, "step1")
    assert list(tmp_path.iterdir()) == []


def test_meta_json_round_trip(synth, tmp_path):
    ds = load_dataset(synth)
    out = builders.write_stage(builders.stage1_records(ds.split("train")), tmp_path / "s1.jsonl", ds, "step1")
    (name, root, annotation, repeat), = records.iter_meta(tmp_path / "s1.meta.json")
    assert name == "step1" and root.resolve() == synth.resolve() and annotation.resolve() == out.resolve()
    assert repeat == 1.0
    recs = records.read_records(annotation, root=root, verify_images=True)
    assert len(recs) == len(ds.split("train"))
