//! Coverage of a shape: the fraction of each pixel it covers (0..=255). Paths
//! ([`super::geometry`]) are filled anti-aliased by tiny-skia; mask images are
//! thresholded; mask-image contours come from [`super::contour`].

use tiny_skia::{Mask, Transform};

use super::contour::contour_band;
use super::geometry::fill_paths;
use super::{MASK_THRESHOLD, Shape, VisualPromptError};

/// Per-pixel coverage (0..=255, row-major `w`×`h`) of a validated shape.
pub(super) fn coverage(shape: &Shape, lw: f32, w: u32, h: u32) -> Result<Vec<u8>, VisualPromptError> {
    match shape {
        Shape::MaskImage(mask) => {
            return Ok(mask
                .as_raw()
                .iter()
                .map(|&v| if v > MASK_THRESHOLD { 255 } else { 0 })
                .collect());
        }
        Shape::MaskContourImage(mask) => return Ok(contour_band(mask, lw)),
        _ => {}
    }
    let mut canvas = Mask::new(w, h).ok_or(VisualPromptError::EmptyImage(w, h))?;
    for (path, rule) in fill_paths(shape, lw, w, h)? {
        canvas.fill_path(&path, rule, true, Transform::identity());
    }
    Ok(canvas.take())
}
