"""The README's "Python API" example runs as written (from the repository root's point of view)."""

import re
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _api_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section holds exactly one python example"
    return blocks[0]


def test_readme_python_api_example_runs(tmp_path, monkeypatch, capsys):
    code = _api_example()
    # run it in a scratch folder that sees the repository's data/ (the example writes vtest.h5 in the cwd)
    (tmp_path / "data").symlink_to(REPO / "data", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    exec(compile(code, "README.md:Python API", "exec"), namespace)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "(48, 384) (48, 3, 192)"
    assert out[-1] == "1.0 1.0"
    feats, agreement = namespace["feats"], namespace["agreement"]
    assert agreement.shape == (48, 3) and ((agreement >= 0) & (agreement <= 1)).all()
    assert namespace["metrics"]["num_valid_query"] == 48
    assert (tmp_path / "vtest.h5").is_file()
    np.testing.assert_allclose((feats["global"] ** 2).sum(axis=1), 1.0, rtol=1e-5)  # unit rows, as documented
