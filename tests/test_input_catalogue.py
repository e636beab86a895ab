"""A catalogue of the files users bring, one parametrised test per reader: each odd-but-valid
variant real tools write is read as the plain file is, and each malformed one is refused with one
line naming the file (and line or record), what is wrong and what to do."""
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import inference
from occmllm import fileio, records
from occmllm.config import parse_config
from occmllm.errors import OccError
from occmllm.model import check_checkpoint
from occmllm.predictions import read_predictions

Q1 = "What's the object in the hand?\n<image>"
GOOD = {"id": "a", "image": "img/a.png",
        "conversations": [{"from": "human", "value": Q1}, {"from": "gpt", "value": "The object is jar."}]}
PAIR = {"id": "p", "image": "img/a.png", "question": Q1, "chosen": "The object is jar.",
        "rejected": "The object is can."}


def _line(rec) -> bytes:
    return json.dumps(rec, ensure_ascii=False).encode()


def _refused(read, path, data: bytes, message: str, named: str | None = None) -> str:
    """``read(path)`` of a file holding ``data`` raises one line that names ``named`` (default: the
    path) and matches ``message``; returns the line."""
    path.write_bytes(data)
    with pytest.raises(OccError) as exc:
        read(path)
    line = str(exc.value)
    assert "\n" not in line and (named or str(path)) in line
    assert exc.match(message)
    return line


@pytest.fixture
def root(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / "img/a.png")
    return tmp_path


# --- conversation JSONL (training and test files) ----------------------------------------------------

UNLABELLED = {**GOOD, "conversations": GOOD["conversations"][:1]}
JSONL_VALID = {
    "plain": _line(GOOD) + b"\n",
    "utf-8 byte-order mark": b"\xef\xbb\xbf" + _line(GOOD) + b"\n",
    "CRLF line ends": _line(GOOD) + b"\r\n",
    "blank and whitespace lines": b"\n  \n" + _line(GOOD) + b"\n\t\n\n",
    "no final newline": _line(GOOD),
    "BOM, CRLF and blank lines together": b"\xef\xbb\xbf\r\n" + _line(GOOD) + b"\r\n\r\n",
    "non-ASCII text": json.dumps({**GOOD, "meta": {"note": "Flasche, \u74f6\u5b50"}}).encode() + b"\n",
    "integer id": _line({**GOOD, "id": 7}) + b"\n",
}
JSONL_MALFORMED = {
    "not UTF-8 (Latin-1)": (_line(GOOD) + b"\n" + _line({**GOOD, "id": "b"}).replace(b"jar", b"j\xe4r") + b"\n",
                            r":2: not UTF-8 text \(byte 0xe4\); save the file as UTF-8"),
    "UTF-16 export": ("\ufeff".encode("utf-16-le") + _line(GOOD).decode().encode("utf-16-le"), r":1: not UTF-8 text"),
    "truncated last line": (_line(GOOD) + b"\n" + _line(GOOD)[:30], r":2: not valid JSON"),
    "a JSON array line": (b"[1, 2]\n", r":1: expected a JSON object, got list"),
    "empty file": (b"", r"no records; the file is empty"),
    "blank lines only": (b"\n\r\n  \n", r"no records; the file is empty"),
    "duplicate id": (_line(GOOD) + b"\n" + _line(GOOD) + b"\n", r":2: duplicate id 'a' \(first on line 1\)"),
    "no id": (_line({k: v for k, v in GOOD.items() if k != "id"}) + b"\n", r":1: record has no string 'id'"),
    "questions alone in training": (_line(UNLABELLED) + b"\n", r":1: .*training records alternate"),
    "image outside the root": (_line({**GOOD, "image": "../a.png"}) + b"\n", r":1: .*escapes the dataset root"),
    "a gzipped file": (__import__("gzip").compress(_line(GOOD), mtime=0), r":1: not UTF-8 text"),
}


@pytest.mark.parametrize("name", JSONL_VALID)
def test_conversation_jsonl_variants_read_as_the_plain_file(root, name):
    path = root / "f.jsonl"
    path.write_bytes(JSONL_VALID[name])
    got = records.read_records(path, root=root, verify_images=True)
    expected = json.loads(JSONL_VALID[name].decode("utf-8-sig"))
    assert got == [expected]


@pytest.mark.parametrize("name", JSONL_MALFORMED)
def test_malformed_conversation_jsonl_is_one_line_naming_file_and_line(root, name):
    _refused(lambda p: records.read_records(p, root=root), root / "f.jsonl", *JSONL_MALFORMED[name])


def test_test_files_may_hold_questions_alone(root):
    path = root / "t.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _line(UNLABELLED) + b"\r\n" + _line({**GOOD, "id": "b"}) + b"\r\n")
    got = records.read_records(path, "test", root=root, verify_images=True)
    assert [len(r["conversations"]) for r in got] == [1, 2]


# --- preference JSONL ---------------------------------------------------------------------------------

PREFERENCE_VALID = {
    "plain": _line(PAIR) + b"\n",
    "byte-order mark and CRLF": b"\xef\xbb\xbf" + _line(PAIR) + b"\r\n",
    "reference file layout (no id, no placeholder)": _line({k: v for k, v in PAIR.items() if k != "id"}
                                                           | {"question": "What's the object in the hand?"}) + b"\n",
}
PREFERENCE_MALFORMED = {
    "no rejected": (_line({k: v for k, v in PAIR.items() if k != "rejected"}), r":1: preference record has no "
                                                                                 r"'rejected'"),
    "chosen equals rejected": (_line({**PAIR, "rejected": " The object is jar. "}), r":1: .*must differ"),
    "chosen not a string": (_line({**PAIR, "chosen": ["a"]}), r":1: preference 'chosen' must be a string"),
    "not UTF-8": (_line(PAIR).replace(b"can", b"c\xff"), r":1: not UTF-8 text"),
}


@pytest.mark.parametrize("name", PREFERENCE_VALID)
def test_preference_variants_read(root, name):
    path = root / "p.jsonl"
    path.write_bytes(PREFERENCE_VALID[name])
    pair, = records.read_records(path, "preference", root=root, verify_images=True)
    assert pair["chosen"] == PAIR["chosen"] and pair["rejected"] == PAIR["rejected"] and pair["id"] in ("p", "a")


@pytest.mark.parametrize("name", PREFERENCE_MALFORMED)
def test_malformed_preference_is_one_line(root, name):
    data, message = PREFERENCE_MALFORMED[name]
    _refused(lambda p: records.read_records(p, "preference"), root / "p.jsonl", data + b"\n", message)


# --- InternVL meta JSON -------------------------------------------------------------------------------

def _meta(root, text: bytes):
    (root / "a.jsonl").write_bytes(_line(GOOD) + b"\n")
    path = root / "a.meta.json"
    path.write_bytes(text)
    return path


META = json.dumps({"set": {"root": ".", "annotation": "a.jsonl", "repeat_time": 1}}, indent=2)
META_VALID = {
    "plain": META.encode(),
    "byte-order mark": b"\xef\xbb\xbf" + META.encode(),
    "CRLF line ends": META.replace("\n", "\r\n").encode(),
    "fractional repeat": META.replace('"repeat_time": 1', '"repeat_time": 0.5').encode(),
}
META_MALFORMED = {
    "not JSON": (META[:-3].encode(), r"a\.meta\.json:\d+: invalid JSON"),
    "a list": (b"[]", r"an InternVL meta file is an object of datasets"),
    "no annotation": (b'{"set": {"root": "."}}', r"dataset 'set' needs 'root' and 'annotation'"),
    "zero repeat": (META.replace('"repeat_time": 1', '"repeat_time": 0').encode(), r"repeat_time must be a positive"),
    "Latin-1": (META.replace('"set"', '"s\u00e9t"').encode("latin-1"), r"a\.meta\.json:2: not UTF-8 text"),
}


@pytest.mark.parametrize("name", META_VALID)
def test_meta_json_variants_read(root, name):
    (entry,) = list(records.iter_meta(_meta(root, META_VALID[name])))
    assert entry[0] == "set" and entry[1].resolve() == root.resolve() and entry[2].name == "a.jsonl"


@pytest.mark.parametrize("name", META_MALFORMED)
def test_malformed_meta_json_is_one_line(root, name):
    (root / "a.jsonl").write_bytes(_line(GOOD) + b"\n")
    _refused(lambda p: list(records.iter_meta(p)), root / "a.meta.json", *META_MALFORMED[name])


# --- images ---------------------------------------------------------------------------------------------

def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1 x 1 grey PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr[4:]
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _rotated_jpeg() -> bytes:
    """A 20 x 10 JPEG whose EXIF says: turn me 90 degrees (orientation 6), as phone cameras write."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(Image.new("RGB", (20, 10), (200, 10, 10)), "JPEG", exif=exif)


GRADIENT16 = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
IMAGE_VALID = {  # name: (file bytes, expected RGB size, a pixel check)
    "RGB PNG": (_save(Image.new("RGB", (12, 8), (1, 2, 3)), "PNG"), (12, 8), (1, 2, 3)),
    "grayscale": (_save(Image.new("L", (12, 8), 77), "PNG"), (12, 8), (77, 77, 77)),
    "1-bit": (_save(Image.new("1", (12, 8), 1), "PNG"), (12, 8), (255, 255, 255)),
    "palette": (_save(Image.new("RGB", (12, 8), (0, 128, 255)).convert("P"), "PNG"), (12, 8), None),
    "palette with transparency": (_save(Image.new("P", (12, 8), 0), "PNG", transparency=0), (12, 8), (0, 0, 0)),
    "RGBA": (_save(Image.new("RGBA", (12, 8), (9, 8, 7, 0)), "PNG"), (12, 8), (9, 8, 7)),
    "grayscale with alpha": (_save(Image.new("LA", (12, 8), (50, 128)), "PNG"), (12, 8), (50, 50, 50)),
    "CMYK JPEG": (_save(Image.new("CMYK", (12, 8), (0, 0, 0, 0)), "JPEG", quality=95), (12, 8), None),
    "16-bit grayscale": (_save(Image.fromarray(GRADIENT16), "PNG"), (8, 8), None),
    "1 x 1 pixel": (_save(Image.new("RGB", (1, 1), (5, 5, 5)), "PNG"), (1, 1), (5, 5, 5)),
    "1000 x 2 (wide)": (_save(Image.new("RGB", (1000, 2), (4, 4, 4)), "PNG"), (1000, 2), (4, 4, 4)),
    "2 x 600 (tall)": (_save(Image.new("RGB", (2, 600), (4, 4, 4)), "PNG"), (2, 600), (4, 4, 4)),
    "EXIF-rotated JPEG": (_rotated_jpeg(), (10, 20), None),
    "BMP": (_save(Image.new("RGB", (12, 8), (1, 2, 3)), "BMP"), (12, 8), (1, 2, 3)),
    "WebP": (_save(Image.new("RGB", (12, 8), (100, 100, 100)), "WEBP", lossless=True), (12, 8), (100, 100, 100)),
}
IMAGE_MALFORMED = {
    "empty file": (b"", r"cannot be read .*not an image, or truncated or corrupt; re-export or remove it"),
    "text file named .png": (b"not an image\n", r"cannot be read"),
    "truncated PNG": (_save(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")[:300], r"cannot be read"),
    "decompression bomb header": (_png_claiming(9000, 9000), r"9000 x 9000 pixels is over the 67,108,864-pixel "
                                                               r"limit \(8192 x 8192\); downscale it"),
    "header past PIL's warning size": (_png_claiming(10000, 10000), r"10000 x 10000 pixels is over the 67,108,864"),
    "header past PIL's own limit": (_png_claiming(60000, 60000), r"over the 67,108,864-pixel limit"),
}


@pytest.mark.parametrize("name", IMAGE_VALID)
def test_image_variants_decode_to_rgb(tmp_path, name):
    data, size, pixel = IMAGE_VALID[name]
    path = tmp_path / "x.img"
    path.write_bytes(data)
    image = fileio.read_image(path)
    assert image.mode == "RGB" and image.size == size
    assert fileio.image_size(path) == size  # the header alone says the same
    if pixel is not None:
        assert image.getpixel((0, 0)) == pixel


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    (tmp_path / "d.png").write_bytes(IMAGE_VALID["16-bit grayscale"][0])
    grey = np.asarray(fileio.read_image(tmp_path / "d.png", mode="L")).astype(int)
    assert grey.min() == 0 and grey.max() == 255
    np.testing.assert_allclose(grey.ravel(), GRADIENT16.ravel() / 257, atol=1)  # the same ramp, 8 bits
    raw = np.asarray(fileio.read_image(tmp_path / "d.png", mode=None))  # depth maps keep their values
    assert raw.max() == 65535


@pytest.mark.parametrize("name", IMAGE_MALFORMED)
def test_malformed_image_is_one_line(tmp_path, name):
    line = _refused(lambda p: fileio.read_image(p, "t.jsonl:3: image 'x.png'"), tmp_path / "x.png",
                    *IMAGE_MALFORMED[name], named="t.jsonl:3: image 'x.png'")
    assert line.startswith("t.jsonl:3: image 'x.png'")


# --- YAML configs ---------------------------------------------------------------------------------------

def _parse(path):
    from transformers import TrainingArguments

    from occmllm.stage import DataArguments, ModelArguments
    return parse_config((ModelArguments, DataArguments, TrainingArguments), ["--config", str(path),
                                                                            "--output_dir", str(path.parent / "o")])


YAML = b"learning_rate: 0.002\nfreeze_vision: true\n"
YAML_VALID = {"plain": YAML, "byte-order mark": b"\xef\xbb\xbf" + YAML, "CRLF": YAML.replace(b"\n", b"\r\n"),
              "comments and blank lines": b"# stage 1\n\n" + YAML + b"\n# end\n"}
YAML_MALFORMED = {
    "bad indentation": (b"learning_rate: 0.002\n  freeze_vision: true\n", r"c\.yaml:2: invalid YAML"),
    "a list": (b"- learning_rate\n", r"expected a mapping of option: value"),
    "unknown key": (b"learnin_rate: 0.1\n", r"unknown key learnin_rate; see --help"),
    "Latin-1 comment": (b"# r\xe9glages\n" + YAML, r"c\.yaml:1: not UTF-8 text"),
}


@pytest.mark.parametrize("name", YAML_VALID)
def test_yaml_variants_parse(tmp_path, name):
    (tmp_path / "c.yaml").write_bytes(YAML_VALID[name])
    model_args, _data, training = _parse(tmp_path / "c.yaml")
    assert model_args.freeze_vision is True and training.learning_rate == 0.002


@pytest.mark.parametrize("name", YAML_MALFORMED)
def test_malformed_yaml_is_one_line(tmp_path, name):
    _refused(_parse, tmp_path / "c.yaml", *YAML_MALFORMED[name])


# --- predictions files (the reference's {id: answer} and this project's predictions.jsonl) --------------

PREDICTIONS_VALID = {
    "reference.json": b'{"v1": "The object is jar."}',
    "reference.json with BOM and CRLF": b'\xef\xbb\xbf{\r\n "v1": "The object is jar."\r\n}\r\n',
    "predictions.jsonl": _line({"checkpoint": "m", "mode": "plain", "id": "v1",
                                "answers": {"Q1": "The object is jar."}}) + b"\n",
    "predictions.jsonl with CRLF": _line({"checkpoint": "m", "mode": "plain", "id": "v1",
                                          "answers": {"Q1": "The object is jar."}}) + b"\r\n\r\n",
}
PREDICTIONS_MALFORMED = {
    "reference.json": (b'{"v1": 3}', r"expected \{id: answer text\}"),
    "broken.json": (b'{"v1": "The obj', r"invalid JSON"),
    "latin1.json": (b'{"v1": "The object is j\xe4r."}', r"not UTF-8 text"),
    "noq1.jsonl": (_line({"id": "v1", "answers": {}}) + b"\n", r"noq1\.jsonl:1: a predictions line needs 'id' and"),
}


@pytest.mark.parametrize("name", PREDICTIONS_VALID)
def test_predictions_variants_read(tmp_path, name):
    path = tmp_path / name.split(" ")[0]
    path.write_bytes(PREDICTIONS_VALID[name])
    assert read_predictions(path).answers == {"v1": "The object is jar."}


@pytest.mark.parametrize("name", PREDICTIONS_MALFORMED)
def test_malformed_predictions_are_one_line(tmp_path, name):
    _refused(read_predictions, tmp_path / name, *PREDICTIONS_MALFORMED[name])


# --- checkpoints ------------------------------------------------------------------------------------------

CHECKPOINT_MALFORMED = {
    "no config.json": (None, r"not a Hugging Face checkpoint \(no config.json\)"),
    "config.json not JSON": (b"{model_type: internvl", r"config\.json:1: invalid JSON"),
    "config.json a list": (b"[]", r"expected a JSON object \(a model config\)"),
    "config.json Latin-1": ('{"model_type": "internvl", "n": "\u00e9"}'.encode("latin-1"), r"not UTF-8 text"),
    "another model type": (b'{"model_type": "llava"}', r"not an InternVL checkpoint \(model_type 'llava'\)"),
    "remote-code layout": (b'{"model_type": "internvl_chat"}', r"original remote-code layout"),
}


@pytest.mark.parametrize("name", CHECKPOINT_MALFORMED)
def test_malformed_checkpoint_is_one_line(tmp_path, name):
    config, message = CHECKPOINT_MALFORMED[name]
    folder = tmp_path / "ckpt"
    folder.mkdir()
    if config is None:
        with pytest.raises(OccError, match=message):
            check_checkpoint(folder)
    else:
        _refused(lambda p: check_checkpoint(p.parent), folder / "config.json", config, message, named=str(folder))


def test_checkpoint_with_pickled_weights_only_is_refused(tiny_model, tmp_path):
    """Weights load from safetensors only: a folder holding only pytorch_model.bin (a pickle) is refused."""
    import shutil

    import torch
    from occmllm.model import load_model
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model, folder)
    (folder / "model.safetensors").unlink()
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        load_model(folder)


# --- end to end: odd-but-valid files give a report ----------------------------------------------------------

def test_odd_but_valid_test_file_and_images_give_a_report(tiny_model, synth_small, tmp_path):
    """A test file with a byte-order mark, CRLF line ends and blank lines, whose images are every
    odd-but-valid variant above: inference answers every record and writes the report."""
    lines = [json.loads(x) for x in (synth_small / "stages/test.jsonl").read_text().splitlines()]
    variants = list(IMAGE_VALID)
    out_lines = []
    for k, name in enumerate(variants):
        rec = json.loads(json.dumps(lines[k % len(lines)]))
        rec["id"] = f"odd{k}"
        rel = f"odd/{k}.img"
        (synth_small / "odd").mkdir(exist_ok=True)
        (synth_small / rel).write_bytes(IMAGE_VALID[name][0])
        rec["image"] = rel
        out_lines.append(_line(rec))
    data = tmp_path / "odd.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + b"\r\n\r\n".join(out_lines) + b"\r\n")
    assert inference.main(["--checkpoint", f"m={tiny_model}", "--data", str(data), "--data-root", str(synth_small),
                           "--out", str(tmp_path / "run"), "--batch-size", "4", "--max-new-tokens", "4"]) == 0
    report = json.loads((tmp_path / "run/report.json").read_text())
    assert report["n"] == len(variants) and report["rows"][0]["n"] == len(variants)
    preds = (tmp_path / "run/predictions.jsonl").read_text().splitlines()
    assert [json.loads(p)["id"] for p in preds] == [f"odd{k}" for k in range(len(variants))]


@pytest.mark.parametrize("name", ["not UTF-8 (Latin-1)", "truncated last line", "duplicate id"])
def test_inference_refuses_a_malformed_test_file_in_one_line_and_writes_nothing(tiny_model, synth_small, tmp_path,
                                                                              capsys, name):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(JSONL_MALFORMED[name][0].replace(b"img/a.png", b"x.png"))
    with pytest.raises(SystemExit) as exc:
        inference.main(["--checkpoint", f"m={tiny_model}", "--data", str(data), "--data-root", str(synth_small),
                        "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {data}:")
    assert not (tmp_path / "run").exists()
