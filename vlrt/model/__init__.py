"""Loading a Stable Diffusion model (folders, single files, shipped configs), LoRA, VAE override, CLIP vocabulary, prompt syntax and embeddings, samplers."""
