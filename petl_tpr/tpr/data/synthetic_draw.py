"""Drawing of the synthetic pedestrians: a front-view figure with PIL's ImageDraw.

`draw_person(attributes, view, style, rng)` paints, back to front: background (colour, blotchy
texture, floor or ground band), long hair, backpack body, legs and lower garment, torso and upper
garment, arms and sleeves, straps, head, short hair, headwear, handbag; then lighting (brightness
and tint) and fine pixel noise. Identity-level traits (the attributes, body proportions, skin and
hair colour, bag colour) live in `attributes`; pose, placement and background live in `view`.
All randomness left (texture, noise) comes from `rng`, a `random.Random`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageEnhance

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class DomainStyle:
    """How one domain looks: canvas size, colour shades, backgrounds, lighting, noise."""

    size: tuple[int, int]  # (width, height)
    palette: dict[str, RGB]
    backgrounds: tuple[RGB, ...]
    ground: tuple[RGB, ...]
    texture_strength: float  # 0..1 contrast of the blotchy background texture
    brightness: tuple[float, float]
    tint: RGB
    tint_strength: float
    pixel_noise: int  # fine noise amplitude, 0..255
    figure_height: float  # fraction of the canvas height for a body of relative height 1


@dataclass(frozen=True)
class Body:
    """Identity-level appearance not described in captions."""

    skin: RGB
    hair: RGB
    bag: RGB
    headwear: RGB
    height: float  # relative, ~0.9..1.05
    width: float  # relative, ~0.85..1.15


@dataclass(frozen=True)
class View:
    """Image-level variation of one identity."""

    arm_swing: float  # degrees, signed
    stride: float  # fraction of leg width, >= 0
    shift_x: float  # fraction of canvas width
    shift_y: float  # fraction of canvas height
    scale: float  # ~0.92..1.05
    background: int  # index into the domain's backgrounds
    handbag_side: int  # -1 left, +1 right


def _shade(colour: RGB, factor: float) -> RGB:
    return tuple(max(0, min(255, round(c * factor))) for c in colour)  # type: ignore[return-value]


def _background(style: DomainStyle, view: View, rng: random.Random) -> Image.Image:
    w, h = style.size
    base = style.backgrounds[view.background % len(style.backgrounds)]
    coarse = Image.frombytes("L", (max(2, w // 6), max(2, h // 6)), rng.randbytes(max(2, w // 6) * max(2, h // 6)))
    mask = coarse.resize((w, h), Image.BILINEAR)
    light, dark = _shade(base, 1 + style.texture_strength / 2), _shade(base, 1 - style.texture_strength / 2)
    image = Image.composite(Image.new("RGB", (w, h), light), Image.new("RGB", (w, h), dark), mask)
    ground = style.ground[view.background % len(style.ground)]
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, round(h * 0.86), w, h], fill=ground)
    return image


def _limb(draw: ImageDraw.ImageDraw, top: tuple[float, float], length: float, angle: float, width: float,
          colours: list[tuple[float, RGB]]) -> tuple[float, float]:
    """A limb hanging from `top` at `angle` degrees from vertical, painted in segments
    `(fraction of length, colour)`; returns the end point."""
    dx, dy = math.sin(math.radians(angle)), math.cos(math.radians(angle))
    start = 0.0
    for stop, colour in colours:
        a = (top[0] + dx * length * start, top[1] + dy * length * start)
        b = (top[0] + dx * length * stop, top[1] + dy * length * stop)
        draw.line([a, b], fill=colour, width=max(1, round(width)))
        start = stop
    return (top[0] + dx * length, top[1] + dy * length)


def draw_person(attributes: dict[str, str], body: Body, view: View, style: DomainStyle,
                rng: random.Random) -> Image.Image:
    """Render one image; `attributes` has keys upper_color, upper_type, lower_color, lower_type,
    headwear, bag, hair (values as in `synthetic.ATTRIBUTE_VALUES`)."""
    image = _background(style, view, rng)
    draw = ImageDraw.Draw(image)
    w, h = style.size
    ph = h * style.figure_height * body.height * view.scale
    cx = w / 2 + view.shift_x * w
    top = (h - ph) / 2 + view.shift_y * h
    upper, lower = style.palette[attributes["upper_color"]], style.palette[attributes["lower_color"]]
    r = 0.065 * ph
    head_c = (cx, top + 0.05 * ph + r)
    shoulder_y = head_c[1] + r + 0.02 * ph
    hip_y = shoulder_y + 0.32 * ph
    feet_y = top + ph
    half_torso = 0.13 * ph * body.width
    leg_w, leg_len = 0.09 * ph * body.width, feet_y - hip_y

    if attributes["hair"] == "long":
        draw.rectangle([cx - r * 1.05, head_c[1], cx + r * 1.05, shoulder_y + 0.06 * ph], fill=body.hair)
    if attributes["bag"] == "backpack":
        draw.rectangle([cx - half_torso * 1.2, shoulder_y + 0.03 * ph, cx + half_torso * 1.2, hip_y - 0.05 * ph],
                       fill=body.bag)

    legs_colour = lower if attributes["lower_type"] == "trousers" else body.skin
    for side in (-1, 1):
        x = cx + side * (leg_w * 0.6 + view.stride * leg_w * 0.5)
        segments = [(0.5, lower), (0.93, body.skin), (1.0, (30, 30, 30))] if attributes["lower_type"] == "shorts" \
            else [(0.93, legs_colour), (1.0, (30, 30, 30))]
        _limb(draw, (x, hip_y - 1), leg_len, side * view.stride * 4, leg_w, segments)
    if attributes["lower_type"] == "skirt":
        draw.polygon([(cx - half_torso, hip_y - 2), (cx + half_torso, hip_y - 2),
                      (cx + half_torso * 1.4, hip_y + 0.5 * leg_len), (cx - half_torso * 1.4, hip_y + 0.5 * leg_len)],
                     fill=lower)

    # A coat stops above the hem of shorts and skirts, so the lower garment stays visible.
    coat_extra = 0.25 * leg_len if attributes["upper_type"] == "coat" else 0.0
    draw.rectangle([cx - half_torso, shoulder_y, cx + half_torso, hip_y + coat_extra], fill=upper)
    if attributes["upper_type"] == "jacket":
        draw.line([(cx, shoulder_y), (cx, hip_y)], fill=_shade(upper, 0.55), width=max(1, round(0.015 * ph)))
    elif attributes["upper_type"] == "coat":
        for k in range(3):
            y = shoulder_y + (k + 1) * (hip_y - shoulder_y) / 4
            draw.point([(cx, y), (cx + 1, y)], fill=_shade(upper, 0.4))

    sleeve = 0.35 if attributes["upper_type"] == "t-shirt" else 0.92
    hands = []
    for side in (-1, 1):
        shoulder = (cx + side * (half_torso + 0.03 * ph), shoulder_y + 0.02 * ph)
        angle = side * 6 + (view.arm_swing if side > 0 else -view.arm_swing)
        hands.append(_limb(draw, shoulder, 0.33 * ph, angle, 0.06 * ph, [(sleeve, upper), (1.0, body.skin)]))
    if attributes["bag"] == "backpack":
        for side in (-1, 1):
            x = cx + side * half_torso * 0.55
            draw.line([(x, shoulder_y), (x, shoulder_y + 0.2 * ph)], fill=body.bag, width=max(1, round(0.02 * ph)))

    draw.rectangle([cx - r * 0.4, head_c[1] + r * 0.8, cx + r * 0.4, shoulder_y], fill=body.skin)
    draw.ellipse([head_c[0] - r, head_c[1] - r, head_c[0] + r, head_c[1] + r], fill=body.skin)
    draw.chord([head_c[0] - r, head_c[1] - r * 1.05, head_c[0] + r, head_c[1] + r * 0.6], 180, 360, fill=body.hair)
    if attributes["headwear"] == "cap":
        draw.chord([head_c[0] - r * 1.05, head_c[1] - r * 1.2, head_c[0] + r * 1.05, head_c[1] + r * 0.5], 180, 360,
                   fill=body.headwear)
        draw.rectangle([head_c[0], head_c[1] - r * 0.4, head_c[0] + r * 1.7, head_c[1] - r * 0.2], fill=body.headwear)
    elif attributes["headwear"] == "hat":
        draw.rectangle([head_c[0] - r * 1.9, head_c[1] - r * 0.75, head_c[0] + r * 1.9, head_c[1] - r * 0.5],
                       fill=body.headwear)
        draw.rectangle([head_c[0] - r * 0.9, head_c[1] - r * 1.7, head_c[0] + r * 0.9, head_c[1] - r * 0.6],
                       fill=body.headwear)
    if attributes["bag"] == "handbag":
        hx, hy = hands[0 if view.handbag_side < 0 else 1]
        size = 0.09 * ph
        draw.line([(hx, hy - 1), (hx, hy + size * 0.3)], fill=_shade(body.bag, 0.6), width=1)
        draw.rectangle([hx - size / 2, hy + size * 0.3, hx + size / 2, hy + size * 1.2], fill=body.bag)
    return _finish(image, style, rng)


def _finish(image: Image.Image, style: DomainStyle, rng: random.Random) -> Image.Image:
    low, high = style.brightness
    image = ImageEnhance.Brightness(image).enhance(low + (high - low) * rng.random())
    if style.tint_strength:
        image = Image.blend(image, Image.new("RGB", image.size, style.tint), style.tint_strength)
    if style.pixel_noise:
        noise = Image.frombytes("L", image.size, rng.randbytes(image.size[0] * image.size[1]))
        grain = Image.merge("RGB", (noise, noise, noise))
        image = Image.blend(image, grain, style.pixel_noise / 255)
    return image
