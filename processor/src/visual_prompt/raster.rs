//! Coverage of a shape: the fraction of each pixel it covers (0..=255). The training style
//! ([`super::training`]) covers whole pixels as Pillow does; the smooth style fills paths
//! ([`super::geometry`]) anti-aliased with tiny-skia, thresholds mask images and takes
//! mask-image contours from [`super::contour`].

use tiny_skia::{Mask, Transform};

use super::contour::contour_band;
use super::geometry::fill_paths;
use super::training::training_coverage;
use super::{DrawOptions, MASK_THRESHOLD, MarkStyle, Shape, VisualPromptError};

/// Per-pixel coverage (0..=255, row-major `w`×`h`) of a validated shape drawn with line
/// width `lw` in the style of `options`.
pub(super) fn coverage(
    shape: &Shape,
    lw: f32,
    options: &DrawOptions,
    w: u32,
    h: u32,
) -> Result<Vec<u8>, VisualPromptError> {
    if options.style == MarkStyle::Training {
        return training_coverage(shape, lw, options, w, h);
    }
    match shape {
        Shape::MaskImage(mask) => return Ok(thresholded(mask)),
        Shape::MaskContourImage(mask) => return Ok(contour_band(mask, lw)),
        _ => {}
    }
    let mut canvas = Mask::new(w, h).ok_or(VisualPromptError::EmptyImage(w, h))?;
    for (path, rule) in fill_paths(shape, lw, options, w, h)? {
        canvas.fill_path(&path, rule, true, Transform::identity());
    }
    Ok(canvas.take())
}

/// A filled mask image's coverage, the same in both styles: 255 above
/// [`MASK_THRESHOLD`], 0 elsewhere.
pub(super) fn thresholded(mask: &image::GrayImage) -> Vec<u8> {
    mask.as_raw()
        .iter()
        .map(|&v| if v > MASK_THRESHOLD { 255 } else { 0 })
        .collect()
}
