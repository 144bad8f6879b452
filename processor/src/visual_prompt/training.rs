//! The default rendering ([`MarkStyle::Training`](super::MarkStyle::Training)): each shape
//! as the Pillow `ImageDraw` calls of ViP-LLaVA's training code
//! (`llava/visual_prompt_generator.py`), on the user's geometry instead of random geometry.
//!
//! | shape | Pillow call |
//! |---|---|
//! | rectangle | `rectangle([x0, y0, x1, y1], outline, width=W)` (`draw_rectangle`) |
//! | ellipse | `ellipse([x0, y0, x1, y1], outline, width=W)` (`draw_ellipse`, size ratio 1) |
//! | triangle | `line([p0, p1, p2, p0], width=W, joint="curve")` (`draw_rounded_triangle`) |
//! | point | `ellipse([x-r, y-r, x+r, y+r], outline, fill)` (`draw_point`, aspect ratio 1) |
//! | arrow | shaft `line([tip, tip + (L-H)·u], width=W)`, head at ±60° of side H, `polygon` or `line` (`draw_arrow`, no wobble) |
//! | scribble | `line([p_i, p_i+1], width=W)` along a Catmull-Rom curve through the points, sampled about 3 times per pixel (training: a random cubic Bézier, `draw_scribble`) |
//! | mask | `polygon(points, fill)` (`draw_mask`) |
//! | mask contour | the 1-px `polygon(points, outline)` at every offset in `[-w, w]²` (`draw_mask_contour`) |
//!
//! `W` is the line width truncated to whole pixels (at least 1), as `int(width · s)` is in
//! training. Mask images have no Pillow call: the filled mask is the thresholded image, and
//! its contour is the region's 1-px boundary stamped at every offset in `[-w, w]²`, the
//! contour of `draw_mask_contour` for a region given as pixels.

use super::pillow::{PillowCanvas, TrainingArrow, bezier_samples};
use super::raster::thresholded;
use super::{DrawOptions, MASK_THRESHOLD, Shape, VisualPromptError, point_radius};

/// Most samples a scribble is drawn with (long curves on large images stay bounded).
const MAX_SCRIBBLE_SAMPLES: usize = 200_000;
/// Scribble samples per pixel of the curve's control-polygon length.
const SCRIBBLE_SAMPLES_PER_PIXEL: f64 = 3.0;

/// `max(W, H) · k / 336` truncated, at least 1: the training code's
/// `max(int(k * max_image_size / image_size_anchor), 1)` (multiplication first, as there).
pub fn training_size(k: u32, width: u32, height: u32) -> u32 {
    let scaled = f64::from(k) * f64::from(width.max(height)) / 336.0;
    (scaled as u32).max(1)
}

/// The default arrow head side for an arrow of length `length` on a `width`×`height`
/// image: `max(0.35 · L, int(6 · s))`, at most `L`. Training draws `max(r · L, int(6 · s))`
/// with `r` uniform in 0.2..0.5; 0.35 is its mean, and no upper cap keeps long arrows'
/// heads in proportion.
pub fn default_arrow_head_size(length: f64, width: u32, height: u32) -> f64 {
    let floor = (6.0 * f64::from(width.max(height)) / 336.0).trunc();
    (0.35 * length).max(floor).min(length)
}

/// The half-width `w` of a contour band drawn `lw` pixels wide: the band is `2w + 1`
/// pixels, `w = max(int(lw) / 2, 1)` (training: `w` from `1·s` to `2·s`).
pub fn contour_half_width(lw: f32) -> u32 {
    (pixel_width(lw) / 2).max(1)
}

/// A line width in whole pixels, as Pillow takes it: truncated, at least 1.
fn pixel_width(lw: f32) -> u32 {
    (lw as u32).max(1)
}

/// Per-pixel coverage (0 or 255, row-major `w`×`h`) of a validated shape drawn as the
/// training code draws it, with line width `lw`.
pub(super) fn training_coverage(
    shape: &Shape,
    lw: f32,
    options: &DrawOptions,
    w: u32,
    h: u32,
) -> Result<Vec<u8>, VisualPromptError> {
    let name = shape.name();
    let pillow = |source| VisualPromptError::Pillow { shape: name, source };
    let width = pixel_width(lw);
    let mut canvas = PillowCanvas::new(w, h);
    let f = f64::from;
    match shape {
        Shape::Rectangle { x0, y0, x1, y1 } => canvas
            .training_rectangle([f(*x0), f(*y0), f(*x1), f(*y1)], width)
            .map_err(pillow)?,
        Shape::Ellipse { x0, y0, x1, y1 } => canvas
            .ellipse([f(*x0), f(*y0), f(*x1), f(*y1)], width)
            .map_err(pillow)?,
        Shape::Triangle { points } => canvas
            .training_triangle(points.map(|(x, y)| (f(x), f(y))), width)
            .map_err(pillow)?,
        Shape::Point { x, y } => {
            let radius = f(options.point_radius.unwrap_or_else(|| point_radius(w, h)));
            canvas
                .training_point((f(*x), f(*y)), radius, 1.0)
                .map_err(pillow)?
        }
        Shape::Arrow { x0, y0, x1, y1 } => {
            let (dx, dy) = (f(*x0) - f(*x1), f(*y0) - f(*y1));
            let length = (dx * dx + dy * dy).sqrt();
            let head = match options.arrow_head_size {
                Some(s) => f(s).min(length),
                None => default_arrow_head_size(length, w, h),
            };
            let arrow = TrainingArrow {
                tip: (f(*x1), f(*y1)),
                angle: dy.atan2(dx),
                length,
                head,
                head_kind: options.arrow_head,
                wobble: None,
            };
            canvas.training_arrow(&arrow, width).map_err(pillow)?
        }
        Shape::Scribble { points } => canvas
            .training_scribble(&scribble_samples(points), width)
            .map_err(pillow)?,
        Shape::Mask { polygon } => canvas.training_mask(&to_f64(polygon)).map_err(pillow)?,
        Shape::MaskContour { polygon } => canvas
            .training_mask_contour(&to_f64(polygon), contour_half_width(lw))
            .map_err(pillow)?,
        Shape::MaskImage(mask) => return Ok(thresholded(mask)),
        Shape::MaskContourImage(mask) => return Ok(stamped_boundary(mask, contour_half_width(lw))),
    }
    Ok(canvas
        .coverage()
        .iter()
        .map(|&c| if c { 255 } else { 0 })
        .collect())
}

fn to_f64(points: &[(f32, f32)]) -> Vec<(f64, f64)> {
    points
        .iter()
        .map(|&(x, y)| (f64::from(x), f64::from(y)))
        .collect()
}

/// The Catmull-Rom curve through `points` (consecutive duplicates dropped), each span a
/// cubic Bézier with control points `b + (c - a) / 6` and `c - (d - b) / 6`, sampled with
/// [`bezier_samples`] (the training scribble's sampling) at about
/// [`SCRIBBLE_SAMPLES_PER_PIXEL`] samples per pixel of its control polygon.
pub fn scribble_samples(points: &[(f32, f32)]) -> Vec<(f64, f64)> {
    let mut p: Vec<(f64, f64)> = Vec::with_capacity(points.len());
    for &(x, y) in points {
        let q = (f64::from(x), f64::from(y));
        if p.last() != Some(&q) {
            p.push(q);
        }
    }
    let n = p.len();
    if n < 2 {
        return p;
    }
    let dist = |a: (f64, f64), b: (f64, f64)| ((b.0 - a.0) * (b.0 - a.0) + (b.1 - a.1) * (b.1 - a.1)).sqrt();
    let spans: Vec<[(f64, f64); 4]> = (0..n - 1)
        .map(|i| {
            let a = p[i.saturating_sub(1)];
            let b = p[i];
            let c = p[i + 1];
            let d = p[(i + 2).min(n - 1)];
            let c1 = (b.0 + (c.0 - a.0) / 6.0, b.1 + (c.1 - a.1) / 6.0);
            let c2 = (c.0 - (d.0 - b.0) / 6.0, c.1 - (d.1 - b.1) / 6.0);
            [b, c1, c2, c]
        })
        .collect();
    let budget = MAX_SCRIBBLE_SAMPLES / spans.len();
    let mut out = Vec::new();
    for (i, span) in spans.iter().enumerate() {
        let length = dist(span[0], span[1]) + dist(span[1], span[2]) + dist(span[2], span[3]);
        let count = ((length * SCRIBBLE_SAMPLES_PER_PIXEL).ceil() as usize).clamp(2, budget.max(2));
        let samples = bezier_samples(*span, count);
        // Each span starts exactly where the previous one ended.
        out.extend(samples.into_iter().skip(usize::from(i > 0)));
    }
    out
}

/// The 1-px boundary of a mask image's region (pixels above [`MASK_THRESHOLD`] with a
/// 4-neighbour outside the region or the image) stamped at every offset in `[-w, w]²`.
fn stamped_boundary(mask: &image::GrayImage, w: u32) -> Vec<u8> {
    let (width, height) = (mask.width() as usize, mask.height() as usize);
    let inside = |x: usize, y: usize| mask.as_raw()[y * width + x] > MASK_THRESHOLD;
    let mut boundary = vec![false; width * height];
    for y in 0..height {
        for x in 0..width {
            if !inside(x, y) {
                continue;
            }
            let edge = x == 0
                || y == 0
                || x + 1 == width
                || y + 1 == height
                || !inside(x - 1, y)
                || !inside(x + 1, y)
                || !inside(x, y - 1)
                || !inside(x, y + 1);
            boundary[y * width + x] = edge;
        }
    }
    // Square dilation, separable: along rows, then along columns.
    let w = w as usize;
    let mut rows = vec![false; width * height];
    for y in 0..height {
        let row = &boundary[y * width..(y + 1) * width];
        for x in 0..width {
            let lo = x.saturating_sub(w);
            let hi = (x + w).min(width - 1);
            rows[y * width + x] = row[lo..=hi].iter().any(|&b| b);
        }
    }
    let mut out = vec![0u8; width * height];
    for x in 0..width {
        for y in 0..height {
            let lo = y.saturating_sub(w);
            let hi = (y + w).min(height - 1);
            if (lo..=hi).any(|yy| rows[yy * width + x]) {
                out[y * width + x] = 255;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_training_formulas() {
        // int(8 * 336 / 336) = 8, int(8 * 160 / 336) = 3, int(3 * 700 / 336) = 6.
        assert_eq!(training_size(8, 336, 200), 8);
        assert_eq!(training_size(8, 160, 106), 3);
        assert_eq!(training_size(3, 700, 460), 6);
        assert_eq!(training_size(3, 40, 30), 1);
        // Heads: 0.35 L, at least int(6 s), never longer than the arrow.
        assert_eq!(default_arrow_head_size(100.0, 336, 336), 35.0);
        assert_eq!(default_arrow_head_size(10.0, 336, 336), 6.0);
        assert_eq!(default_arrow_head_size(4.0, 336, 336), 4.0);
        assert_eq!(contour_half_width(3.0), 1);
        assert_eq!(contour_half_width(6.9), 3);
        assert_eq!(contour_half_width(0.5), 1);
    }

    #[test]
    fn scribble_samples_pass_through_every_point() {
        let pts = [(0.0, 0.0), (10.0, 5.0), (10.0, 5.0), (20.0, -3.0)];
        let s = scribble_samples(&pts);
        assert_eq!(s.first(), Some(&(0.0, 0.0)));
        assert!(s.contains(&(10.0, 5.0)));
        assert_eq!(s.last(), Some(&(20.0, -3.0)));
        // About three samples per pixel of length.
        assert!(s.len() > 60 && s.len() < 200, "{}", s.len());
    }

    #[test]
    fn boundary_band_is_centred_on_the_region_edge() {
        let mut mask = image::GrayImage::new(20, 20);
        for y in 5..15 {
            for x in 5..15 {
                mask.put_pixel(x, y, image::Luma([255]));
            }
        }
        let band = stamped_boundary(&mask, 1);
        let at = |x: usize, y: usize| band[y * 20 + x] == 255;
        // The boundary column x = 5 grows one pixel to each side.
        assert!(at(4, 10) && at(5, 10) && at(6, 10));
        assert!(!at(3, 10) && !at(7, 10));
        assert!(!at(10, 10));
    }
}
