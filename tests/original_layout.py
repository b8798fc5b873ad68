"""Write a diffusers SD model as one checkpoint in the original (CompVis / ldm) key layout.

The independent check of vlrt's single-file loader: this mapping is written here from the two
layouts' structure (diffusers ships only the other direction, which the loader uses), so a
checkpoint written with it and loaded back through diffusers' converter must give back the very
same weights.

UNet, per resolution level i (L = layers_per_block):
  input_blocks[(L+1)·i + j + 1] = down_blocks[i].resnets[j], .attentions[j]
  input_blocks[(L+1)·(i+1)].0.op = down_blocks[i].downsamplers[0].conv
  output_blocks[(L+1)·i + j] = up_blocks[i].resnets[j], .attentions[j]; the upsampler follows them
  middle_block = resnet, attention, resnet
VAE: encoder.down[i].block[j], decoder.up[n-1-i] (reversed), mid.block_1/attn_1/block_2, and
1x1 convolutions for the mid attention's q/k/v/proj_out.
SD 1.x text encoder: transformers' CLIPTextModel under cond_stage_model.transformer.text_model.
SD 2.x text encoder: OpenCLIP's layout under cond_stage_model.model (q/k/v packed in in_proj);
real SD 2 checkpoints hold one layer more (the full 24-layer tower) that SD 2 does not use.
SDXL (sgm's layout): the UNet's add_embedding is label_emb.0.0 / label_emb.0.2; CLIP-L under
conditioner.embedders.0.transformer.text_model, OpenCLIP-G under conditioner.embedders.1.model with
its text_projection as the matrix the pooled feature is multiplied by (x @ P: the Linear's weight
transposed).
"""

from __future__ import annotations

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_to_original(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    per_level = layers_per_block + 1
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "time_embedding":
            new = {"linear_1": "time_embed.0", "linear_2": "time_embed.2"}[parts[1]] + "." + ".".join(parts[2:])
        elif parts[0] == "add_embedding":  # SDXL: the pooled embedding and sizes
            new = {"linear_1": "label_emb.0.0", "linear_2": "label_emb.0.2"}[parts[1]] + "." + ".".join(parts[2:])
        elif parts[0] in ("conv_in", "conv_norm_out", "conv_out"):
            new = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}[parts[0]] + "." + parts[1]
        elif parts[0] == "down_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if kind == "downsamplers":
                new = f"input_blocks.{per_level * (i + 1)}.0.op." + ".".join(rest[1:])
            else:
                block = per_level * i + j + 1
                new = f"input_blocks.{block}.{0 if kind == 'resnets' else 1}." + _inner(kind, rest)
        elif parts[0] == "up_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if kind == "upsamplers":
                has_attention = any(k.startswith(f"up_blocks.{i}.attentions.") for k in state)
                new = f"output_blocks.{per_level * i + layers_per_block}.{2 if has_attention else 1}.conv." + rest[-1]
            else:
                new = f"output_blocks.{per_level * i + j}.{0 if kind == 'resnets' else 1}." + _inner(kind, rest)
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), parts[3:]
            new = f"middle_block.{1 if kind == 'attentions' else 2 * j}." + _inner(kind, rest)
        else:
            raise KeyError(f"no original name for UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def _inner(kind: str, rest: list[str]) -> str:
    name = ".".join(rest)
    if kind == "resnets":
        layer = ".".join(rest[:-1])
        return RESNET[layer] + "." + rest[-1]
    return name  # SpatialTransformer names are the same in both layouts


def vae_to_original(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] in ("quant_conv", "post_quant_conv"):
            new = key
        else:
            half, rest = parts[0], parts[1:]
            if rest[0] == "conv_norm_out":
                new = f"{half}.norm_out.{rest[1]}"
            elif rest[0] in ("conv_in", "conv_out"):
                new = key
            elif rest[0] in ("down_blocks", "up_blocks"):
                i = int(rest[1])
                level = i if half == "encoder" else levels - 1 - i
                group = "down" if half == "encoder" else "up"
                if rest[2] in ("downsamplers", "upsamplers"):
                    new = f"{half}.{group}.{level}.{rest[2][:-2]}.conv.{rest[-1]}"
                else:
                    layer = VAE_RESNET.get(rest[4], rest[4])
                    new = f"{half}.{group}.{level}.block.{rest[3]}.{layer}.{rest[-1]}"
            elif rest[0] == "mid_block":
                if rest[1] == "resnets":
                    new = f"{half}.mid.block_{int(rest[2]) + 1}.{rest[3]}.{rest[4]}"
                else:
                    layer = ".".join(rest[3:-1])
                    new = f"{half}.mid.attn_1.{VAE_ATTENTION[layer]}.{rest[-1]}"
                    if value.ndim == 2:
                        value = value[:, :, None, None]  # the original uses 1x1 convolutions
            else:
                raise KeyError(f"no original name for VAE key {key}")
        out["first_stage_model." + new] = value
    return out


def clip_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in state.items()}


def open_clip_to_original(
    state: dict[str, torch.Tensor], layers: int, extra_layer: bool, p: str = "cond_stage_model.model."
) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModel(WithProjection) as OpenCLIP's text tower under prefix `p`, with
    `extra_layer` the unused 24th of SD 2; a projection's weight W becomes text_projection = Wᵀ."""
    projection = state.get("text_projection.weight")
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {
        p + "token_embedding.weight": state["embeddings.token_embedding.weight"],
        p + "positional_embedding": state["embeddings.position_embedding.weight"],
        p + "ln_final.weight": state["final_layer_norm.weight"],
        p + "ln_final.bias": state["final_layer_norm.bias"],
        p + "text_projection": torch.zeros(state["final_layer_norm.weight"].shape[0], 8) if projection is None else projection.T,
    }
    for n in range(layers + int(extra_layer)):
        src = f"encoder.layers.{min(n, layers - 1)}."
        dst = f"{p}transformer.resblocks.{n}."
        for w in ("weight", "bias"):
            out[dst + f"attn.in_proj_{w}"] = torch.cat([state[src + f"self_attn.{q}_proj.{w}"] for q in "qkv"])
            out[dst + f"attn.out_proj.{w}"] = state[src + f"self_attn.out_proj.{w}"]
            out[dst + f"ln_1.{w}"] = state[src + f"layer_norm1.{w}"]
            out[dst + f"ln_2.{w}"] = state[src + f"layer_norm2.{w}"]
            out[dst + f"mlp.c_fc.{w}"] = state[src + f"mlp.fc1.{w}"]
            out[dst + f"mlp.c_proj.{w}"] = state[src + f"mlp.fc2.{w}"]
    return out


def to_original(
    unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module, open_clip: bool = False, extra_layer: bool = False
) -> dict:
    """One state dict in the original layout for the three modules (contiguous copies, for safetensors)."""
    text = text_encoder.state_dict()
    text = {k: v for k, v in text.items() if not k.endswith("position_ids")}
    state = {
        **unet_to_original(unet.state_dict(), unet.config.layers_per_block),
        **vae_to_original(vae.state_dict(), len(vae.config.block_out_channels)),
        **(open_clip_to_original(text, text_encoder.config.num_hidden_layers, extra_layer) if open_clip else clip_to_original(text)),
    }
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def controlnet_to_original(controlnet: torch.nn.Module, prefix: str = "control_model.") -> dict:
    """A diffusers ControlNetModel in the original ControlNet layout (ControlNet 1.0's files prefix every
    key with control_model., 1.1's have none). Its encoder copy of the UNet keeps the UNet's names (an SDXL
    ControlNet's add_embedding is label_emb, as in sgm's UNet); the extra parts are:
      controlnet_cond_embedding.conv_in / blocks[k] / conv_out = input_hint_block.0 / .2(k+1) / .2(n+1)
        (the Sequential's odd entries are its SiLUs; n blocks, 6 in every real ControlNet, so conv_out is .14;
        fewer in the tests' ControlNets of models whose VAE downscales by 2 or 4)
      controlnet_down_blocks[i] = zero_convs.i.0, controlnet_mid_block = middle_block_out.0
    """
    state = controlnet.state_dict()
    unet_part = {k: v for k, v in state.items() if k.split(".")[0] in ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block")}
    out = {k.removeprefix("model.diffusion_model."): v for k, v in unet_to_original(unet_part, controlnet.config.layers_per_block).items()}
    blocks = len(controlnet.controlnet_cond_embedding.blocks)
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "controlnet_cond_embedding":
            index = {"conv_in": 0, "conv_out": 2 * (blocks + 1)}.get(parts[1])
            if index is None:  # blocks.k.weight
                index = 2 * (int(parts[2]) + 1)
            out[f"input_hint_block.{index}.{parts[-1]}"] = value
        elif parts[0] == "controlnet_down_blocks":
            out[f"zero_convs.{parts[1]}.0.{parts[2]}"] = value
        elif parts[0] == "controlnet_mid_block":
            out[f"middle_block_out.0.{parts[1]}"] = value
    assert len(out) == len(state)
    return {prefix + k: v.detach().contiguous().clone() for k, v in out.items()}


def sdxl_to_original(
    unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module, text_encoder_2: torch.nn.Module
) -> dict:
    """One SDXL state dict in sgm's layout (contiguous copies, for safetensors)."""
    clip = {k: v for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}
    open_clip = {k: v for k, v in text_encoder_2.state_dict().items() if not k.endswith("position_ids")}
    state = {
        **unet_to_original(unet.state_dict(), unet.config.layers_per_block),
        **vae_to_original(vae.state_dict(), len(vae.config.block_out_channels)),
        **{"conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v for k, v in clip.items()},
        **open_clip_to_original(open_clip, text_encoder_2.config.num_hidden_layers, False, "conditioner.embedders.1.model."),
    }
    return {k: v.detach().contiguous() for k, v in state.items()}  # no copies: the real SDXL is 7 GB in fp16
