"""The networks: 3D UNet, attention, VAEs, context resampler, CLIP towers, layer ops."""
