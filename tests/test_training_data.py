"""Training data: synthetic clips, CSV layouts, stream sampling, bad input."""
import csv
import dataclasses
import logging
import os

import numpy as np
import pytest
import torch

from training import synthetic
from dynamicrafter.pipeline import cover_crop
from training.data import (DatasetError, StreamSampler, VideoDataset, collate, decode_frames, make_dataset,
                           probe_video, read_annotations)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    return synthetic.generate_dataset(str(out), 6, height=32, width=48, frames=12, fps=12, seed=1)


def test_synthetic_clip_moves_as_captioned():
    for direction in synthetic.DIRECTIONS:
        spec = synthetic.ClipSpec("circle", "red", direction, "checker", seed=3)
        clip, track = synthetic.render_clip(spec, 48, 64, 8)
        assert clip.shape == (8, 48, 64, 3) and clip.dtype == np.uint8
        # locate the red object in the first and last frame and compare to the stored track
        cents = []
        for f in (0, -1):
            px = clip[f].astype(int)
            mask = (px[..., 0] > 180) & (px[..., 1] < 90) & (px[..., 2] < 90)
            ys, xs = np.nonzero(mask)
            cents.append((xs.mean() + 0.5, ys.mean() + 0.5))
        (x0, y0), (x1, y1) = cents
        assert abs(x0 - track[0, 0]) < 1.5 and abs(y1 - track[-1, 1]) < 1.5
        dx, dy = synthetic.DIRECTIONS[direction]
        assert np.sign(round(x1 - x0)) == dx and np.sign(round(y1 - y0)) == dy
    assert synthetic.ClipSpec("square", "blue", "left", "noise", 0).caption == "a blue square moves to the left"
    assert synthetic.ClipSpec("triangle", "green", "up", "noise", 0).caption == "a green triangle moves up"


def test_synthetic_specs_balanced():
    specs = synthetic.make_specs(40, seed=0)
    counts = {d: sum(s.direction == d for s in specs) for d in synthetic.DIRECTIONS}
    assert max(counts.values()) - min(counts.values()) <= 10
    assert len({(s.shape, s.color, s.direction) for s in specs}) == 40


def test_corner_origin_hides_the_axis_and_leaves_the_side_clips_as_they_were():
    # a corner start is near an end across the motion too: inside the band where a clip along
    # the other axis starts, so the first frame alone cannot tell the axis
    starts = {}
    for origin in ("side", "corner"):
        for seed in range(40):
            for direction in ("right", "down"):
                _, track = synthetic.render_clip(synthetic.ClipSpec("circle", "red", direction, "noise", seed, origin),
                                                 64, 64, 2)
                starts.setdefault((origin, direction), []).append(track[0])
    band = 64 - (0.14 * 64 + 1) - 0.4 * 64     # farthest from its edge a clip along y starts (smallest r, travel)
    down_y = np.array(starts[("side", "down")])[:, 1]
    assert down_y.max() <= band and down_y.min() >= 0.14 * 64
    for origin in ("side", "corner"):
        across = np.array(starts[(origin, "right")])[:, 1]         # y of clips that move along x
        near_end = np.minimum(across, 64 - across) <= band
        if origin == "corner":
            assert near_end.all() and (across < 32).any() and (across > 32).any()
        else:
            assert not near_end.all()
    with pytest.raises(ValueError, match="origin"):
        synthetic.render_clip(synthetic.ClipSpec("circle", "red", "up", "noise", 0, "centre"), 32, 32, 2)
    # corners come from their own stream: the other clips of a set are the ones it had without
    plain_specs, mixed = synthetic.make_specs(60, seed=7), synthetic.make_specs(60, seed=7, corner_share=0.5)
    assert 15 < sum(s.origin == "corner" for s in mixed) < 45
    assert [dataclasses.replace(s, origin="side") for s in mixed] == plain_specs
    assert {s.origin for s in plain_specs} == {"side"}


def test_plain_csv_roundtrip(plain):
    recs = read_annotations(plain)
    assert len(recs) == 6 and all(os.path.isfile(r.path) for r in recs)
    n, fps = probe_video(recs[0].path)
    assert (n, fps) == (12, 12.0)
    ds = VideoDataset(recs, frames=4, height=32, width=32, max_stride=3, seed=0)
    item = ds[3]
    assert item["video"].shape == (3, 4, 32, 32)
    assert -1.0 <= item["video"].min() < item["video"].max() <= 1.0
    assert item["caption"] in {r.caption for r in recs}
    assert 1 <= item["fs"] == item["stride"] <= 3
    # deterministic per stream index, different across indices
    assert torch.equal(ds[3]["video"], item["video"])
    assert not torch.equal(ds[4]["video"], item["video"])
    # every video of the epoch appears once in the first N stream indices
    assert sorted(ds[k]["path"] for k in range(6)) == sorted(r.path for r in recs)


def test_webvid_layout(tmp_path):
    csv_path = synthetic.generate_dataset(str(tmp_path), 3, height=32, width=32, frames=6, layout="webvid")
    with open(csv_path) as fh:
        header = next(csv.reader(fh))
    assert header[:3] == ["videoid", "name", "page_dir"]
    ds = make_dataset(csv_path, frames=6, height=16, width=16, max_stride=1)
    item = ds[0]
    assert item["video"].shape == (3, 6, 16, 16)
    assert item["caption"].startswith("a ") and item["path"].endswith(".mp4")


def test_fs_is_fps_over_stride(plain):
    ds = make_dataset(plain, frames=3, height=32, width=32, max_stride=4, fs_meaning="fps", seed=5)
    seen = set()
    for k in range(12):
        it = ds[k]
        assert it["fs"] == 12 // it["stride"]
        seen.add(it["stride"])
    assert len(seen) > 1, "random stride never varied"
    capped = make_dataset(plain, frames=3, height=32, width=32, max_stride=4, fs_meaning="fps", fps_max=5)
    assert all(capped[k]["fs"] <= 5 for k in range(6))


def test_frames_at_stride_are_decoded_in_order(plain):
    recs = read_annotations(plain)
    frames = decode_frames(recs[0].path, [0, 3, 6, 9])
    all_frames = decode_frames(recs[0].path, list(range(12)))
    assert np.array_equal(frames, all_frames[[0, 3, 6, 9]])
    ds = VideoDataset(recs[:1], frames=4, height=32, width=48, max_stride=3, seed=0)
    for k in range(5):
        it = ds[k]
        s = it["stride"]
        # the clip equals some strided run of the decoded video, normalised to [-1, 1]
        vid = torch.from_numpy(all_frames).permute(3, 0, 1, 2).float() / 127.5 - 1
        starts = [st for st in range(12 - 3 * s) if torch.allclose(vid[:, st:st + 3 * s + 1:s], it["video"], atol=1e-5)]
        assert starts, f"sample {k} is not a stride-{s} clip of the source"


def test_cover_crop_covers_and_centres():
    x = torch.zeros(1, 3, 20, 40)
    x[..., :, 15:25] = 1.0      # a centred vertical bar
    y = cover_crop(x, 16, 16)
    assert y.shape == (1, 3, 16, 16)
    # scale 0.8 -> 16x32, crop columns 8..24: the bar (12..20 after scaling) sits in the middle
    assert y[0, 0, 8, 8].item() > 0.9 and y[0, 0, 8, 0].item() < 0.1 and y[0, 0, 8, 15].item() < 0.1
    up = cover_crop(torch.rand(2, 3, 8, 8), 16, 24)
    assert up.shape == (2, 3, 16, 24)


def test_unreadable_and_short_videos_skipped_and_logged(plain, tmp_path, caplog):
    recs = read_annotations(plain)
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00 ftypisom this is not a video" * 10)
    short = tmp_path / "short.mp4"
    synthetic.write_video(np.zeros((2, 16, 16, 3), np.uint8), str(short))
    from training.data import VideoRecord
    records = [VideoRecord(str(bad), "x"), VideoRecord(str(short), "y"), recs[0], recs[1]]
    ds = VideoDataset(records, frames=4, height=16, width=16, seed=0)
    with caplog.at_level(logging.WARNING, logger="training.data"):
        items = [ds[k] for k in range(8)]
    assert {it["path"] for it in items} == {recs[0].path, recs[1].path}
    text = caplog.text
    assert "skipping unreadable video" in text and "broken.mp4" in text and "short.mp4" in text
    per_file = [r.getMessage().split(":")[1] for r in caplog.records if "skipping" in r.getMessage()]
    assert sum("broken.mp4" in m for m in per_file) == 1, "each bad file is logged once"


def test_empty_dataset_errors(tmp_path, plain):
    empty = tmp_path / "empty.csv"
    empty.write_text("video,caption\n")
    with pytest.raises(DatasetError, match="empty"):
        make_dataset(str(empty), frames=2, height=8, width=8)
    missing = tmp_path / "missing.csv"
    missing.write_text("video,caption\nnope.mp4,a cat\n")
    with pytest.raises(DatasetError, match="none of the 1 videos listed exists"):
        make_dataset(str(missing), frames=2, height=8, width=8)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("clip,description\na.mp4,b\n")
    with pytest.raises(DatasetError, match="video/path/file.*caption/text/prompt.*videoid,name,page_dir"):
        make_dataset(str(wrong), frames=2, height=8, width=8)
    with pytest.raises(DatasetError, match="not found"):
        make_dataset(str(tmp_path / "absent.csv"), frames=2, height=8, width=8)
    garbage = tmp_path / "g.mp4"
    garbage.write_bytes(b"garbage")
    all_bad = tmp_path / "bad.csv"
    all_bad.write_text("video,caption\ng.mp4,x\n")
    ds = make_dataset(str(all_bad), frames=2, height=8, width=8)
    with pytest.raises(DatasetError, match="none of the 1 videos could be read"):
        ds[0]


def test_stream_sampler_partition_is_invariant():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    single = take(StreamSampler(micro_batch=2, accum=4), 2 * 4 * 3)      # 3 optimizer steps
    ranks = [take(StreamSampler(micro_batch=2, accum=2, rank=r, world=2), 2 * 2 * 3) for r in range(2)]
    for step in range(3):
        one = set(single[step * 8:(step + 1) * 8])
        two = set(ranks[0][step * 4:(step + 1) * 4]) | set(ranks[1][step * 4:(step + 1) * 4])
        assert one == two == set(range(step * 8, step * 8 + 8))
    resumed = take(StreamSampler(micro_batch=2, accum=4, start_step=2), 8)
    assert resumed == single[16:24]


def test_collate_through_dataloader(plain):
    ds = make_dataset(plain, frames=2, height=16, width=16)
    dl = torch.utils.data.DataLoader(ds, batch_size=3, sampler=StreamSampler(3, 1), collate_fn=collate)
    batch = next(iter(dl))
    assert batch["video"].shape == (3, 3, 2, 16, 16)
    assert batch["index"].tolist() == [0, 1, 2] and len(batch["caption"]) == 3
    assert batch["fs"].dtype == torch.long
