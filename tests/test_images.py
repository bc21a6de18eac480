"""gradmon's figures as TensorBoard images during the run, drawn off the training thread: written at every
``images_every_n_logs``-th logging step and at the end of fit, read back with tensorboard's own reader."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from helpers import MLP, accumulator, fit, logdir
from PIL import Image

from gradmon import ActivationMonitor, GradHealthMonitor, GradNormMonitor, WeightInit


def images(tmp_path: Path) -> dict[str, list[tuple[int, np.ndarray]]]:
    acc = accumulator(logdir(tmp_path))
    found = {}
    for tag in acc.Tags()["images"]:
        found[tag] = [(e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string)))) for e in acc.Images(tag)]
    return found


def test_the_heatmaps_and_the_gradient_flow_are_tensorboard_images_at_the_cadence_and_the_end(tmp_path: Path) -> None:
    fit(MLP(depth=4), [WeightInit("normal(std=0.01)", seed=0, verbose=False),
                       GradNormMonitor(log_every_n_steps=2, images_every_n_logs=3), GradHealthMonitor(),
                       ActivationMonitor(log_every_n_steps=2)], steps=12, tmp_path=tmp_path)
    found = images(tmp_path)
    assert {"gradmon/grad_norm_heatmap", "gradmon/gradient_flow", "gradmon/activation_rms_heatmap",
            "gradmon/dead_or_saturated_heatmap"} <= set(found)
    # Logging steps 0, 2, ..., 10: the 3rd and 6th logs (steps 4 and 10), then the end of fit (step 12).
    assert [step for step, _ in found["gradmon/grad_norm_heatmap"]] == [4, 10, 12]
    for _, image in found["gradmon/gradient_flow"]:
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0
    # The heatmap's cells are coloured, not the light grey of a missing value (it once drew a grey field).
    _, heatmap = found["gradmon/grad_norm_heatmap"][-1]
    grey = np.all(heatmap[..., :3] == (211, 211, 211), axis=-1).mean()
    viridis = ((heatmap[..., 2] > heatmap[..., 0] + 40) | (heatmap[..., 1] > heatmap[..., 0] + 80)).mean()
    assert grey < 0.02 and viridis > 0.1, (grey, viridis)


@pytest.mark.parametrize("every", [None])
def test_no_images_when_turned_off(tmp_path: Path, every) -> None:
    fit(MLP(depth=2), [GradNormMonitor(log_every_n_steps=1, images_every_n_logs=every)], steps=4, tmp_path=tmp_path)
    assert images(tmp_path) == {}
