"""Draw the example pictures in examples/images/ (simple scenes, made here so that they are ours to ship).

    python examples/make_images.py

`OBJECTS` gives, for every picture, the pixel box of each thing in it (x1, y1, x2, y2): what a perfect
`kosmos2 ground` would answer.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent / "images"

OBJECTS = {
    "scene.png": {
        "the sun": (500, 30, 590, 120),
        "a house": (60, 150, 260, 340),
        "a tree": (300, 130, 410, 340),
        "a red car": (420, 270, 610, 350),
    },
    "shapes.png": {
        "a red circle": (30, 60, 150, 180),
        "a blue square": (170, 70, 270, 170),
        "a green triangle": (290, 50, 390, 170),
    },
    "kite.png": {
        "a kite": (150, 40, 250, 170),
        "a child": (40, 300, 110, 440),
    },
}


def scene() -> Image.Image:
    image = Image.new("RGB", (640, 426))
    draw = ImageDraw.Draw(image)
    for y in range(300):  # sky, lighter towards the horizon
        shade = int(150 + 80 * y / 300)
        draw.line([(0, y), (640, y)], fill=(shade - 60, shade - 10, 255))
    draw.rectangle([0, 300, 640, 426], fill=(86, 160, 70))
    draw.ellipse(OBJECTS["scene.png"]["the sun"], fill=(255, 214, 64))
    x1, y1, x2, y2 = OBJECTS["scene.png"]["a house"]
    draw.rectangle([x1 + 15, y1 + 70, x2 - 15, y2], fill=(205, 170, 125))
    draw.polygon([(x1, y1 + 75), ((x1 + x2) // 2, y1), (x2, y1 + 75)], fill=(170, 50, 45))
    draw.rectangle([x1 + 85, y2 - 70, x1 + 120, y2], fill=(110, 70, 40))
    draw.rectangle([x1 + 35, y1 + 100, x1 + 70, y1 + 135], fill=(200, 230, 255))
    draw.rectangle([x2 - 70, y1 + 100, x2 - 35, y1 + 135], fill=(200, 230, 255))
    x1, y1, x2, y2 = OBJECTS["scene.png"]["a tree"]
    draw.rectangle([(x1 + x2) // 2 - 12, y1 + 120, (x1 + x2) // 2 + 12, y2], fill=(110, 75, 45))
    draw.ellipse([x1, y1, x2, y1 + 140], fill=(40, 120, 50))
    x1, y1, x2, y2 = OBJECTS["scene.png"]["a red car"]
    draw.rounded_rectangle([x1, y1 + 25, x2, y2 - 18], radius=12, fill=(210, 40, 40))
    draw.rounded_rectangle([x1 + 40, y1, x2 - 50, y1 + 35], radius=10, fill=(210, 40, 40))
    draw.rectangle([x1 + 52, y1 + 8, x2 - 62, y1 + 28], fill=(200, 230, 255))
    for cx in (x1 + 40, x2 - 40):
        draw.ellipse([cx - 18, y2 - 36, cx + 18, y2], fill=(30, 30, 30))
    return image.filter(ImageFilter.SMOOTH)


def shapes() -> Image.Image:
    image = Image.new("RGB", (420, 240), (245, 243, 238))
    draw = ImageDraw.Draw(image)
    boxes = OBJECTS["shapes.png"]
    draw.ellipse(boxes["a red circle"], fill=(220, 50, 50))
    draw.rectangle(boxes["a blue square"], fill=(50, 90, 210))
    x1, y1, x2, y2 = boxes["a green triangle"]
    draw.polygon([(x1, y2), ((x1 + x2) // 2, y1), (x2, y2)], fill=(60, 170, 80))
    return image


def kite() -> Image.Image:
    image = Image.new("RGB", (300, 450), (150, 200, 250))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 380, 300, 450], fill=(90, 165, 75))
    x1, y1, x2, y2 = OBJECTS["kite.png"]["a kite"]
    cx, cy = (x1 + x2) // 2, y1 + 50
    draw.polygon([(cx, y1), (x2, cy), (cx, y1 + 110), (x1, cy)], fill=(240, 120, 30))
    x1c, y1c, x2c, y2c = OBJECTS["kite.png"]["a child"]
    draw.line([(cx, y1 + 110), (cx - 20, y2), (x2c - 10, y1c + 40)], fill=(60, 60, 60), width=2)
    mid = (x1c + x2c) // 2
    draw.ellipse([mid - 15, y1c, mid + 15, y1c + 30], fill=(240, 200, 160))
    draw.rectangle([mid - 20, y1c + 30, mid + 20, y1c + 90], fill=(60, 110, 200))
    draw.line([(mid + 20, y1c + 40), (x2c, y1c + 40)], fill=(240, 200, 160), width=6)
    draw.rectangle([mid - 18, y1c + 90, mid - 4, y2c], fill=(50, 50, 60))
    draw.rectangle([mid + 4, y1c + 90, mid + 18, y2c], fill=(50, 50, 60))
    return image


def main() -> None:
    HERE.mkdir(exist_ok=True)
    for name, make in (("scene.png", scene), ("shapes.png", shapes), ("kite.png", kite)):
        make().save(HERE / name, optimize=True)
        print(HERE / name)


if __name__ == "__main__":
    main()
