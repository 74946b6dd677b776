"""The README documents every setting, and the CI script runs what the README says."""

from pathlib import Path

from compactor.storage.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_is_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"COMPACTOR_{name.upper()}" not in readme]
    assert not missing, f"README lacks {missing}"


def test_ci_runs_the_readme_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ('pip install -e ".[dev]"', "python -m pytest"):
        assert command in readme and command in ci
