import numpy as np
import pytest
import torch

from sbr.tiny import write_video
from sbr.video import VideoError, frame_indices, load_frames, load_image, read_video


@pytest.mark.parametrize("total, fps, expected", [
    # 3 s at 30 fps: 3 * 2 = 6 frames; linspace(0, 89, 6) = 0, 17.8, 35.6, 53.4, 71.2, 89
    (90, 30, [0, 18, 36, 53, 71, 89]),
    # 1 s: 2 frames, raised to the minimum 4; linspace(0, 29, 4) = 0, 9.67, 19.33, 29
    (30, 30, [0, 10, 19, 29]),
    # 4.5 s: 9 frames, floored to the even 8; step 134 / 7 = 19.14
    (135, 30, [0, 19, 38, 57, 77, 96, 115, 134]),
    # 8 s: exactly 16; step 239 / 15 = 15.93 (127.47 -> 127)
    (240, 30, [0, 16, 32, 48, 64, 80, 96, 112, 127, 143, 159, 175, 191, 207, 223, 239]),
    # 100 s: 200 frames capped at 16; step 2999 / 15 = 199.93 (1599.47 -> 1599)
    (3000, 30, [0, 200, 400, 600, 800, 1000, 1200, 1400, 1599, 1799, 1999, 2199, 2399, 2599, 2799, 2999]),
    # 3 frames in all: min(4, 3) = 3, floored to the even 2
    (3, 30, [0, 2]),
    # a single frame repeats to fill Qwen's temporal patch of 2
    (1, 30, [0, 0]),
])
def test_frame_indices(total, fps, expected):
    assert frame_indices(total, fps) == expected


def test_frame_indices_knobs_and_bad_input():
    assert frame_indices(3000, 30, max_frames=8) == [round(i * 2999 / 7) for i in range(8)]
    assert len(frame_indices(60, 30, fps=4.0)) == 8
    with pytest.raises(ValueError):
        frame_indices(0, 30)


def gray_ramp(path, n, fps):
    """A clip whose frame t is a flat grey of level 6 t: the level tells which frame was read."""
    frames = np.stack([np.full((48, 64, 3), 6 * t, np.uint8) for t in range(n)])
    write_video(str(path), frames, fps)


def test_read_video_takes_the_sampled_frames_resized(tmp_path):
    path = tmp_path / "ramp.mp4"
    gray_ramp(path, 40, 30)                       # 1.33 s -> indices 0, 13, 26, 39
    clip = read_video(str(path))
    assert clip.frames.shape == (4, 3, 252, 252) and clip.frames.dtype == torch.uint8
    assert clip.total_frames == 40 and clip.video_fps == pytest.approx(30)
    assert clip.sample_fps == pytest.approx(4 / 40 * 30)
    levels = clip.frames.float().mean(dim=(1, 2, 3))
    assert torch.allclose(levels, torch.tensor([0.0, 78, 156, 234]), atol=4), levels
    assert torch.equal(load_frames(str(path)), clip.frames)


def test_long_clip_gives_16_frames(tmp_path):
    path = tmp_path / "long.mp4"
    gray_ramp(path, 42, 4)                        # 10.5 s at 4 fps: 21 at 2 fps -> 16
    assert load_frames(str(path)).shape == (16, 3, 252, 252)


def test_corrupt_and_missing_videos_name_the_file(tmp_path):
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    with pytest.raises(VideoError, match="corrupt.mp4"):
        load_frames(str(bad))
    with pytest.raises(VideoError, match="missing.mp4"):
        load_frames(str(tmp_path / "missing.mp4"))


def test_load_image_is_rgb_252(tmp_path):
    from PIL import Image
    Image.new("RGBA", (80, 60), (10, 200, 30, 128)).save(tmp_path / "obs.png")
    image = load_image(str(tmp_path / "obs.png"))
    assert image.shape == (3, 252, 252) and image.dtype == torch.uint8
    assert image[:, 100, 100].tolist() == [10, 200, 30]          # a flat colour survives the bicubic resize
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(VideoError, match="broken.png"):
        load_image(str(tmp_path / "broken.png"))
