//! Blending the marks onto the image as the original does: one layer per prompt,
//! alpha-composited with Pillow's integer arithmetic.

use image::{DynamicImage, RgbImage};

use super::raster::coverage;
use super::validate::resolve;
use super::{DrawOptions, VisualPrompt, VisualPromptError};

/// Draw the prompts, in order, onto `image` (converted to RGB as transformers does, see
/// [`crate::image::to_rgb`]) at its original resolution. All prompts are validated first;
/// nothing is drawn if one is invalid.
pub fn draw(
    image: &DynamicImage,
    prompts: &[VisualPrompt],
    options: &DrawOptions,
) -> Result<RgbImage, VisualPromptError> {
    let mut rgb = crate::image::to_rgb(image);
    draw_on_rgb(&mut rgb, prompts, options)?;
    Ok(rgb)
}

/// [`draw`] in place on an RGB image.
pub fn draw_on_rgb(
    image: &mut RgbImage,
    prompts: &[VisualPrompt],
    options: &DrawOptions,
) -> Result<(), VisualPromptError> {
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 {
        return Err(VisualPromptError::EmptyImage(w, h));
    }
    let resolved = prompts
        .iter()
        .map(|p| resolve(p, options, w, h).map(|r| (p, r)))
        .collect::<Result<Vec<_>, _>>()?;
    for (prompt, (alpha, line_width)) in resolved {
        let cov = coverage(&prompt.shape, line_width, w, h)?;
        let c = prompt.colour;
        for (px, &cv) in image.pixels_mut().zip(cov.iter()) {
            if cv == 0 {
                continue;
            }
            // The RGBA layer's alpha, 8-bit like Pillow's layer.
            let a = ((u32::from(alpha) * u32::from(cv) + 127) / 255) as u8;
            px.0 = [
                composite(c.r, px.0[0], a),
                composite(c.g, px.0[1], a),
                composite(c.b, px.0[2], a),
            ];
        }
    }
    Ok(())
}

/// [`draw`], returning the image type preprocessing takes
/// ([`crate::image::preprocess`], the facade pipeline's `prepare`), so a prompted image
/// goes straight on.
pub fn draw_image(
    image: &DynamicImage,
    prompts: &[VisualPrompt],
    options: &DrawOptions,
) -> Result<DynamicImage, VisualPromptError> {
    draw(image, prompts, options).map(DynamicImage::ImageRgb8)
}

/// One pixel channel of Pillow's `alpha_composite(opaque dst, src with alpha a)`.
#[inline]
fn composite(src: u8, dst: u8, a: u8) -> u8 {
    const PRECISION_BITS: u32 = 7;
    // With an opaque destination Pillow's coefficients reduce to a·128 and (255 − a)·128.
    let coef1 = u32::from(a) << PRECISION_BITS;
    let coef2 = (255 - u32::from(a)) << PRECISION_BITS;
    let tmp = u32::from(src) * coef1 + u32::from(dst) * coef2 + (0x80 << PRECISION_BITS);
    ((((tmp >> 8) + tmp) >> 8) >> PRECISION_BITS) as u8
}
