// Written by scripts/make_workflows.py (its WORKFLOWS order): the Templates browser's card order.
export const TEMPLATE_ORDER = [
 "DynamiCrafter demo",
 "DynamiCrafter image to video",
 "DynamiCrafter interpolation",
 "DynamiCrafter seamless loop",
 "Animate a generated image",
 "DynamiCrafter storytelling",
 "VideoCrafter text to video",
 "DynamiCrafter long video",
 "DynamiCrafter with KSampler",
 "ToonCrafter in-betweening",
 "Keyframes to one shot",
 "Long shot - context windows",
 "Continue a clip",
 "Camera moves",
 "Motion brush",
 "Video to video"
];
