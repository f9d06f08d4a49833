"""`lorasoup report` loads its config through the strict loader: --set is checked before any work."""

from typer.testing import CliRunner

from lorasoup.cli import app

runner = CliRunner()


def test_report_set_is_validated_once_in_one_line(tmp_path):
    out = tmp_path / "report"
    for extra, message in (
        (["--set", "limit=0"], "--limit must be at least 1"),
        (["--set", "sed=1"], "did you mean 'seed'?"),
        (["--set", "density=1.5"], "--density must be in (0, 1]"),
        (["--adapters", "a", "--set", "adapters=[a, b]"], "two or more skill adapters"),
    ):
        result = runner.invoke(app, ["report", str(tmp_path), "--output", str(out), *extra])
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
        assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()
