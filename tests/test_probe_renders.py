"""benchmarks/probe_renders.py on the tiny model, so it cannot rot: every probe reads the records it
was fitted on, and a record without its render is refused with its file."""
import json
import re
import sys
from pathlib import Path

import pytest

from conftest import STAGE4_RENDERS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_probes_read_the_views_they_were_fitted_on(tiny_model, synth_small, stage4_file, capsys):
    from probe_renders import main
    step1, renders = synth_small / "stages/step1.jsonl", synth_small / STAGE4_RENDERS
    assert main(["--model", str(tiny_model), "--train", str(step1), "--val", str(step1),
                 "--val-renders", str(renders), "--train-renders", str(renders)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["train"] == result["val"] == 16
    for read in ("image", "render", "blend", "both"):
        # 16 views and a few thousand features: a linear probe separates its own training views
        assert result[read]["all"] == 1.0 and set(result[read]) == {"all", "least", "middle", "most"}


def test_a_record_without_its_render_is_refused(tiny_model, synth_small, tmp_path, capsys):
    from probe_renders import main
    step1 = synth_small / "stages/step1.jsonl"
    with pytest.raises(SystemExit) as stop:
        main(["--model", str(tiny_model), "--train", str(step1), "--train-renders", str(tmp_path), "--val", str(step1),
              "--val-renders", str(tmp_path)])
    assert stop.value.code == 2
    assert re.fullmatch(r"error: \S+step1\.jsonl: no render \S+s00000_v00\.png for record 's00000_v00'; run make demo "
                        r"first\n", capsys.readouterr().err)
