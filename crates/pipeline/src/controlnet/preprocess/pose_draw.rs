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

use super::line::line_pixels;

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

/// `cv2.fillConvexPoly(canvas, points, color)` (line type 8, shift 0).
pub fn fill_convex_poly(canvas: &mut Canvas, v: &[(i64, i64)], color: [u8; 3]) {
    const SHIFT: i64 = 16;
    const HALF: i64 = 1 << (SHIFT - 1);
    let n = v.len();
    if n == 0 {
        return;
    }
    let (w, h) = (canvas.width, canvas.height);
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
        line_pixels(w, h, p0, p, |x, y| canvas.put(x, y, color));
        p0 = p;
    }
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
            x: -(1 << SHIFT),
            dx: 0,
            ye: ymin,
        },
        Edge {
            idx: imin,
            di: n - 1,
            x: -(1 << SHIFT),
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
                let ty = v[idx].1;
                if ty > y {
                    let (xs, xe) = (v[idx0].0 << SHIFT, v[idx].0 << SHIFT);
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
            let x1 = (edges[l].x + HALF) >> SHIFT;
            let x2 = (edges[r].x + HALF) >> SHIFT;
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
