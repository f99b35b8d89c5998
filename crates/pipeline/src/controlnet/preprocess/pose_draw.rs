//! The OpenPose drawing of the extension's `annotator/openpose/util.py` (`draw_bodypose`) and
//! the OpenCV rasterisers it calls, written after OpenCV's documented algorithms
//! (`imgproc/src/drawing.cpp`) so the maps match `cv2`'s bit for bit:
//! - [`ellipse2poly`]: `cv2.ellipse2Poly` with integer arguments: the points of the rotated
//!   ellipse at each `delta` degrees from OpenCV's 7-digit sine table (f32), rounded half to
//!   even, repeats dropped.
//! - [`fill_convex_poly`]: `cv2.fillConvexPoly` (8-connected, no fractional bits): the outline
//!   drawn with `cv2.line`'s pixels, then the scanlines between two edges walked in 16.16
//!   fixed point from the topmost vertex.
//! - [`fill_circle`]: `cv2.circle(thickness=-1)` (OpenCV's `Circle`): the midpoint circle's
//!   spans.

use super::line::{clip_line, line_pixels};

/// An RGB canvas being drawn on (row-major, 3 bytes a pixel).
pub struct Canvas<'a> {
    pub pixels: &'a mut [u8],
    pub width: usize,
    pub height: usize,
}

impl Canvas<'_> {
    fn put(&mut self, x: usize, y: usize, color: [u8; 3]) {
        let i = (y * self.width + x) * 3;
        self.pixels[i..i + 3].copy_from_slice(&color);
    }

    /// A span `[x1, x2]` of row `y`, clipped to the canvas.
    fn hline(&mut self, y: i64, x1: i64, x2: i64, color: [u8; 3]) {
        if !(0..self.height as i64).contains(&y) {
            return;
        }
        let (x1, x2) = (x1.max(0), x2.min(self.width as i64 - 1));
        for x in x1..=x2 {
            self.put(x as usize, y as usize, color);
        }
    }
}

/// OpenCV's sine table entry for a whole degree (`SinTable`, degrees 0..=450): the sine to 7
/// decimals, as an f32.
fn table_sin(deg: i64) -> f32 {
    let s = (deg as f64).to_radians().sin();
    ((s * 1e7).round() / 1e7) as f32
}

/// `cv2.ellipse2Poly(center, axes, angle, arc_start, arc_end, delta)` with integer arguments.
pub fn ellipse2poly(
    center: (i64, i64),
    axes: (i64, i64),
    angle: i64,
    arc_start: i64,
    arc_end: i64,
    delta: i64,
) -> Vec<(i64, i64)> {
    let angle = angle.rem_euclid(360);
    let (mut start, mut end) = (arc_start.min(arc_end), arc_start.max(arc_end));
    while start < 0 {
        start += 360;
        end += 360;
    }
    while end > 360 {
        start -= 360;
        end -= 360;
    }
    if end - start > 360 {
        (start, end) = (0, 360);
    }
    let (alpha, beta) = (
        f64::from(table_sin(450 - angle)),
        f64::from(table_sin(angle)),
    );
    let mut points: Vec<(i64, i64)> = Vec::new();
    let mut i = start;
    while i < end + delta {
        let mut a = i.min(end);
        if a < 0 {
            a += 360;
        }
        let x = axes.0 as f64 * f64::from(table_sin(450 - a));
        let y = axes.1 as f64 * f64::from(table_sin(a));
        let px = center.0 as f64 + x * alpha - y * beta;
        let py = center.1 as f64 + x * beta + y * alpha;
        let p = (px.round_ties_even() as i64, py.round_ties_even() as i64);
        if points.last() != Some(&p) {
            points.push(p);
        }
        i += delta;
    }
    if points.len() == 1 {
        // A zero-size polygon: the centre twice.
        points = vec![center, center];
    }
    points
}

/// OpenCV's fixed-point coordinates: 16 fraction bits.
const XY_SHIFT: i64 = 16;
const XY_ONE: i64 = 1 << XY_SHIFT;
const HALF: i64 = XY_ONE >> 1;

/// `cv2.fillConvexPoly(canvas, points, color)` (line type 8, shift 0).
pub fn fill_convex_poly(canvas: &mut Canvas, v: &[(i64, i64)], color: [u8; 3]) {
    fill_convex_poly_shifted(canvas, v, color, 0);
}

/// OpenCV's `FillConvexPoly` (line type 8) of points with `shift` fraction bits: the outline
/// (`cv2.line`'s pixels without fractions, `Line2`'s with), then the scanlines between two
/// edges walked in 16.16 fixed point from the topmost vertex, each end rounded.
fn fill_convex_poly_shifted(canvas: &mut Canvas, v: &[(i64, i64)], color: [u8; 3], shift: i64) {
    let n = v.len();
    if n == 0 {
        return;
    }
    let delta = (1i64 << shift) >> 1;
    let (w, h) = (canvas.width, canvas.height);
    let up = |p: (i64, i64)| (p.0 << (XY_SHIFT - shift), p.1 << (XY_SHIFT - shift));
    // The outline first, each edge from the previous vertex.
    let mut p0 = v[n - 1];
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (v[0].0, v[0].0, v[0].1, v[0].1);
    let mut imin = 0;
    for (i, &p) in v.iter().enumerate() {
        if p.1 < ymin {
            ymin = p.1;
            imin = i;
        }
        ymax = ymax.max(p.1);
        xmax = xmax.max(p.0);
        xmin = xmin.min(p.0);
        if shift == 0 {
            line_pixels(w, h, p0, p, |x, y| canvas.put(x, y, color));
        } else {
            line2(canvas, up(p0), up(p), color);
        }
        p0 = p;
    }
    let round = |c: i64| (c + delta) >> shift;
    let (xmin, xmax, ymin, ymax) = (round(xmin), round(xmax), round(ymin), round(ymax));
    if n < 3 || xmax < 0 || ymax < 0 || xmin >= w as i64 || ymin >= h as i64 {
        return;
    }
    let ymax = ymax.min(h as i64 - 1);
    // Two edges walk down from the top vertex, one each way round.
    struct Edge {
        idx: usize,
        di: usize,
        x: i64,
        dx: i64,
        ye: i64,
    }
    let mut edges = [
        Edge {
            idx: imin,
            di: 1,
            x: -XY_ONE,
            dx: 0,
            ye: ymin,
        },
        Edge {
            idx: imin,
            di: n - 1,
            x: -XY_ONE,
            dx: 0,
            ye: ymin,
        },
    ];
    let mut left_edges = n as i64;
    let mut y = ymin;
    loop {
        for e in edges.iter_mut() {
            if y < e.ye {
                continue;
            }
            let mut idx0 = e.idx;
            let mut idx = (idx0 + e.di) % n;
            loop {
                left_edges -= 1;
                if left_edges < 0 {
                    break;
                }
                let ty = round(v[idx].1);
                if ty > y {
                    let (xs, xe) = (up(v[idx0]).0, up(v[idx]).0);
                    e.ye = ty;
                    // C's division: truncated toward zero.
                    e.dx = ((xe - xs) * 2 + (ty - y)) / (2 * (ty - y));
                    e.x = xs;
                    e.idx = idx;
                    break;
                }
                idx0 = idx;
                idx = (idx + e.di) % n;
            }
        }
        if left_edges < 0 {
            break;
        }
        if y >= 0 {
            let (l, r) = if edges[0].x > edges[1].x {
                (1, 0)
            } else {
                (0, 1)
            };
            let x1 = (edges[l].x + HALF) >> XY_SHIFT;
            let x2 = (edges[r].x + HALF) >> XY_SHIFT;
            if x2 >= 0 && x1 < w as i64 {
                canvas.hline(y, x1, x2, color);
            }
        }
        edges[0].x += edges[0].dx;
        edges[1].x += edges[1].dx;
        y += 1;
        if y > ymax {
            break;
        }
    }
}

/// OpenCV's `Line2`: the segment between 16.16 points, clipped to the canvas, stepped one
/// pixel along its longer axis from its left (or top) end, the other coordinate in fixed
/// point; the far end's pixel first.
fn line2(canvas: &mut Canvas, p1: (i64, i64), p2: (i64, i64), color: [u8; 3]) {
    let (w, h) = (canvas.width as i64, canvas.height as i64);
    let Some((mut p1, mut p2)) = clip_line(w << XY_SHIFT, h << XY_SHIFT, p1, p2) else {
        return;
    };
    let mut put = |x: i64, y: i64| {
        if (0..w).contains(&x) && (0..h).contains(&y) {
            canvas.put(x as usize, y as usize, color);
        }
    };
    let (ax, ay) = ((p2.0 - p1.0).abs(), (p2.1 - p1.1).abs());
    let along_x = ax > ay;
    if (along_x && p2.0 < p1.0) || (!along_x && p2.1 < p1.1) {
        std::mem::swap(&mut p1, &mut p2);
    }
    put((p2.0 + HALF) >> XY_SHIFT, (p2.1 + HALF) >> XY_SHIFT);
    let (x, y) = (p1.0 + HALF, p1.1 + HALF);
    if along_x {
        let step = ((p2.1 - p1.1) << XY_SHIFT) / (ax | 1);
        let count = (p2.0 - p1.0) >> XY_SHIFT;
        let (x, mut y) = (x >> XY_SHIFT, y);
        for i in 0..=count {
            put(x + i, y >> XY_SHIFT);
            y += step;
        }
    } else {
        let step = ((p2.0 - p1.0) << XY_SHIFT) / (ay | 1);
        let count = (p2.1 - p1.1) >> XY_SHIFT;
        let (mut x, y) = (x, y >> XY_SHIFT);
        for i in 0..=count {
            put(x >> XY_SHIFT, y + i);
            x += step;
        }
    }
}

/// `cv2.line(canvas, p0, p1, color, thickness)` for `thickness > 1` (OpenCV's `ThickLine`,
/// line type 8): a quadrilateral `thickness / 2` either side of the segment (its corners
/// rounded to 16.16), filled, and a filled circle of radius `round(thickness / 2)` at
/// each end.
pub fn thick_line(
    canvas: &mut Canvas,
    p0: (i64, i64),
    p1: (i64, i64),
    thickness: i64,
    color: [u8; 3],
) {
    let (p0, p1) = (
        (p0.0 << XY_SHIFT, p0.1 << XY_SHIFT),
        (p1.0 << XY_SHIFT, p1.1 << XY_SHIFT),
    );
    let one = XY_ONE as f64;
    let (dx, dy) = ((p0.0 - p1.0) as f64 / one, (p1.1 - p0.1) as f64 / one);
    let r = dx * dx + dy * dy;
    let odd = thickness & 1;
    let half = thickness << (XY_SHIFT - 1);
    if r.abs() > f64::EPSILON {
        let r = (half as f64 + odd as f64 * one * 0.5) / r.sqrt();
        let dp = (
            (dy * r).round_ties_even() as i64,
            (dx * r).round_ties_even() as i64,
        );
        let corners = [
            (p0.0 + dp.0, p0.1 + dp.1),
            (p0.0 - dp.0, p0.1 - dp.1),
            (p1.0 - dp.0, p1.1 - dp.1),
            (p1.0 + dp.0, p1.1 + dp.1),
        ];
        fill_convex_poly_shifted(canvas, &corners, color, XY_SHIFT);
    }
    for p in [p0, p1] {
        let center = ((p.0 + HALF) >> XY_SHIFT, (p.1 + HALF) >> XY_SHIFT);
        fill_circle(canvas, center, (half + HALF) >> XY_SHIFT, color);
    }
}

/// `cv2.circle(canvas, center, radius, color, thickness=-1)` (line type 8, shift 0).
pub fn fill_circle(canvas: &mut Canvas, center: (i64, i64), radius: i64, color: [u8; 3]) {
    let (cx, cy) = center;
    let (mut err, mut dx, mut dy, mut plus, mut minus) = (0i64, radius, 0i64, 1i64, 2 * radius - 1);
    let (w, h) = (canvas.width as i64, canvas.height as i64);
    while dx >= dy {
        let (x11, x12, x21, x22) = (cx - dx, cx + dx, cx - dy, cx + dy);
        let (y11, y12, y21, y22) = (cy - dy, cy + dy, cy - dx, cy + dx);
        if x11 < w && x12 >= 0 && y21 < h && y22 >= 0 {
            canvas.hline(y11, x11, x12, color);
            canvas.hline(y12, x11, x12, color);
            if x21 < w && x22 >= 0 {
                canvas.hline(y21, x21, x22, color);
                canvas.hline(y22, x21, x22, color);
            }
        }
        dy += 1;
        err += plus;
        plus += 2;
        if err > 0 {
            err -= minus;
            dx -= 1;
            minus -= 2;
        }
    }
}

/// The body's limbs as `draw_bodypose` draws them (1-based keypoint numbers): the first 17 of
/// body.py's `limbSeq` (its last two, ear to shoulder, are scored but not drawn).
pub const LIMBS: &[(usize, usize)] = super::openpose_body::LIMB_SEQ.split_at(17).0;

/// `draw_bodypose`'s colours: limb k's (at 0.6) and keypoint k's.
pub const COLORS: [[u8; 3]; 18] = [
    [255, 0, 0],
    [255, 85, 0],
    [255, 170, 0],
    [255, 255, 0],
    [170, 255, 0],
    [85, 255, 0],
    [0, 255, 0],
    [0, 255, 85],
    [0, 255, 170],
    [0, 255, 255],
    [0, 170, 255],
    [0, 85, 255],
    [0, 0, 255],
    [85, 0, 255],
    [170, 0, 255],
    [255, 0, 255],
    [255, 0, 170],
    [255, 0, 85],
];

/// `draw_bodypose(canvas, keypoints)`: the keypoints normalized to the canvas (x / W, y / H),
/// each limb an ellipse of half-width 4 in its colour times 0.6, each keypoint a disc of
/// radius 4. (`is_normalized` holds for every detected body: its points lie in the image.)
pub fn draw_bodypose(canvas: &mut Canvas, keypoints: &[Option<(f64, f64)>]) {
    let (w, h) = (canvas.width as f64, canvas.height as f64);
    let normalized = keypoints
        .iter()
        .flatten()
        .all(|&(x, y)| x.abs() <= 1.0 && y.abs() <= 1.0)
        && keypoints.iter().any(Option::is_some);
    let (w, h) = if normalized { (w, h) } else { (1.0, 1.0) };
    const STICK: i64 = 4;
    for (&(a, b), color) in LIMBS.iter().zip(COLORS) {
        let (Some(k1), Some(k2)) = (keypoints[a - 1], keypoints[b - 1]) else {
            continue;
        };
        // The extension's names: Y holds the x coordinates, X the y ones.
        let (y0, y1) = (k1.0 * w, k2.0 * w);
        let (x0, x1) = (k1.1 * h, k2.1 * h);
        let (mx, my) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0);
        let length = ((x0 - x1).powi(2) + (y0 - y1).powi(2)).powf(0.5);
        let angle = (x0 - x1).atan2(y0 - y1).to_degrees();
        let polygon = ellipse2poly(
            (my as i64, mx as i64),
            ((length / 2.0) as i64, STICK),
            angle as i64,
            0,
            360,
            1,
        );
        let dim = color.map(|c| (f64::from(c) * 0.6) as u8);
        fill_convex_poly(canvas, &polygon, dim);
    }
    for (k, color) in keypoints.iter().zip(COLORS) {
        let Some((x, y)) = *k else { continue };
        fill_circle(canvas, ((x * w) as i64, (y * h) as i64), 4, color);
    }
}

/// `draw_handpose`'s 20 edges (keypoint indices): the wrist to each finger's four joints.
pub const HAND_EDGES: [(usize, usize); 20] = [
    (0, 1),
    (1, 2),
    (2, 3),
    (3, 4),
    (0, 5),
    (5, 6),
    (6, 7),
    (7, 8),
    (0, 9),
    (9, 10),
    (10, 11),
    (11, 12),
    (0, 13),
    (13, 14),
    (14, 15),
    (15, 16),
    (0, 17),
    (17, 18),
    (18, 19),
    (19, 20),
];

/// `matplotlib.colors.hsv_to_rgb([hue, 1, 1]) * 255` as `cv2.line` takes it (each channel
/// rounded half to even).
pub fn hue_color(hue: f64) -> [u8; 3] {
    let i = (hue * 6.0) as i64;
    let f = hue * 6.0 - i as f64;
    let (q, t) = (1.0 - f, 1.0 - (1.0 - f));
    let rgb = match i % 6 {
        0 => [1.0, t, 0.0],
        1 => [q, 1.0, 0.0],
        2 => [0.0, 1.0, t],
        3 => [0.0, q, 1.0],
        4 => [t, 0.0, 1.0],
        _ => [1.0, 0.0, q],
    };
    rgb.map(|c: f64| (c * 255.0).round_ties_even().clamp(0.0, 255.0) as u8)
}

/// util.py's `eps`: a hand or face point at pixel 0 (or the -1 of one not found) is skipped.
const EPS: f32 = 0.01;

/// The pixel of a normalized f32 keypoint as util.py computes it: `int(x * W)` in float32
/// (the keypoints are numpy float32), `W` 1 where the points are not normalized.
fn pixel(k: (f32, f32), w: f32, h: f32) -> (i64, i64) {
    ((k.0 * w) as i64, (k.1 * h) as i64)
}

/// `is_normalized` for f32 keypoints: every point within -1..=1, and at least one.
fn scale(canvas: &Canvas, keypoints: &[(f32, f32)]) -> (f32, f32) {
    let normalized = !keypoints.is_empty()
        && keypoints
            .iter()
            .all(|&(x, y)| x.abs() <= 1.0 && y.abs() <= 1.0);
    if normalized {
        (canvas.width as f32, canvas.height as f32)
    } else {
        (1.0, 1.0)
    }
}

/// `draw_handpose(canvas, keypoints)`: edge k a 2-pixel line in hue k / 20 where both its
/// ends lie past pixel 0, then each such keypoint a blue disc of radius 4.
pub fn draw_handpose(canvas: &mut Canvas, keypoints: &[(f32, f32)]) {
    let (w, h) = scale(canvas, keypoints);
    for (ie, &(a, b)) in HAND_EDGES.iter().enumerate() {
        let (p1, p2) = (pixel(keypoints[a], w, h), pixel(keypoints[b], w, h));
        let past = |p: (i64, i64)| p.0 as f32 > EPS && p.1 as f32 > EPS;
        if past(p1) && past(p2) {
            let color = hue_color(ie as f64 / HAND_EDGES.len() as f64);
            thick_line(canvas, p1, p2, 2, color);
        }
    }
    for &k in keypoints {
        let p = pixel(k, w, h);
        if p.0 as f32 > EPS && p.1 as f32 > EPS {
            fill_circle(canvas, p, 4, [0, 0, 255]);
        }
    }
}

/// `draw_facepose(canvas, keypoints)`: each keypoint past pixel 0 a white disc of radius 3.
pub fn draw_facepose(canvas: &mut Canvas, keypoints: &[(f32, f32)]) {
    let (w, h) = scale(canvas, keypoints);
    for &k in keypoints {
        let p = pixel(k, w, h);
        if p.0 as f32 > EPS && p.1 as f32 > EPS {
            fill_circle(canvas, p, 3, [255, 255, 255]);
        }
    }
}
