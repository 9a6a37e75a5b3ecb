"""The README's 'Python in five minutes' example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text.split("## Python in five minutes", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "save_pretrained" in code and "from_pretrained" in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "tiny-pmmrec" / "config.json").exists()
