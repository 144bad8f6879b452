//! Checks a prompt before anything is drawn, and resolves its alpha and line width.

use super::{
    DEFAULT_MASK_ALPHA, DEFAULT_STROKE_ALPHA, DrawOptions, MASK_THRESHOLD, MAX_COORDINATE, Shape,
    VisualPrompt, VisualPromptError, default_line_width,
};

/// Validate `prompt` for a `w`×`h` image and resolve its alpha and line width.
pub(super) fn resolve(
    prompt: &VisualPrompt,
    options: &DrawOptions,
    w: u32,
    h: u32,
) -> Result<(u8, f32), VisualPromptError> {
    validate_shape(&prompt.shape, w, h)?;
    let default_alpha = if prompt.shape.is_filled_mask() {
        DEFAULT_MASK_ALPHA
    } else {
        DEFAULT_STROKE_ALPHA
    };
    let alpha = prompt.alpha.or(options.alpha).unwrap_or(default_alpha);
    if alpha == 0 {
        return Err(VisualPromptError::ZeroAlpha);
    }
    for (what, size) in [
        ("point radius", options.point_radius),
        ("arrow head size", options.arrow_head_size),
    ] {
        if let Some(v) = size
            && !(v.is_finite() && v > 0.0 && v <= MAX_COORDINATE)
        {
            return Err(VisualPromptError::InvalidSize { what, value: v });
        }
    }
    let line_width = match prompt.line_width.or(options.line_width) {
        Some(lw) if lw.is_finite() && lw > 0.0 && lw <= MAX_COORDINATE => lw,
        Some(lw) => return Err(VisualPromptError::InvalidLineWidth(lw)),
        None => default_line_width(w, h),
    };
    Ok((alpha, line_width))
}

fn check_values(shape: &'static str, values: &[f32]) -> Result<(), VisualPromptError> {
    for &v in values {
        if !v.is_finite() {
            return Err(VisualPromptError::NonFinite {
                shape,
                what: "a coordinate",
            });
        }
        if v.abs() > MAX_COORDINATE {
            return Err(VisualPromptError::CoordinateOutOfRange { shape, value: v });
        }
    }
    Ok(())
}

fn check_points(shape: &'static str, points: &[(f32, f32)], needed: usize) -> Result<(), VisualPromptError> {
    if points.len() < needed {
        return Err(VisualPromptError::TooFewPoints {
            shape,
            needed,
            got: points.len(),
        });
    }
    let flat: Vec<f32> = points.iter().flat_map(|&(x, y)| [x, y]).collect();
    check_values(shape, &flat)
}

/// Twice the signed area of a polygon (shoelace).
fn twice_area(points: &[(f32, f32)]) -> f64 {
    let n = points.len();
    (0..n)
        .map(|i| {
            let (x0, y0) = points[i];
            let (x1, y1) = points[(i + 1) % n];
            f64::from(x0) * f64::from(y1) - f64::from(x1) * f64::from(y0)
        })
        .sum()
}

fn validate_shape(shape: &Shape, w: u32, h: u32) -> Result<(), VisualPromptError> {
    let name = shape.name();
    match shape {
        Shape::Rectangle { x0, y0, x1, y1 } | Shape::Ellipse { x0, y0, x1, y1 } => {
            check_values(name, &[*x0, *y0, *x1, *y1])?;
            if x1 <= x0 || y1 <= y0 {
                return Err(VisualPromptError::UnorderedCorners {
                    shape: name,
                    x0: *x0,
                    y0: *y0,
                    x1: *x1,
                    y1: *y1,
                });
            }
        }
        Shape::Arrow { x0, y0, x1, y1 } => {
            check_values(name, &[*x0, *y0, *x1, *y1])?;
            if x0 == x1 && y0 == y1 {
                return Err(VisualPromptError::Degenerate {
                    shape: name,
                    reason: "tail and tip coincide",
                });
            }
        }
        Shape::Triangle { points } => {
            check_points(name, points, 3)?;
            if twice_area(points).abs() < 1e-6 {
                return Err(VisualPromptError::Degenerate {
                    shape: name,
                    reason: "the points are collinear",
                });
            }
        }
        Shape::Point { x, y } => check_values(name, &[*x, *y])?,
        Shape::Scribble { points } => {
            check_points(name, points, 2)?;
            if points.iter().all(|p| *p == points[0]) {
                return Err(VisualPromptError::Degenerate {
                    shape: name,
                    reason: "all points coincide",
                });
            }
        }
        Shape::Mask { polygon } | Shape::MaskContour { polygon } => {
            check_points(name, polygon, 3)?;
            if twice_area(polygon).abs() < 1e-6 {
                return Err(VisualPromptError::Degenerate {
                    shape: name,
                    reason: "the polygon has no area",
                });
            }
        }
        Shape::MaskImage(mask) | Shape::MaskContourImage(mask) => {
            if mask.dimensions() != (w, h) {
                return Err(VisualPromptError::MaskSizeMismatch {
                    mask_width: mask.width(),
                    mask_height: mask.height(),
                    image_width: w,
                    image_height: h,
                });
            }
            if !mask.as_raw().iter().any(|&v| v > MASK_THRESHOLD) {
                return Err(VisualPromptError::EmptyMask);
            }
        }
    }
    Ok(())
}
