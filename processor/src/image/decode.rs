//! Image decoding that yields what Pillow's `Image.open` yields.
//!
//! PNG files are decoded with the `png` crate without its transformations and then
//! unpacked the way Pillow's `PngImagePlugin` does, including its `tRNS` quirks (the
//! transparent key is compared with 8-bit samples using the low byte of the key).
//! The result uses the [`DynamicImage`] variant that corresponds to Pillow's mode:
//!
//! | PNG                         | Pillow mode | here                              |
//! |-----------------------------|-------------|-----------------------------------|
//! | gray 1/2/4/8 bit            | `1` / `L`   | `Luma8` (low depths scaled up)     |
//! | gray 16 bit                 | `I;16`      | `Luma16`                          |
//! | RGB 8/16 bit                | `RGB`       | `Rgb8` (16 bit: high byte)        |
//! | palette                     | `P`         | `Rgb8` (palette applied)          |
//! | gray+alpha 8 bit            | `LA`        | `LumaA8`                          |
//! | gray+alpha 16, RGBA 8/16    | `RGBA`      | `Rgba8` (16 bit: high byte)       |
//! | any of the above with `tRNS`| `.info["transparency"]` | `LumaA8` / `Rgba8` with the alpha Pillow's `convert("RGBA")` gives |
//!
//! JPEG is decoded by libjpeg-turbo's decoder (bundled C code, through the `mozjpeg`
//! crate; cargo feature `libjpeg`, on by default), as Pillow does, with Pillow's settings
//! (integer IDCT, fancy upsampling): the pixels are bit-identical. CMYK/YCCK JPEGs, and
//! every JPEG when the feature is off or [`JpegDecoder::PureRust`] is asked for, go
//! through the `image` crate's zune-jpeg, which differs from libjpeg-turbo by up to 3
//! levels on 4:2:0 chroma. Other formats go
//! through the `image` crate. EXIF orientation is not applied: transformers' processor
//! does not apply it either.

use std::io::Cursor;
use std::path::Path;

use image::{
    DynamicImage, GrayAlphaImage, GrayImage, ImageBuffer, ImageDecoder, ImageReader, RgbImage, RgbaImage,
};

use super::ImageError;

/// Pillow's `Image.MAX_IMAGE_PIXELS` (`1024 * 1024 * 1024 // 4 // 3`): above it Pillow warns
/// of a possible decompression bomb.
pub const MAX_IMAGE_PIXELS: u64 = 89_478_485;

/// The default decode limit: twice [`MAX_IMAGE_PIXELS`], where Pillow raises
/// `DecompressionBombError` instead of warning.
pub const DEFAULT_MAX_PIXELS: u64 = 2 * MAX_IMAGE_PIXELS;

/// Read and decode an image file like `PIL.Image.open(path)`, refusing images larger than
/// [`DEFAULT_MAX_PIXELS`] before allocating their pixels.
pub fn load_image(path: &Path) -> Result<DynamicImage, ImageError> {
    load_image_with_limit(path, DEFAULT_MAX_PIXELS)
}

/// [`load_image`] with an explicit pixel-count limit (width * height).
pub fn load_image_with_limit(path: &Path, max_pixels: u64) -> Result<DynamicImage, ImageError> {
    let bytes = std::fs::read(path).map_err(|source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_image_with(
        &bytes,
        &path.display().to_string(),
        max_pixels,
        JpegDecoder::default(),
    )
}

/// Decode an in-memory encoded image (PNG, JPEG, GIF, BMP, WebP, TIFF) like
/// `PIL.Image.open(io.BytesIO(bytes))`, with the [`DEFAULT_MAX_PIXELS`] limit.
pub fn decode_image(bytes: &[u8]) -> Result<DynamicImage, ImageError> {
    decode_image_with(bytes, "<memory>", DEFAULT_MAX_PIXELS, JpegDecoder::default())
}

/// [`decode_image`] with an explicit pixel-count limit (width * height).
pub fn decode_image_with_limit(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, ImageError> {
    decode_image_with(bytes, "<memory>", max_pixels, JpegDecoder::default())
}

/// Which decoder reads JPEG files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JpegDecoder {
    /// libjpeg-turbo's, Pillow's own: bit-identical pixels. Needs the `libjpeg` feature
    /// (on by default); without it, and for CMYK/YCCK files, zune-jpeg decodes.
    #[default]
    Libjpeg,
    /// zune-jpeg (pure Rust, the `image` crate's): up to 3 levels off on 4:2:0 chroma.
    PureRust,
}

/// [`decode_image_with_limit`] with a choice of JPEG decoder.
pub fn decode_image_with_decoder(
    bytes: &[u8],
    max_pixels: u64,
    jpeg: JpegDecoder,
) -> Result<DynamicImage, ImageError> {
    decode_image_with(bytes, "<memory>", max_pixels, jpeg)
}

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

fn decode_image_with(
    bytes: &[u8],
    what: &str,
    max_pixels: u64,
    jpeg: JpegDecoder,
) -> Result<DynamicImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::EmptyInput {
            what: what.to_string(),
        });
    }
    if bytes.starts_with(PNG_SIGNATURE) {
        return decode_png(bytes, what, max_pixels);
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| decode_error(what, "unknown", e.to_string()))?;
    let Some(format) = reader.format() else {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        return Err(ImageError::UnknownFormat {
            what: what.to_string(),
            magic: head.join(" "),
        });
    };
    let format_name = format.extensions_str().first().copied().unwrap_or("image");
    if format == image::ImageFormat::Jpeg && jpeg_is_truncated(bytes) {
        // zune-jpeg fills missing data with grey; Pillow raises "image file is truncated".
        return Err(decode_error(
            what,
            format_name,
            "truncated: no end-of-image marker after the last scan".into(),
        ));
    }
    #[cfg(not(feature = "libjpeg"))]
    let _ = jpeg; // zune-jpeg decodes every JPEG
    #[cfg(feature = "libjpeg")]
    if format == image::ImageFormat::Jpeg
        && jpeg == JpegDecoder::Libjpeg
        && let Some(img) = libjpeg::decode(bytes, what, max_pixels)?
    {
        return Ok(img);
    }
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| decode_error(what, format_name, e.to_string()))?;
    let (width, height) = decoder.dimensions();
    check_dimensions(what, width, height, max_pixels)?;
    let mut limits = image::Limits::default();
    // Never allocate more than the largest legal image in the widest pixel format
    // (RGBA f32) plus slack, even if the header lied about the size.
    limits.max_alloc = Some(max_pixels.saturating_mul(16).saturating_add(1 << 26));
    decoder
        .set_limits(limits)
        .map_err(|e| decode_error(what, format_name, e.to_string()))?;
    DynamicImage::from_decoder(decoder).map_err(|e| decode_error(what, format_name, e.to_string()))
}

fn decode_error(what: &str, format: &str, message: String) -> ImageError {
    ImageError::Decode {
        what: what.to_string(),
        format: format.to_string(),
        message,
    }
}

fn check_dimensions(what: &str, width: u32, height: u32, max_pixels: u64) -> Result<(), ImageError> {
    if width == 0 || height == 0 {
        return Err(ImageError::ZeroSize { width, height });
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(ImageError::TooManyPixels {
            what: what.to_string(),
            width,
            height,
            limit: max_pixels,
        });
    }
    Ok(())
}

/// Decode a PNG into the Pillow-equivalent representation described in the module docs.
fn decode_png(bytes: &[u8], what: &str, max_pixels: u64) -> Result<DynamicImage, ImageError> {
    let err = |e: png::DecodingError| decode_error(what, "png", e.to_string());
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let (width, height) = {
        let header = decoder.read_header_info().map_err(err)?;
        (header.width, header.height)
    };
    check_dimensions(what, width, height, max_pixels)?;
    let mut reader = decoder.read_info().map_err(err)?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| decode_error(what, "png", "decoded size overflows memory".to_string()))?;
    let mut buf = vec![0u8; size];
    let frame = reader.next_frame(&mut buf).map_err(err)?;
    let info = reader.info();
    let (w, h) = (frame.width, frame.height);
    check_dimensions(what, w, h, max_pixels)?;
    let line = frame.line_size;
    let rows = buf.chunks_exact(line).take(h as usize);
    let n = w as usize * h as usize;
    let trns = info.trns.as_deref();
    let be16 = |s: &[u8], i: usize| u16::from_be_bytes([s[2 * i], s[2 * i + 1]]);
    // Pillow reads the tRNS key as 16-bit values and compares the low byte of each with the
    // 8-bit samples (`rgbT2a`). The png crate keeps 2 bytes per sample for 16-bit images
    // and only the low byte otherwise.
    let wide = frame.bit_depth == png::BitDepth::Sixteen;
    let key = |i: usize| -> Option<u8> {
        let t = trns?;
        if wide {
            t.get(2 * i + 1).copied()
        } else {
            t.get(i).copied()
        }
    };
    let too_short = || decode_error(what, "png", "pixel data shorter than the image size".to_string());

    use png::{BitDepth, ColorType};
    let img = match (frame.color_type, frame.bit_depth) {
        (ColorType::Grayscale, BitDepth::Sixteen) => {
            let mut v = Vec::with_capacity(n);
            for row in rows {
                v.extend((0..w as usize).map(|x| be16(row, x)));
            }
            let gray: ImageBuffer<image::Luma<u16>, Vec<u16>> =
                ImageBuffer::from_raw(w, h, v).ok_or_else(too_short)?;
            match key(0) {
                // Pillow mode I;16; with a key, `convert("RGBA")` first clamps to 8 bits.
                None => DynamicImage::ImageLuma16(gray),
                Some(key) => {
                    let la = GrayAlphaImage::from_fn(w, h, |x, y| {
                        let g = gray.get_pixel(x, y).0[0].min(255) as u8;
                        image::LumaA([g, if g == key { 0 } else { 255 }])
                    });
                    DynamicImage::ImageLumaA8(la)
                }
            }
        }
        (ColorType::Grayscale, depth) => {
            let bits = depth as u8;
            let mut v = Vec::with_capacity(n);
            for row in rows {
                unpack_low_depth(row, w as usize, bits, &mut v, |s| scale_gray(s, bits));
            }
            if v.len() != n {
                return Err(too_short());
            }
            match key(0) {
                None => DynamicImage::ImageLuma8(GrayImage::from_raw(w, h, v).ok_or_else(too_short)?),
                Some(low) => {
                    // Pillow mode "1" stores the key as 0/255, mode "L" as the raw value
                    // (not scaled to 8 bits like the samples).
                    let key = if bits == 1 {
                        if low != 0 { 255 } else { 0 }
                    } else {
                        low
                    };
                    let la: Vec<u8> = v
                        .iter()
                        .flat_map(|&g| [g, if g == key { 0 } else { 255 }])
                        .collect();
                    DynamicImage::ImageLumaA8(GrayAlphaImage::from_raw(w, h, la).ok_or_else(too_short)?)
                }
            }
        }
        (ColorType::Rgb, depth) => {
            let mut v = Vec::with_capacity(n * 3);
            for row in rows {
                match depth {
                    BitDepth::Sixteen => v.extend(row.chunks_exact(2).take(w as usize * 3).map(|s| s[0])),
                    _ => v.extend_from_slice(&row[..(w as usize * 3).min(row.len())]),
                }
            }
            let rgb = RgbImage::from_raw(w, h, v).ok_or_else(too_short)?;
            match (key(0), key(1), key(2)) {
                (Some(r), Some(g), Some(b)) => DynamicImage::ImageRgba8(RgbaImage::from_fn(w, h, |x, y| {
                    let p = rgb.get_pixel(x, y).0;
                    image::Rgba([p[0], p[1], p[2], if p == [r, g, b] { 0 } else { 255 }])
                })),
                _ => DynamicImage::ImageRgb8(rgb),
            }
        }
        (ColorType::Indexed, depth) => {
            let palette = info.palette.as_deref().unwrap_or(&[]);
            let bits = depth as u8;
            let mut idx = Vec::with_capacity(n);
            for row in rows {
                unpack_low_depth(row, w as usize, bits, &mut idx, |s| s);
            }
            if idx.len() != n {
                return Err(too_short());
            }
            // Entries past the palette are black (Pillow's zero-initialised palette).
            let colour = |i: u8| -> [u8; 3] {
                let i = usize::from(i);
                palette
                    .get(3 * i..3 * i + 3)
                    .map_or([0, 0, 0], |c| [c[0], c[1], c[2]])
            };
            match trns {
                None => {
                    let v: Vec<u8> = idx.iter().flat_map(|&i| colour(i)).collect();
                    DynamicImage::ImageRgb8(RgbImage::from_raw(w, h, v).ok_or_else(too_short)?)
                }
                Some(alphas) => {
                    let v: Vec<u8> = idx
                        .iter()
                        .flat_map(|&i| {
                            let [r, g, b] = colour(i);
                            [r, g, b, alphas.get(usize::from(i)).copied().unwrap_or(255)]
                        })
                        .collect();
                    DynamicImage::ImageRgba8(RgbaImage::from_raw(w, h, v).ok_or_else(too_short)?)
                }
            }
        }
        (ColorType::GrayscaleAlpha, BitDepth::Sixteen) => {
            // Pillow opens this as RGBA from the high bytes ("LA;16B").
            let mut v = Vec::with_capacity(n * 4);
            for row in rows {
                for s in row.chunks_exact(4).take(w as usize) {
                    v.extend_from_slice(&[s[0], s[0], s[0], s[2]]);
                }
            }
            DynamicImage::ImageRgba8(RgbaImage::from_raw(w, h, v).ok_or_else(too_short)?)
        }
        (ColorType::GrayscaleAlpha, _) => {
            let mut v = Vec::with_capacity(n * 2);
            for row in rows {
                v.extend_from_slice(&row[..(w as usize * 2).min(row.len())]);
            }
            DynamicImage::ImageLumaA8(GrayAlphaImage::from_raw(w, h, v).ok_or_else(too_short)?)
        }
        (ColorType::Rgba, depth) => {
            let mut v = Vec::with_capacity(n * 4);
            for row in rows {
                match depth {
                    BitDepth::Sixteen => v.extend(row.chunks_exact(2).take(w as usize * 4).map(|s| s[0])),
                    _ => v.extend_from_slice(&row[..(w as usize * 4).min(row.len())]),
                }
            }
            DynamicImage::ImageRgba8(RgbaImage::from_raw(w, h, v).ok_or_else(too_short)?)
        }
    };
    Ok(img)
}

/// Pillow's `L;2` / `L;4` / `1` unpackers scale samples to the full 8-bit range.
fn scale_gray(sample: u8, bits: u8) -> u8 {
    match bits {
        1 => sample * 255,
        2 => sample * 0x55,
        4 => sample * 0x11,
        _ => sample,
    }
}

/// Unpack `width` samples of `bits` bits (MSB first) from one PNG row.
fn unpack_low_depth(row: &[u8], width: usize, bits: u8, out: &mut Vec<u8>, map: impl Fn(u8) -> u8) {
    if bits >= 8 {
        out.extend(row.iter().take(width).map(|&s| map(s)));
        return;
    }
    let per_byte = 8 / usize::from(bits);
    let mask = (1u16 << bits) as u8 - 1;
    let mut count = 0;
    'row: for &byte in row {
        for j in 0..per_byte {
            if count == width {
                break 'row;
            }
            let shift = 8 - usize::from(bits) * (j + 1);
            out.push(map((byte >> shift) & mask));
            count += 1;
        }
    }
}

/// A JPEG whose last scan (SOS marker `FF DA`) is not followed by an end-of-image marker
/// (`FF D9`). Neither byte pair can occur inside entropy-coded data (0xFF is stuffed), and
/// APPn payloads such as EXIF thumbnails come before the main image's scans.
fn jpeg_is_truncated(bytes: &[u8]) -> bool {
    let Some(sos) = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]) else {
        return true;
    };
    !bytes[sos..].windows(2).any(|w| w == [0xFF, 0xD9])
}

/// JPEG through libjpeg-turbo's decoder, the library Pillow links.
#[cfg(feature = "libjpeg")]
mod libjpeg {
    use image::{DynamicImage, GrayImage, RgbImage};
    use mozjpeg::{ColorSpace, Decompress};

    use super::{ImageError, check_dimensions, decode_error};

    /// Decoded like Pillow (`L` for grayscale, `RGB` for YCbCr/RGB files), or `None` for
    /// colour spaces left to the `image` crate (CMYK, YCCK). libjpeg reports fatal errors
    /// by unwinding (without the panic hook), which is caught here and turned into an error.
    pub(super) fn decode(
        bytes: &[u8],
        what: &str,
        max_pixels: u64,
    ) -> Result<Option<DynamicImage>, ImageError> {
        let result =
            std::panic::catch_unwind(|| -> std::io::Result<Result<Option<DynamicImage>, ImageError>> {
                let decompress = Decompress::new_mem(bytes)?;
                let (width, height) = (decompress.width(), decompress.height());
                let dims = (u32::try_from(width), u32::try_from(height));
                let (Ok(w), Ok(h)) = dims else {
                    return Ok(Err(ImageError::TooManyPixels {
                        what: what.to_string(),
                        width: u32::MAX,
                        height: u32::MAX,
                        limit: max_pixels,
                    }));
                };
                if let Err(e) = check_dimensions(what, w, h, max_pixels) {
                    return Ok(Err(e));
                }
                let image = match decompress.color_space() {
                    ColorSpace::JCS_GRAYSCALE => {
                        let mut started = decompress.grayscale()?;
                        let pixels: Vec<u8> = started.read_scanlines()?;
                        started.finish()?;
                        GrayImage::from_raw(w, h, pixels).map(DynamicImage::ImageLuma8)
                    }
                    ColorSpace::JCS_YCbCr | ColorSpace::JCS_RGB => {
                        let mut started = decompress.rgb()?;
                        let pixels: Vec<[u8; 3]> = started.read_scanlines()?;
                        started.finish()?;
                        RgbImage::from_raw(w, h, pixels.into_flattened()).map(DynamicImage::ImageRgb8)
                    }
                    _ => return Ok(Ok(None)),
                };
                Ok(image.map(Some).ok_or_else(|| {
                    decode_error(what, "jpg", "fewer scanlines than the header's height".into())
                }))
            });
        match result {
            Ok(Ok(decoded)) => decoded,
            Ok(Err(io)) => Err(decode_error(what, "jpg", io.to_string())),
            Err(payload) => {
                let message = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "libjpeg error".to_string());
                Err(decode_error(what, "jpg", message))
            }
        }
    }
}
