"""Training defects found by using the trainer as learners do (issue 8, items 3-10).

Each test drives ``train_lora`` on the tiny profile the way a learner would
(validate, interrupt, resume with other settings, overwrite, kill mid-export,
type settings on the command line) and checks the files the run leaves.
"""
import csv
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import kolors_course.cli as cli
import kolors_course.lora.files as lora_files
import kolors_course.lora.train as lora_train
import kolors_course.models.loading as models
from kolors_course.lora.config import TrainConfig, TrainingError
from kolors_course.lora.train import train_lora


def _cfg(tiny, **kw):
    base = dict(max_steps=6, checkpoint_every=2, validate_every=None, learning_rate=5e-3)
    base.update(kw)
    return TrainConfig.for_profile(tiny, **base)


def _weights(path):
    return load_file(str(path))


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_validation_images_do_not_change_training(tiny, dataset_dir, tmp_path):
    """Item 3: a validation image used to leave the shared scheduler on the inference timesteps."""
    plain = train_lora(tiny, dataset_dir, tmp_path / "plain", _cfg(tiny))
    validated = train_lora(tiny, dataset_dir, tmp_path / "val", _cfg(tiny, validate_every=1))
    # step 0 (the base model) and each of the 6 steps
    assert len(list((tmp_path / "val" / "samples").glob("*.png"))) == 7
    assert _same_weights(_weights(plain.files["lora"]), _weights(validated.files["lora"]))
    assert plain.losses == validated.losses
    assert plain.fixed_loss_after == validated.fixed_loss_after


def test_a_headless_training_bar_prints_a_few_lines_not_one_a_step(tiny, dataset_dir, tmp_path, monkeypatch,
                                                                   capsys):
    """Headless (papermill, the kit's runner) the bar prints at most every 30 seconds; the loss shown
    on it once forced a print at every step (notebook 03's executed copy held 84 bar lines)."""
    monkeypatch.setenv("KOLORS_COURSE_HEADLESS", "1")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)      # a silenced bar would pass for any reason
    capsys.readouterr()
    res = train_lora(tiny, dataset_dir, tmp_path / "r", _cfg(tiny))
    lines = capsys.readouterr().out.count("training LoRA:")
    assert res.steps >= 6 and lines <= 3, lines


def test_no_validation_prompts_means_no_validation_images(tiny, dataset_dir, tmp_path):
    """validation_prompts=() asks for no images: the run trains and exports (it once failed at the
    end, building a grid of nothing)."""
    res = train_lora(tiny, dataset_dir, tmp_path / "r", _cfg(tiny, validate_every=2, validation_prompts=()))
    assert res.samples == [] and res.files["lora"].exists()
    assert not (tmp_path / "r" / "samples").exists()


class Stop(Exception):
    pass


def _stop_at(k):
    def cb(step, loss):
        if step == k:
            raise Stop()
    return cb


def test_resume_with_changed_settings_is_refused_and_not_recorded(tiny, dataset_dir, tmp_path):
    """Item 4: a resume used to keep the checkpoint's learning rate but record the new one."""
    run = tmp_path / "r"
    with pytest.raises(Stop):
        train_lora(tiny, dataset_dir, run, _cfg(tiny), callback=_stop_at(3))
    recorded = (run / "train_config.json").read_text()
    with pytest.raises(TrainingError) as err:
        train_lora(tiny, dataset_dir, run, _cfg(tiny, learning_rate=1e-4, rank=8))
    msg = str(err.value)
    assert "learning_rate" in msg and "rank" in msg and "0.005" in msg
    assert (run / "train_config.json").read_text() == recorded      # nothing recorded that was not used
    # settings that do not change the finished steps may change: more steps
    res = train_lora(tiny, dataset_dir, run, _cfg(tiny, max_steps=8))
    assert res.resumed_from == 2 and res.steps == 8
    assert json.loads((run / "train_config.json").read_text())["max_steps"] == 8


def test_resume_on_a_changed_training_set_is_refused(tiny, dataset_dir, tmp_path):
    data = tmp_path / "ds"
    shutil.copytree(dataset_dir, data)
    with pytest.raises(Stop):
        train_lora(tiny, data, tmp_path / "r", _cfg(tiny), callback=_stop_at(3))
    meta = data / "train" / "metadata.csv"
    rows = list(csv.reader(meta.open(encoding="utf-8")))
    rows[1][1] = "another caption"
    with meta.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(TrainingError, match="training set changed"):
        train_lora(tiny, data, tmp_path / "r", _cfg(tiny))


def test_divergence_never_leaves_a_poisoned_checkpoint(tiny, dataset_dir, tmp_path):
    """Item 5: the checkpoint after the step that blew the weights up used to be kept as good."""
    run = tmp_path / "nan"
    cfg = _cfg(tiny, max_steps=10, checkpoint_every=1, learning_rate=1e30, max_grad_norm=0.0)
    with pytest.raises(TrainingError, match="diverged"):
        train_lora(tiny, dataset_dir, run, cfg)
    for ckpt in (run / "checkpoints").glob("step-*"):
        # a kept checkpoint must be usable: its LoRA fused into the UNet gives finite predictions
        pipe = models.load_pipeline(tiny, lora=ckpt / "lora.safetensors")
        emb = pipe.encode_prompt("一个红色的圆形", positive=True)
        out = pipe.unet(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
                        timestep=torch.tensor(500.0), encoder_hidden_states=emb["encoder_hidden_states"],
                        add_text_embeds=emb["add_text_embeds"], add_time_id=torch.tensor([64, 64, 0, 0, 64, 64]))
        assert torch.isfinite(out).all(), f"{ckpt.name} was kept but its weights are blown up"
    assert not (run / "lora.safetensors").exists()


def test_overwrite_trains_afresh_and_replaces_only_when_complete(tiny, dataset_dir, tmp_path):
    """Item 6: overwrite=True used to resume (0 steps) or crash with another rank."""
    run = tmp_path / "r"
    first = train_lora(tiny, dataset_dir, run, _cfg(tiny))
    before = {p.name: p.read_bytes() for p in run.glob("*.safetensors")}
    # an overwrite killed half-way leaves the finished run exactly as it was
    with pytest.raises(Stop):
        train_lora(tiny, dataset_dir, run, _cfg(tiny, rank=8), overwrite=True, callback=_stop_at(3))
    assert {p.name: p.read_bytes() for p in run.glob("*.safetensors")} == before
    again = train_lora(tiny, dataset_dir, run, _cfg(tiny, rank=8), overwrite=True)
    assert again.resumed_from is None and again.steps == 6 and len(again.losses) == 6
    assert again.run_dir == run and again.files["lora"].parent == run
    with safe_open(str(run / "lora.safetensors"), "pt") as f:
        assert f.metadata()["lora_rank"] == "8"
    assert json.loads((run / "train_config.json").read_text())["rank"] == 8
    assert not list(tmp_path.glob(".r.*")), "staging folders are cleaned up"
    assert first.files["lora"] == again.files["lora"]


def test_a_kill_during_export_is_redone_on_the_next_run(tiny, dataset_dir, tmp_path, monkeypatch):
    """Item 7: lora.safetensors written but not the rest used to count as a finished run."""
    run = tmp_path / "r"
    real = lora_files._atomic_save

    def dies_on_kohya(tensors, path, metadata):
        if path.name.endswith("_kohya.safetensors"):
            raise Stop()
        return real(tensors, path, metadata)
    monkeypatch.setattr(lora_files, "_atomic_save", dies_on_kohya)
    with pytest.raises(Stop):
        train_lora(tiny, dataset_dir, run, _cfg(tiny))
    assert (run / "lora.safetensors").exists() and not (run / "lora_kohya.safetensors").exists()
    monkeypatch.setattr(lora_files, "_atomic_save", real)
    res = train_lora(tiny, dataset_dir, run, _cfg(tiny))
    assert res.resumed_from == 6 and res.steps == 6
    for name in ("lora.safetensors", "lora_kohya.safetensors", "loss.png", "summary.json"):
        assert (run / name).exists(), name
    with pytest.raises(TrainingError, match="already holds a finished LoRA"):
        train_lora(tiny, dataset_dir, run, _cfg(tiny))


def test_command_line_settings_accept_every_number_notation(tiny, dataset_dir, tmp_path, capsys):
    """Item 8: `-s learning_rate 1e-4` used to fail with a comparison between str and int."""
    run = tmp_path / "cli"
    rc = cli.main(["train", "--dataset", str(dataset_dir), "--run", str(run), "--profile", "tiny",
                   "-s", "learning_rate", "1e-4", "-s", "max_steps", "2e0", "-s", "checkpoint_every", "1",
                   "-s", "random_flip", "no"])
    assert rc == 0, capsys.readouterr().err
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["learning_rate"] == pytest.approx(1e-4) and saved["max_steps"] == 2
    assert saved["random_flip"] is False
    rc = cli.main(["train", "--dataset", str(dataset_dir), "--run", str(tmp_path / "bad"), "--profile", "tiny",
                   "-s", "max_steps", "lots"])
    assert rc == 2 and "max_steps='lots': expected a whole number" in capsys.readouterr().err
    assert cli._parse_value("1e-4") == pytest.approx(1e-4) and cli._parse_value("7") == 7
    assert cli._parse_value("[2, 4]") == [2, 4] and cli._parse_value("红色") == "红色"


def test_a_checkpoint_lora_loads_at_its_trained_strength(tiny, dataset_dir, tmp_path):
    """Item 9: checkpoint LoRAs carried no rank/alpha, so they loaded at scale 1 (rank 8, alpha 2: 4x)."""
    res = train_lora(tiny, dataset_dir, tmp_path / "r", _cfg(tiny, rank=8, alpha=2.0))
    last = tmp_path / "r" / "checkpoints" / "step-000006" / "lora.safetensors"
    with safe_open(str(last), "pt") as f:
        meta = f.metadata()
    assert meta["lora_rank"] == "8" and float(meta["lora_alpha"]) == 2.0 and meta["checkpoint_step"] == "6"
    key = next(k for k in _weights(last) if k.endswith(".lora_A.weight"))
    name = key[: -len(".lora_A.weight")] + ".weight"
    from_ckpt = dict(models.load_pipeline(tiny, lora=last).unet.named_parameters())[name]
    exported = dict(models.load_pipeline(tiny, lora=res.files["lora"]).unet.named_parameters())[name]
    torch.testing.assert_close(from_ckpt, exported)


def test_gradient_accumulation_logs_the_mean_of_its_micro_batches(tiny, dataset_dir, tmp_path, monkeypatch):
    """Item 10: with grad_accum the logged loss used to be the last micro-batch's only."""
    seen = []
    real = lora_train.batch_loss

    def record(*args, **kwargs):
        loss = real(*args, **kwargs)
        seen.append(float(loss.detach()))
        return loss
    monkeypatch.setattr(lora_train, "batch_loss", record)
    res = train_lora(tiny, dataset_dir, tmp_path / "r", _cfg(tiny, max_steps=3, grad_accum=2, batch_size=1))
    assert len(seen) == 6
    assert res.losses == pytest.approx([(seen[i] + seen[i + 1]) / 2 for i in (0, 2, 4)])


def test_peak_memory_is_taken_after_export_and_in_gb(tiny, dataset_dir, tmp_path):
    import resource
    res = train_lora(tiny, dataset_dir, tmp_path / "r", _cfg(tiny, max_steps=2))
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    # ru_maxrss only grows, and the run reads it last after the export
    assert res.peak_training_gb <= res.peak_memory_gb <= rss_gb
    assert res.peak_memory_gb > 0.9 * rss_gb
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert "10^9" in summary["memory_measure"] or "GB" in summary["memory_measure"]


def _small_set(tmp_path, captions):
    from PIL import Image
    train = tmp_path / "small" / "train"
    train.mkdir(parents=True)
    with (train / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "text"])
        for i, text in enumerate(captions):
            Image.new("RGB", (64, 64), (40 * i, 200, 90)).save(train / f"{i}.jpg")
            w.writerow([f"{i}.jpg", text])
    return tmp_path / "small"


def test_a_batch_larger_than_the_training_set_is_refused(tiny, tmp_path):
    data = _small_set(tmp_path, ["红色", "蓝色", "绿色"])
    with pytest.raises(TrainingError, match=r"larger than the training set \(3 images\)"):
        train_lora(tiny, data, tmp_path / "r", _cfg(tiny, batch_size=4))


def test_empty_captions_are_reported(tiny, tmp_path):
    data = _small_set(tmp_path, ["红色", "", "绿色"])
    with pytest.warns(UserWarning, match="1 of 3 training captions are empty"):
        train_lora(tiny, data, tmp_path / "r", _cfg(tiny, batch_size=1, max_steps=2))


def test_a_train_config_of_the_wrong_type_gets_a_message(tiny, dataset_dir, tmp_path):
    cfg = TrainConfig.for_profile(tiny)
    cfg.learning_rate = "fast"           # e.g. a papermill parameter typed as text
    with pytest.raises(TrainingError, match="learning_rate='fast': expected a number"):
        train_lora(tiny, dataset_dir, tmp_path / "r", cfg)


def test_a_finished_run_is_reused_only_with_the_same_settings(tiny, dataset_dir, tmp_path):
    """Notebook 03 run again from the top reuses its finished run instead of training twice."""
    run = tmp_path / "r"
    first = train_lora(tiny, dataset_dir, run, _cfg(tiny))
    stamp = (run / "lora.safetensors").stat().st_mtime_ns
    again = train_lora(tiny, dataset_dir, run, _cfg(tiny), reuse_finished=True)
    assert (run / "lora.safetensors").stat().st_mtime_ns == stamp        # nothing trained or written
    assert again.losses == pytest.approx(first.losses) and again.files == first.files
    assert again.fixed_loss_after == pytest.approx(first.fixed_loss_after)
    assert [s for s, _ in again.fixed_losses] == [s for s, _ in first.fixed_losses]
    assert [v for _, v in again.fixed_losses] == pytest.approx([v for _, v in first.fixed_losses])
    assert [s for s, _ in again.samples] == [6]
    with pytest.raises(TrainingError, match="learning_rate"):
        train_lora(tiny, dataset_dir, run, _cfg(tiny, learning_rate=1e-3), reuse_finished=True)
