"""LTX-2 (Lightricks) on MLX: the audio-video DiT, its VAEs, vocoder, text connectors and latent
upsampler, each a plain model mirroring diffusers' tree."""
