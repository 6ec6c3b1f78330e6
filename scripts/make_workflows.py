"""Write the bundled UI-format workflows into workflows/ from the real node schemas.

    .venv/bin/python scripts/make_workflows.py        (boots ComfyUI in-process, no GPU needed)

Every graph uses the released model names and settings; scripts/run_workflow.py swaps in other
files and sizes when running them headless.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from comfy_workflow import UIGraph  # noqa: E402

NEG = ""   # the official unconditional text is the empty prompt


def input_aspects() -> dict:
    """Height / width of every example input the templates name (assets/, assets/examples/): their
    previews' room in the layout."""
    import av
    from PIL import Image
    aspects = {}
    for path in [*(REPO / "assets").glob("*.png"), *(REPO / "assets" / "examples").iterdir()]:
        if path.suffix == ".png":
            with Image.open(path) as im:
                aspects[path.name] = im.height / im.width
        elif path.suffix == ".mp4":
            with av.open(str(path)) as f:
                stream = f.streams.video[0]
                aspects[path.name] = stream.height / stream.width
    return aspects


def prompt_pair(g: UIGraph, clip_src, clip_slot, text: str, x: float, y: float, *, negative: str = NEG,
                titled: bool = True, title_suffix: str = ""):
    """A prompt and, 150 below, the unconditional prompt (CLIPTextEncode), both fed by `clip_src`'s
    CLIP output; returns the (positive, negative) nodes."""
    pos = g.add("CLIPTextEncode", (x, y), {"text": text}, title=f"Prompt{title_suffix}" if titled else None,
                size=[360, 120])
    neg = g.add("CLIPTextEncode", (x, y + 150), {"text": negative},
                title=f"Empty prompt (unconditional){title_suffix}" if titled else None, size=[360, 90])
    g.connect(clip_src, clip_slot, pos, "clip")
    g.connect(clip_src, clip_slot, neg, "clip")
    return pos, neg


def connect_pipeline(g: UIGraph, ld, pos, neg, node, **more) -> None:
    """The loader's model / clip_vision / vae and the two prompts into an all-in-one node (the
    nodes' pipeline_inputs group), then `more`: input name -> (source node, output slot)."""
    links = {"model": (ld, "model"), "clip_vision": (ld, "clip_vision"), "vae": (ld, "vae"),
             "positive": (pos, 0), "negative": (neg, 0), **more}
    for name, (src, slot) in links.items():
        g.connect(src, slot, node, name)


# i2v_chain's widgets: the conditioning node's and the DDIM sampler's. The conditioning's width, height,
# frames and fs and the sampler's cfg_text stay at the nodes' default (0), the loaded model's own (its
# metadata: size, length, fs, guidance), unless given: a graph fits whichever model the loader picks.
I2V_VIDEO = {"batch_size": 1, "mode": "image-to-video"}
I2V_SAMPLER = {"seed": 123, "steps": 50, "cfg_text": 0.0, "cfg_img": 0.0, "eta": 1.0, "guidance_rescale": 0.7,
               "spacing": "auto"}


def i2v_chain(g: UIGraph, loader, image, prompt: str, x: float, y: float, *, end_image=None, title_suffix="",
              video: dict | None = None, sampler: dict | None = None):
    """Text encodes + CLIP vision + resampler + conditioning + DDIM + decode; returns the decode node.
    video / sampler: widget values over I2V_VIDEO (the conditioning node) / I2V_SAMPLER (the DDIM node)."""
    pos, neg = prompt_pair(g, loader, "clip", prompt, x, y, title_suffix=title_suffix)
    enc = g.add("DynamiCrafterCLIPVisionEncode", (x, y + 270))
    g.connect(loader, "clip_vision", enc, "clip_vision")
    g.connect(image, 0, enc, "image")
    res = g.add("DynamiCrafterContextResampler", (x, y + 360))
    g.connect(loader, "model", res, "model")
    g.connect(enc, 0, res, "clip_tokens")
    cond = g.add("DynamiCrafterImageConditioning", (x, y + 450), {**I2V_VIDEO, **(video or {})},
                 title="Image conditioning" + title_suffix)
    g.connect(pos, 0, cond, "positive")
    g.connect(neg, 0, cond, "negative")
    g.connect(loader, "vae", cond, "vae")
    g.connect(res, 0, cond, "image_context")
    g.connect(image, 0, cond, "start_image")
    if end_image is not None:
        g.connect(end_image, 0, cond, "end_image")
    samp = g.add("DynamiCrafterDDIMSampler", (x + 380, y), {**I2V_SAMPLER, **(sampler or {})},
                 title="DDIM (dual CFG)" + title_suffix)
    g.connect(loader, "model", samp, "model")
    g.connect(cond, "positive", samp, "positive")
    g.connect(cond, "negative", samp, "negative")
    g.connect(cond, "latent", samp, "latent_image")
    dec = g.add("DynamiCrafterVideoDecode", (x + 380, y + 330), {"frames_per_batch": 4, "trim": "auto"})
    g.connect(loader, "vae", dec, "vae")
    g.connect(samp, 0, dec, "latent")
    return dec


def save_video(g: UIGraph, frames, x, y, prefix, fps=8.0):
    cv = g.add("CreateVideo", (x, y), {"fps": fps})
    g.connect(frames, 0, cv, "images")
    sv = g.add("SaveVideo", (x, y + 120), {"filename_prefix": prefix, "format": "mp4", "codec": "h264"},
               size=[360, 260])
    g.connect(cv, 0, sv, "video")
    return sv


# The official releases (file names as the workflows expect them in models/checkpoints).  The
# web UI reads a loader's properties.models and offers these when the file is missing.
OFFICIAL_DOWNLOADS = {
    "dynamicrafter_256.ckpt": "https://huggingface.co/Doubiiu/DynamiCrafter/resolve/main/model.ckpt",
    "dynamicrafter_512.ckpt": "https://huggingface.co/Doubiiu/DynamiCrafter_512/resolve/main/model.ckpt",
    "dynamicrafter_1024.ckpt": "https://huggingface.co/Doubiiu/DynamiCrafter_1024/resolve/main/model.ckpt",
    "dynamicrafter_512_interp.ckpt": "https://huggingface.co/Doubiiu/DynamiCrafter_512_Interp/resolve/main/model.ckpt",
    "videocrafter2_512.ckpt": "https://huggingface.co/VideoCrafter/VideoCrafter2/resolve/main/model.ckpt",
}


def loader(g: UIGraph, ckpt: str, x=0, y=0):
    node = g.add("DynamiCrafterLoader", (x, y), {"ckpt_name": ckpt, "dtype": "auto", "variant": "auto"},
                 size=[360, 150])
    if ckpt in OFFICIAL_DOWNLOADS:
        node["properties"]["models"] = [{"name": ckpt, "url": OFFICIAL_DOWNLOADS[ckpt], "directory": "checkpoints"}]
    return node


def image_to_video(classes) -> dict:
    g = UIGraph(classes, input_aspects())
    ld = loader(g, "dynamicrafter_512.ckpt")
    img = g.add("LoadImage", (0, 200), {"image": "example.png"}, title="Start image", size=[320, 360])
    dec = i2v_chain(g, ld, img, "a boat sails across a calm lake at sunset", 380, 0)
    save_video(g, dec, 1100, 0, "video/dynamicrafter_i2v")
    g.note("Image to video with DynamiCrafter 512 (320x512, 16 frames, fs = fps 24; 15-30, smaller = more "
           "motion).\nPut dynamicrafter_512.ckpt in models/checkpoints. Width, height, frames and fs at 0 are the "
           "loaded model's own (1024: 1024x576, fs 10; 256: 256x256, fs 3 = frame stride; the demo model: its "
           "size) and so is cfg_text at 0 (its guidance: 7.5 here, the demo model's text-only cfg 2): pick another "
           "checkpoint and nothing else needs changing. Set cfg_text for your own text guidance; cfg_img > 0 turns "
           "on dual CFG (image guidance); guidance_rescale 0.7 and eta 1.0 are the official settings.",
           (0, 600), (360, 260))
    return g.to_json()


DEMO_MODEL = REPO / "assets" / "demo" / "dynamicrafter_demo.json"    # the bundled demo model's metadata
DEMO_PROMPT = "a red circle moves to the right"                     # what assets/example.png was made for


def guidance_words(v: dict) -> str:
    """The variant's default guidance in words, e.g. 'cfg 7.5' or 'text-only guidance cfg 2 (cfg_img 1)'."""
    if v.get("cfg_img") is None:
        return f"cfg {v['cfg_text']:g}"
    if v["cfg_img"] == 1.0:
        return f"text-only guidance cfg {v['cfg_text']:g} (cfg_img 1: the image in both branches)"
    return f"dual CFG: cfg_text {v['cfg_text']:g}, cfg_img {v['cfg_img']:g}"


def demo(classes) -> dict:
    """The image-to-video graph preset for the bundled demo model: the size, length, fs and guidance
    its metadata carries (what it was trained and evaluated at), 25 steps."""
    v = json.loads(DEMO_MODEL.read_text())["variant"]
    (height, width), frames = v["resolution"], v["frames"]
    g = UIGraph(classes, input_aspects())
    ld = loader(g, "dynamicrafter_demo.safetensors")
    img = g.add("LoadImage", (0, 200), {"image": "example.png"}, title="Start image", size=[320, 360])
    dec = i2v_chain(g, ld, img, DEMO_PROMPT, 380, 0,
                    sampler=dict(steps=25, cfg_text=v["cfg_text"], cfg_img=v.get("cfg_img") or 0.0,
                                 guidance_rescale=v["guidance_rescale"]))
    save_video(g, dec, 1100, 0, "video/dynamicrafter_demo")
    g.note(f"The bundled demo model (assets/demo/, trained by training/ on synthetic clips): {width}x{height}, "
           f"{frames} frames, {guidance_words(v)} (its own default), 25 steps, a few seconds on a CPU.\nCopy "
           f"assets/demo/dynamicrafter_demo.safetensors "
           f"into models/checkpoints and assets/example.png into input/. For real videos use the image-to-video "
           f"template with a released checkpoint.", (0, 600), (360, 260))
    return g.to_json()


def demo_chain(g: UIGraph, image, prompt: str = DEMO_PROMPT):
    """The demo preset's loader + i2v chain (the model's own size, frames, fs; its metadata's guidance;
    25 steps): (loader, DDIM sampler, decode), the sampler free for more inputs."""
    v = json.loads(DEMO_MODEL.read_text())["variant"]
    ld = loader(g, "dynamicrafter_demo.safetensors")
    dec = i2v_chain(g, ld, image, prompt, 380, 0,
                    sampler=dict(steps=25, cfg_text=v["cfg_text"], cfg_img=v.get("cfg_img") or 0.0,
                                 guidance_rescale=v["guidance_rescale"]))
    samp = next(n for n in g.nodes if n["type"] == "DynamiCrafterDDIMSampler")
    return ld, samp, dec


def set_widget(g: UIGraph, node: dict, name: str, value) -> None:
    """A widget's value in a node already added (its index in the widget layout)."""
    from comfy_workflow import widget_layout
    i = 0
    for w, count in widget_layout(g.classes[node["type"]]):
        if w == name:
            node["widgets_values"][i] = value
            return
        i += count
    raise ValueError(f"{node['type']} has no widget {name!r}")


def motion_brush(classes) -> dict:
    """The demo preset with a motion brush: a mask image (white = moves) into the DDIM node's mask and,
    after decoding, into Hold Image with the start image (the held pixels are the image's)."""
    g = UIGraph(classes, input_aspects())
    # the two square pictures 240 wide: their previews (as tall as wide) fit one column with the loader
    img = g.add("LoadImage", (0, 200), {"image": "example.png"}, title="Start image", size=[240, 300])
    ld, samp, dec = demo_chain(g, img)
    mimg = g.add("LoadImage", (0, 620), {"image": "motion_mask.png"}, title="Motion mask (white = moves)",
                 size=[240, 300])
    mask = g.add("ImageToMask", (380, 900), {"channel": "red"})
    g.connect(mimg, 0, mask, "image")
    g.connect(mask, 0, samp, "mask")
    hold = g.add("DynamiCrafterHoldImage", (760, 740), {"mask_feather": 1.0})
    g.connect(dec, 0, hold, "images")
    g.connect(img, 0, hold, "start_image")
    g.connect(mask, 0, hold, "mask")
    save_video(g, hold, 1100, 0, "video/dynamicrafter_motion_brush")
    g.note("Motion brush: white in the mask moves, black holds the start image (at every step the latent there "
           "is the image's, noised to that step; mask_feather softens the edge), and after decoding Hold Image "
           "pastes the start image's pixels back there (give it the sampler's mask_feather). Paint your own with "
           "the mask editor (right-click the start image > Open in MaskEditor) and use LoadImage's MASK output "
           "(painted = moves) for both. Set for the bundled demo model: copy "
           "assets/demo/dynamicrafter_demo.safetensors into models/checkpoints, assets/example.png and "
           "assets/examples/motion_mask.png into input/. The DDIM node's motion widget (1 = the model's own) "
           "starts later from the image for less motion.",
           (1100, 600), (360, 240))
    return g.to_json()


def video_to_video(classes) -> dict:
    """The demo preset from a clip: LoadVideo -> frames -> VAEEncode -> Video Latent as the DDIM latent,
    denoise 0.6; its first frame is the start image."""
    g = UIGraph(classes, input_aspects())
    vid = g.add("LoadVideo", (0, 200), {"file": "motion_clip.mp4"}, title="Clip to re-animate", size=[320, 360])
    parts = g.add("GetVideoComponents", (0, 620))
    g.connect(vid, 0, parts, "video")
    first = g.add("DynamiCrafterPickFrame", (0, 760), {"which": "first", "index": 0})
    g.connect(parts, "images", first, "images")
    ld, samp, dec = demo_chain(g, first, "a blue square moves to the right")
    enc = g.add("VAEEncode", (380, 900))
    g.connect(parts, "images", enc, "pixels")
    g.connect(ld, "vae", enc, "vae")
    lat = g.add("DynamiCrafterVideoLatent", (760, 900))
    g.connect(enc, 0, lat, "frames")
    link = next(lk for lk in g.links if lk[0] == next(i for i in samp["inputs"] if i["name"] == "latent_image")["link"])
    for n in g.nodes:                   # the conditioning's empty latent -> the clip's: move the link's source
        for o in n["outputs"]:
            o["links"] = [x for x in o["links"] if x != link[0]]
    link[1], link[2] = lat["id"], 0
    lat["outputs"][0]["links"].append(link[0])
    set_widget(g, samp, "denoise", 0.6)
    save_video(g, dec, 1100, 0, "video/dynamicrafter_v2v")
    g.note("Video to video: the clip's latents, noised as far as denoise says, are where DDIM starts (1 = pure "
           "noise, today's sampler; 0 = the clip back; 0.5-0.8 re-animates it). The clip must have the "
           "conditioning's frames and size (VAEEncode of its frames -> DynamiCrafter Video Latent). Core "
           "KSampler's denoise works on the same latent. Set for the bundled demo model: copy "
           "assets/demo/dynamicrafter_demo.safetensors into models/checkpoints and "
           "assets/examples/motion_clip.mp4 into input/.", (1100, 600), (360, 240))
    return g.to_json()


# the prompt of assets/examples/first.png -> last.png and key1-3.png (scripts/make_example_image.py)
EXAMPLE_PAIR_PROMPT = "a purple circle moves to the right"


def interpolation(classes) -> dict:
    g = UIGraph(classes, input_aspects())
    ld = loader(g, "dynamicrafter_512_interp.ckpt")
    a = g.add("LoadImage", (0, 200), {"image": "first.png"}, title="First frame", size=[320, 320])
    b = g.add("LoadImage", (0, 560), {"image": "last.png"}, title="Last frame", size=[320, 320])
    dec = i2v_chain(g, ld, a, EXAMPLE_PAIR_PROMPT, 380, 0, end_image=b, video=dict(mode="interpolation"))
    save_video(g, dec, 1100, 0, "video/dynamicrafter_interp")
    g.note("Frame interpolation: the 512_interp model generates the frames between the first and last image "
           "(both the same size). The CLIP image tokens come from the first image only, as in the official "
           "code. fs = fps (10 by default; lower = more motion). Example first.png / last.png: assets/examples/ "
           "(copy into input/).", (1100, 600), (360, 180))
    return g.to_json()


def loop(classes) -> dict:
    g = UIGraph(classes, input_aspects())
    ld = loader(g, "dynamicrafter_512_interp.ckpt")
    img = g.add("LoadImage", (0, 200), {"image": "example.png"}, title="Image to loop", size=[320, 360])
    dec = i2v_chain(g, ld, img, "gentle waves, looping animation", 380, 0, video=dict(mode="loop"))
    save_video(g, dec, 1100, 0, "video/dynamicrafter_loop")
    g.note("Looping video: the same image is the first and the last frame's condition; the decode node drops "
           "the duplicate last frame (trim = auto) so the video loops seamlessly.", (0, 600), (360, 140))
    return g.to_json()


def text_to_image_to_video(classes) -> dict:
    g = UIGraph(classes, input_aspects())
    sd = g.add("CheckpointLoaderSimple", (0, 0), {"ckpt_name": "v1-5-pruned-emaonly.safetensors"},
               title="Any text-to-image checkpoint", size=[360, 100])
    p, n = prompt_pair(g, sd, "CLIP", "a lighthouse on a cliff, stormy sea, digital painting", 0, 150,
                       negative="blurry, low quality", titled=False)
    lat = g.add("EmptyLatentImage", (0, 420), {"width": 512, "height": 320, "batch_size": 1})
    ks = g.add("KSampler", (380, 0), {"seed": 7, "steps": 25, "cfg": 7.0, "sampler_name": "euler",
                                     "scheduler": "normal", "denoise": 1.0})
    g.connect(sd, "MODEL", ks, "model")
    g.connect(p, 0, ks, "positive")
    g.connect(n, 0, ks, "negative")
    g.connect(lat, 0, ks, "latent_image")
    dec = g.add("VAEDecode", (380, 300))
    g.connect(ks, 0, dec, "samples")
    g.connect(sd, "VAE", dec, "vae")
    ld = loader(g, "dynamicrafter_512.ckpt", 380, 400)
    vid = i2v_chain(g, ld, dec, "waves crash against the cliff, the light turns", 760, 0)
    save_video(g, vid, 1480, 0, "video/dynamicrafter_t2i2v")
    g.note("Text-to-image, then animation: any image model makes the still (here SD 1.5 in "
           "models/checkpoints), DynamiCrafter animates it. The still is resized and centre-cropped to the "
           "conditioning width/height.", (0, 560), (360, 140))
    return g.to_json()


def place(node: dict, x: float, y: float, width: float | None = None, height: float | None = None) -> None:
    """Move a node already added (pos y only orders a column: UIGraph._settle stacks it), and narrow or
    shorten it to a size the web UI still lays out in (it grows a node to fit its rows)."""
    node["pos"] = [float(x), float(y)]
    if width is not None:
        node["size"][0] = width
    if height is not None:
        node["size"][1] = height


def storytelling(classes) -> dict:
    """Three scenes side by side, each in two narrow columns (the image and prompts; the conditioning,
    DDIM and decode), the loader, joins, video and note under the first columns: 30 nodes that open
    in a 1440x900 window with their text drawn."""
    g = UIGraph(classes, input_aspects())
    scenes = [("scene1.png", "a red circle moves to the right"),     # assets/examples/ (make_example_image.py)
              ("scene2.png", "a blue square moves up"),
              ("scene3.png", "a yellow triangle moves to the left")]
    decs, below = [], 10_000      # pos y that orders a node under its column's scene nodes
    ld = loader(g, "dynamicrafter_512.ckpt", 0, below)
    place(ld, 0, below, 336)
    for i, (name, prompt) in enumerate(scenes):
        x, first = i * 634, len(g.nodes)
        # 280 wide: its 512x320 picture's preview is no taller than the empty one
        img = g.add("LoadImage", (x, 0), {"image": name}, title=f"Scene {i + 1}", size=[280, 280])
        decs.append(i2v_chain(g, ld, img, prompt, x, 1, title_suffix=f" (scene {i + 1})",
                              sampler=dict(seed=100 + i)))
        for n in g.nodes[first:]:
            if n["type"] == "CLIPTextEncode":
                place(n, x, n["pos"][1], 336, 82)
            elif n["type"] == "DynamiCrafterImageConditioning":      # heads the second column
                place(n, x + 356, -1, 258)
            elif n["type"] in ("DynamiCrafterDDIMSampler", "DynamiCrafterVideoDecode"):
                place(n, x + 356, n["pos"][1], 258)
    joined = decs[0]
    for i, d in enumerate(decs[1:]):
        b = g.add("ImageBatch", (634, below + i), title="Join scenes", size=[336, 54])
        g.connect(joined, 0, b, "image1")
        g.connect(d, 0, b, "image2")
        joined = b
    sv = save_video(g, joined, 634, below + 2, "video/dynamicrafter_story")
    place(sv, 1268, below, 336, 120)
    g.note("Storytelling: each scene (image + prompt) is animated separately and the clips are joined in "
           "order into one video. Example scene1-3.png: assets/examples/ (copy into input/); replace them "
           "and the prompts with your story.", (1268, below + 1), (336, 130))
    return g.to_json()


def text_to_video(classes) -> dict:
    g = UIGraph(classes, input_aspects())
    ld = loader(g, "videocrafter2_512.ckpt")
    p, n = prompt_pair(g, ld, "clip", "a corgi running on the beach, slow motion", 380, 0, titled=False)
    t2v = g.add("DynamiCrafterTextToVideoLatent", (380, 300),
                {"width": 512, "height": 320, "frames": 16, "batch_size": 1, "fs": 28}, title="Text-to-video latent")
    g.connect(p, 0, t2v, "positive")
    g.connect(n, 0, t2v, "negative")
    samp = g.add("DynamiCrafterDDIMSampler", (760, 0),
                 {"seed": 1, "steps": 50, "cfg_text": 0.0, "cfg_img": 0.0, "eta": 1.0, "guidance_rescale": 0.0,
                  "spacing": "uniform"})
    g.connect(ld, "model", samp, "model")
    g.connect(t2v, "positive", samp, "positive")
    g.connect(t2v, "negative", samp, "negative")
    g.connect(t2v, "latent", samp, "latent_image")
    dec = g.add("DynamiCrafterVideoDecode", (760, 330), {"frames_per_batch": 4, "trim": "auto"})
    g.connect(ld, "vae", dec, "vae")
    g.connect(samp, 0, dec, "latent")
    save_video(g, dec, 1100, 0, "video/videocrafter_t2v")
    g.note("Text-to-video with VideoCrafter2 or VideoCrafter1 (same loader; text only, cfg 12, fps 28 "
           "(ignored by VideoCrafter1 512), 'uniform' DDIM steps; 320x512, VideoCrafter1 1024: 576x1024).",
           (0, 200), (360, 120))
    return g.to_json()


def long_video(classes) -> dict:
    g = UIGraph(classes, input_aspects())
    ld = loader(g, "dynamicrafter_512.ckpt")
    img = g.add("LoadImage", (0, 200), {"image": "example.png"}, title="Start image", size=[320, 360])
    p, n = prompt_pair(g, ld, "clip", "a train travels through snowy mountains", 400, 0, titled=False)
    lv = g.add("DynamiCrafterLongVideo", (800, 0),
               {"total_frames": 46, "seed": 5, "steps": 50, "cfg_text": 0.0, "cfg_img": 0.0, "eta": 1.0,
                "guidance_rescale": 0.7, "spacing": "auto"},
               size=[360, 420])
    connect_pipeline(g, ld, p, n, lv, start_image=(img, 0))
    save_video(g, lv, 1380, 0, "video/dynamicrafter_long")
    g.note("Longer than 16 frames. method chained: segments, each animated from the previous segment's last "
           "frame (46 frames = 3 segments of 16); windows: the whole video in context windows of segment_frames "
           "overlapping by half a window, blended at every step. README 'Long shots' compares them.",
           (0, 600), (360, 140))
    return g.to_json()


def continue_clip(classes) -> dict:
    """A video in, the same video continued: LoadVideo -> GetVideoComponents -> Continue Clip."""
    g = UIGraph(classes, input_aspects())
    ld = loader(g, "dynamicrafter_512.ckpt")
    vid = g.add("LoadVideo", (0, 200), {"file": "clip.mp4"}, title="Clip to continue", size=[320, 360])
    parts = g.add("GetVideoComponents", (0, 600))
    g.connect(vid, 0, parts, "video")
    p, n = prompt_pair(g, ld, "clip", "a green square moves down", 400, 0)     # assets/examples/clip.mp4
    cc = g.add("DynamiCrafterContinueClip", (800, 0),
               {"overlap": 8, "condition": "window_start", "seed": 7, "steps": 50, "cfg_text": 0.0, "cfg_img": 0.0,
                "eta": 1.0, "guidance_rescale": 0.7, "spacing": "auto"}, size=[360, 480])
    connect_pipeline(g, ld, p, n, cc, video=(parts, "images"))
    save_video(g, cc, 1200, 0, "video/dynamicrafter_continued")
    g.note("Continue a clip: the window's first `overlap` frames are the clip's last ones, kept pinned to the "
           "clip while sampling, so the motion carries on instead of restarting from a still image. Output: the "
           "clip (covered and centre-cropped to width x height) then frames - overlap new frames (16 - 8 = 8 "
           "here); chain the node to go on. To start a new animation from one frame of a video instead, use "
           "'DynamiCrafter Pick Frame' (first / last / index) into the image conditioning. Example clip.mp4: "
           "assets/examples/ (copy into input/).", (0, 800), (360, 220))
    return g.to_json()


def core_sampler_inputs(g: UIGraph, frames: int | None = None, title: str = "Image conditioning"):
    """Loader, start image, prompts, CLIP vision, resampler and image conditioning for a core
    sampler (the MODEL and positive / negative / image_only / latent); returns (loader, conditioning).
    Size, fs and (unless given) frames: the loaded model's own."""
    ld = loader(g, "dynamicrafter_512.ckpt")
    img = g.add("LoadImage", (0, 200), {"image": "example.png"}, title="Start image", size=[320, 360])
    p, n = prompt_pair(g, ld, "clip", "a boat sails across a calm lake at sunset", 380, 0, titled=False)
    enc = g.add("DynamiCrafterCLIPVisionEncode", (380, 270))
    g.connect(ld, "clip_vision", enc, "clip_vision")
    g.connect(img, 0, enc, "image")
    res = g.add("DynamiCrafterContextResampler", (380, 360))
    g.connect(ld, "model", res, "model")
    g.connect(enc, 0, res, "clip_tokens")
    cond = g.add("DynamiCrafterImageConditioning", (380, 450),
                 {"batch_size": 1, "mode": "image-to-video", **({} if frames is None else {"frames": frames})},
                 title=title)
    for name, src, slot in (("positive", p, 0), ("negative", n, 0), ("vae", ld, "vae"), ("image_context", res, 0),
                            ("start_image", img, 0)):
        g.connect(src, slot, cond, name)
    return ld, cond


def model_guidance(g: UIGraph, ld, pos, into: dict) -> dict:
    """A Variant Defaults node on the loader's model whose guidance outputs feed core sampler widgets
    (`into`: output name -> (node, widget)): the graph samples at the loaded model's own guidance."""
    defaults = g.add("DynamiCrafterVariantDefaults", pos, title="Model's own guidance")
    g.connect(ld, "model", defaults, "model")
    for output, (node, widget) in into.items():
        g.connect(defaults, output, node, widget)
    return defaults


def image_to_video_ksampler(classes) -> dict:
    """The same MODEL under core SamplerCustomAdvanced + DualCFGGuider (ComfyUI's samplers)."""
    g = UIGraph(classes, input_aspects())
    ld, cond = core_sampler_inputs(g)
    guider = g.add("DualCFGGuider", (760, 0), {"cfg_conds": 7.5, "cfg_cond2_negative": 7.5, "style": "regular"})
    g.connect(ld, "model", guider, "model")
    model_guidance(g, ld, (1100, 700), {"cfg_text": (guider, "cfg_conds"),
                                        "cfg_cond2_negative": (guider, "cfg_cond2_negative")})
    g.connect(cond, "positive", guider, "cond1")
    g.connect(cond, "image_only", guider, "cond2")
    g.connect(cond, "negative", guider, "negative")
    noise = g.add("RandomNoise", (760, 220), {"noise_seed": 3})
    ksel = g.add("KSamplerSelect", (760, 330), {"sampler_name": "ddim"})
    sched = g.add("BasicScheduler", (760, 420), {"scheduler": "simple", "steps": 30, "denoise": 1.0})
    g.connect(ld, "model", sched, "model")
    sca = g.add("SamplerCustomAdvanced", (1100, 0))
    for name, src in (("noise", noise), ("guider", guider), ("sampler", ksel), ("sigmas", sched)):
        g.connect(src, 0, sca, name)
    g.connect(cond, "latent", sca, "latent_image")
    dec = g.add("DynamiCrafterVideoDecode", (1100, 330), {"frames_per_batch": 4, "trim": "auto"})
    g.connect(ld, "vae", dec, "vae")
    g.connect(sca, 0, dec, "latent")
    save_video(g, dec, 1440, 0, "video/dynamicrafter_ksampler")
    g.note("The DynamiCrafter MODEL under ComfyUI's own samplers: v-prediction with the zero-SNR schedule. "
           "DualCFGGuider: cond1 = positive, cond2 = image_only (empty text + image), negative = empty text + "
           "grey image; cfg_conds = text scale, cfg_cond2_negative = image scale, both the loaded model's own "
           "through \'Model\'s own guidance\' (Variant Defaults; 7.5 / 7.5 = the 512 model's single CFG, the demo "
           "model's 2 / 1: text-only); unlink them to set your own. Differs from the exact DDIM "
           "node: continuous sigmas (the last ComfyUI alpha is 4.9e-8, not 0), no dynamic x0 rescale, "
           "ComfyUI's scheduler spacing; results are close but not identical.", (0, 600), (360, 240))
    return g.to_json()


def context_windows(classes) -> dict:
    """A 64-frame video in context windows of 16 under core KSampler: core 'Context Windows
    (Manual)' on the DynamiCrafter MODEL, windows along the latent's frame axis (dim 2)."""
    g = UIGraph(classes, input_aspects())
    ld, cond = core_sampler_inputs(g, 64, "Image conditioning (64 frames)")
    cw = g.add("ContextWindowsManual", (760, 0),
               {"context_length": 16, "context_overlap": 4, "context_schedule": "standard_static",
                "context_stride": 1, "closed_loop": False, "fuse_method": "pyramid", "dim": 2},
               title="Context windows (16 frames, dim 2)", size=[360, 260])
    g.connect(ld, "model", cw, "model")
    ks = g.add("KSampler", (760, 300), {"seed": 3, "steps": 30, "cfg": 7.5, "sampler_name": "ddim",
                                       "scheduler": "simple", "denoise": 1.0}, size=[320, 270])
    g.connect(cw, 0, ks, "model")
    model_guidance(g, ld, (1140, 700), {"cfg_text": (ks, "cfg")})
    g.connect(cond, "positive", ks, "positive")
    g.connect(cond, "negative", ks, "negative")
    g.connect(cond, "latent", ks, "latent_image")
    dec = g.add("DynamiCrafterVideoDecode", (760, 600), {"frames_per_batch": 4, "trim": "auto"})
    g.connect(ld, "vae", dec, "vae")
    g.connect(ks, 0, dec, "latent")
    save_video(g, dec, 1140, 0, "video/dynamicrafter_context_windows", fps=12.0)
    g.note("Longer than 16 frames in one shot: core 'Context Windows (Manual)' runs the UNet on windows of 16 "
           "frames (what the models are trained on) overlapping by 4, and blends them at every step, so the "
           "motion carries through instead of restarting per segment. dim must be 2: DynamiCrafter latents are "
           "(batch, channels, frames, height, width); each window gets its frames' image latent and image tokens. "
           "The exact DDIM node does the same with its context_window / context_overlap / context_schedule "
           "inputs (looped: windows wrap round for loop mode). Windows >= frames is plain sampling. KSampler's cfg "
           "is the loaded model's own guidance (\'Model\'s own guidance\': 7.5 for the 512 model, 2 for the demo).",
           (0, 600), (360, 240))
    return g.to_json()


TOONCRAFTER_MODEL = {"name": "tooncrafter_512_interp.ckpt", "directory": "checkpoints",
                     "url": "https://huggingface.co/Doubiiu/ToonCrafter/resolve/main/model.ckpt"}


def with_model_download(node: dict, *models: dict) -> None:
    """ComfyUI's model download metadata on the loader node (the frontend offers missing files)."""
    node["properties"]["models"] = [dict(m) for m in models]


def listing_models(workflow: dict, *models: dict) -> dict:
    """The same metadata at the workflow's top level ("models"), as the frontend's schema allows."""
    workflow["models"] = [dict(m) for m in models]
    return workflow


def models_of(workflow: dict) -> list[dict]:
    """The model files a workflow's loaders ask for (their properties.models), each once."""
    seen = {}
    for node in workflow["nodes"]:
        for m in node.get("properties", {}).get("models", []):
            seen.setdefault(m["name"], m)
    return list(seen.values())


def with_download_notes(workflow: dict) -> dict:
    """The first Note ends with each model's link and folder: ComfyUI's Missing Models dialog
    (frontend 1.32) offers neither Download nor Copy URL for a file that is not .safetensors."""
    models = models_of(workflow)
    note = next((n for n in workflow["nodes"] if n["type"] == "Note"), None)
    if not models or note is None:
        return workflow
    lines = [f"{m['name']} -> ComfyUI/models/{m['directory']}/{m['name']}\n{m['url']}" for m in models]
    note["widgets_values"][0] += ("\n\nDownload (the Missing Models dialog cannot download .ckpt files: open the "
                                  "link, save the file in the folder under that name, press R):\n" + "\n".join(lines))
    return workflow


def tooncrafter(classes) -> dict:
    g = UIGraph(classes, input_aspects())
    ld = loader(g, TOONCRAFTER_MODEL["name"])
    with_model_download(ld, TOONCRAFTER_MODEL)
    a = g.add("LoadImage", (0, 200), {"image": "first.png"}, title="First keyframe", size=[320, 320])
    b = g.add("LoadImage", (0, 560), {"image": "last.png"}, title="Last keyframe", size=[320, 320])
    dec = i2v_chain(g, ld, a, EXAMPLE_PAIR_PROMPT, 380, 0, end_image=b, video=dict(mode="interpolation"))
    save_video(g, dec, 1100, 0, "video/tooncrafter")
    g.note("ToonCrafter: cartoon in-betweening of two keyframes (320x512, 16 frames, fs 10, cfg 7.5, guidance "
           "rescale 0.7, eta 1.0: the official settings). Put the ToonCrafter model.ckpt in models/checkpoints as "
           "tooncrafter_512_interp.ckpt (the loader's VAE is ToonCrafter's dual-reference video decoder).\n"
           "The conditioning node (interpolation mode) keeps what the encoder saw of both keyframes in the "
           "latent; 'DynamiCrafter Video Decode' decodes with it, exactly as the official code (including its "
           "re-decode of the two middle frames). A core VAEDecode also works but decodes without the keyframes "
           "(the official decoder without references: less faithful detail). cfg_img > 0 = dual CFG; core "
           "KSampler / SamplerCustomAdvanced can replace the DDIM node.\nExample keyframes (synthetic, to try the "
           "graph): assets/examples/first.png, last.png (copy into input/).", (1100, 600), (360, 330))
    return listing_models(g.to_json(), TOONCRAFTER_MODEL)


CAMI2V_MODEL = {"name": "256_cami2v.pt", "directory": "checkpoints",
                "url": "https://huggingface.co/MuteApo/CamI2V/resolve/main/256_cami2v.pt"}
CAMI2V_512_MODEL = {"name": "512_cami2v_100k.pt", "directory": "checkpoints",
                    "url": "https://huggingface.co/MuteApo/CamI2V/resolve/main/512_cami2v_100k.pt"}


def rewire(g: UIGraph, dst: dict, input_name: str, src: dict, out_slot: int) -> None:
    """Point the link already feeding dst.input_name at src's output out_slot instead."""
    target = next(i for i in dst["inputs"] if i["name"] == input_name)
    link = next(lk for lk in g.links if lk[0] == target["link"])
    old = next(n for n in g.nodes if n["id"] == link[1])
    old["outputs"][link[2]]["links"].remove(link[0])
    link[1], link[2] = src["id"], out_slot
    src["outputs"][out_slot]["links"].append(link[0])


def camera_moves(classes) -> dict:
    g = UIGraph(classes, input_aspects())
    ld = loader(g, CAMI2V_MODEL["name"])
    with_model_download(ld, CAMI2V_MODEL, CAMI2V_512_MODEL)
    img = g.add("LoadImage", (0, 200), {"image": "scene1.png"}, title="Start image", size=[320, 360])
    dec = i2v_chain(g, ld, img, "a quiet street in the morning, dramatic camera movement, high quality, "
                    "cinematic shot, photorealistic, smooth motion", 380, 0,
                    video=dict(fs=2), sampler=dict(steps=25))
    samp = next(n for n in g.nodes if n["type"] == "DynamiCrafterDDIMSampler")
    cond = next(n for n in g.nodes if n["type"] == "DynamiCrafterImageConditioning")
    cam = g.add("DynamiCrafterCamera", (1100, 500), {"preset": "orbit left", "speed": 0.1, "strength": 1.0},
                title="Camera move")
    for slot, name in enumerate(("positive", "negative")):
        g.connect(cond, name, cam, name)
        rewire(g, samp, name, cam, slot)
    preview = g.add("PreviewImage", (1100, 800), size=[300, 200])
    g.connect(cam, 2, preview, "images")
    save_video(g, dec, 1100, 0, "video/cami2v_camera")
    g.note("Camera moves with CamI2V (camera-controlled DynamiCrafter, ZGCTroy/CamI2V). Put 256_cami2v.pt in "
           "models/checkpoints (256x256: the conditioning's 0 takes the size from the model; fs = frame stride "
           "2, the official demo's; or 512_cami2v_100k.pt, 512x320, with fs 10). "
           "'DynamiCrafter Camera' picks one of the 16 moves of the official demo (pan, zoom, orbit, look, "
           "rotate), a custom pan/zoom/orbit, or a RealEstate10K pose file; speed 0.1 is the demo's default "
           "(the first tenth of the move over the clip). cfg_camera > 1 on the sampler strengthens the move "
           "(one more UNet call per step). The camera needs the released CamI2V weights: other DynamiCrafter "
           "models refuse it.", (0, 600), (360, 280))
    return listing_models(g.to_json(), CAMI2V_MODEL, CAMI2V_512_MODEL)


def keyframes(classes) -> dict:
    g = UIGraph(classes, input_aspects())
    ld = loader(g, TOONCRAFTER_MODEL["name"], 340, 0)
    with_model_download(ld, TOONCRAFTER_MODEL)     # its one loader needs one model (512_interp also works)
    names = ["key1.png", "key2.png", "key3.png"]
    imgs = [g.add("LoadImage", (0, 200 + 340 * i), {"image": n}, title=f"Keyframe {i + 1}", size=[320, 280])
            for i, n in enumerate(names)]
    batch = imgs[0]
    for i, img in enumerate(imgs[1:]):
        bt = g.add("ImageBatch", (340, 600 + 200 * i), title="Keyframes in order")
        g.connect(batch, 0, bt, "image1")
        g.connect(img, 0, bt, "image2")
        batch = bt
    p, n = prompt_pair(g, ld, "clip", EXAMPLE_PAIR_PROMPT, 340, 300)
    kf = g.add("DynamiCrafterKeyframes", (720, 0),
               {"width": 512, "height": 320, "frames": 16, "fs": 10, "seed": 123, "steps": 50, "cfg_text": 0.0,
                "cfg_img": 0.0, "eta": 1.0, "guidance_rescale": 0.7, "spacing": "auto",
                "pair_prompts": EXAMPLE_PAIR_PROMPT + "\nthe purple circle keeps moving to the right",
                "framing": "pad"},
               size=[380, 560])
    connect_pipeline(g, ld, p, n, kf, keyframes=(batch, 0), clip=(ld, "clip"))
    save_video(g, kf, 1260, 0, "video/keyframes")
    g.note("Keyframes to one shot: N keyframes (an IMAGE batch, e.g. a storyboard from any image model) are "
           "in-betweened pair by pair by an interpolation model (ToonCrafter or DynamiCrafter 512_interp: "
           "load either, the node is the same) and joined: each keyframe appears once (the next clip's copy "
           "of it is dropped), nothing is cross-faded. N keyframes x 16 frames give 1 + 15(N-1) frames. "
           "pair_prompts: one line per pair (blank = the Prompt node). Example key1-3.png: assets/examples/ "
           "(copy into input/).", (1260, 600), (360, 240))
    return listing_models(g.to_json(), TOONCRAFTER_MODEL)


# Key order is the Templates browser's card order (web/js/templates.js applies it: the server lists
# files in directory order): the demo, which runs out of the box, first.
WORKFLOWS = {
    "DynamiCrafter demo.json": demo,
    "DynamiCrafter image to video.json": image_to_video,
    "DynamiCrafter interpolation.json": interpolation,
    "DynamiCrafter seamless loop.json": loop,
    "Animate a generated image.json": text_to_image_to_video,
    "DynamiCrafter storytelling.json": storytelling,
    "VideoCrafter text to video.json": text_to_video,
    "DynamiCrafter long video.json": long_video,
    "DynamiCrafter with KSampler.json": image_to_video_ksampler,
    "ToonCrafter in-betweening.json": tooncrafter,
    "Keyframes to one shot.json": keyframes,
    "Long shot - context windows.json": context_windows,
    "Continue a clip.json": continue_clip,
    "Camera moves.json": camera_moves,
    "Motion brush.json": motion_brush,
    "Video to video.json": video_to_video,
}


# The Templates browser titles a custom pack's templates by their file names (ComfyUI 0.3.75's front
# end reads no title or index for them), hence the human file names above; it does translate the
# category heading, from the pack's locales/en/main.json keyed by the folder the pack is installed
# as: the README's clone and the registry's.
TEMPLATE_CATEGORY = "DynamiCrafter"
INSTALL_FOLDERS = ("ComfyUI-DynamiCrafter", "comfyui-dynamicrafter")


def template_translations() -> dict:
    """locales/en/main.json: the category heading for every install folder name (the front end's
    normalizeI18nKey turns dots into underscores).  Card subtitles cannot be set: frontend 1.32.9
    gives a custom pack's card its file name as description and reads no translation for it."""
    return {"templateWorkflows": {"category": {d.replace(".", "_"): TEMPLATE_CATEGORY for d in INSTALL_FOLDERS}}}


def template_order_js() -> str:
    """web/js/template_order.js: the card order, read by web/js/templates.js."""
    names = [Path(n).stem for n in WORKFLOWS]
    return ("// Written by scripts/make_workflows.py (its WORKFLOWS order): the Templates browser's card order.\n"
            f"export const TEMPLATE_ORDER = {json.dumps(names, indent=1)};\n")


def main() -> None:
    import comfy_runtime
    base = comfy_runtime.make_base_dir(Path(tempfile.mkdtemp(prefix="dc_make_workflows_")))
    rt = comfy_runtime.InProcessComfy(base)
    out = REPO / "workflows"
    out.mkdir(exist_ok=True)
    for name, fn in WORKFLOWS.items():
        (out / name).write_text(json.dumps(with_download_notes(fn(rt.node_classes)), indent=1) + "\n")
        print("wrote", out / name)
    locale = REPO / "locales" / "en" / "main.json"
    locale.parent.mkdir(parents=True, exist_ok=True)
    locale.write_text(json.dumps(template_translations(), indent=1) + "\n")
    print("wrote", locale)
    order = REPO / "web" / "js" / "template_order.js"
    order.write_text(template_order_js())
    print("wrote", order)


if __name__ == "__main__":
    main()
