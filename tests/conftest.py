import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT.parent / "shared" / "fixtures" / "occ-mllm"


@pytest.fixture(scope="session")
def fixtures() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    """A small SynthOcc set shared by the data tests (16 scenes x 4 views)."""
    from data_tools.synthocc import Settings, generate
    out = tmp_path_factory.mktemp("synth") / "data"
    generate(out, Settings(scenes=16, views=4, seed=3), workers=1, progress=False)
    return out


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests on tiny models (still run by make test)")
