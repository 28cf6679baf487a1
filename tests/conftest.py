import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def workdirs(tmp_path, monkeypatch):
    """Fresh $RESULTS; $DATASETS shared per session so digits is prepared once."""
    results = tmp_path / "results"
    monkeypatch.setenv("RESULTS", str(results))
    return results


@pytest.fixture(autouse=True, scope="session")
def _datasets_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("datasets")
    old = os.environ.get("DATASETS")
    os.environ["DATASETS"] = str(d)
    yield d
    if old is None:
        os.environ.pop("DATASETS", None)
    else:
        os.environ["DATASETS"] = old
