"""Draw rafale's logo (a gust of wind: three curling strokes on a night-blue disc) to media/rafale-logo.png.

Run from the repository root: `python scripts/draw_logo.py`. Needs only Pillow, which Composer brings.
"""

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = 480
NIGHT, PALE, SKY, BLUE, SUN = "#0f2a44", "#e8f4ff", "#9fd3ff", "#5fb0f0", "#ffb347"


def gust(draw: ImageDraw.ImageDraw, y: int, x0: int, x1: int, radius: int, colour: str, width: int, up: bool) -> None:
    """A horizontal stroke that ends in a curl, upwards or downwards."""
    draw.line([(x0, y), (x1, y)], fill=colour, width=width)
    # The curl starts where the stroke ends and turns three quarters round its circle (angles run clockwise).
    centre_y = y - radius if up else y + radius
    box = [x1 - radius, centre_y - radius, x1 + radius, centre_y + radius]
    start, end = (180, 450) if up else (270, 540)
    draw.arc(box, start=start, end=end, fill=colour, width=width)
    draw.ellipse([x0 - width // 2, y - width // 2, x0 + width // 2, y + width // 2], fill=colour)


def main() -> None:
    image = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse([8, 8, SIZE - 8, SIZE - 8], fill=NIGHT)
    gust(draw, 180, 80, 300, 44, SKY, 24, up=True)
    gust(draw, 244, 56, 356, 52, PALE, 24, up=False)
    gust(draw, 306, 104, 224, 32, BLUE, 20, up=False)
    for x, y, r in [(372, 168, 12), (400, 208, 8), (344, 132, 6)]:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=SUN)
    try:
        font = ImageFont.truetype("DejaVuSans-Bold.ttf", 52)
    except OSError:
        font = ImageFont.load_default(size=52)
    draw.text((SIZE // 2, 412), "rafale", fill=PALE, font=font, anchor="mm")
    out = Path(__file__).resolve().parents[1] / "media" / "rafale-logo.png"
    image.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
