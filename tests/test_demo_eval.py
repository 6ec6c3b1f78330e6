"""The demo evaluation's motion measure (training/demo/evaluate.py): the template tracker finds
the true motion, calls a clip that stands still or runs backwards a failure, and is at chance
on noise, so the README's direction figures mean what they say."""
import importlib.util
import os

import numpy as np

from training.synthetic import DIRECTIONS, make_specs, render_clip

_PATH = os.path.join(os.path.dirname(__file__), "..", "training", "demo", "evaluate.py")
_spec = importlib.util.spec_from_file_location("demo_evaluate", _PATH)
evaluate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate)


def _clips(n=24):
    specs = make_specs(n, seed=77)
    clips, tracks = zip(*(render_clip(s, 64, 64, 8) for s in specs))
    rows = [{"color": s.color, "direction": s.direction} for s in specs]
    return np.stack(clips), np.stack(tracks), rows


def test_tracker_follows_the_true_motion():
    gts, tracks, rows = _clips()
    for gt, tr, row in zip(gts, tracks, rows):
        mask = evaluate.object_mask(gt[0], row["color"])
        pos, rms = evaluate.track(gt, gt[0], mask)
        assert np.abs(pos - (tr - tr[0])).max() <= 1.0, row      # whole-pixel placements
        assert rms.max() < 20
    r = evaluate.score(gts, gts, rows, interp=True)
    assert r["direction_agreement"] == 1.0 and r["object_kept"] == 1.0 and r["moved_ge_3px"] == 1.0
    assert r["first_frame_object_offset_px"] == 0.0 and r["mid_position_err_px"] <= 1.0


def test_still_backward_and_noise_clips_do_not_count_as_motion():
    gts, _, rows = _clips()
    still = np.repeat(gts[:, :1], gts.shape[1], axis=1)
    assert evaluate.score(still, gts, rows)["direction_agreement"] == 0.0
    backward = evaluate.score(gts[:, ::-1].copy(), gts, rows)
    assert backward["direction_agreement"] == 0.0 and backward["first_frame_object_offset_px"] > 10
    noise = np.random.default_rng(0).integers(0, 256, gts.shape).astype(np.uint8)
    r = evaluate.score(noise, gts, rows)
    assert r["object_kept"] == 0.0 and 0.2 < r["direction_agreement"] < 0.8
    # a clip moving the other way along the axis: every caption disagrees
    flipped = [{**row, "direction": {"left": "right", "right": "left", "up": "down", "down": "up"}[row["direction"]]}
               for row in rows]
    assert set(DIRECTIONS) >= {row["direction"] for row in flipped}
    assert evaluate.score(gts, gts, flipped)["direction_agreement"] == 0.0


def test_first_frame_over_seeds_counts_colour_changes(monkeypatch):
    """The first-frame check scores every clip x seed: perfect copies score 99 dB and no colour
    change; a clip whose object turns green on the first frame counts as changed."""
    gts, _, rows = _clips(6)
    rows = [{**r, "caption": "a clip"} for r in rows]
    imgs = np.zeros((len(rows), gts.shape[1], 3, 64, 64), dtype=np.float32)     # unused by the fake generate
    recoloured = gts.copy()
    mask = evaluate.object_mask(gts[0, 0], rows[0]["color"])
    recoloured[0, 0][mask] = evaluate.COLORS["green"] if rows[0]["color"] != "green" else evaluate.COLORS["red"]
    for videos, changed in ((gts, 0), (recoloured, 1)):
        monkeypatch.setattr(evaluate, "generate", lambda dc, first, prompts, frames, *, mode, steps, seed, cfg_text,
                            cfg_img, v=videos: v[:len(prompts)])
        r = evaluate.first_frame_over_seeds(None, imgs, gts, rows, seeds=3, batch=8, steps=1)
        assert r["clips"] == 6 and r["seeds"] == 3
        assert r["colour_changed"] == 3 * changed                 # the changed clip, once per seed
        if not changed:
            assert r["first_frame_psnr_min"] == 99.0 and r["first_frame_colour_error_max"] < 1e-9
