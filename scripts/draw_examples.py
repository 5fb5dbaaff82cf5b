"""Draw the example project's source images with Pillow only (no external assets).

Two cat-eared girls, ``characters/kuroneko`` (black hair, school uniform) and
``characters/chaneko`` (brown hair, plugsuit), one 512x512 RGBA PNG per angle code on a
transparent background. The figures are simple flat-colour mannequins, but they really turn:
the head is a shaded sphere whose face, hair and ears follow the horizontal angle (h) and the
camera pitch (v), and the torso is an elliptic cylinder whose front/back details (collar,
ribbon, navel, spine, tail) appear and disappear with the angle. Output is deterministic.

    python scripts/draw_examples.py            # writes characters/*/face/*.png, outfits/*/*.png
"""

from __future__ import annotations

import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
SIZE = 512

Color = tuple[int, int, int]


NAVY, NAVY_SHADE = (35, 45, 100), (22, 28, 66)
WHITE, WHITE_SHADE = (246, 246, 250), (205, 205, 218)
RED, RED_SHADE = (205, 35, 45), (150, 22, 32)
BLACK, BLACK_SHADE = (34, 34, 40), (18, 18, 22)
ORANGE = (240, 150, 40)


@dataclass(frozen=True)
class Clothes:
    """An outfit's colours. School uniform: ``main`` the collar/skirt, ``light`` the blouse,
    ``accent`` the ribbon. Plugsuit: ``light`` the suit, ``accent`` the panels, ``main`` the
    seams and rings, ``belt`` the buckle."""

    main: Color = NAVY
    main_shade: Color = NAVY_SHADE
    light: Color = WHITE
    accent: Color = RED
    accent_shade: Color = RED_SHADE
    dark: Color = BLACK
    belt: Color = ORANGE


@dataclass(frozen=True)
class Look:
    hair: Color
    hair_shade: Color
    eyes: Color
    skin: Color = (250, 222, 200)
    skin_shade: Color = (222, 186, 165)
    line: Color = (150, 100, 90)
    ears: str = "cat"  # "cat" | "fox" | "none"
    hair_style: str = "short"  # "short" | "long"
    school: Clothes = Clothes()
    plugsuit: Clothes = Clothes()


KURONEKO = Look(hair=(28, 28, 38), hair_shade=(12, 12, 18), eyes=(235, 185, 40))
CHANEKO = Look(hair=(150, 92, 48), hair_shade=(112, 66, 32), eyes=(70, 165, 85))


def yaw_of(h: int) -> float:
    """Horizontal angle in radians: 45-degree steps; 5..7 mirror 3..1."""
    return math.radians(h * 45 if h <= 4 else (h - 8) * 45)


PITCH = {0: 0.0, 1: math.radians(32), 2: math.radians(-28)}  # from above / from below
TAPER = {0: 0.0, 1: 0.38, 2: -0.32}  # perspective: nearer parts larger


class Figure:
    """Maps body coordinates (unit = head radius, y down, 0 = head centre) to the canvas."""

    def __init__(self, kind: str, v: int, h: int, look: Look, outfit: str, size: int = SIZE):
        self.size = size
        self.kind, self.v, self.h, self.look, self.outfit = kind, v, h, look, outfit
        self.theta = yaw_of(h)
        self.phi = PITCH[v]
        self.k = TAPER[v]
        self.length = 7.0 if kind == "b" else 3.2
        top, bottom = -1.5, (7.0 if kind == "b" else 2.95)
        span = self._raw_y(bottom) - self._raw_y(top)
        margin = 14 if kind == "b" else 0
        margin = margin * size / SIZE
        self.scale = (size - 2 * margin) / span
        if kind == "f":
            self.scale = min(self.scale, 118 * size / SIZE)
        self.y0 = margin - self._raw_y(top) * self.scale
        self.cx = size / 2
        self.img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        self.px = self.img.load()
        self.draw = ImageDraw.Draw(self.img)

    # --- projection -------------------------------------------------------------------------

    def _raw_y(self, y: float) -> float:
        return y - self.k * y * y / (2 * self.length)

    def s(self, y: float) -> float:
        """Width scale at body height y (perspective taper)."""
        return 1 - self.k * y / self.length

    def Y(self, y: float) -> float:
        return self.y0 + self.scale * self._raw_y(y)

    def X(self, x: float, y: float) -> float:
        return self.cx + self.scale * x * self.s(y)

    def turn(self, x: float, z: float) -> tuple[float, float]:
        """Body (x, z) to screen x and depth (toward the camera) after the yaw."""
        c, s = math.cos(self.theta), math.sin(self.theta)
        return x * c + z * s, -x * s + z * c

    # --- parts ------------------------------------------------------------------------------

    def capsule(self, x: float, z: float, y1: float, y2: float, r: float, fill: Color, outline: Color | None = None):
        sx, _ = self.turn(x, z)
        ax, ay, bx, by = self.X(sx, y1), self.Y(y1), self.X(sx, y2), self.Y(y2)
        ra, rb = r * self.scale * self.s(y1), r * self.scale * self.s(y2)
        self.draw.polygon([(ax - ra, ay), (ax + ra, ay), (bx + rb, by), (bx - rb, by)], fill=fill)
        self.draw.ellipse((ax - ra, ay - ra, ax + ra, ay + ra), fill=fill)
        self.draw.ellipse((bx - rb, by - rb, bx + rb, by + rb), fill=fill)

    def limbs(self, side: str):
        """Arms and legs; side 'back' draws those behind the torso, 'front' those before it."""
        look, outfit = self.look, self.outfit
        cl = look.plugsuit if outfit == "plugsuit" else look.school
        for sign in (-1, 1):
            # arms hang at the shoulders' sides
            _, depth = self.turn(sign * 1.12, 0.0)
            if (depth < 0) == (side == "back"):
                sleeve = {"nude": look.skin, "school": cl.light, "plugsuit": cl.light}[outfit]
                hand = {"nude": look.skin, "school": look.skin, "plugsuit": cl.accent}[outfit]
                shade = depth < 0
                self.capsule(sign * 1.12, 0.0, 1.3, 2.55, 0.24, _shade(sleeve, shade))
                if outfit == "plugsuit":
                    self.capsule(sign * 1.12, 0.0, 2.2, 2.5, 0.25, _shade(cl.dark, shade))
                self.capsule(sign * 1.12, 0.0, 2.6, 3.05, 0.2, _shade(hand, shade))
            if self.kind == "f":
                continue
            _, depth = self.turn(sign * 0.42, 0.0)
            if (depth < 0) == (side == "back"):
                shade = depth < 0
                leg = {"school": look.skin, "plugsuit": cl.light, "nude": look.skin}[outfit]
                sock = {"school": BLACK, "plugsuit": cl.accent, "nude": look.skin}[outfit]
                self.capsule(sign * 0.42, 0.0, 3.3, 6.55, 0.3, _shade(leg, shade))
                self.capsule(sign * 0.42, 0.0, 5.0, 6.55, 0.31, _shade(sock, shade))
                # foot points where the body faces
                fx, _ = self.turn(sign * 0.42, 0.3)
                fy = 6.75
                w, hgt = (0.28 + 0.2 * abs(math.sin(self.theta))) * self.scale * self.s(fy), 0.2 * self.scale * self.s(fy)
                cx, cy = self.X(fx, fy), self.Y(fy)
                shoe = (90, 50, 30) if outfit == "school" else cl.accent_shade
                self.draw.ellipse((cx - w, cy - hgt, cx + w, cy + hgt), fill=_shade(shoe, shade))

    def tail(self, side: str):
        if self.kind != "b" or self.look.ears == "none":
            return
        sx, depth = self.turn(0.0, -0.7)
        if (depth < 0) != (side == "back"):
            return
        pts = []
        for i in range(13):
            t = i / 12
            y = 3.05 + 0.9 * math.sin(t * math.pi * 0.9) - 1.9 * t * t
            x = sx + (0.9 * t + 0.35 * math.sin(t * 5)) * (1 if self.theta >= 0 else -1)
            pts.append((self.X(x, y), self.Y(y)))
        width = (0.45 if self.look.ears == "fox" else 0.2) * self.scale
        self.draw.line(pts, fill=self.look.hair, width=max(2, int(width)), joint="curve")

    def torso(self):
        """Per-pixel elliptic cylinder: colours by angle around the body and height."""
        profile = [(0.85, 0.36), (1.12, 1.0), (1.6, 0.95), (2.35, 0.74), (3.05, 0.92), (3.4, 0.88)]
        if self.outfit == "school":
            profile += [(3.42, 1.02), (4.25, 1.42)]
        y_end = profile[-1][0] if self.kind == "b" else 3.0
        depth_ratio = 0.58
        # lookup: normalised screen offset -> (angle around the body, facing amount)
        bins = 240
        best: list[tuple[float, float] | None] = [None] * (bins + 1)
        c, s = math.cos(self.theta), math.sin(self.theta)
        half = math.hypot(c, depth_ratio * s)
        for i in range(1440):
            a = -math.pi + 2 * math.pi * i / 1440
            xb, zb = math.sin(a), depth_ratio * math.cos(a)
            sx, sz = xb * c + zb * s, -xb * s + zb * c
            b = round((sx / half + 1) / 2 * bins)
            if 0 <= b <= bins and (best[b] is None or sz > best[b][1]):
                best[b] = (a, sz)
        for b in range(bins + 1):  # fill gaps
            if best[b] is None:
                best[b] = best[b - 1] if b else best[1]
        top, bottom = int(self.Y(profile[0][0])), min(self.size - 1, int(self.Y(y_end)))
        for py in range(max(0, top), bottom + 1):
            y = self._inverse_y(py)
            w = _interp(profile, y) * half * self.scale * self.s(y)
            if w <= 0:
                continue
            for px in range(max(0, int(self.cx - w)), min(self.size, int(self.cx + w) + 1)):
                u = (px - self.cx) / w
                if abs(u) > 1:
                    continue
                a, sz = best[round((u + 1) / 2 * bins)]
                col = self.torso_color(a, y)
                if col is None:
                    continue
                self.px[px, py] = _shade(col, sz < 0.22 * depth_ratio) + (255,)

    def _inverse_y(self, py: float) -> float:
        raw = (py - self.y0) / self.scale
        if self.k == 0:
            return raw
        a = -self.k / (2 * self.length)  # a y^2 + y - raw = 0
        return (-1 + math.sqrt(max(0.0, 1 + 4 * a * raw))) / (2 * a)

    def torso_color(self, a: float, y: float) -> Color | None:
        look, aa = self.look, abs(a)
        back = aa > math.pi / 2
        if self.outfit == "nude":
            if y < 1.0:
                return look.skin
            if not back and 1.12 < y < 1.2 and 0.2 < aa < 0.95:  # collarbones
                return look.line
            if aa < 0.07 and 2.3 < y < 2.42:  # navel
                return look.line
            if aa > math.pi - 0.03 and 1.3 < y < 2.6:  # spine
                return look.skin_shade
            if 2.2 < aa < 2.55 and 1.45 < y < 1.85 and abs(aa - 2.2 - (y - 1.45) * 0.8) < 0.05:  # shoulder blades
                return look.line
            if y > 3.0:
                return None
            return look.skin
        cl = look.school
        if self.outfit == "school":
            if y < 0.98:
                return look.skin
            if y > 3.42:  # pleated skirt
                return cl.main_shade if (a * 6 / math.pi) % 1 < 0.12 else cl.main
            if back:
                if y < 2.0 and aa > 1.75:  # square sailor flap with a white stripe
                    edge = y > 1.88 or aa < 1.87
                    return cl.light if edge else cl.main
                return cl.main if y < 1.2 else cl.light
            # front: V of the sailor collar down to a red ribbon
            depth_v = 1.95 - y
            if 1.72 < y < 2.05 and aa < 0.28 - abs(y - 1.88) * 0.9:
                return cl.accent
            if depth_v > 0 and aa < depth_v * 0.38:
                return look.skin if y < 1.45 else cl.light
            if y < 1.2 or (depth_v > -0.05 and aa < depth_v * 0.38 + 0.42):
                return cl.main
            if 3.25 < y:
                return cl.main
            return cl.light
        # plugsuit
        cl = look.plugsuit
        if y < 0.98:
            return look.skin
        if 0.98 <= y < 1.15:
            return cl.dark  # neck ring
        if abs(aa - math.pi / 2) < 0.07:
            return cl.dark  # side seams
        if 2.3 < y < 2.5:
            return cl.belt if not back else cl.dark  # belt, buckle at the front
        if not back and aa < 0.75 and 1.35 < y < 2.1:
            return cl.accent  # chest panel
        if back and aa > math.pi - 0.12 and y > 1.15:
            return cl.dark  # spine line
        if back and 1.3 < y < 1.75 and aa > 2.0:
            return cl.accent  # back plate
        return cl.light

    def neck(self):
        self.capsule(0.0, 0.0, 0.55, 1.05, 0.3, self.look.skin_shade)

    def back_hair(self):
        r = self.scale * self.s(0)
        cx, cy = self.cx, self.Y(0.18)
        if self.look.hair_style == "long":  # a mane down to the waist behind the body
            w, bottom = 1.25 * self.scale * self.s(1.5), self.Y(3.3)
            self.draw.rounded_rectangle((cx - w, cy, cx + w, bottom), radius=int(0.4 * self.scale), fill=self.look.hair_shade)
        self.draw.ellipse((cx - 1.18 * r, cy - 1.12 * r, cx + 1.18 * r, cy + 1.05 * r), fill=self.look.hair_shade)

    def ears(self, front: bool):
        if self.look.ears == "none":
            return
        fox = self.look.ears == "fox"  # taller, wider, with a white inside
        for sign in (-1, 1):
            if fox:
                pts3 = [(sign * 0.9, -0.45, 0.05), (sign * 0.15, -0.9, 0.05), (sign * 0.85, -1.75, 0.0)]
                inner3 = [(sign * 0.76, -0.65, 0.08), (sign * 0.36, -0.9, 0.08), (sign * 0.8, -1.5, 0.06)]
            else:
                pts3 = [(sign * 0.78, -0.5, 0.05), (sign * 0.2, -0.95, 0.05), (sign * 0.78, -1.45, 0.0)]
                inner3 = [(sign * 0.68, -0.68, 0.08), (sign * 0.36, -0.93, 0.08), (sign * 0.7, -1.25, 0.06)]
            pts = [self.head_to_screen(*p) for p in pts3]
            depth = sum(p[2] for p in pts) / 3
            if (depth >= 0) != front:
                continue
            self.draw.polygon([p[:2] for p in pts], fill=self.look.hair)
            # the ear's opening faces forward (+z): visible when the face side is toward us
            nx, ny, nz = self.head_dir(0.0, 0.0, 1.0)
            if nz > 0.1:
                inside = (250, 250, 250) if fox else (240, 160, 170)
                self.draw.polygon([self.head_to_screen(*p)[:2] for p in inner3], fill=inside)

    def head_dir(self, x: float, y: float, z: float) -> tuple[float, float, float]:
        """Head coordinates (x right, y down, z face-forward) to view (x, y, toward camera)."""
        sx, zv = self.turn(x, z)
        cp, sp = math.cos(self.phi), math.sin(self.phi)
        return sx, y * cp + zv * sp, -y * sp + zv * cp

    def head_to_screen(self, x: float, y: float, z: float) -> tuple[float, float, float]:
        sx, sy, sz = self.head_dir(x, y, z)
        r = self.scale * self.s(0)
        return self.cx + sx * r, self.Y(0) + sy * r, sz

    def head(self):
        """Per-pixel sphere: undo pitch and yaw per pixel, colour by head coordinates."""
        look = self.look
        r = self.scale * self.s(0)
        cx, cy = self.cx, self.Y(0)
        cp, sp = math.cos(self.phi), math.sin(self.phi)
        c, s = math.cos(self.theta), math.sin(self.theta)
        for py in range(max(0, int(cy - r)), min(self.size, int(cy + r) + 1)):
            for px in range(max(0, int(cx - r)), min(self.size, int(cx + r) + 1)):
                sx, sy = (px - cx) / r, (py - cy) / r
                d = sx * sx + sy * sy
                if d > 1:
                    continue
                sz = math.sqrt(1 - d)
                yh, zv = sy * cp - sz * sp, sy * sp + sz * cp
                xh, zh = sx * c - zv * s, sx * s + zv * c
                col = self.head_color(xh, yh, zh, look)
                self.px[px, py] = _shade(col, sz < 0.25) + (255,)

    @staticmethod
    def head_color(x: float, y: float, z: float, look: Look) -> Color:
        bangs = -0.28 + 0.09 * abs(math.sin(x * 9))
        side_lock = abs(x) > 0.74 and y < 0.45  # locks framing the face
        face = z > 0.3 and y > bangs and not side_lock
        if not face:
            if y > 0.6 and z > 0.05:
                return look.skin  # jaw and chin
            return look.hair if (x + y) % 0.5 > 0.06 else look.hair_shade  # hair strands
        for ex in (-0.36, 0.36):
            dx, dy = x - ex, y - 0.12
            if (dx / 0.14) ** 2 + (dy / 0.19) ** 2 < 1:
                if (dx + 0.04) ** 2 + (dy + 0.07) ** 2 < 0.003:
                    return (255, 255, 255)
                return look.eyes if dy > -0.08 else (30, 20, 20)
            if (dx * 0.7 + 0.02) ** 2 + (dy + 0.25) ** 2 < 0.006 and dy < -0.21:
                return (60, 40, 40)  # eyelash line
        for ex in (-0.5, 0.5):
            if (x - ex) ** 2 / 0.012 + (y - 0.36) ** 2 / 0.003 < 1:
                return (245, 170, 170)  # blush
        if 0.42 < y < 0.56 and abs(x) < 0.16 - (y - 0.42) * 0.7:
            return (170, 50, 60)  # open smiling mouth
        return look.skin

    def render(self) -> Image.Image:
        self.tail("back")
        self.limbs("back")
        self.back_hair()
        self.ears(front=False)
        self.neck()
        self.torso()
        self.limbs("front")
        self.tail("front")
        self.head()
        self.ears(front=True)
        return self.img


def _shade(col: Color, dark: bool) -> Color:
    return tuple(int(ch * 0.78) for ch in col) if dark else col


def _interp(profile: list[tuple[float, float]], y: float) -> float:
    if y < profile[0][0] or y > profile[-1][0]:
        return 0.0
    for (y1, w1), (y2, w2) in zip(profile, profile[1:]):
        if y1 <= y <= y2:
            return w1 + (w2 - w1) * (y - y1) / (y2 - y1) if y2 > y1 else w2
    return profile[-1][1]


def draw_image(code: str, look: Look, outfit: str, size: int = SIZE) -> Image.Image:
    """One figure as an RGBA picture of ``size`` px (flat colours, transparent background)."""
    kind, v, h = code[0], int(code[1]), int(code[2])
    img = Figure(kind, v, h, look, outfit, size).render()
    if h > 4:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def draw(code: str, look: Look, outfit: str) -> bytes:
    """One example image as PNG bytes (flat colours, transparent background, no metadata)."""
    img = draw_image(code, look, outfit)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


FACE_12 = ("f00", "f01", "f02", "f03", "f10", "f11", "f12", "f13", "f20", "f21", "f22", "f23")
BODY_12 = ("b00", "b01", "b02", "b03", "b10", "b11", "b12", "b13", "b20", "b21", "b22", "b23")
FACE_15 = tuple(f"f{v}{h}" for v in range(3) for h in range(5))

PLAN = [
    ("kuroneko", KURONEKO, "face", "nude", FACE_15),
    ("kuroneko", KURONEKO, "outfits/school", "school", BODY_12),
    ("chaneko", CHANEKO, "face", "nude", FACE_12),
    ("chaneko", CHANEKO, "outfits/plugsuit", "plugsuit", BODY_12),
]


def main(root: Path = ROOT) -> int:
    total = 0
    for character, look, part, outfit, codes in PLAN:
        folder = root / "characters" / character / part
        folder.mkdir(parents=True, exist_ok=True)
        for code in codes:
            data = draw(code, look, outfit)
            (folder / f"{code}.png").write_bytes(data)
            total += len(data)
        print(f"{folder.relative_to(root)}: {len(codes)} images")
    print(f"total {total / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT))
