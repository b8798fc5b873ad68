"""Train the tiny built-in demo model: ``python -m vlrt.demo.train [--out DIR] [--seconds N]``.

Random weights make a useless demo and blind tests: a random VAE decoder returns nearly the same
grey whatever its input. A few minutes of CPU training on generated pictures (gratings, discs,
gradients, noise) gives a VAE that reconstructs its input and a UNet that denoises toward
plausible pictures, so img2img frames follow their inputs. The result is a diffusers-format
Stable Diffusion folder under 2 MB, with an SD-1.5-like scheduler.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from vlrt.demo.tokenizer import BOS_TOKEN, EOS_TOKEN, MODEL_MAX_LENGTH, byte_level_vocab, write_byte_level_tokenizer

DEFAULT_OUT = Path(__file__).resolve().parent / "model"
TRAIN_CROP = 64  # UNet training crops (in pixels); the nets are convolutional and run at any size
VAE_CROP = 32  # a factor-2 VAE learns local detail only, so small crops make its steps cheap
LEARNING_RATE = 2e-3
KL_WEIGHT = 1e-5
VAE_STEPS, UNET_STEPS = 600, 400
VAE_SHARE = 0.6  # of the time limit, should it bind
POOL_SIZE = 128  # the generated pictures the crops come from, and the model's default image size
VAE_BLOCK_CHANNELS = (16, 32, 48, 48)
UNET_BLOCK_CHANNELS = (32, 48)

# The schedule SD 1.x was trained with, so samplers behave as they do on a real model.
SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
}

# Prompts per kind of picture, so the text conditioning carries some meaning; "" trains the
# unconditional branch that classifier-free guidance uses.
PROMPTS = {
    0: ("stripes", "a striped pattern", "wavy lines"),
    1: ("circles", "coloured discs", "round spots"),
    2: ("a smooth gradient", "soft colours", "a blurry sky"),
}


def vae_config(blocks: int = 2, latent_channels: int = 4, sample_size: int = POOL_SIZE) -> dict:
    """A tiny AutoencoderKL config; `blocks` sets the scale factor, 2 ** (blocks - 1)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * blocks,
        "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "block_out_channels": list(VAE_BLOCK_CHANNELS[:blocks]),
        "layers_per_block": 1,
        "latent_channels": latent_channels,
        "norm_num_groups": 8,
        "sample_size": sample_size,
    }


def unet_config(latent_channels: int = 4, cross_attention_dim: int = 32, sample_size: int = POOL_SIZE // 2) -> dict:
    """A tiny UNet2DConditionModel config; attention only at the lower resolution, so the demo stays
    fast at the VAE's small scale factor (2)."""
    return {
        "sample_size": sample_size,
        "in_channels": latent_channels,
        "out_channels": latent_channels,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": list(UNET_BLOCK_CHANNELS),
        "layers_per_block": 1,
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }


def text_encoder_config(hidden_size: int = 32) -> CLIPTextConfig:
    """A tiny CLIP text encoder whose vocabulary is the byte-level tokenizer's."""
    vocab, _ = byte_level_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
    )


def synthetic_images(count: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pictures in [-1, 1] of shape [count, 3, size, size] and their kind (0 stripes, 1 discs, 2 gradient).

    Every picture mixes a gradient background, an oriented sinusoid grating, soft-edged discs and
    noise, with the weights drawn so one element dominates; the dominant one is its kind.
    """

    def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    n = count
    axis = (torch.arange(size) + 0.5) / size
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    x, y = x[None, None], y[None, None]

    def along(angle: torch.Tensor) -> torch.Tensor:
        return x * torch.cos(angle) + y * torch.sin(angle)

    kind = torch.randint(0, 3, (n,), generator=generator)

    start, end = uniform(n, 3, 1, 1), uniform(n, 3, 1, 1)
    ramp = along(uniform(n, 1, 1, 1, high=2 * math.pi))
    ramp = (ramp - ramp.amin((2, 3), keepdim=True)) / (ramp.amax((2, 3), keepdim=True) - ramp.amin((2, 3), keepdim=True))
    image = start + (end - start) * ramp

    cycles = uniform(n, 1, 1, 1, low=1.0, high=6.0)
    wave = 0.5 + 0.5 * torch.sin(2 * math.pi * cycles * along(uniform(n, 1, 1, 1, high=math.pi)) + uniform(n, 1, 1, 1, high=6.3))
    grating = uniform(n, 3, 1, 1) * (1 - wave) + uniform(n, 3, 1, 1) * wave
    weight = torch.where(kind == 0, 1.0, uniform(n) * 0.3)[:, None, None, None]
    image = image * (1 - weight) + grating * weight

    discs = torch.where(kind == 1, torch.randint(2, 7, (n,), generator=generator), torch.randint(0, 2, (n,), generator=generator))
    for i in range(int(discs.max())):
        centre_x, centre_y = uniform(n, 1, 1, 1), uniform(n, 1, 1, 1)
        radius = uniform(n, 1, 1, 1, low=0.05, high=0.3)
        distance = torch.sqrt((x - centre_x) ** 2 + (y - centre_y) ** 2)
        inside = ((radius - distance) * size / 2).clamp(0, 1) * (i < discs).float()[:, None, None, None]
        image = image * (1 - inside) + uniform(n, 3, 1, 1) * inside

    coarse = torch.randn(n, 3, 4, 4, generator=generator)
    blotches = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    image = image + uniform(n, 1, 1, 1, high=0.1) * blotches + uniform(n, 1, 1, 1, high=0.03) * torch.randn(n, 3, size, size, generator=generator)
    return (image.clamp(0, 1) * 2 - 1), kind


def random_crops(pool: torch.Tensor, count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random `size`-px crops, each from a random picture of `pool` (flips included)."""
    index = torch.randint(0, pool.shape[0], (count,), generator=generator)
    top = torch.randint(0, pool.shape[-2] - size + 1, (count,), generator=generator)
    left = torch.randint(0, pool.shape[-1] - size + 1, (count,), generator=generator)
    crops = torch.stack([pool[i, :, t : t + size, l : l + size] for i, t, l in zip(index.tolist(), top.tolist(), left.tolist())])
    flip = torch.rand(count, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(-1), crops)


def psnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """PSNR in dB of pictures in [-1, 1], measured on the [0, 1] scale."""
    mse = F.mse_loss((test.clamp(-1, 1) + 1) / 2, (reference + 1) / 2).item()
    return 10 * math.log10(1 / max(mse, 1e-12))


def cosine_lr(base: float, progress: float) -> float:
    """Learning rate at `progress` (0 to 1) through training: short warm-up, then cosine decay to 5 %."""
    warm = min(1.0, progress / 0.05)
    return base * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class Budget:
    """A fixed number of steps, cut short by a time limit so a busy machine still finishes.

    Steps, not seconds, set the schedule on an idle machine, so the same seed gives the same model.
    """

    def __init__(self, steps: int, seconds: float) -> None:
        self.steps, self.seconds, self.step = steps, seconds, 0
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def progress(self) -> float:
        return max(self.step / self.steps, self.elapsed() / self.seconds)

    def __iter__(self):
        while self.progress() < 1.0:
            yield self.step
            self.step += 1


def train_vae(vae: AutoencoderKL, pool: torch.Tensor, budget: Budget, generator: torch.Generator) -> None:
    """Fit the VAE to random crops with L1 + L2 + a small KL term."""
    # Start with a narrow posterior: at the default unit variance the sampled latents are mostly
    # noise and the decoder needs far more steps than the budget allows to learn anything.
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels :] -= 6.0
    optimizer = torch.optim.Adam(vae.parameters(), lr=LEARNING_RATE)
    vae.train()
    for step in budget:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(LEARNING_RATE, budget.progress())
        batch = random_crops(pool, 8, VAE_CROP, generator)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = F.l1_loss(reconstruction, batch) + F.mse_loss(reconstruction, batch) + KL_WEIGHT * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 50 == 0:
            print(f"  vae step {step + 1:5d}  {budget.elapsed():5.0f}s  loss {loss.item():.4f}  psnr {psnr(batch, reconstruction.detach()):.1f} dB", flush=True)
    vae.eval()


def prompt_embeddings(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer) -> tuple[torch.Tensor, list[list[int]]]:
    """Embeddings of every prompt (row 0 is the empty prompt) and, per kind, the rows of its prompts."""
    prompts = [""]
    rows = []
    for kind in sorted(PROMPTS):
        rows.append(list(range(len(prompts), len(prompts) + len(PROMPTS[kind]))))
        prompts.extend(PROMPTS[kind])
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0], rows


def encode_pool(vae: AutoencoderKL, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and standard deviation of every picture, in unscaled latent units."""
    means, stds = [], []
    with torch.no_grad():
        for chunk in pool.split(64):
            posterior = vae.encode(chunk).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(
    unet: UNet2DConditionModel,
    latents: tuple[torch.Tensor, torch.Tensor],
    kinds: torch.Tensor,
    embeddings: tuple[torch.Tensor, list[list[int]]],
    budget: Budget,
    generator: torch.Generator,
) -> float:
    """Train the UNet to predict the noise added to scaled latent crops (DDPM, epsilon); returns the last loss average."""
    mean, std = latents
    table, rows = embeddings
    noise_scheduler = DDPMScheduler(**{k: SCHEDULER_CONFIG[k] for k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type")})
    optimizer = torch.optim.Adam(unet.parameters(), lr=LEARNING_RATE)
    crop, batch_size = TRAIN_CROP // (POOL_SIZE // mean.shape[-1]), 32
    unet.train()
    recent: list[float] = []
    for step in budget:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(LEARNING_RATE, budget.progress())
        index = torch.randint(0, mean.shape[0], (batch_size,), generator=generator)
        sample = mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)
        top, left = torch.randint(0, mean.shape[-1] - crop + 1, (2,), generator=generator).tolist()
        sample = sample[..., top : top + crop, left : left + crop]
        noise = torch.randn(sample.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        choice = [rows[k][j] for k, j in zip(kinds[index].tolist(), torch.randint(0, 3, (batch_size,), generator=generator).tolist())]
        unconditional = torch.rand(batch_size, generator=generator) < 0.15
        prompt = torch.where(unconditional, 0, torch.tensor(choice))
        prediction = unet(noise_scheduler.add_noise(sample, noise, timesteps), timesteps, encoder_hidden_states=table[prompt]).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recent = (recent + [loss.item()])[-50:]
        if (step + 1) % 50 == 0:
            print(f"  unet step {step + 1:5d}  {budget.elapsed():5.0f}s  loss {sum(recent) / len(recent):.4f}", flush=True)
    unet.eval()
    return sum(recent) / max(len(recent), 1)


def heldout_psnr(vae: AutoencoderKL, size: int) -> float:
    """Reconstruction PSNR on pictures the VAE never saw (another seed), through the posterior mean."""
    images, _ = synthetic_images(16, size, torch.Generator().manual_seed(10_000 + size))
    with torch.no_grad():
        return psnr(images, vae.decode(vae.encode(images).latent_dist.mode()).sample)


def save_model(out: Path, vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel) -> None:
    """Write the diffusers folder, fp16 safetensors, replacing only the files a pipeline folder holds."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.rmtree(out / name, ignore_errors=True)
    with tempfile.TemporaryDirectory() as scratch:
        write_byte_level_tokenizer(Path(scratch))
        tokenizer = CLIPTokenizer.from_pretrained(scratch)
    pipeline = StableDiffusionPipeline(
        vae=vae.half(),
        text_encoder=text_encoder.half(),
        tokenizer=tokenizer,
        unet=unet.half(),
        scheduler=PNDMScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out, safe_serialization=True)
    # The whole SD-1.5-style scheduler config (clip_sample, set_alpha_to_one…), which the samplers read.
    config_path = out / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(SCHEDULER_CONFIG)
    config.pop("_use_default_values", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    # The tokenizer folder holds the plain byte-level files, whatever the installed transformers saves.
    shutil.rmtree(out / "tokenizer")
    write_byte_level_tokenizer(out / "tokenizer")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlrt.demo.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"model folder to write (default {DEFAULT_OUT})")
    parser.add_argument("--seconds", type=float, default=300.0, help="time limit for all training; cuts the step counts short on a slow machine")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    vae = AutoencoderKL(**vae_config())
    unet = UNet2DConditionModel(**unet_config())
    text_encoder = CLIPTextModel(text_encoder_config()).eval()
    with tempfile.TemporaryDirectory() as scratch:
        write_byte_level_tokenizer(Path(scratch))
        tokenizer = CLIPTokenizer.from_pretrained(scratch)

    started = time.monotonic()
    pool, kinds = synthetic_images(512, POOL_SIZE, generator)
    print(f"training the VAE ({VAE_STEPS} steps at most)", flush=True)
    train_vae(vae, pool, Budget(VAE_STEPS, args.seconds * VAE_SHARE), generator)
    quality = {size: heldout_psnr(vae, size) for size in (64, 128)}
    print("  held-out reconstruction: " + ", ".join(f"{s} px {q:.1f} dB" for s, q in quality.items()), flush=True)

    mean, std = encode_pool(vae, pool)
    scale = 1.0 / mean.std().item()
    vae.register_to_config(scaling_factor=scale)
    print(f"  latent scaling factor {scale:.5f}", flush=True)

    print(f"training the UNet ({UNET_STEPS} steps at most)", flush=True)
    remaining = max(args.seconds - (time.monotonic() - started), 1.0)
    loss = train_unet(unet, (mean * scale, std * scale), kinds, prompt_embeddings(text_encoder, tokenizer), Budget(UNET_STEPS, remaining), generator)

    save_model(args.out, vae, unet, text_encoder)
    print(
        f"done in {time.monotonic() - started:.0f} s: VAE PSNR {quality[64]:.1f} dB (64 px), {quality[128]:.1f} dB (128 px); "
        f"UNet loss {loss:.4f}; {folder_bytes(args.out) / 1e6:.2f} MB in {args.out}",
        flush=True,
    )


if __name__ == "__main__":
    main()
