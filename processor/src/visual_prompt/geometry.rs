//! The outline of each shape as tiny-skia paths to fill: strokes are converted to fill
//! paths here, so that rasterising is one anti-aliased fill per path.

use tiny_skia::{FillRule, LineCap, LineJoin, PathBuilder, Rect, Stroke};

use super::{ArrowHead, DrawOptions, Shape, VisualPromptError, point_radius, size_scale};

/// The paths that make up a validated shape drawn with line width `lw` on a `w`×`h`
/// image, each with its fill rule, in drawing order; none for mask images.
pub(super) fn fill_paths(
    shape: &Shape,
    lw: f32,
    options: &DrawOptions,
    w: u32,
    h: u32,
) -> Result<Vec<(tiny_skia::Path, FillRule)>, VisualPromptError> {
    let name = shape.name();
    let geometry = || VisualPromptError::Geometry(name);
    let round = Stroke {
        width: lw,
        line_cap: LineCap::Round,
        line_join: LineJoin::Round,
        ..Stroke::default()
    };
    let mut paths = Vec::new();
    match shape {
        Shape::Rectangle { x0, y0, x1, y1 } | Shape::Ellipse { x0, y0, x1, y1 } => {
            let outer = Rect::from_ltrb(*x0, *y0, *x1, *y1).ok_or_else(geometry)?;
            let inner = Rect::from_ltrb(x0 + lw, y0 + lw, x1 - lw, y1 - lw);
            let ellipse = matches!(shape, Shape::Ellipse { .. });
            let mut pb = PathBuilder::new();
            for r in std::iter::once(outer).chain(inner) {
                if ellipse { pb.push_oval(r) } else { pb.push_rect(r) }
            }
            paths.push((pb.finish().ok_or_else(geometry)?, FillRule::EvenOdd));
        }
        Shape::Triangle { points } => {
            let mut pb = PathBuilder::new();
            pb.move_to(points[0].0, points[0].1);
            pb.line_to(points[1].0, points[1].1);
            pb.line_to(points[2].0, points[2].1);
            pb.close();
            let path = pb.finish().ok_or_else(geometry)?;
            paths.push((path.stroke(&round, 1.0).ok_or_else(geometry)?, FillRule::Winding));
        }
        Shape::Point { x, y } => {
            let path =
                PathBuilder::from_circle(*x, *y, options.point_radius.unwrap_or_else(|| point_radius(w, h)))
                    .ok_or_else(geometry)?;
            paths.push((path, FillRule::Winding));
        }
        Shape::Scribble { points } => {
            let path = catmull_rom(points).ok_or_else(geometry)?;
            paths.push((path.stroke(&round, 1.0).ok_or_else(geometry)?, FillRule::Winding));
        }
        Shape::Arrow { x0, y0, x1, y1 } => {
            let (dx, dy) = (x0 - x1, y0 - y1);
            let len = dx.hypot(dy);
            let (bx, by) = (dx / len, dy / len); // unit vector from the tip back to the tail
            let s = size_scale(w, h);
            let lo = (6.0 * s).max(3.0 * lw);
            let head = match options.arrow_head_size {
                Some(size) => size.min(len),
                None => (0.35 * len).clamp(lo, (18.0 * s).max(lo)).min(len),
            };
            // Head: the original's triangle with its sides at ±60° from the shaft.
            let (c, sn) = (0.5f32, 3f32.sqrt() / 2.0);
            let side = |sign: f32| {
                (
                    x1 + head * (c * bx - sign * sn * by),
                    y1 + head * (sign * sn * bx + c * by),
                )
            };
            let (l, r) = (side(1.0), side(-1.0));
            let mut pb = PathBuilder::new();
            if options.arrow_head == ArrowHead::Open {
                // An open V of the line width, as the training code's `line` head.
                pb.move_to(l.0, l.1);
                pb.line_to(*x1, *y1);
                pb.line_to(r.0, r.1);
                let v = pb.finish().ok_or_else(geometry)?;
                paths.push((v.stroke(&round, 1.0).ok_or_else(geometry)?, FillRule::Winding));
            } else {
                pb.move_to(*x1, *y1);
                pb.line_to(l.0, l.1);
                pb.line_to(r.0, r.1);
                pb.close();
                paths.push((pb.finish().ok_or_else(geometry)?, FillRule::Winding));
            }
            // Shaft: from the tail to just inside the head (0.4·head back from the tip).
            let back = 0.4 * head;
            if len > back {
                let mut pb = PathBuilder::new();
                pb.move_to(*x0, *y0);
                pb.line_to(x1 + back * bx, y1 + back * by);
                let shaft = pb.finish().ok_or_else(geometry)?;
                let butt = Stroke {
                    width: lw,
                    line_join: LineJoin::Round,
                    ..Stroke::default()
                };
                paths.push((shaft.stroke(&butt, 1.0).ok_or_else(geometry)?, FillRule::Winding));
            }
        }
        Shape::Mask { polygon } | Shape::MaskContour { polygon } => {
            let mut pb = PathBuilder::new();
            pb.move_to(polygon[0].0, polygon[0].1);
            for &(x, y) in &polygon[1..] {
                pb.line_to(x, y);
            }
            pb.close();
            let path = pb.finish().ok_or_else(geometry)?;
            if matches!(shape, Shape::Mask { .. }) {
                paths.push((path, FillRule::Winding));
            } else {
                paths.push((path.stroke(&round, 1.0).ok_or_else(geometry)?, FillRule::Winding));
            }
        }
        Shape::MaskImage(_) | Shape::MaskContourImage(_) => {}
    }
    Ok(paths)
}

/// A Catmull-Rom spline through `points` (consecutive duplicates dropped) as cubic Béziers.
fn catmull_rom(points: &[(f32, f32)]) -> Option<tiny_skia::Path> {
    let mut p: Vec<(f32, f32)> = Vec::with_capacity(points.len());
    for &q in points {
        if p.last() != Some(&q) {
            p.push(q);
        }
    }
    let mut pb = PathBuilder::new();
    let first = *p.first()?;
    pb.move_to(first.0, first.1);
    let n = p.len();
    for i in 0..n.saturating_sub(1) {
        let a = p[i.saturating_sub(1)];
        let b = p[i];
        let c = p[i + 1];
        let d = p[(i + 2).min(n - 1)];
        let c1 = (b.0 + (c.0 - a.0) / 6.0, b.1 + (c.1 - a.1) / 6.0);
        let c2 = (c.0 - (d.0 - b.0) / 6.0, c.1 - (d.1 - b.1) / 6.0);
        pb.cubic_to(c1.0, c1.1, c2.0, c2.1, c.0, c.1);
    }
    pb.finish()
}
