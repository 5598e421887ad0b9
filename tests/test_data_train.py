"""DAM training: the mean-texture baseline it reports, and resuming from a saved state."""

from __future__ import annotations

import pytest
import torch

from avatarq.data.capture import MultifaceCapture
from avatarq.data.synthetic_capture import SyntheticCaptureConfig, write_synthetic_capture
from avatarq.data.train import TrainConfig, train_dam

CONFIG = TrainConfig(z_dim=8, tex_size=32, iters=6, batch=2)


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> MultifaceCapture:
    config = SyntheticCaptureConfig(
        texture_size=64, n_cameras=2, segment_frames=(4, 4), mesh_bands=16, mesh_sectors=24
    )
    return MultifaceCapture(write_synthetic_capture(tmp_path_factory.mktemp("cap"), config))


@pytest.fixture(scope="module")
def uninterrupted(capture):
    return train_dam(capture, CONFIG)


@pytest.mark.slow
def test_an_interrupted_training_resumes_to_the_same_weights_and_losses(
    capture, uninterrupted, tmp_path
):
    def stop_after_step_5(phase, done=0, total=None):
        if done == 5:
            raise Stop

    state = tmp_path / "state.pt"
    with pytest.raises(Stop):
        train_dam(capture, CONFIG, stop_after_step_5, state_path=state, state_every=2)
    model, report = train_dam(capture, CONFIG, state_path=state, state_every=2)
    full_model, full_report = uninterrupted
    assert report.losses == full_report.losses
    for name, value in full_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


@pytest.mark.slow
def test_a_state_saved_with_other_settings_is_ignored(capture, tmp_path):
    state = tmp_path / "state.pt"
    train_dam(capture, TrainConfig(z_dim=8, tex_size=32, iters=2, batch=2), state_path=state)
    _, report = train_dam(capture, CONFIG, state_path=state)
    assert len(report.losses) == 6


def test_the_report_states_the_loss_of_predicting_the_mean_texture(uninterrupted):
    _, report = uninterrupted
    assert report.mean_texture_loss > 0
    # a decoder that ignores its code does no better than the per-texel mean target, and
    # 6 steps from random weights are far worse than that
    assert report.texture_losses[0] > report.mean_texture_loss
