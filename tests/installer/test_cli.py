from typer.testing import CliRunner

from installer import __version__
from installer.cli import app

runner = CliRunner()


def test_version_prints_the_package_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"imcloud {__version__}"


def test_help_lists_every_verb() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    for verb in (
        "lab",
        "init",
        "check",
        "install",
        "verify",
        "status",
        "users",
        "alerts",
        "quickstart",
        "drill",
    ):
        assert verb in result.output
