//! OpenCV's `cv2.line(img, pt1, pt2, color, thickness=1)` with its default 8-connected line
//! type and no fractional bits, on a one-channel u8 map (M-LSD draws its segments with it):
//! the segment clipped to the map as `clipLine` clips it (integer steps, each cut point's
//! offset truncated from a double), then the pixels `LineIterator` visits (8-connected,
//! drawn left to right, its error term deciding each minor step).

/// `clipLine(Size(w, h), pt1, pt2)`: the part of the segment inside `[0, w) x [0, h)`, or
/// `None` where none is (as OpenCV's, it may keep a segment whose clipped end is still off).
pub(super) fn clip_line(
    w: i64,
    h: i64,
    p1: (i64, i64),
    p2: (i64, i64),
) -> Option<((i64, i64), (i64, i64))> {
    if w <= 0 || h <= 0 {
        return None;
    }
    let (right, bottom) = (w - 1, h - 1);
    let ((mut x1, mut y1), (mut x2, mut y2)) = (p1, p2);
    let code = |x: i64, y: i64| {
        i32::from(x < 0)
            + i32::from(x > right) * 2
            + i32::from(y < 0) * 4
            + i32::from(y > bottom) * 8
    };
    let (mut c1, mut c2) = (code(x1, y1), code(x2, y2));
    // The offset along the segment to a cut, truncated as OpenCV's `(int64)(double ...)`.
    let cut = |d: i64, num: i64, den: i64| (d as f64 * num as f64 / den as f64) as i64;
    if c1 & c2 == 0 && c1 | c2 != 0 {
        // Off the top or bottom: moved onto that edge first.
        if c1 & 12 != 0 {
            let a = if c1 < 8 { 0 } else { bottom };
            x1 += cut(a - y1, x2 - x1, y2 - y1);
            y1 = a;
            c1 = i32::from(x1 < 0) + i32::from(x1 > right) * 2;
        }
        if c2 & 12 != 0 {
            let a = if c2 < 8 { 0 } else { bottom };
            x2 += cut(a - y2, x2 - x1, y2 - y1);
            y2 = a;
            c2 = i32::from(x2 < 0) + i32::from(x2 > right) * 2;
        }
        if c1 & c2 == 0 && c1 | c2 != 0 {
            if c1 != 0 {
                let a = if c1 == 1 { 0 } else { right };
                y1 += cut(a - x1, y2 - y1, x2 - x1);
                x1 = a;
                c1 = 0;
            }
            if c2 != 0 {
                let a = if c2 == 1 { 0 } else { right };
                y2 += cut(a - x2, y2 - y1, x2 - x1);
                x2 = a;
                c2 = 0;
            }
        }
    }
    (c1 | c2 == 0).then_some(((x1, y1), (x2, y2)))
}

/// `cv2.line(map, p1, p2, value, 1)` on a `w` x `h` one-channel map (row-major).
pub fn draw_line(map: &mut [u8], w: usize, h: usize, p1: (i64, i64), p2: (i64, i64), value: u8) {
    line_pixels(w, h, p1, p2, |x, y| map[y * w + x] = value);
}

/// The pixels `cv2.line(img, p1, p2, color, 1)` (OpenCV's `Line`, 8-connected) sets on a
/// `w` x `h` image, in its order (`fillConvexPoly` outlines its polygon with the same).
pub fn line_pixels(
    w: usize,
    h: usize,
    p1: (i64, i64),
    p2: (i64, i64),
    mut put: impl FnMut(usize, usize),
) {
    let (wi, hi) = (w as i64, h as i64);
    let inside = |(x, y): (i64, i64)| (0..wi).contains(&x) && (0..hi).contains(&y);
    let (mut p1, mut p2) = (p1, p2);
    if !inside(p1) || !inside(p2) {
        match clip_line(wi, hi, p1, p2) {
            Some((a, b)) => (p1, p2) = (a, b),
            None => return,
        }
    }
    // `LineIterator(img, pt1, pt2, 8, leftToRight=true)`.
    if p2.0 < p1.0 {
        std::mem::swap(&mut p1, &mut p2);
    }
    let (dx, dy) = (p2.0 - p1.0, p2.1 - p1.1);
    let step_y = if dy < 0 { -1 } else { 1 };
    let dy = dy.abs();
    // The major axis is the longer one (x on a tie); the minor steps when the error is < 0.
    let vertical = dy > dx;
    let (major, minor) = if vertical { (dy, dx) } else { (dx, dy) };
    let mut err = major - 2 * minor;
    let (mut x, mut y) = p1;
    for _ in 0..=major {
        put(x as usize, y as usize);
        let minor_step = err < 0;
        err += -2 * minor + if minor_step { 2 * major } else { 0 };
        if vertical {
            y += step_y;
            x += i64::from(minor_step);
        } else {
            x += 1;
            if minor_step {
                y += step_y;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drawn(w: usize, h: usize, p1: (i64, i64), p2: (i64, i64)) -> Vec<(usize, usize)> {
        let mut map = vec![0u8; w * h];
        draw_line(&mut map, w, h, p1, p2, 255);
        (0..w * h)
            .filter(|&i| map[i] == 255)
            .map(|i| (i % w, i / w))
            .collect()
    }

    #[test]
    fn a_point_a_diagonal_and_a_segment_off_the_map() {
        assert_eq!(drawn(4, 4, (2, 1), (2, 1)), [(2, 1)]);
        assert_eq!(drawn(3, 3, (2, 2), (0, 0)), [(0, 0), (1, 1), (2, 2)]);
        assert!(drawn(4, 4, (-3, -1), (-1, 9)).is_empty());
        // Clipped to the map's width: the row's 4 pixels.
        assert_eq!(drawn(4, 2, (-5, 1), (9, 1)).len(), 4);
    }
}
