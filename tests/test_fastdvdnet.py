"""FastDVDnet: checkpoint contract, architecture against an independent reference, streaming reuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vlrt.errors import VlrtError
from vlrt.fastdvdnet.checkpoint import load_fastdvdnet, save_upstream_layout
from vlrt.fastdvdnet.network import DenoisingBlock, FastDVDnet, denoise_padded
from vlrt.fastdvdnet.streaming import StreamingDenoiser
from vlrt.fastdvdnet.window import mirror_index, window_indices

SIGMA = 30 / 255


def _randomised() -> FastDVDnet:
    """Random weights and BatchNorm statistics far from the defaults, so eval-mode BN matters."""
    torch.manual_seed(0)
    model = FastDVDnet()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(1234)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny frames: intra-op threads only add synchronisation, which on a busy machine costs 20x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> FastDVDnet:
    return _randomised()


@pytest.fixture(scope="module")
def upstream_pth(model: FastDVDnet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    save_upstream_layout(model, path)
    return path


def _assert_same_weights(a: FastDVDnet, b: FastDVDnet) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# --- architecture ---------------------------------------------------------------------------


def test_parameter_count() -> None:
    net = FastDVDnet()
    assert sum(p.numel() for p in net.parameters()) == 2_479_096
    assert sum(p.numel() for p in DenoisingBlock().parameters()) == 1_239_548
    stats = sum(b.numel() for n, b in net.named_buffers() if n.endswith(("running_mean", "running_var")))
    assert stats == 4_456
    assert len(net.state_dict()) == 162


# --- checkpoint loading ---------------------------------------------------------------------


def test_upstream_layout_loads_strictly(model: FastDVDnet, upstream_pth: Path) -> None:
    raw = torch.load(upstream_pth, weights_only=True)
    assert len(raw) == 162 and all(k.startswith("module.temp") for k in raw)
    assert tuple(raw["module.temp1.inc.convblock.0.weight"].shape) == (90, 4, 3, 3)
    assert tuple(raw["module.temp2.upc2.convblock.1.weight"].shape) == (256, 128, 3, 3)
    loaded = load_fastdvdnet(upstream_pth)
    assert not loaded.training
    _assert_same_weights(model, loaded)


def test_legacy_format_unprefixed_and_safetensors(model: FastDVDnet, tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.pth"
    save_upstream_layout(model, legacy, legacy=True)
    _assert_same_weights(model, load_fastdvdnet(legacy))

    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    _assert_same_weights(model, load_fastdvdnet(bare))

    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, st)
    _assert_same_weights(model, load_fastdvdnet(st))


def _edited(upstream_pth: Path, tmp_path: Path, edit) -> Path:
    state = torch.load(upstream_pth, weights_only=True)
    edit(state)
    out = tmp_path / "edited.pth"
    torch.save(state, out)
    return out


def test_wrong_key_is_named(upstream_pth: Path, tmp_path: Path) -> None:
    def rename(s: dict) -> None:
        s["module.temp1.downc0.convblock.0.weightx"] = s.pop("module.temp1.downc0.convblock.0.weight")

    path = _edited(upstream_pth, tmp_path, rename)
    with pytest.raises(VlrtError) as err:
        load_fastdvdnet(path)
    msg = str(err.value)
    assert "'module.temp1.downc0.convblock.0.weight'" in msg and "missing" in msg and "(64, 32, 3, 3)" in msg
    assert "weightx" in msg and str(path) in msg


def test_first_wrong_shape_is_named(upstream_pth: Path, tmp_path: Path) -> None:
    def reshape(s: dict) -> None:
        s["module.temp2.inc.convblock.0.weight"] = torch.zeros(90, 3, 3, 3)
        s["module.temp1.outc.convblock.3.weight"] = torch.zeros(3, 32, 1, 1)

    path = _edited(upstream_pth, tmp_path, reshape)
    with pytest.raises(VlrtError) as err:
        load_fastdvdnet(path)
    msg = str(err.value)
    assert "'module.temp1.outc.convblock.3.weight'" in msg and "temp2" not in msg
    assert "(3, 32, 1, 1)" in msg and "(3, 32, 3, 3)" in msg and str(path) in msg


def test_unexpected_key_is_named(upstream_pth: Path, tmp_path: Path) -> None:
    path = _edited(upstream_pth, tmp_path, lambda s: s.update({"module.temp3.x": torch.zeros(1)}))
    with pytest.raises(VlrtError, match=r"unexpected key 'module\.temp3\.x'"):
        load_fastdvdnet(path)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(VlrtError) as err:
        load_fastdvdnet(tmp_path / "model.pth")
    msg = str(err.value)
    assert "github.com/m-tassano/fastdvdnet" in msg and "001d08c260a2cde36b0c023e251e6be97f9f48dc" in msg
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(VlrtError, match="junk.pth"):
        load_fastdvdnet(junk)


# --- independent reference of SPEC.md §7.1, straight from the state-dict tensors -------------


def _ref_block(sd: dict, p: str, frames9: torch.Tensor, nm: torch.Tensor) -> torch.Tensor:
    def conv(x, name, stride=1, groups=1):
        return F.conv2d(x, sd[f"{p}{name}.weight"], stride=stride, padding=1, groups=groups)

    def bn_relu(x, name):
        g = lambda s: sd[f"{p}{name}.{s}"]  # noqa: E731
        y = F.batch_norm(x, g("running_mean"), g("running_var"), g("weight"), g("bias"), False, 0.0, 1e-5)
        return F.relu(y)

    def two(x, q):  # conv+BN+ReLU twice, layers q.0/q.1 and q.3/q.4
        return bn_relu(conv(bn_relu(conv(x, f"{q}.0"), f"{q}.1"), f"{q}.3"), f"{q}.4")

    f0, f1, f2 = frames9[:, 0:3], frames9[:, 3:6], frames9[:, 6:9]
    x = torch.cat([f0, nm, f1, nm, f2, nm], dim=1)
    x = bn_relu(conv(x, "inc.convblock.0", groups=3), "inc.convblock.1")
    x0 = bn_relu(conv(x, "inc.convblock.3"), "inc.convblock.4")
    x1 = two(bn_relu(conv(x0, "downc0.convblock.0", 2), "downc0.convblock.1"), "downc0.convblock.3.convblock")
    x2 = two(bn_relu(conv(x1, "downc1.convblock.0", 2), "downc1.convblock.1"), "downc1.convblock.3.convblock")
    u2 = F.pixel_shuffle(conv(two(x2, "upc2.convblock.0.convblock"), "upc2.convblock.1"), 2)
    u1 = F.pixel_shuffle(conv(two(x1 + u2, "upc1.convblock.0.convblock"), "upc1.convblock.1"), 2)
    n = conv(bn_relu(conv(x0 + u1, "outc.convblock.0"), "outc.convblock.1"), "outc.convblock.3")
    return f1 - n


def _ref_net(sd: dict, frames15: torch.Tensor, nm: torch.Tensor) -> torch.Tensor:
    x = [frames15[:, 3 * i : 3 * i + 3] for i in range(5)]
    mids = [_ref_block(sd, "temp1.", torch.cat(x[i : i + 3], dim=1), nm) for i in range(3)]
    return _ref_block(sd, "temp2.", torch.cat(mids, dim=1), nm)


def test_network_matches_independent_reference(model: FastDVDnet, upstream_pth: Path) -> None:
    sd = {k.removeprefix("module."): v for k, v in torch.load(upstream_pth, weights_only=True).items()}
    net = load_fastdvdnet(upstream_pth)
    g = torch.Generator().manual_seed(1)
    frames = torch.rand(2, 15, 20, 28, generator=g)
    nm = torch.full((2, 1, 20, 28), SIGMA)
    with torch.inference_mode():
        ours = net(frames, nm)
        ref = _ref_net(sd, frames, nm)
        assert ours.shape == (2, 3, 20, 28)
        assert (ours - ref).abs().max().item() <= 1e-5
        # the block-level call is the same computation on one triplet
        assert (net.temp1(frames[:, :9], nm) - _ref_block(sd, "temp1.", frames[:, :9], nm)).abs().max() <= 1e-5

    # odd size: reflect-pad bottom/right to 20x28, crop back, clamp
    small = torch.rand(1, 15, 19, 27, generator=g)
    padded = F.pad(small, (0, 1, 0, 1), mode="reflect")
    want = _ref_net(sd, padded, torch.full((1, 1, 20, 28), SIGMA))[..., :19, :27].clamp(0, 1)
    got = denoise_padded(net, small, torch.full((1, 1, 19, 27), SIGMA))
    assert got.shape == (1, 3, 19, 27)
    assert (got - want).abs().max().item() <= 1e-5


# --- window rule ----------------------------------------------------------------------------


def test_window_edges() -> None:
    assert window_indices(0, 10) == (2, 1, 0, 1, 2)
    assert window_indices(1, 10) == (1, 0, 1, 2, 3)
    assert window_indices(5, 10) == (3, 4, 5, 6, 7)
    assert window_indices(8, 10) == (6, 7, 8, 9, 8)
    assert window_indices(9, 10) == (7, 8, 9, 8, 7)
    assert window_indices(0, 3) == (2, 1, 0, 1, 2)
    assert window_indices(2, 3) == (0, 1, 2, 1, 0)
    assert window_indices(0, 2) == (0, 1, 0, 1, 0)
    assert window_indices(1, 2) == (1, 0, 1, 0, 1)
    assert window_indices(0, 1) == (0, 0, 0, 0, 0)
    for bad_f, n in ((-1, 5), (5, 5), (0, 0)):
        with pytest.raises(ValueError):
            window_indices(bad_f, n)


def test_window_valid_everywhere() -> None:
    for n in range(1, 13):
        for f in range(n):
            w = window_indices(f, n)
            assert w[2] == f and all(0 <= i < n for i in w)
            for k, i in zip(range(f - 2, f + 3), w):
                if n >= 3 and k >= n:
                    assert i == 2 * (n - 1) - k
                elif n >= 3 and k < 0:
                    assert i == -k
            assert mirror_index(f + 2 * (n - 1), n) == f


# --- streaming with stage-1 reuse -----------------------------------------------------------


def _clip(n: int, h: int = 11, w: int = 13, seed: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _plain(model: FastDVDnet, clip: torch.Tensor) -> torch.Tensor:
    """The upstream way: the whole clip in memory, the full network per frame."""
    n, _, h, w = clip.shape
    nm = torch.full((1, 1, h, w), SIGMA)
    outs = [denoise_padded(model, clip[list(window_indices(f, n))].reshape(1, 15, h, w), nm) for f in range(n)]
    return torch.cat(outs)


def _stream(model: FastDVDnet, clip: torch.Tensor, max_batch: int, log: list | None = None) -> torch.Tensor:
    def counted(block, name):
        def run(frames, nm):
            assert frames.shape[2] % 4 == 0 and frames.shape[3] % 4 == 0
            if log is not None:
                log.append((name, frames.shape[0]))
            return block(frames, nm)

        return run

    den = StreamingDenoiser(counted(model.temp1, 1), counted(model.temp2, 2), SIGMA, max_batch=max_batch)
    outs = []
    for frame in clip:
        outs += den.push(frame)
        assert len(den._frames) <= max_batch + 3 and len(den._stage1) <= max_batch + 3
    outs += den.close()
    assert len(outs) == len(clip)
    return torch.stack(outs)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_streaming_equals_plain(model: FastDVDnet, n: int) -> None:
    clip = _clip(n)
    want = _plain(model, clip)
    for max_batch in (1, 2, 5):
        got = _stream(model, clip, max_batch)
        assert got.shape == clip.shape
        assert (got - want).abs().max().item() <= 1e-5, max_batch


def test_streaming_other_sizes(model: FastDVDnet) -> None:
    for h, w in ((20, 28), (19, 27)):  # no padding needed; padding on both axes
        clip = _clip(4, h, w)
        assert (_stream(model, clip, 2) - _plain(model, clip)).abs().max().item() <= 1e-5


def test_streaming_emits_early(model: FastDVDnet) -> None:
    """With max_batch=1, frame f leaves as soon as frame f+2 arrives: O(1) latency."""
    den = StreamingDenoiser(model.temp1, model.temp2, SIGMA, max_batch=1)
    emitted = 0
    for c, frame in enumerate(_clip(8), start=1):
        emitted += len(den.push(frame))
        assert emitted == max(0, c - 2)
    assert len(den.close()) == 2
    with pytest.raises(RuntimeError):
        den.push(_clip(1)[0])


def test_reuse_halves_block1_work(model: FastDVDnet) -> None:
    log: list = []
    _stream(model, _clip(20, 12, 12), max_batch=4, log=log)
    rows1 = sum(b for name, b in log if name == 1)
    rows2 = sum(b for name, b in log if name == 2)
    assert rows1 == 22  # n + 2 triplets (virtual centres -1..n) instead of 3n = 60
    assert rows2 == 20
    assert max(b for _, b in log) <= 4


def test_streaming_rejects_bad_frames(model: FastDVDnet) -> None:
    den = StreamingDenoiser(model.temp1, model.temp2, SIGMA)
    with pytest.raises(VlrtError, match="RGB"):
        den.push(torch.rand(4, 8, 8))
    den.push(torch.rand(3, 8, 8))
    with pytest.raises(VlrtError, match="one size"):
        den.push(torch.rand(3, 8, 12))
    with pytest.raises(VlrtError, match="3x3"):
        StreamingDenoiser(model.temp1, model.temp2, SIGMA).push(torch.rand(3, 2, 8))
