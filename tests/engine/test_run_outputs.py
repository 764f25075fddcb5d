"""What a finished run leaves for its user: TensorBoard events with the scalars and the
prediction pictures, the eval folder, and checkpoints that `ddetr eval` and
`ddetr predict` take (a converted official-format file, a run directory)."""
from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from ddetr_dist.eval import main as eval_main
from ddetr_dist.models.convert import convert
from ddetr_dist.predict import main as predict_main

from .engine_helpers import TINY_OVERRIDES, run_trainer, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = tiny_config(tiny_data, out, "name=done", "train.max_steps=3", "train.pictures=2", "train.picture_threshold=0")
    run_trainer(cfg, 1, out / "done")
    return out / "done"


def test_tensorboard_has_losses_rates_speed_memory_ap_and_pictures(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(finished_run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {"loss/loss", "loss/loss_ce", "loss/loss_ce_weighted", "loss/loss_bbox", "loss/loss_giou_weighted",
                "lr/rest", "lr/backbone", "lr/linear_proj", "train/images_per_s", "time/step_time",
                "time/data_wait", "train/rss_gb", "train/grad_norm", "train/skipped_steps", "train/skipped_samples",
                "eval/AP", "eval/AP50", "eval/AR100", "eval/val_loss"}
    assert expected <= scalars, expected - scalars
    assert [e.step for e in events.Scalars("loss/loss")] == [1, 2, 3]
    pictures = events.Images("predictions")
    assert [p.step for p in pictures] == [3]
    assert Image.open(io.BytesIO(pictures[0].encoded_image_string)).size[0] > 100


def test_eval_folder_has_detections_metrics_and_the_picture(finished_run):
    folder = finished_run / "eval" / "00000003"
    detections = json.loads((folder / "detections.json").read_text())
    assert detections and {"image_id", "category_id", "bbox", "score"} == set(detections[0])
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["metrics"]["images"] == 8 and "AP50" in metrics["metrics"] and metrics["per_category_AP"]
    assert Image.open(folder / "predictions.png").mode == "RGB"
    record = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()
              if '"eval"' in line][-1]
    assert record["step"] == 3 and "AP" in record and any(k.startswith("AP_") for k in record)


def tiny_yaml(tmp_path, tiny_data):
    import yaml

    tree: dict = {}
    for text in TINY_OVERRIDES + [f"data.val_shards={tiny_data / 'val' / 'shards'}", "ray.num_workers=1"]:
        key, value = text.split("=", 1)
        section, leaf = key.split(".")
        tree.setdefault(section, {})[leaf] = yaml.safe_load(value)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_ddetr_eval_on_an_official_format_checkpoint(finished_run, tiny_data, tmp_path, capsys):
    official = tmp_path / "official.pth"
    assert convert(finished_run / "model_final.pth", official, to="official") == "official"
    code = eval_main(["--checkpoint", str(official), "--config", str(tiny_yaml(tmp_path, tiny_data)),
                      "--out", str(tmp_path / "eval")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "AP50" in out and "category" in out and "8 images" in out
    ours = json.loads((finished_run / "eval" / "00000003" / "metrics.json").read_text())["metrics"]
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert again["AP"] == ours["AP"] and again["detections"] == ours["detections"]  # the same model, the same numbers


def test_ddetr_eval_on_a_checkpoint_folder_of_the_run(finished_run, tiny_data, tmp_path, capsys):
    folder = sorted((finished_run / "checkpoints").glob("step_*"))[-1]
    code = eval_main(["--checkpoint", str(folder), "--config", str(tiny_yaml(tmp_path, tiny_data)),
                      "--out", str(tmp_path / "eval")])
    assert code == 0 and (tmp_path / "eval" / "detections.json").exists(), capsys.readouterr()


def test_ddetr_predict_draws_good_images_and_names_the_corrupt_one(finished_run, tiny_data, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    source = Image.open(sorted((tiny_data / "val" / "images").glob("*.jpg"))[0])
    source.convert("L").save(images / "grey.png")
    source.convert("RGBA").save(images / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to show upright
    source.save(images / "rotated.jpg", exif=exif)
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code = predict_main([str(images), "--checkpoint", str(finished_run / "model_final.pth"), "--threshold", "0",
                         "--config", str(tiny_yaml(tmp_path, tiny_data)), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 1
    assert "corrupt.jpg" in captured.err and "3 of 4 images done" in captured.out
    for name in ("grey", "rgba", "rotated"):
        record = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert record["detections"] and {"bbox", "label", "category", "score"} == set(record["detections"][0])
        assert record["detections"][0]["category"] in {"circle", "square", "triangle", "star", "cross", "diamond"}
        assert Image.open(tmp_path / "out" / f"{name}.png").size == (record["width"], record["height"])
    rotated = json.loads((tmp_path / "out" / "rotated.json").read_text())
    assert (rotated["width"], rotated["height"]) == (source.height, source.width)  # turned upright
    assert not (tmp_path / "out" / "corrupt.json").exists()


def test_ddetr_predict_takes_positional_overrides_like_the_other_commands(finished_run, tiny_data, tmp_path, capsys):
    image = sorted((tiny_data / "val" / "images").glob("*.jpg"))[0]
    common = ["--checkpoint", str(finished_run / "model_final.pth"), "--threshold", "0", "--out", str(tmp_path / "out")]
    assert predict_main([str(image), "data.val_scal=64", *common]) == 2  # a misspelled key: named, with the nearest
    assert "unknown config key 'data.val_scal'. Did you mean 'val_scale'?" in capsys.readouterr().err
    # without shards to name the classes they are numbers: the overrides were applied
    assert predict_main([str(image), "data.val_shards=", *common, "data.train_shards="]) == 0
    record = json.loads((tmp_path / "out" / f"{image.stem}.json").read_text())
    assert record["detections"] and all(d["category"] == str(d["label"]) for d in record["detections"])
    # the old option still works, with a note
    assert predict_main([str(image), "--override", "data.val_scale=64", *common]) == 0
    assert "--override is deprecated" in capsys.readouterr().err


def test_the_final_model_carries_its_training_padding_to_eval_and_predict(finished_run, tiny_data, tmp_path):
    # a model learns the padding it trained with (config.pad_multiple): model_final.pth records
    # it, and whatever config evaluates or predicts with it pads alike unless an override says
    import torch

    from ddetr_dist.config import DEMO_CONFIG
    from ddetr_dist.engine.inference import load_trained
    from ddetr_dist.models.convert import METADATA_KEY, TRAINED_PADDING_KEY

    final = torch.load(finished_run / "model_final.pth", weights_only=True)
    assert final[METADATA_KEY][TRAINED_PADDING_KEY] == 1  # trained unpadded
    final[METADATA_KEY][TRAINED_PADDING_KEY] = 64  # as a train.compile run's
    torch.save(final, tmp_path / "compiled.pth")
    config = str(tiny_yaml(tmp_path, tiny_data))
    assert load_trained(tmp_path / "compiled.pth", config, [], DEMO_CONFIG)[0].data.pad_to_multiple == 64
    overridden = load_trained(tmp_path / "compiled.pth", config, ["data.pad_to_multiple=1"], DEMO_CONFIG)[0]
    assert overridden.data.pad_to_multiple == 1
