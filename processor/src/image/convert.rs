//! transformers' `convert_to_rgb` for PIL images, reproduced on [`DynamicImage`].
//!
//! transformers 5.x (`image_transforms.convert_to_rgb`) composites any transparency onto
//! opaque white with `PIL.Image.alpha_composite`, then drops alpha; images without
//! transparency go through a plain `convert("RGB")`. Pillow's conversions that matter:
//! grayscale is replicated into three channels, 16-bit RGB(A) keeps the high byte, and
//! 16-bit grayscale (mode `I;16`) is *clamped* to 255, not scaled (so a typical 16-bit
//! grayscale PNG comes out nearly white, in transformers as here).

use image::{DynamicImage, Rgb, RgbImage};

/// Pillow's `SHIFTFORDIV255`: a rounded division by 255 for the values that occur here.
#[inline]
fn shift_for_div255(a: u32) -> u32 {
    ((a >> 8) + a) >> 8
}

/// One pixel of `PIL.Image.alpha_composite(white, rgba)`, in Pillow's integer arithmetic.
#[inline]
pub(crate) fn composite_on_white(r: u8, g: u8, b: u8, a: u8) -> [u8; 3] {
    const PRECISION_BITS: u32 = 7;
    let (dst_c, dst_a) = (255u32, 255u32);
    if a == 0 {
        return [255, 255, 255];
    }
    let sa = u32::from(a);
    let blend = dst_a * (255 - sa);
    let outa255 = sa * 255 + blend;
    let coef1 = sa * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let mix = |c: u8| {
        let tmp = u32::from(c) * coef1 + dst_c * coef2;
        (shift_for_div255(tmp + (0x80 << PRECISION_BITS)) >> PRECISION_BITS) as u8
    };
    [mix(r), mix(g), mix(b)]
}

/// Convert to 8-bit RGB exactly like transformers' PIL-backend `convert_to_rgb` on the
/// image Pillow would have opened (see [`super::load_image`] for the mode mapping).
///
/// - RGB: unchanged; grayscale: replicated into three channels.
/// - gray+alpha / RGBA: alpha-composited onto white with Pillow's integer arithmetic.
/// - 16-bit RGB(A) and gray+alpha: high byte (Pillow's `;16B` raw modes).
/// - 16-bit grayscale (Pillow `I;16`): values above 255 clamp to 255.
/// - 32-bit float images (not produced by Pillow's decoders): clamped to `[0, 1]` and
///   rounded to 8 bits, then as above.
pub fn to_rgb(img: &DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb.clone(),
        DynamicImage::ImageLuma8(l) => RgbImage::from_fn(w, h, |x, y| {
            let v = l.get_pixel(x, y).0[0];
            Rgb([v, v, v])
        }),
        DynamicImage::ImageLumaA8(la) => RgbImage::from_fn(w, h, |x, y| {
            let [v, a] = la.get_pixel(x, y).0;
            Rgb(composite_on_white(v, v, v, a))
        }),
        DynamicImage::ImageRgba8(rgba) => RgbImage::from_fn(w, h, |x, y| {
            let [r, g, b, a] = rgba.get_pixel(x, y).0;
            Rgb(composite_on_white(r, g, b, a))
        }),
        DynamicImage::ImageLuma16(l) => RgbImage::from_fn(w, h, |x, y| {
            let v = l.get_pixel(x, y).0[0].min(255) as u8;
            Rgb([v, v, v])
        }),
        DynamicImage::ImageLumaA16(la) => RgbImage::from_fn(w, h, |x, y| {
            let [v, a] = la.get_pixel(x, y).0.map(|s| (s >> 8) as u8);
            Rgb(composite_on_white(v, v, v, a))
        }),
        DynamicImage::ImageRgb16(rgb) => {
            RgbImage::from_fn(w, h, |x, y| Rgb(rgb.get_pixel(x, y).0.map(|s| (s >> 8) as u8)))
        }
        DynamicImage::ImageRgba16(rgba) => RgbImage::from_fn(w, h, |x, y| {
            let [r, g, b, a] = rgba.get_pixel(x, y).0.map(|s| (s >> 8) as u8);
            Rgb(composite_on_white(r, g, b, a))
        }),
        DynamicImage::ImageRgb32F(_) => img.to_rgb8(),
        other => {
            let rgba = other.to_rgba8();
            RgbImage::from_fn(w, h, |x, y| {
                let [r, g, b, a] = rgba.get_pixel(x, y).0;
                Rgb(composite_on_white(r, g, b, a))
            })
        }
    }
}

/// The image as Pillow mode `RGB` without any conversion (the `do_convert_rgb = false`
/// path), or `None` when it is not an RGB image.
pub(crate) fn as_pil_rgb(img: &DynamicImage) -> Option<RgbImage> {
    match img {
        DynamicImage::ImageRgb8(rgb) => Some(rgb.clone()),
        DynamicImage::ImageRgb16(_) => Some(to_rgb(img)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_and_transparent_pixels() {
        for v in 0..=255u8 {
            assert_eq!(composite_on_white(v, v / 2, 255 - v, 255), [v, v / 2, 255 - v]);
            assert_eq!(composite_on_white(v, 0, 3, 0), [255, 255, 255]);
        }
        // Half transparent black on white is mid grey.
        assert_eq!(composite_on_white(0, 0, 0, 128), [127, 127, 127]);
    }
}
