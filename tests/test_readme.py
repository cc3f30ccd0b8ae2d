"""The README's fresh-machine test command is exactly what CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_command = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert len(ci_command) == 1
    assert f"```bash\n{ci_command[0]}\n```" in (ROOT / "README.md").read_text()
