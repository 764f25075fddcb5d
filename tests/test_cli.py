import pytest

from ddetr_dist.cli import COMMANDS, main


def test_overview_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_suggests(capsys):
    assert main(["shrad"]) == 2
    assert "Did you mean 'shard'" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert f"ddetr {name}" in capsys.readouterr().out


def test_options_may_follow_positional_overrides(tmp_path, capsys):
    # parsed (not an argparse usage error, exit 2): fails on the missing file instead
    code = main(["convert-checkpoint", str(tmp_path / "nope.pth"), str(tmp_path / "out.pth"),
                 "model.nheads=8", "--to", "official"])
    assert code == 1 and "checkpoint not found" in capsys.readouterr().err
