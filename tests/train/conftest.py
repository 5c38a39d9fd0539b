from pathlib import Path

import pytest

from libmoe.train import resolve_config

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One data cache for the session: the tokenizer is trained once."""
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture
def micro_config(data_cache):
    """micro preset on tinyshakespeare, logging every step; keyword overrides as dotted keys."""
    if not SHAKESPEARE.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt not present")

    def make(*overrides: str, algorithm: str = "smoe", steps: int = 8):
        base = [f"data.source={SHAKESPEARE}", f"data.cache_dir={data_cache}",
                f"model.algorithm={algorithm}", f"train.max_steps={steps}", "train.log_every=1",
                "train.eval_every=4", "train.checkpoint_every=4", "train.eval_tokens=2048",
                "train.tensorboard=false"]
        return resolve_config(overrides=base + list(overrides), preset="micro")

    return make
