"""`lorasoup inspect` (cli/commands/compat.py): the adapters table; exit code 2 when not composable."""

from typer.testing import CliRunner

from lorasoup.cli import app

runner = CliRunner()


def test_inspect_reports_and_exit_codes(make_lora, gpt2_dir, tmp_path):
    from tests.conftest import make_peft_lora

    a = make_lora("a", r=4, targets=["q_proj", "v_proj"])
    b = make_lora("b", r=2, use_rslora=True)
    result = runner.invoke(app, ["inspect", str(a), str(b)])
    assert result.exit_code == 0, result.output
    assert "composable" in result.output and "rsLoRA" in result.output and "zero block" in result.output

    g = make_peft_lora(gpt2_dir, tmp_path / "g", targets=["c_attn"], fan_in_fan_out=True)
    result = runner.invoke(app, ["inspect", str(a), str(g)])
    assert result.exit_code == 2
