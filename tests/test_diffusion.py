"""Notebook 06's demonstrations open kc.generate's box: they must be the same computation."""
import numpy as np
import pytest
import torch

from kolors_course.generation import diffusion
from kolors_course.generation.text2image import generate


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_the_loop_by_hand_is_the_pipelines_loop_pixel_for_pixel(tiny_pipe, cfg_scale):
    kw = dict(seed=3, steps=3, cfg_scale=cfg_scale)
    by_hand = diffusion.denoise_by_hand(tiny_pipe, "一个红色的圆形", "蓝色", **kw)
    assert np.array_equal(np.asarray(by_hand.image), np.asarray(generate(tiny_pipe, "一个红色的圆形", "蓝色", **kw)))
    assert len(by_hand.predicted_clean) == 3 and by_hand.timesteps[0] > by_hand.timesteps[-1] == 0
    # the update at each step moves x_t towards the model's clean guess: the last step lands on it
    for x_t, x0 in zip(by_hand.latents, by_hand.predicted_clean):
        assert torch.isfinite(x0).all() and x0.shape == x_t.shape


def test_guidance_by_hand_matches_the_formula(tiny_pipe):
    """cfg 1 ignores the negative prompt: changing it changes nothing; cfg 4 uses it."""
    a = diffusion.denoise_by_hand(tiny_pipe, "一个圆形", "红色", seed=1, steps=2, cfg_scale=1.0).image
    b = diffusion.denoise_by_hand(tiny_pipe, "一个圆形", "绿色", seed=1, steps=2, cfg_scale=1.0).image
    c = diffusion.denoise_by_hand(tiny_pipe, "一个圆形", "绿色", seed=1, steps=2, cfg_scale=4.0).image
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(b), np.asarray(c))


def test_the_forward_process_goes_from_the_picture_to_noise(tiny_pipe):
    picture = generate(tiny_pipe, "一个圆形", seed=0)
    noisy = diffusion.forward_process(tiny_pipe, picture, seed=0)
    ts = [t for t, _, _ in noisy]
    assert ts[0] == 0 and ts[-1] == tiny_pipe.diffsynth.scheduler.num_train_timesteps - 1
    x0 = diffusion.encode(tiny_pipe, picture)
    noise_left = (1 - tiny_pipe.diffsynth.scheduler.alphas_cumprod[0]) ** 0.5     # about 0.03 at t=0
    assert float((noisy[0][1] - x0).abs().max()) < 5 * noise_left
    fractions = [diffusion.signal_fraction(tiny_pipe, t) for t in ts]
    assert fractions == sorted(fractions, reverse=True) and fractions[0] > 0.99 and fractions[-1] < 0.1
    # the last one is (almost) the noise alone: nearly uncorrelated with the picture's latents
    corr = np.corrcoef(noisy[-1][1].flatten().numpy(), x0.flatten().numpy())[0, 1]
    assert abs(corr) < 0.3


def test_the_vae_round_trip_reports_what_survives(tiny_pipe):
    picture = generate(tiny_pipe, "一个圆形", seed=0)
    latents, back, psnr = diffusion.vae_round_trip(tiny_pipe, picture)
    assert latents.shape == (1, 4, picture.height // 8, picture.width // 8)
    assert back.size == picture.size and np.isfinite(psnr)
    assert len(diffusion.latent_channels(latents, size=32)) == 4


def test_training_from_scratch_changes_the_samples_reproducibly_and_leaves_the_pipeline(tiny, tiny_pipe):
    import numpy as np
    import torch

    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    kw = dict(steps=6, sample_every=3, batch_size=4, n_scenes=16, seed=3)
    a = diffusion.train_from_scratch(tiny, "一个红色的圆形，蓝色背景", **kw)
    assert [n for n, _ in a.samples] == [0, 3, 6] and len(a.losses) == 6
    first, last = (np.asarray(im, np.float32) for _, im in (a.samples[0], a.samples[-1]))
    assert np.abs(first - last).mean() > 1.0, "six training steps left the samples as they were"
    b = diffusion.train_from_scratch(tiny, "一个红色的圆形，蓝色背景", **kw)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(a.samples, b.samples))
    after = tiny_pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the learner's pipeline was changed"


def test_training_from_scratch_is_for_the_tiny_world_only():
    from kolors_course.core.profiles import KOLORS

    with pytest.raises(ValueError, match="tiny"):
        diffusion.train_from_scratch(KOLORS)
