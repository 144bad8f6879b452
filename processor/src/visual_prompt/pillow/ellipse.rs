//! Pillow's ellipses (`ellipseNew`): a Bresenham-like walk over one quadrant of the
//! ellipse on a grid of step 2, the inner and outer quadrants of the ring combined into
//! horizontal segments, and the half-plane clipping tree that cuts pie slices out of it
//! (`pie_init`, `clip_tree_do_clip`).

use super::PillowCanvas;

/// One quadrant walk (`quarter_state`): points `(x, y)` of the top-right quarter of the
/// ellipse with semi-axes `a`, `b` on the grid `{(2i + a % 2, 2j + b % 2)}`.
struct Quarter {
    cx: i64,
    cy: i64,
    ex: i64,
    ey: i64,
    a2: i128,
    b2: i128,
    a2b2: i128,
    finished: bool,
}

impl Quarter {
    fn new(a: i64, b: i64) -> Self {
        if a < 0 || b < 0 {
            return Self {
                cx: 0,
                cy: 0,
                ex: 0,
                ey: 0,
                a2: 0,
                b2: 0,
                a2b2: 0,
                finished: true,
            };
        }
        let a2 = i128::from(a) * i128::from(a);
        let b2 = i128::from(b) * i128::from(b);
        Self {
            cx: a,
            cy: b % 2,
            ex: a % 2,
            ey: b,
            a2,
            b2,
            a2b2: a2 * b2,
            finished: false,
        }
    }

    fn delta(&self, x: i64, y: i64) -> i128 {
        let (x, y) = (i128::from(x), i128::from(y));
        (self.a2 * y * y + self.b2 * x * x - self.a2b2).abs()
    }

    fn next(&mut self) -> Option<(i64, i64)> {
        if self.finished {
            return None;
        }
        let ret = (self.cx, self.cy);
        if self.cx == self.ex && self.cy == self.ey {
            self.finished = true;
        } else {
            let mut nx = self.cx;
            let mut ny = self.cy + 2;
            let mut ndelta = self.delta(nx, ny);
            if nx > 1 {
                let d = self.delta(self.cx - 2, self.cy + 2);
                if ndelta > d {
                    nx = self.cx - 2;
                    ny = self.cy + 2;
                    ndelta = d;
                }
                let d = self.delta(self.cx - 2, self.cy);
                if ndelta > d {
                    nx = self.cx - 2;
                    ny = self.cy;
                }
            }
            self.cx = nx;
            self.cy = ny;
        }
        Some(ret)
    }
}

/// The ring between the outer ellipse and the one `w - 1` pixels inside, as horizontal
/// segments `(x0, y, x1)` on the doubled grid centred at the origin (`ellipse_state`).
struct Ring {
    outer: Quarter,
    inner: Quarter,
    py: i64,
    pl: i64,
    pr: i64,
    buf: Vec<(i64, i64, i64)>,
    finished: bool,
    leftmost: i64,
}

impl Ring {
    fn new(a: i64, b: i64, w: i64) -> Self {
        let leftmost = a % 2;
        let mut outer = Quarter::new(a, b);
        let first = if w < 1 { None } else { outer.next() };
        match first {
            Some((pr, py)) => Self {
                outer,
                inner: Quarter::new(a - 2 * (w - 1), b - 2 * (w - 1)),
                py,
                pl: leftmost,
                pr,
                buf: Vec::with_capacity(4),
                finished: false,
                leftmost,
            },
            None => Self {
                outer,
                inner: Quarter::new(-1, -1),
                py: 0,
                pl: 0,
                pr: 0,
                buf: Vec::new(),
                finished: true,
                leftmost,
            },
        }
    }

    fn next(&mut self) -> Option<(i64, i64, i64)> {
        if self.buf.is_empty() {
            if self.finished {
                return None;
            }
            let y = self.py;
            let mut l = self.pl;
            let r = self.pr;
            let mut found = None;
            while let Some((cx, cy)) = self.outer.next() {
                if cy > y {
                    found = Some((cx, cy));
                    break;
                }
            }
            match found {
                Some((cx, cy)) => {
                    self.pr = cx;
                    self.py = cy;
                }
                None => self.finished = true,
            }
            let mut next_l = None;
            while let Some((cx, cy)) = self.inner.next() {
                if cy > y {
                    next_l = Some(cx);
                    break;
                }
                l = cx;
            }
            self.pl = next_l.unwrap_or(self.leftmost);
            let lf = if l == 0 { 2 } else { l };
            if (l > 0 || l < r) && y > 0 {
                self.buf.push((lf, y, r));
            }
            if y > 0 {
                self.buf.push((-r, y, -l));
            }
            if l > 0 || l < r {
                self.buf.push((lf, -y, r));
            }
            self.buf.push((-r, -y, -l));
        }
        self.buf.pop()
    }
}

/// `ellipseNew`: the ring `w` pixels thick inside the box (filled when `w` = a + b).
pub(super) fn draw_ellipse(canvas: &mut PillowCanvas, bbox: [i64; 4], w: i64) {
    let [x0, y0, x1, y1] = bbox;
    let a = x1 - x0;
    let b = y1 - y0;
    if a < 0 || b < 0 {
        return;
    }
    let mut ring = Ring::new(a, b, w);
    while let Some((l, y, r)) = ring.next() {
        canvas.hline(x0 + (l + a) / 2, y0 + (y + b) / 2, x0 + (r + a) / 2);
    }
}

/// A node of the clipping tree (`clip_node`).
enum Clip {
    /// Keep `a·x + b·y + c >= 0` (up to Pillow's epsilon and rounding).
    HalfPlane(f64, f64, f64),
    /// Intersection.
    And(Box<Clip>, Box<Clip>),
    /// Union.
    Or(Box<Clip>, Box<Clip>),
}

/// `clip_tree_do_clip`: the parts of segment `x0..=x1` of row `y` inside the tree, as
/// events `(x, +1 start | -1 end)`.
fn clip(node: &Clip, x0: i64, y: i64, x1: i64) -> Vec<(i64, i8)> {
    match node {
        Clip::HalfPlane(a, b, c) => {
            let (a, b, c) = (*a, *b, *c);
            let eps = 1e-9;
            let (mut x0, mut x1) = (x0, x1);
            let yf = y as f64;
            if a.abs() < eps {
                if b * yf + c < -eps {
                    x0 = 1;
                    x1 = 0;
                }
            } else {
                let ix = -(b * yf + c) / a;
                if a * x0 as f64 + b * yf + c < eps {
                    x0 = (x0 as f64).max(ix).round() as i64;
                }
                if a * x1 as f64 + b * yf + c < eps {
                    x1 = (x1 as f64).min(ix).round() as i64;
                }
            }
            if x0 <= x1 {
                vec![(x0, 1), (x1, -1)]
            } else {
                Vec::new()
            }
        }
        Clip::And(l, r) | Clip::Or(l, r) => {
            let is_or = matches!(node, Clip::Or(..));
            let l1 = clip(l, x0, y, x1);
            let l2 = clip(r, x0, y, x1);
            let (mut i1, mut i2) = (0, 0);
            let (mut k1, mut k2) = (0i32, 0i32);
            let mut out: Vec<(i64, i8)> = Vec::new();
            while i1 < l1.len() || i2 < l2.len() {
                let take_first = i2 >= l2.len()
                    || (i1 < l1.len()
                        && (l1[i1].0 < l2[i2].0 || (l1[i1].0 == l2[i2].0 && l1[i1].1 > l2[i2].1)));
                let t = if take_first {
                    let t = l1[i1];
                    k1 += i32::from(t.1);
                    i1 += 1;
                    t
                } else {
                    let t = l2[i2];
                    k2 += i32::from(t.1);
                    i2 += 1;
                    t
                };
                let tail = out.last().map(|e| e.1);
                let keep = if is_or {
                    (t.1 == 1 && tail != Some(1)) || (t.1 == -1 && k1 == 0 && k2 == 0)
                } else {
                    (t.1 == 1 && tail != Some(1) && k1 > 0 && k2 > 0)
                        || (t.1 == -1 && tail == Some(1) && (k1 == 0 || k2 == 0))
                };
                if keep {
                    out.push(t);
                }
            }
            out
        }
    }
}

/// C's `fmod` (Rust's `%` on floats is the same operation).
fn fmod(x: f64, y: f64) -> f64 {
    x % y
}

/// `normalize_angles`: `0 <= al < 360`, `al <= ar <= al + 360`, in `float`.
fn normalize_angles(al: f32, ar: f32) -> (f32, f32) {
    if ar - al >= 360.0 {
        return (0.0, 360.0);
    }
    let al = fmod(
        if al < 0.0 {
            360.0 - fmod(-f64::from(al), 360.0)
        } else {
            f64::from(al)
        },
        360.0,
    ) as f32;
    let ar = (f64::from(al)
        + fmod(
            if ar < al {
                360.0 - fmod(f64::from(al - ar), 360.0)
            } else {
                f64::from(ar - al)
            },
            360.0,
        )) as f32;
    (al, ar)
}

/// `ImagingDrawPieslice(fill=1)`: the filled sector from `start` to `end` degrees.
pub(super) fn draw_pieslice_filled(canvas: &mut PillowCanvas, bbox: [i64; 4], start: f32, end: f32) {
    let (start, end) = normalize_angles(start, end);
    if start + 360.0 == end {
        let w = (bbox[2] - bbox[0]) + (bbox[3] - bbox[1]);
        draw_ellipse(canvas, bbox, w);
        return;
    }
    if start == end {
        return;
    }
    let [x0, y0, x1, y1] = bbox;
    let a = x1 - x0;
    let b = y1 - y0;
    if a < 0 || b < 0 {
        return;
    }
    // pie_init
    let w = x1 + y1 - x0 - y0;
    let (af, bf) = (a as f64, b as f64);
    let (al, ar) = (f64::from(start), f64::from(end));
    let xl = af * (al * std::f64::consts::PI / 180.0).cos();
    let xr = af * (ar * std::f64::consts::PI / 180.0).cos();
    let yl = bf * (al * std::f64::consts::PI / 180.0).sin();
    let yr = bf * (ar * std::f64::consts::PI / 180.0).sin();
    let lc = Clip::HalfPlane(-yl, xl, 0.0);
    let rc = Clip::HalfPlane(yr, -xr, 0.0);
    let mut root = if end - start < 180.0 {
        Clip::And(Box::new(lc), Box::new(rc))
    } else {
        Clip::Or(Box::new(lc), Box::new(rc))
    };
    if end - start < 90.0 {
        // One more half-plane against spikes.
        root = Clip::And(
            Box::new(root),
            Box::new(Clip::HalfPlane((xl + xr) / 2.0, (yl + yr) / 2.0, 0.0)),
        );
    }
    let mut ring = Ring::new(a, b, w);
    while let Some((l, y, r)) = ring.next() {
        let events = clip(&root, l, y, r);
        for seg in events.chunks_exact(2) {
            canvas.hline(x0 + (seg[0].0 + a) / 2, y0 + (y + b) / 2, x0 + (seg[1].0 + a) / 2);
        }
    }
}
