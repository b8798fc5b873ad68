"""FastDVDNet as a streaming stage: `vlrt denoise` against the plain network over the whole clip, edges, alpha."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import read_frames, write_frames
from PIL import Image

from vlrt.cli import main
from vlrt.fastdvdnet.checkpoint import save_upstream_layout
from vlrt.fastdvdnet.network import FastDVDnet, denoise_padded
from vlrt.fastdvdnet.window import window_indices


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(5)
    net = FastDVDnet()
    for m in net.modules():  # non-trivial BatchNorm statistics, so eval mode matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("w") / "model.pth"
    save_upstream_layout(net, path)
    return path, net.eval()


def _whole_clip_reference(frames: list[np.ndarray], net: FastDVDnet, sigma: float) -> list[np.ndarray]:
    """The network applied frame by frame with the mirrored 5-frame window, the whole clip in memory."""
    clip = torch.stack([torch.from_numpy(f).permute(2, 0, 1).float() / 255 for f in frames])
    n = len(frames)
    out = []
    for f in range(n):
        stack = torch.cat([clip[i] for i in window_indices(f, n)]).unsqueeze(0)
        noise_map = torch.full((1, 1, *stack.shape[-2:]), sigma / 255)
        den = denoise_padded(net, stack, noise_map)[0]
        out.append(np.rint(den.permute(1, 2, 0).numpy() * 255).clip(0, 255).astype(np.uint8))
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_denoise_equals_the_network_over_the_whole_clip(n, weights, tmp_path):
    path, net = weights
    rng = np.random.default_rng(n)
    frames = [rng.integers(0, 256, (22, 30, 3), dtype=np.uint8) for _ in range(n)]  # odd size, not a multiple of 4
    write_frames(tmp_path / "in", frames)
    code = main(["denoise", str(tmp_path / "in"), "-o", str(tmp_path / "out") + "/", "--weights", str(path),
                 "--sigma", "25", "--max-batch", "3", "--quiet"])
    assert code == 0
    got = read_frames(tmp_path / "out")
    expected = _whole_clip_reference(frames, net, 25)
    assert len(got) == n
    for g, e, f in zip(got, expected, frames):
        assert g.shape == f.shape
        assert np.abs(g.astype(int) - e.astype(int)).max() <= 1
    assert any(np.abs(g.astype(int) - f.astype(int)).mean() > 1 for g, f in zip(got, frames))


def test_alpha_channel_passes_through_untouched(weights, tmp_path):
    path, _ = weights
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    alphas = []
    for i in range(4):
        rgba = rng.integers(0, 256, (21, 17, 4), dtype=np.uint8)
        alphas.append(rgba[..., 3].copy())
        Image.fromarray(rgba, "RGBA").save(folder / f"{i:03d}.png")
    assert main(["denoise", str(folder), "-o", str(tmp_path / "out") + "/", "--weights", str(path), "--quiet"]) == 0
    outs = sorted((tmp_path / "out").glob("*.png"))
    assert len(outs) == 4
    for out, alpha in zip(outs, alphas):
        img = Image.open(out)
        assert img.mode == "RGBA" and np.array_equal(np.asarray(img)[..., 3], alpha)


def test_render_with_fastdvdnet_is_deterministic(demo_model, clip_folder, tmp_path):
    """The synthetic noise comes from the run's seed: two runs give the same frames, another seed does not."""
    from vlrt.render.pipeline import render
    from vlrt.settings.config import build_settings

    def run(seed, name):
        s = build_settings(overrides=dict(model="demo", backend="torch", loop_n=2, steps=2, denoising_strength=0.5, seed=seed,
                                          video_post_process_method="fastdvdnet", fastdvdnet_noise_sigma=30))
        render(s, str(clip_folder), str(tmp_path / name) + "/", quiet=True, model=demo_model)
        return read_frames(tmp_path / name)

    a, b, c = run(1, "a"), run(1, "b"), run(2, "c")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(not np.array_equal(x, z) for x, z in zip(a, c))


def test_render_without_weights_for_a_real_model_says_where_to_get_them(tiny8_dir, clip_folder, tmp_path, capsys):
    code = main(["render", str(clip_folder), "-o", str(tmp_path / "o.mp4"), "--model", str(tiny8_dir),
                 "--video-post-process-method", "fastdvdnet", "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and "m-tassano/fastdvdnet" in err and "--fastdvdnet-weights" in err
    assert not (tmp_path / "o.mp4").exists()


def test_denoise_on_ort_agrees_with_torch(weights, tmp_path):
    path, _ = weights
    rng = np.random.default_rng(3)
    write_frames(tmp_path / "in", [rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) for _ in range(5)])
    outs = {}
    for backend in ("torch", "ort"):
        out = tmp_path / backend
        assert main(["denoise", str(tmp_path / "in"), "-o", str(out) + "/", "--weights", str(path), "--backend", backend,
                     "--quiet"]) == 0
        outs[backend] = read_frames(out)
    assert len(outs["ort"]) == 5
    assert max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(outs["ort"], outs["torch"])) <= 1
