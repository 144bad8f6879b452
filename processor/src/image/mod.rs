//! CLIP image preprocessing, bit-exact with transformers 5.x `CLIPImageProcessorPil`
//! (`AutoProcessor.from_pretrained(dir, backend="pil")`).
//!
//! The pipeline, as transformers' `PilBackend` runs it on one image:
//!
//! 1. [`to_rgb`]: composite transparency onto white, expand grayscale (Pillow semantics).
//! 2. resize with Pillow's fixed-point convolution ([`resize_pil`]) to the size from
//!    [`output_size`] (shortest edge 336 for ViP-LLaVA, long side `int(336 * long / short)`).
//! 3. center crop with `top = (h - crop_h) // 2`, zero-padding if the image is smaller
//!    ([`center_crop`]).
//! 4. rescale in `f64` (`u8 as f64 * 1/255`), round to `f32`, normalise in `f32`
//!    (`(x - mean) / std`), channels first.
//!
//! ```no_run
//! use vipllava_processor::image::{load_image, preprocess, ImageProcessorConfig};
//! # fn main() -> Result<(), vipllava_processor::image::ImageError> {
//! let cfg = ImageProcessorConfig::from_model_dir("vip-llava-7b-hf".as_ref())?;
//! let img = load_image("photo.png".as_ref())?;
//! let pixels = preprocess(&img, &cfg)?; // [3, 336, 336], CHW f32
//! # Ok(()) }
//! ```

mod config;
mod convert;
mod decode;
mod resample;
mod window;

use std::path::PathBuf;

use image::{DynamicImage, RgbImage};

pub use config::{HeightWidth, ImageProcessorConfig, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Size};
pub use convert::to_rgb;
pub use decode::{
    DEFAULT_MAX_PIXELS, JpegDecoder, MAX_IMAGE_PIXELS, decode_image, decode_image_with_decoder,
    decode_image_with_limit, load_image, load_image_with_limit,
};
pub use resample::{Resample, resize_pil};
pub use window::{CropWindow, crop_window};

/// Errors of image loading, configuration and preprocessing.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The input holds no bytes.
    #[error("{what} is empty (0 bytes), not an image")]
    EmptyInput {
        /// File name or `<memory>`.
        what: String,
    },
    /// The bytes are not in a known image format.
    #[error("{what} is not a recognised image (PNG, JPEG, GIF, BMP, WebP, TIFF); it starts with {magic}")]
    UnknownFormat {
        /// File name or `<memory>`.
        what: String,
        /// The first bytes, in hex.
        magic: String,
    },
    /// The decoder failed (corrupt or truncated data, unsupported variant).
    #[error("cannot decode {format} image {what}: {message}")]
    Decode {
        /// File name or `<memory>`.
        what: String,
        /// The detected format.
        format: String,
        /// The decoder's message.
        message: String,
    },
    /// The image is larger than the decompression-bomb limit.
    #[error(
        "{what} is {width}x{height} pixels, more than the limit of {limit} pixels \
         (decompression-bomb guard, as Pillow's MAX_IMAGE_PIXELS); use load_image_with_limit to raise it"
    )]
    TooManyPixels {
        /// File name or `<memory>`.
        what: String,
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
        /// The limit in pixels.
        limit: u64,
    },
    /// An image (or a computed size) has no pixels.
    #[error("image has zero size ({width}x{height})")]
    ZeroSize {
        /// Width.
        width: u32,
        /// Height.
        height: u32,
    },
    /// The resize target computed from the config is unusable (zero or too large).
    #[error("cannot resize a {in_width}x{in_height} image to {out_width}x{out_height}: {reason}")]
    BadResize {
        /// Input width.
        in_width: u32,
        /// Input height.
        in_height: u32,
        /// Computed output width.
        out_width: u64,
        /// Computed output height.
        out_height: u64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// `do_convert_rgb` is false but the image is not RGB.
    #[error(
        "do_convert_rgb is false but the image is {color:?}, not 8/16-bit RGB; transformers would produce a \
         tensor with the wrong number of channels"
    )]
    NotRgb {
        /// The image's colour type.
        color: image::ColorType,
    },
    /// No image-processor settings in a model directory.
    #[error(
        "no image processor config in {dir}: expected processor_config.json with an \"image_processor\" \
         object or preprocessor_config.json"
    )]
    ConfigMissing {
        /// The directory.
        dir: PathBuf,
    },
    /// A config file is not valid JSON.
    #[error("cannot parse {path} as JSON: {message}")]
    ConfigJson {
        /// The file (or `<string>`).
        path: String,
        /// The parser's message.
        message: String,
    },
    /// A config value is missing, of the wrong type or out of range.
    #[error("invalid image processor config{}: {field}: {message}", file.as_deref().map(|f| format!(" in {f}")).unwrap_or_default())]
    InvalidConfig {
        /// The file, when known.
        file: Option<String>,
        /// The offending field.
        field: String,
        /// What is wrong.
        message: String,
    },
}

impl ImageError {
    /// Attach the config file name to an [`ImageError::InvalidConfig`].
    fn in_file(self, path: &str) -> Self {
        match self {
            Self::InvalidConfig { field, message, .. } => Self::InvalidConfig {
                file: Some(path.to_string()),
                field,
                message,
            },
            other => other,
        }
    }
}

/// The processed image: `pixel_values[0]` of transformers, channels first (`[C, H, W]`).
#[derive(Clone, Debug, PartialEq)]
pub struct PixelValues {
    /// `channels * height * width` values in CHW order.
    pub data: Vec<f32>,
    /// Number of channels (3).
    pub channels: usize,
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
}

impl PixelValues {
    /// The shape `[channels, height, width]`.
    pub fn shape(&self) -> [usize; 3] {
        [self.channels, self.height, self.width]
    }
}

/// Largest image the resize step may produce (Pillow's bomb-error threshold).
const MAX_OUTPUT_PIXELS: u64 = DEFAULT_MAX_PIXELS;

/// The `(height, width)` transformers' PIL backend resizes an `in_height x in_width` image
/// to (`get_resize_output_image_size` with `default_to_square=False`,
/// `get_size_with_aspect_ratio`, `get_image_size_for_max_height_width`).
/// Values are unclamped; zero or huge results are rejected by [`resize_and_crop`].
pub fn output_size(in_height: u32, in_width: u32, size: Size) -> (u64, u64) {
    let (h, w) = (u64::from(in_height), u64::from(in_width));
    // Python's int(float) truncates toward zero; results here are non-negative.
    let trunc = |v: f64| if v.is_finite() && v > 0.0 { v as u64 } else { 0 };
    match size {
        Size::Exact { height, width } => (u64::from(height), u64::from(width)),
        Size::ShortestEdge {
            shortest_edge,
            longest_edge: None,
        } => {
            let s = u64::from(shortest_edge);
            let (short, long) = if w <= h { (w, h) } else { (h, w) };
            if short == 0 {
                return (0, 0);
            }
            // `int(size * long / short)`: exact integer product, correctly rounded division.
            let new_long = trunc((s * long) as f64 / short as f64);
            if w <= h { (new_long, s) } else { (s, new_long) }
        }
        Size::ShortestEdge {
            shortest_edge,
            longest_edge: Some(max_size),
        } => {
            let mut size = u64::from(shortest_edge);
            let mut raw_size = None;
            let (min_o, max_o) = (h.min(w) as f64, h.max(w) as f64);
            if min_o == 0.0 {
                return (0, 0);
            }
            if max_o / min_o * size as f64 > f64::from(max_size) {
                let raw = f64::from(max_size) * min_o / max_o;
                raw_size = Some(raw);
                size = trunc(raw.round_ties_even());
            }
            if (h <= w && h == size) || (w <= h && w == size) {
                (h, w)
            } else if w < h {
                let oh = match raw_size {
                    Some(raw) => trunc(raw * h as f64 / w as f64),
                    None => trunc((size * h) as f64 / w as f64),
                };
                (oh, size)
            } else {
                let ow = match raw_size {
                    Some(raw) => trunc(raw * w as f64 / h as f64),
                    None => trunc((size * w) as f64 / h as f64),
                };
                (size, ow)
            }
        }
        Size::MaxHeightWidth {
            max_height,
            max_width,
        } => {
            if h == 0 || w == 0 {
                return (0, 0);
            }
            let scale = (f64::from(max_height) / h as f64).min(f64::from(max_width) / w as f64);
            (trunc(h as f64 * scale), trunc(w as f64 * scale))
        }
    }
}

/// transformers' `center_crop` on an 8-bit image: `top = (h - crop_h) // 2` (floor), and
/// when the crop is larger than the image along an axis, the image is placed at offset
/// `ceil((crop - size) / 2)` on a black (zero) canvas.
pub fn center_crop(img: &RgbImage, crop: HeightWidth) -> RgbImage {
    let (h, w) = (i64::from(img.height()), i64::from(img.width()));
    let (ch, cw) = (i64::from(crop.height), i64::from(crop.width));
    // Output pixel (y, x) reads source pixel (y + top, x + left) or zero. For the padded
    // case transformers' arithmetic reduces to top = -ceil((ch - h) / 2).
    let offset = |size: i64, c: i64| {
        if size >= c {
            (size - c).div_euclid(2)
        } else {
            -((c - size + 1) / 2)
        }
    };
    let (top, left) = (offset(h, ch), offset(w, cw));
    RgbImage::from_fn(crop.width, crop.height, |x, y| {
        let (sy, sx) = (i64::from(y) + top, i64::from(x) + left);
        if (0..h).contains(&sy) && (0..w).contains(&sx) {
            *img.get_pixel(sx as u32, sy as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

/// The background of the original ViP-LLaVA / LLaVA-1.5 `expand2square` padding:
/// `tuple(int(x * 255) for x in image_mean)` with CLIP's mean.
pub const LLAVA_PAD_COLOR: [u8; 3] = [122, 116, 104];

/// LLaVA's `expand2square` (`image_aspect_ratio: pad`, how ViP-LLaVA was trained): paste
/// the image onto a square canvas of `background`, centred along the short axis at
/// `(long - short) // 2`, so that the processor's center crop removes nothing (and no
/// visual prompt drawn near an edge is cut away).
pub fn expand_to_square(img: &RgbImage, background: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == h {
        return img.clone();
    }
    let side = w.max(h);
    let (dx, dy) = if w > h { (0, (w - h) / 2) } else { ((h - w) / 2, 0) };
    let mut out = RgbImage::from_pixel(side, side, image::Rgb(background));
    for (x, y, p) in img.enumerate_pixels() {
        out.put_pixel(x + dx, y + dy, *p);
    }
    out
}

/// Steps 1-3 of the pipeline: RGB conversion, resize and center crop, still in 8 bits
/// (what the model sees, before rescale and normalisation).
pub fn resize_and_crop(img: &DynamicImage, cfg: &ImageProcessorConfig) -> Result<RgbImage, ImageError> {
    cfg.validate()?;
    let (w, h) = (img.width(), img.height());
    if w == 0 || h == 0 {
        return Err(ImageError::ZeroSize { width: w, height: h });
    }
    let mut rgb = if cfg.do_convert_rgb {
        to_rgb(img)
    } else {
        convert::as_pil_rgb(img).ok_or(ImageError::NotRgb { color: img.color() })?
    };
    if cfg.do_resize {
        let (oh, ow) = output_size(h, w, cfg.size);
        let bad = |reason| ImageError::BadResize {
            in_width: w,
            in_height: h,
            out_width: ow,
            out_height: oh,
            reason,
        };
        if oh == 0 || ow == 0 {
            return Err(bad("the computed size is zero (extreme aspect ratio)"));
        }
        if oh.saturating_mul(ow) > MAX_OUTPUT_PIXELS || oh > u64::from(u32::MAX) || ow > u64::from(u32::MAX) {
            return Err(bad(
                "the computed size exceeds the pixel limit (extreme aspect ratio)",
            ));
        }
        rgb = resize_pil(&rgb, ow as u32, oh as u32, cfg.resample);
    }
    if cfg.do_center_crop {
        rgb = center_crop(&rgb, cfg.crop_size);
    }
    Ok(rgb)
}

/// Step 4: rescale and normalise an 8-bit RGB image into CHW `f32`, with transformers'
/// precision (`f32(f64(v) * rescale_factor)`, then `(x - mean) / std` in `f32`), then
/// `do_pad` (zeros at the bottom and right).
pub fn rescale_normalize(img: &RgbImage, cfg: &ImageProcessorConfig) -> Result<PixelValues, ImageError> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    // The value of every 8-bit level per channel: 768 evaluations instead of one per pixel,
    // each computed exactly as transformers computes it.
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, out) in table.iter_mut().enumerate() {
            let mut x = if cfg.do_rescale {
                (v as f64 * cfg.rescale_factor) as f32
            } else {
                v as f32
            };
            if cfg.do_normalize {
                x = (x - cfg.image_mean[c]) / cfg.image_std[c];
            }
            *out = x;
        }
    }
    let (out_h, out_w) = match (cfg.do_pad, cfg.pad_size) {
        (true, Some(p)) => {
            let (ph, pw) = (p.height as usize, p.width as usize);
            if ph < h || pw < w {
                return Err(ImageError::InvalidConfig {
                    file: None,
                    field: "pad_size".into(),
                    message: format!("{ph}x{pw} is smaller than the processed image {h}x{w}"),
                });
            }
            (ph, pw)
        }
        _ => (h, w),
    };
    let mut data = vec![0f32; 3 * out_h * out_w];
    let raw = img.as_raw();
    for (c, table) in lut.iter().enumerate() {
        let plane = &mut data[c * out_h * out_w..(c + 1) * out_h * out_w];
        for y in 0..h {
            let row_in = &raw[y * w * 3..(y + 1) * w * 3];
            for (o, px) in plane[y * out_w..y * out_w + w]
                .iter_mut()
                .zip(row_in.chunks_exact(3))
            {
                *o = table[usize::from(px[c])];
            }
        }
    }
    Ok(PixelValues {
        data,
        channels: 3,
        height: out_h,
        width: out_w,
    })
}

/// The whole pipeline on one image: `processor(images=img).pixel_values[0]` of transformers'
/// PIL backend.
pub fn preprocess(img: &DynamicImage, cfg: &ImageProcessorConfig) -> Result<PixelValues, ImageError> {
    let rgb = resize_and_crop(img, cfg)?;
    rescale_normalize(&rgb, cfg)
}

/// How a non-square image reaches the square model input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImageMode {
    /// transformers' behaviour: resize the shortest edge, then center-crop (the long
    /// edge loses its ends).
    #[default]
    Crop,
    /// The original ViP-LLaVA training preprocessing (`image_aspect_ratio: pad`): pad to
    /// a square with [`LLAVA_PAD_COLOR`] first, so nothing is cropped away.
    Pad,
}

impl ImageMode {
    /// Parses `crop` or `pad`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "crop" => Some(Self::Crop),
            "pad" => Some(Self::Pad),
            _ => None,
        }
    }
}

/// [`preprocess`] with a choice of crop (transformers) or pad (ViP-LLaVA training) mode.
pub fn preprocess_with_mode(
    img: &DynamicImage,
    cfg: &ImageProcessorConfig,
    mode: ImageMode,
) -> Result<PixelValues, ImageError> {
    match mode {
        ImageMode::Crop => preprocess(img, cfg),
        ImageMode::Pad => {
            let square = expand_to_square(&to_rgb(img), LLAVA_PAD_COLOR);
            preprocess(&DynamicImage::ImageRgb8(square), cfg)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_truncates() {
        // 640x480 -> short 480 -> 336, long int(336 * 640 / 480) = 448.
        assert_eq!(
            output_size(
                480,
                640,
                Size::ShortestEdge {
                    shortest_edge: 336,
                    longest_edge: None
                }
            ),
            (336, 448)
        );
        // int(336 * 451 / 300) = int(505.12) = 505
        assert_eq!(
            output_size(
                451,
                300,
                Size::ShortestEdge {
                    shortest_edge: 336,
                    longest_edge: None
                }
            ),
            (505, 336)
        );
        assert_eq!(
            output_size(
                7,
                7,
                Size::ShortestEdge {
                    shortest_edge: 56,
                    longest_edge: None
                }
            ),
            (56, 56)
        );
    }

    #[test]
    fn center_crop_offsets() {
        let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8, y as u8, 1]));
        // Odd margin: top = (4 - 3) // 2 = 0, left = (5 - 2) // 2 = 1.
        let c = center_crop(&img, HeightWidth { height: 3, width: 2 });
        assert_eq!(c.get_pixel(0, 0).0, [1, 0, 1]);
        // Padding: 4 -> 7 rows puts the image at ceil(3 / 2) = 2.
        let p = center_crop(&img, HeightWidth { height: 7, width: 5 });
        assert_eq!(p.get_pixel(0, 1).0, [0, 0, 0]);
        assert_eq!(p.get_pixel(0, 2).0, [0, 0, 1]);
        assert_eq!(p.get_pixel(4, 5).0, [4, 3, 1]);
        assert_eq!(p.get_pixel(4, 6).0, [0, 0, 0]);
    }
}
