//! Pillow-exact hard-edged drawing: `ImageDraw`'s `rectangle`, `ellipse`, `line` (with
//! `joint="curve"`) and `polygon` on a transparent RGBA layer, reproduced pixel for pixel.
//!
//! ViP-LLaVA's training code (`llava/visual_prompt_generator.py`) draws its marks with
//! Pillow's `ImageDraw` on a transparent RGBA layer. Drawing on an RGBA image without
//! blending writes the ink into every pixel a primitive covers, so the layer is fully
//! described by which pixels were covered: a [`PillowCanvas`] is that coverage, one bit per
//! pixel. Composited with the ink's colour and alpha it is the training code's layer.
//!
//! Coordinates follow Pillow: points are `f64` (Python floats) and are truncated toward
//! zero to integers by Pillow's C layer (`(int)` casts in `_imaging.c`) before drawing, end
//! corners of rectangles and ellipse boxes are inclusive, and `width` grows inward for
//! rectangles and ellipses and is centred on the segment for lines. Only the `joint="curve"`
//! joins of [`PillowCanvas::line`] use the float coordinates, as `ImageDraw.line` does.
//! Shapes partly or wholly outside the canvas are clipped.
//!
//! `training_*` methods draw each mark shape the training code's way (same calls, same
//! float arithmetic on the geometry), for a renderer that wants the training look.
//!
//! The algorithms (scanline polygon filling with Pillow's corner fixes, Bresenham lines,
//! the ellipse quadrant iterator on a doubled grid, the half-plane clipping of pie slices)
//! follow Pillow's `src/libImaging/Draw.c` and `src/PIL/ImageDraw.py` (Pillow 11-13),
//! including their `float`/`double` arithmetic, so that rounding decisions agree.

mod ellipse;
mod marks;
mod scan;

pub use marks::{ArrowHead, TrainingArrow, bezier_samples};

use thiserror::Error;

/// Largest coordinate magnitude the primitives accept. Pillow casts coordinates to C
/// `int`; this bound keeps every intermediate of the integer algorithms far from overflow.
pub const PILLOW_MAX_COORDINATE: f64 = 1.0e6;

/// Largest accepted stroke width.
pub const PILLOW_MAX_WIDTH: u32 = 10_000;

/// Why a Pillow primitive was not drawn.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum PillowDrawError {
    /// A coordinate is NaN, infinite or larger in magnitude than [`PILLOW_MAX_COORDINATE`].
    #[error("coordinate {0} is not a finite number within ±{PILLOW_MAX_COORDINATE}")]
    BadCoordinate(f64),
    /// `x1 < x0` or `y1 < y0` in a box (Pillow raises `ValueError` too).
    #[error("box corners out of order: [{0}, {1}, {2}, {3}] needs x1 >= x0 and y1 >= y0")]
    Unordered(f64, f64, f64, f64),
    /// A polygon needs at least two points (Pillow raises `TypeError`).
    #[error("a polygon needs at least 2 points, got {0}")]
    TooFewPoints(usize),
    /// The width is larger than [`PILLOW_MAX_WIDTH`].
    #[error("width {0} is larger than {PILLOW_MAX_WIDTH}")]
    BadWidth(u32),
}

/// How [`PillowCanvas::line`] joins consecutive segments (`ImageDraw.line`'s `joint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Joint {
    /// `joint=None`: segments are drawn one after the other, nothing at the joins.
    #[default]
    None,
    /// `joint="curve"`: for widths above 4, a filled pie slice rounds every join (and for
    /// widths above 8 a 3-px line covers the gaps between slice and segments).
    Curve,
}

/// A binary drawing layer of `width × height` pixels: which pixels Pillow's `ImageDraw`
/// would have set to the ink on a transparent RGBA image of that size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PillowCanvas {
    width: u32,
    height: u32,
    covered: Vec<bool>,
}

impl PillowCanvas {
    /// An empty (fully transparent) canvas.
    pub fn new(width: u32, height: u32) -> Self {
        Self {
            width,
            height,
            covered: vec![false; width as usize * height as usize],
        }
    }

    /// Canvas width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Canvas height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// Whether pixel `(x, y)` is covered; `false` outside the canvas.
    pub fn get(&self, x: u32, y: u32) -> bool {
        x < self.width && y < self.height && self.covered[y as usize * self.width as usize + x as usize]
    }

    /// The coverage, row-major, one entry per pixel.
    pub fn coverage(&self) -> &[bool] {
        &self.covered
    }

    /// The canvas as an RGBA layer: `ink` where covered, `[0, 0, 0, 0]` elsewhere, as
    /// Pillow's `Image.new("RGBA", size, (0, 0, 0, 0))` after drawing with `ink`.
    pub fn to_rgba(&self, ink: [u8; 4]) -> image::RgbaImage {
        let mut out = image::RgbaImage::new(self.width, self.height);
        for (px, &c) in out.pixels_mut().zip(self.covered.iter()) {
            if c {
                px.0 = ink;
            }
        }
        out
    }

    /// Blend the layer onto `image` as the training code does (`image_blending`:
    /// `Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")`, the layer's
    /// covered pixels being `(rgb, alpha)`): covered pixels get Pillow's `alpha_composite`
    /// arithmetic, the others are unchanged. The canvas and the image must have the same
    /// size; pixels outside either are left alone.
    pub fn composite_onto(&self, image: &mut image::RgbImage, rgb: [u8; 3], alpha: u8) {
        let w = self.width.min(image.width());
        let h = self.height.min(image.height());
        for y in 0..h {
            for x in 0..w {
                if self.get(x, y) {
                    let px = image.get_pixel_mut(x, y);
                    px.0 = std::array::from_fn(|c| super::draw::composite(rgb[c], px.0[c], alpha));
                }
            }
        }
    }

    /// `ImageDraw.rectangle([x0, y0, x1, y1], outline=ink, width=width)`: a frame `width`
    /// pixels wide inside the box, both corners inclusive. `width` 0 draws nothing.
    pub fn rectangle(&mut self, bbox: [f64; 4], width: u32) -> Result<(), PillowDrawError> {
        let [x0, y0, x1, y1] = ordered_box(bbox)?;
        check_width(width)?;
        if width == 0 {
            return Ok(());
        }
        let w = i64::from(width);
        for i in 0..w {
            self.hline(x0, y0 + i, x1);
            self.hline(x0, y1 - i, x1);
            self.bresenham(x1 - i, y0 + w, x1 - i, y1 - w + 1);
            self.bresenham(x0 + i, y0 + w, x0 + i, y1 - w + 1);
        }
        Ok(())
    }

    /// `ImageDraw.rectangle([x0, y0, x1, y1], fill=ink)`: every pixel of the box, both
    /// corners inclusive.
    pub fn rectangle_filled(&mut self, bbox: [f64; 4]) -> Result<(), PillowDrawError> {
        let [x0, y0, x1, y1] = ordered_box(bbox)?;
        let h = i64::from(self.height);
        if y0 >= h || y1 < 0 {
            return Ok(());
        }
        for y in y0.max(0)..=y1.min(h) {
            self.hline(x0, y, x1);
        }
        Ok(())
    }

    /// `ImageDraw.ellipse([x0, y0, x1, y1], outline=ink, width=width)`: the ring of the
    /// ellipse inscribed in the box, `width` pixels thick inward. `width` 0 draws nothing.
    pub fn ellipse(&mut self, bbox: [f64; 4], width: u32) -> Result<(), PillowDrawError> {
        let b = ordered_box(bbox)?;
        check_width(width)?;
        if width == 0 {
            return Ok(());
        }
        ellipse::draw_ellipse(self, b, i64::from(width));
        Ok(())
    }

    /// `ImageDraw.ellipse([x0, y0, x1, y1], fill=ink)` (also with `outline=ink`, which then
    /// adds nothing): the filled ellipse inscribed in the box. The training code's points
    /// are these.
    pub fn ellipse_filled(&mut self, bbox: [f64; 4]) -> Result<(), PillowDrawError> {
        let b = ordered_box(bbox)?;
        let width = (b[2] - b[0]) + (b[3] - b[1]);
        ellipse::draw_ellipse(self, b, width);
        Ok(())
    }

    /// `ImageDraw.pieslice([x0, y0, x1, y1], start, end, fill=ink)`: the filled sector of
    /// the inscribed ellipse from `start` to `end` degrees (clockwise from 3 o'clock).
    pub fn pieslice_filled(&mut self, bbox: [f64; 4], start: f64, end: f64) -> Result<(), PillowDrawError> {
        let b = ordered_box(bbox)?;
        for v in [start, end] {
            check_coordinate(v)?;
        }
        // `draw_pieslice` parses the angles as C floats.
        ellipse::draw_pieslice_filled(self, b, start as f32, end as f32);
        Ok(())
    }

    /// `ImageDraw.line(points, fill=ink, width=width, joint=joint)`: the segments between
    /// consecutive points. Width 1 is Bresenham's line (last point included); wider lines
    /// are each segment's rectangle filled as a polygon. `width` 0 draws nothing.
    pub fn line(&mut self, points: &[(f64, f64)], width: u32, joint: Joint) -> Result<(), PillowDrawError> {
        check_points(points)?;
        check_width(width)?;
        if width == 0 {
            return Ok(());
        }
        let ipts: Vec<(i64, i64)> = points.iter().map(|&(x, y)| (trunc(x), trunc(y))).collect();
        if width == 1 {
            for s in ipts.windows(2) {
                self.bresenham(s[0].0, s[0].1, s[1].0, s[1].1);
            }
            if let (true, Some(&(x, y))) = (ipts.len() >= 2, ipts.last()) {
                // `draw_lines` adds the last point after the segments.
                self.point(x, y);
            }
        } else {
            for s in ipts.windows(2) {
                scan::wide_line(self, s[0], s[1], i64::from(width));
            }
        }
        if joint == Joint::Curve && width > 4 {
            self.curve_joints(points, width);
        }
        Ok(())
    }

    /// `ImageDraw.polygon(points, fill=ink)`: the filled polygon (closed automatically).
    pub fn polygon_filled(&mut self, points: &[(f64, f64)]) -> Result<(), PillowDrawError> {
        let ipts = polygon_points(points)?;
        scan::polygon_fill(self, &ipts);
        Ok(())
    }

    /// `ImageDraw.polygon(points, outline=ink)` (width 1): Bresenham lines between
    /// consecutive points and back to the first.
    pub fn polygon_outline(&mut self, points: &[(f64, f64)]) -> Result<(), PillowDrawError> {
        let ipts = polygon_points(points)?;
        for s in ipts.windows(2) {
            self.bresenham(s[0].0, s[0].1, s[1].0, s[1].1);
        }
        if let (Some(&(xl, yl)), Some(&(xf, yf))) = (ipts.last(), ipts.first()) {
            self.bresenham(xl, yl, xf, yf);
        }
        Ok(())
    }

    /// The joins `ImageDraw.line(..., joint="curve")` adds for `width > 4`, computed from
    /// the float points as Python does.
    fn curve_joints(&mut self, points: &[(f64, f64)], width: u32) {
        let wf = f64::from(width);
        for i in 1..points.len().saturating_sub(1) {
            let point = points[i];
            let angle =
                |s: (f64, f64), e: (f64, f64)| py_mod((e.0 - s.0).atan2(s.1 - e.1).to_degrees(), 360.0);
            let a0 = angle(points[i - 1], point);
            let a1 = angle(point, points[i + 1]);
            if a0 == a1 {
                continue;
            }
            let flipped = (a1 > a0 && a1 - 180.0 > a0) || (a1 < a0 && a1 + 180.0 > a0);
            let bbox = [
                point.0 - wf / 2.0 + 1.0,
                point.1 - wf / 2.0 + 1.0,
                point.0 + wf / 2.0 - 1.0,
                point.1 + wf / 2.0 - 1.0,
            ];
            let (start, end) = if flipped {
                (a1 + 90.0, a0 + 90.0)
            } else {
                (a0 - 90.0, a1 - 90.0)
            };
            if let Ok(b) = ordered_box(bbox) {
                ellipse::draw_pieslice_filled(self, b, (start - 90.0) as f32, (end - 90.0) as f32);
            }
            if width > 8 {
                let distance = wf / 2.0 - 1.0;
                let at_angle = |angle: f64| {
                    let angle = angle - 90.0;
                    let step = |p: f64, d: f64| p + if d > 0.0 { d.floor() } else { d.ceil() };
                    (
                        step(point.0, distance * angle.to_radians().cos()),
                        step(point.1, distance * angle.to_radians().sin()),
                    )
                };
                let sign = if flipped { 90.0 } else { -90.0 };
                let gap = [at_angle(a0 + sign), point, at_angle(a1 + sign)];
                let ipts: Vec<(i64, i64)> = gap.iter().map(|&(x, y)| (trunc(x), trunc(y))).collect();
                for s in ipts.windows(2) {
                    scan::wide_line(self, s[0], s[1], 3);
                }
            }
        }
    }

    /// Pillow's `point32`: one pixel, ignored outside the canvas.
    fn point(&mut self, x: i64, y: i64) {
        if x >= 0 && y >= 0 && x < i64::from(self.width) && y < i64::from(self.height) {
            self.covered[y as usize * self.width as usize + x as usize] = true;
        }
    }

    /// Pillow's `hline32`: pixels `x0..=x1` of row `y`, clipped.
    fn hline(&mut self, x0: i64, y: i64, x1: i64) {
        if y < 0 || y >= i64::from(self.height) {
            return;
        }
        let x0 = x0.max(0);
        let x1 = x1.min(i64::from(self.width) - 1);
        if x0 > x1 {
            return;
        }
        let row = y as usize * self.width as usize;
        self.covered[row + x0 as usize..=row + x1 as usize].fill(true);
    }

    /// Pillow's `line32`: Bresenham from `(x0, y0)` towards `(x1, y1)`, the end point
    /// excluded.
    fn bresenham(&mut self, mut x0: i64, mut y0: i64, x1: i64, y1: i64) {
        let (mut dx, xs) = if x1 - x0 < 0 { (x0 - x1, -1) } else { (x1 - x0, 1) };
        let (mut dy, ys) = if y1 - y0 < 0 { (y0 - y1, -1) } else { (y1 - y0, 1) };
        if dx == 0 {
            for _ in 0..dy {
                self.point(x0, y0);
                y0 += ys;
            }
        } else if dy == 0 {
            for _ in 0..dx {
                self.point(x0, y0);
                x0 += xs;
            }
        } else if dx > dy {
            let n = dx;
            dy += dy;
            let mut e = dy - dx;
            dx += dx;
            for _ in 0..n {
                self.point(x0, y0);
                if e >= 0 {
                    y0 += ys;
                    e -= dx;
                }
                e += dy;
                x0 += xs;
            }
        } else {
            let n = dy;
            dx += dx;
            let mut e = dx - dy;
            dy += dy;
            for _ in 0..n {
                self.point(x0, y0);
                if e >= 0 {
                    x0 += xs;
                    e -= dy;
                }
                e += dx;
                y0 += ys;
            }
        }
    }
}

/// C's `(int)` cast of a (checked) coordinate: truncation toward zero.
fn trunc(v: f64) -> i64 {
    v as i64
}

/// Python's float `%` for a positive divisor: the result has the divisor's sign.
fn py_mod(x: f64, m: f64) -> f64 {
    let r = x % m;
    if r != 0.0 && r < 0.0 {
        r + m
    } else if r == 0.0 {
        0.0
    } else {
        r
    }
}

fn check_coordinate(v: f64) -> Result<(), PillowDrawError> {
    if v.is_finite() && v.abs() <= PILLOW_MAX_COORDINATE {
        Ok(())
    } else {
        Err(PillowDrawError::BadCoordinate(v))
    }
}

fn check_width(width: u32) -> Result<(), PillowDrawError> {
    if width > PILLOW_MAX_WIDTH {
        Err(PillowDrawError::BadWidth(width))
    } else {
        Ok(())
    }
}

fn check_points(points: &[(f64, f64)]) -> Result<(), PillowDrawError> {
    for &(x, y) in points {
        check_coordinate(x)?;
        check_coordinate(y)?;
    }
    Ok(())
}

fn polygon_points(points: &[(f64, f64)]) -> Result<Vec<(i64, i64)>, PillowDrawError> {
    check_points(points)?;
    if points.len() < 2 {
        return Err(PillowDrawError::TooFewPoints(points.len()));
    }
    Ok(points.iter().map(|&(x, y)| (trunc(x), trunc(y))).collect())
}

/// The box checked as `_imaging.c` does (float order), then truncated.
fn ordered_box(b: [f64; 4]) -> Result<[i64; 4], PillowDrawError> {
    for v in b {
        check_coordinate(v)?;
    }
    if b[2] < b[0] || b[3] < b[1] {
        return Err(PillowDrawError::Unordered(b[0], b[1], b[2], b[3]));
    }
    Ok(b.map(trunc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let mut c = PillowCanvas::new(8, 8);
        assert_eq!(
            c.rectangle([4.0, 0.0, 2.0, 3.0], 1),
            Err(PillowDrawError::Unordered(4.0, 0.0, 2.0, 3.0))
        );
        assert!(matches!(
            c.ellipse([0.0, f64::NAN, 2.0, 3.0], 1),
            Err(PillowDrawError::BadCoordinate(_))
        ));
        assert!(matches!(
            c.line(&[(0.0, 0.0), (1e9, 0.0)], 3, Joint::Curve),
            Err(PillowDrawError::BadCoordinate(_))
        ));
        assert_eq!(
            c.polygon_filled(&[(1.0, 1.0)]),
            Err(PillowDrawError::TooFewPoints(1))
        );
        assert_eq!(
            c.rectangle([0.0, 0.0, 2.0, 2.0], 20_000),
            Err(PillowDrawError::BadWidth(20_000))
        );
        assert!(c.coverage().iter().all(|&v| !v));
    }

    #[test]
    fn corners_are_inclusive_and_coordinates_truncate() {
        let mut c = PillowCanvas::new(8, 8);
        c.rectangle_filled([1.9, 1.2, 3.99, 2.5]).unwrap();
        let set: Vec<(u32, u32)> = (0..8)
            .flat_map(|y| (0..8).map(move |x| (x, y)))
            .filter(|&(x, y)| c.get(x, y))
            .collect();
        assert_eq!(set, vec![(1, 1), (2, 1), (3, 1), (1, 2), (2, 2), (3, 2)]);
    }

    #[test]
    fn width_zero_draws_nothing() {
        let mut c = PillowCanvas::new(8, 8);
        c.rectangle([1.0, 1.0, 6.0, 6.0], 0).unwrap();
        c.ellipse([1.0, 1.0, 6.0, 6.0], 0).unwrap();
        c.line(&[(1.0, 1.0), (6.0, 6.0)], 0, Joint::None).unwrap();
        assert_eq!(c, PillowCanvas::new(8, 8));
    }

    #[test]
    fn python_modulo_has_the_divisor_sign() {
        assert_eq!(py_mod(-90.0, 360.0), 270.0);
        assert_eq!(py_mod(450.0, 360.0), 90.0);
        assert_eq!(py_mod(-360.0, 360.0).to_bits(), 0.0f64.to_bits());
    }
}
