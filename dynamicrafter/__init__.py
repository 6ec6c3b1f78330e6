"""DynamiCrafter (image-to-video) and VideoCrafter (text-to-video) as a plain PyTorch library.

    dc = dynamicrafter.load_model("dynamicrafter_512.ckpt")
    video = dynamicrafter.animate(dc, image, "a boat sails across the lake")
"""
from .checkpoints.loader import load_model, read_state_dict, save_checkpoint
from .config import CheckpointError, ModelConfig, infer_config, tiny_config
from .checkpoints.lora import LoraError, load_lora
from .model import DynamiCrafter, MissingComponentError
from .pipeline import animate, concat_latent, fit_image, image_conditioning, text_conditioning
from .sampling.ddim import Conditioning, sample_ddim
from .sampling.schedule import NoiseSchedule
from .settings import Camera, Guidance, Motion, Schedule, Shot, Windows
from .sampling.solvers import sample
from .video import load_image, save_video, to_uint8

__all__ = ["load_model", "read_state_dict", "save_checkpoint", "CheckpointError", "ModelConfig", "infer_config",
           "tiny_config", "DynamiCrafter", "MissingComponentError", "sample_ddim", "sample", "animate",
           "concat_latent", "fit_image", "image_conditioning", "text_conditioning", "load_image", "save_video",
           "to_uint8", "load_lora", "LoraError", "Camera", "Guidance", "Schedule", "Windows", "Shot", "Motion",
           "Conditioning", "NoiseSchedule"]
