"""`lorasoup compress` loads its config through the strict loader: --set, flags on top, one-line errors."""

from typer.testing import CliRunner

from lorasoup.adapters import load_adapter
from lorasoup.cli import app
from lorasoup.cli.commands.merge import weighted_adapter

runner = CliRunner()


def test_compress_takes_set_and_its_flags_beat_it(make_lora, tmp_path):
    source = make_lora("wide", r=8, alpha=16, seed=5)
    out = tmp_path / "small"
    result = runner.invoke(app, ["compress", str(source), "--output", str(out), "--set", "rank=3"])
    assert result.exit_code == 0, result.output
    assert load_adapter(out).peft_config["r"] == 3
    args = ["compress", str(source), "--output", str(out), "--set", "rank=3", "--rank", "2", "--overwrite"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert load_adapter(out).peft_config["r"] == 2


def test_compress_config_errors_are_one_line(make_lora, tmp_path):
    source = make_lora("wide", r=8, seed=5)
    out = tmp_path / "small"
    for extra, message in (
        (["--set", "rnk=3"], "did you mean 'rank'?"),
        (["--set", "rank=three"], "rank: expected an integer"),
        ([], "give --rank k or --energy e"),
    ):
        result = runner.invoke(app, ["compress", str(source), "--output", str(out), *extra])
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
        assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_weighted_adapter_reads_a_weight_after_the_last_colon():
    assert weighted_adapter("runs/math:0.7") == {"path": "runs/math", "weight": 0.7}
    assert weighted_adapter("org/adapter:main") == {"path": "org/adapter:main"}
    assert weighted_adapter("runs/math") == {"path": "runs/math"}
