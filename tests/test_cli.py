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


def test_predict_reads_section_key_value_items_as_overrides_not_images(tmp_path, capsys):
    # the same override grammar as train, tune and eval: positional section.key=value
    assert main(["predict", "data.val_scale=640", "--checkpoint", str(tmp_path / "nope.pth")]) == 2
    assert "no images given" in capsys.readouterr().err
    code = main(["predict", str(tmp_path / "a=b.jpg"), "--checkpoint", str(tmp_path / "nope.pth"), "data.val_scale=640"])
    assert code == 2 and "checkpoint not found" in capsys.readouterr().err  # parsed: an image and an override


def write_evaluation(folder, images: int) -> None:
    import json

    from ddetr_dist.engine.evaluate import REPORTED

    folder.mkdir(parents=True)
    metrics = {**{name: 0.5 for name in REPORTED}, "images": images}
    (folder / "metrics.json").write_text(json.dumps({"metrics": metrics, "per_category_AP": {"circle": 0.5}}))


def test_the_summary_shows_the_newest_step_evaluation_beside_ddetr_evals_own(tmp_path):
    """`ddetr eval` on a run directory writes eval/manual-<...>/: the end-of-run summary
    reads the train loop's eval/<step:08d>/ only (issue 12, bug 6)."""
    from ddetr_dist.on_ray.driver import RunResult
    from ddetr_dist.train import summary

    write_evaluation(tmp_path / "eval" / "00000005", images=5)
    write_evaluation(tmp_path / "eval" / "00000012", images=12)
    write_evaluation(tmp_path / "eval" / "manual-20260101-120000", images=99)
    result = RunResult(tmp_path, tmp_path / "model_final.pth", {"step": 12, "loss": 1.5, "images_per_s": 3.0})
    text = summary(result)
    assert "evaluation at step 12 (12 val images)" in text
    assert str(tmp_path / "eval" / "00000012" / "predictions.png") in text
    assert "last step 12: loss 1.5000" in text
