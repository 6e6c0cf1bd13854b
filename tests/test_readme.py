"""Every Python block of the README runs, in order, as a newcomer would paste them."""

import os
import re
from pathlib import Path

import matplotlib

README = Path(__file__).parents[1] / "README.md"


def test_the_readme_python_blocks_run(tmp_path, capsys):
    matplotlib.use("Agg")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 4
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for block in blocks:
            exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    finally:
        os.chdir(cwd)
    assert (tmp_path / "run.h5").exists() and (tmp_path / "density.png").exists()
    assert "largest relative difference" in capsys.readouterr().out
