//! The training code's marks (`llava/visual_prompt_generator.py` in
//! WisconsinAIVision/ViP-LLaVA), each drawn with the same `ImageDraw` calls and the same
//! float arithmetic on the given geometry. The random parts of the training code (sizes,
//! angles, ratios, wobble) are the caller's inputs.

use super::{Joint, PillowCanvas, PillowDrawError};

/// How an arrow's head is drawn (`draw_arrow`: half of the training arrows each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ArrowHead {
    /// `polygon([side+, tip, side-], fill)`.
    #[default]
    Filled,
    /// `line([side+, tip, side-], width)`: an open V of the stroke width.
    Open,
}

/// An arrow as `draw_arrow` builds it: the tip at `tip`, the shaft pointing away from the
/// tip at `angle` radians, `length` the total length L and `head` the head's side length H.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainingArrow {
    /// The tip (`center_x`, `center_y` in the training code).
    pub tip: (f64, f64),
    /// Direction from the tip to the shaft's end, in radians.
    pub angle: f64,
    /// Total length L; the shaft runs from the tip to `L - H`.
    pub length: f64,
    /// Head side length H; the sides are at ±60° around the shaft.
    pub head: f64,
    /// Filled or open head.
    pub head_kind: ArrowHead,
    /// The wobble of a hand-drawn shaft: the offset of its middle point from the straight
    /// shaft's midpoint (`uniform(-5, 5) · int(s)` per axis in training); `None` for a
    /// straight two-point shaft.
    pub wobble: Option<(f64, f64)>,
}

impl PillowCanvas {
    /// `draw_rectangle`: `rectangle([(l, t), (r, b)], outline, width)`.
    pub fn training_rectangle(&mut self, bbox: [f64; 4], width: u32) -> Result<(), PillowDrawError> {
        self.rectangle(bbox, width)
    }

    /// `draw_ellipse`: the ellipse outline on `bbox` scaled about its centre by
    /// `size_ratio · aspect_ratio` horizontally and `size_ratio / aspect_ratio` vertically
    /// (training: size ratio uniform 1..1.5; aspect ratio 1, or uniform 0.5..2 half of the
    /// time).
    pub fn training_ellipse(
        &mut self,
        bbox: [f64; 4],
        width: u32,
        size_ratio: f64,
        aspect_ratio: f64,
    ) -> Result<(), PillowDrawError> {
        let [minx, miny, maxx, maxy] = bbox;
        let cx = (maxx + minx) / 2.0;
        let cy = (maxy + miny) / 2.0;
        let new_w = (maxx - minx) * size_ratio * aspect_ratio;
        let new_h = (maxy - miny) * size_ratio / aspect_ratio;
        self.ellipse(
            [
                cx - new_w / 2.0,
                cy - new_h / 2.0,
                cx + new_w / 2.0,
                cy + new_h / 2.0,
            ],
            width,
        )
    }

    /// `draw_triangle`'s stroke: `line([p0, p1, p2, p0], width, joint="curve")`.
    pub fn training_triangle(&mut self, points: [(f64, f64); 3], width: u32) -> Result<(), PillowDrawError> {
        self.line(&[points[0], points[1], points[2], points[0]], width, Joint::Curve)
    }

    /// `draw_point`: the filled ellipse with radii `radius · aspect_ratio` and
    /// `radius / aspect_ratio` around `centre`.
    pub fn training_point(
        &mut self,
        centre: (f64, f64),
        radius: f64,
        aspect_ratio: f64,
    ) -> Result<(), PillowDrawError> {
        let rx = radius * aspect_ratio;
        let ry = radius / aspect_ratio;
        self.ellipse_filled([centre.0 - rx, centre.1 - ry, centre.0 + rx, centre.1 + ry])
    }

    /// `draw_scribble`'s strokes: `line([prev, current], width)` between consecutive
    /// samples (the same pixels as one `line` through all of them). [`bezier_samples`]
    /// gives the training code's samples.
    pub fn training_scribble(&mut self, samples: &[(f64, f64)], width: u32) -> Result<(), PillowDrawError> {
        self.line(samples, width, Joint::None)
    }

    /// `draw_arrow`: the shaft as `line` (two points, or three with the wobble), then the
    /// head as a filled `polygon` or an open `line`, both of `width`.
    pub fn training_arrow(&mut self, arrow: &TrainingArrow, width: u32) -> Result<(), PillowDrawError> {
        let (cx, cy) = arrow.tip;
        let shaft = arrow.length - arrow.head;
        let end = (cx + shaft * arrow.angle.cos(), cy + shaft * arrow.angle.sin());
        match arrow.wobble {
            Some((ox, oy)) => {
                let mid = ((cx + end.0) / 2.0 + ox, (cy + end.1) / 2.0 + oy);
                self.line(&[(cx, cy), mid, end], width, Joint::None)?;
            }
            None => self.line(&[(cx, cy), end], width, Joint::None)?,
        }
        let third = std::f64::consts::PI / 3.0;
        let h = arrow.head;
        let head = [
            (
                cx + h * (arrow.angle + third).cos(),
                cy + h * (arrow.angle + third).sin(),
            ),
            (cx, cy),
            (
                cx + h * (arrow.angle - third).cos(),
                cy + h * (arrow.angle - third).sin(),
            ),
        ];
        match arrow.head_kind {
            ArrowHead::Filled => self.polygon_filled(&head),
            ArrowHead::Open => self.line(&head, width, Joint::None),
        }
    }

    /// `draw_mask`: `polygon(coords, fill)`.
    pub fn training_mask(&mut self, polygon: &[(f64, f64)]) -> Result<(), PillowDrawError> {
        self.polygon_filled(polygon)
    }

    /// `draw_mask_contour`: the 1-px polygon outline shifted by every `(dx, dy)` in
    /// `[-w, w]²`, so a band about `2w + 1` pixels wide centred on the outline (training:
    /// `w` from 1·s to 2·s).
    pub fn training_mask_contour(&mut self, polygon: &[(f64, f64)], w: u32) -> Result<(), PillowDrawError> {
        let w = i64::from(w);
        let mut shifted = Vec::with_capacity(polygon.len());
        for dx in -w..=w {
            for dy in -w..=w {
                shifted.clear();
                shifted.extend(polygon.iter().map(|&(x, y)| (x + dx as f64, y + dy as f64)));
                self.polygon_outline(&shifted)?;
            }
        }
        Ok(())
    }
}

/// The training scribble's samples: the cubic Bézier through control points `p` at
/// `numpy.linspace(0, 1, n)`, each coordinate
/// `(1-t)^3·p0 + 3·(1-t)^2·t·p1 + 3·(1-t)·t^2·p2 + t^3·p3` in Python's evaluation order
/// (training: `n = int(1000 · s)`). Powers use the C library's `pow` as numpy does.
pub fn bezier_samples(p: [(f64, f64); 4], n: usize) -> Vec<(f64, f64)> {
    let step = if n > 1 { 1.0 / (n - 1) as f64 } else { 0.0 };
    (0..n)
        .map(|i| {
            let t = if n > 1 && i == n - 1 {
                1.0
            } else {
                i as f64 * step + 0.0
            };
            let u = 1.0 - t;
            let c = |a: f64, b: f64, c: f64, d: f64| {
                u.powf(3.0) * a + 3.0 * u.powf(2.0) * t * b + 3.0 * u * t.powf(2.0) * c + t.powf(3.0) * d
            };
            (
                c(p[0].0, p[1].0, p[2].0, p[3].0),
                c(p[0].1, p[1].1, p[2].1, p[3].1),
            )
        })
        .collect()
}
