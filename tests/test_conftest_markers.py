"""tests/conftest.py skips GPU / SGLang tests by their markers, not by keywords (which include folder names)."""

import shutil
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")


def test_a_checkout_under_a_folder_named_gpu_still_runs_its_unmarked_tests(tmp_path):
    folder = tmp_path / "gpu" / "sglang"
    folder.mkdir(parents=True)
    shutil.copy(CONFTEST, folder / "conftest.py")
    (folder / "test_plain.py").write_text(
        "import pytest\n\ndef test_plain():\n    assert True\n\n@pytest.mark.gpu\ndef test_marked():\n    assert True\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", str(folder)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    import torch

    expected = "2 passed" if torch.cuda.is_available() else "1 passed, 1 skipped"
    assert expected in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
