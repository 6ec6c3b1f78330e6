"""The noise process and the samplers over one denoiser: schedule, guidance, DDIM, fast solvers,
context windows, step cache, long shots."""
