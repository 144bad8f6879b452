//! Visual prompts: the marks (box, ellipse, arrow, scribble, ...) that ViP-LLaVA reads on
//! a photo, drawn the way the original training code draws them.
//!
//! The original (`llava/visual_prompt_generator.py`, `image_blending`) converts the image to
//! RGB, draws every mark on a transparent RGBA layer of the image's size and
//! alpha-composites that layer onto the image at its original resolution. This module does
//! the same, one layer per [`VisualPrompt`], in order, with Pillow's `alpha_composite`
//! integer arithmetic (`out ≈ round(src·a + dst·(1 − a))`). Unlike Pillow's `ImageDraw`,
//! edges are anti-aliased: a pixel's layer alpha is the prompt's alpha times the fraction of
//! the pixel the shape covers. Same input, same bytes.
//!
//! Coordinates are continuous original-image pixels: pixel `(i, j)` covers
//! `[i, i + 1) × [j, j + 1)`, so a box `0,0,10,10` spans exactly the first ten pixels. Shapes
//! that reach outside the image are clipped.
//!
//! Defaults follow the original, where sizes are given for a 336-px image and multiplied by
//! `s = max(W, H) / 336`:
//!
//! | what | default | original |
//! |---|---|---|
//! | stroke alpha | 128 | `cli_vip.py --alpha 128`; v7w / PointQA evaluation |
//! | mask (fill) alpha | 88 | middle of training's `randint(48, 128)` |
//! | line width | `max(floor(3·s), 1)` px | `cli_vip.py --width 3`, `'constant'` style rectangle |
//! | point radius | `max(floor(8·s), 1)` px | `'constant'` style point |
//! | arrow head | `clamp(0.35·len, max(6·s, 3·lw), max(18·s, 3·lw))`, sides ±60° | `max(U(0.2, 0.5)·len, 6·s)` |
//!
//! Rectangles and ellipses are stroked inward from their box (like Pillow's `width=`);
//! triangles, scribbles, arrow shafts and polygon mask contours are stroked centred on
//! their path with round joins.
//!
//! ```
//! use image::{DynamicImage, RgbImage};
//! use vipllava_processor::visual_prompt::{Colour, DrawOptions, Shape, VisualPrompt, draw};
//! # fn main() -> Result<(), vipllava_processor::visual_prompt::VisualPromptError> {
//! let photo = DynamicImage::ImageRgb8(RgbImage::new(64, 48));
//! let red_box = VisualPrompt::new(
//!     Shape::Rectangle { x0: 8.0, y0: 8.0, x1: 40.0, y1: 30.0 },
//!     Colour::parse("red")?,
//! );
//! let marked = draw(&photo, &[red_box], &DrawOptions::default())?;
//! assert_eq!(marked.dimensions(), (64, 48));
//! # Ok(()) }
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use image::{DynamicImage, GrayImage, RgbImage};
use tiny_skia::{FillRule, LineCap, LineJoin, Mask, PathBuilder, Rect, Stroke, Transform};

/// The image size the original's sizes are given for (`image_size_anchor`).
pub const SIZE_ANCHOR: f32 = 336.0;
/// Line width at [`SIZE_ANCHOR`], in pixels.
pub const BASE_LINE_WIDTH: f32 = 3.0;
/// Point radius at [`SIZE_ANCHOR`], in pixels.
pub const BASE_POINT_RADIUS: f32 = 8.0;
/// Default alpha of stroked shapes.
pub const DEFAULT_STROKE_ALPHA: u8 = 128;
/// Default alpha of filled masks.
pub const DEFAULT_MASK_ALPHA: u8 = 88;
/// Largest accepted coordinate magnitude (and line width), in pixels.
pub const MAX_COORDINATE: f32 = 100_000.0;
/// A mask image pixel is inside the mask when its value exceeds this.
pub const MASK_THRESHOLD: u8 = 127;

/// The original's colour pool (`color_pool`), CSS values.
pub const COLOUR_POOL: [(&str, Colour); 9] = [
    ("red", Colour::new(255, 0, 0)),
    ("lime", Colour::new(0, 255, 0)),
    ("blue", Colour::new(0, 0, 255)),
    ("yellow", Colour::new(255, 255, 0)),
    ("fuchsia", Colour::new(255, 0, 255)),
    ("aqua", Colour::new(0, 255, 255)),
    ("orange", Colour::new(255, 165, 0)),
    ("purple", Colour::new(128, 0, 128)),
    ("gold", Colour::new(255, 215, 0)),
];

/// Errors of visual prompt parsing, validation and drawing.
#[derive(Debug, thiserror::Error)]
pub enum VisualPromptError {
    /// A colour that is neither a pool name nor `#rrggbb`.
    #[error(
        "unknown colour {0:?}: expected one of red, lime, blue, yellow, fuchsia, aqua, orange, purple, gold, or #rrggbb"
    )]
    UnknownColour(String),
    /// A coordinate or size is NaN or infinite.
    #[error("{shape}: {what} is not a finite number")]
    NonFinite {
        /// Shape name.
        shape: &'static str,
        /// Which value.
        what: &'static str,
    },
    /// A coordinate beyond [`MAX_COORDINATE`].
    #[error("{shape}: coordinate {value} is out of range (|v| <= {MAX_COORDINATE})")]
    CoordinateOutOfRange {
        /// Shape name.
        shape: &'static str,
        /// The offending value.
        value: f32,
    },
    /// A box whose corners are not ordered `x0 < x1`, `y0 < y1`.
    #[error("{shape}: box corners must satisfy x0 < x1 and y0 < y1, got ({x0}, {y0}, {x1}, {y1})")]
    UnorderedCorners {
        /// Shape name.
        shape: &'static str,
        /// Left.
        x0: f32,
        /// Top.
        y0: f32,
        /// Right.
        x1: f32,
        /// Bottom.
        y1: f32,
    },
    /// Too few points for a scribble or polygon.
    #[error("{shape}: needs at least {needed} points, got {got}")]
    TooFewPoints {
        /// Shape name.
        shape: &'static str,
        /// Minimum.
        needed: usize,
        /// Given.
        got: usize,
    },
    /// A shape that has no extent (zero-length arrow, collinear triangle, ...).
    #[error("{shape}: degenerate shape: {reason}")]
    Degenerate {
        /// Shape name.
        shape: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// Alpha 0 would draw nothing.
    #[error("alpha must be 1..=255, got 0 (the prompt would be invisible)")]
    ZeroAlpha,
    /// A line width that is not a positive finite number of pixels.
    #[error("line width must be a positive finite number of pixels (at most {MAX_COORDINATE}), got {0}")]
    InvalidLineWidth(f32),
    /// A mask image whose size differs from the image's.
    #[error("mask image is {mask_width}x{mask_height} but the image is {image_width}x{image_height}")]
    MaskSizeMismatch {
        /// Mask width.
        mask_width: u32,
        /// Mask height.
        mask_height: u32,
        /// Image width.
        image_width: u32,
        /// Image height.
        image_height: u32,
    },
    /// A mask image with no pixel above [`MASK_THRESHOLD`].
    #[error("mask image is empty: no pixel is above {MASK_THRESHOLD}")]
    EmptyMask,
    /// The image has no pixels.
    #[error("image is empty ({0}x{1})")]
    EmptyImage(u32, u32),
    /// A CLI shape kind that is not known.
    #[error(
        "unknown visual prompt shape {0:?}: expected box, ellipse, triangle, point, arrow, scribble, mask or mask-contour"
    )]
    UnknownShape(String),
    /// A CLI shape spec that does not parse.
    #[error("bad {kind} spec {spec:?}: {reason}")]
    BadSpec {
        /// Shape kind.
        kind: String,
        /// The spec.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// A mask image that cannot be read.
    #[error("cannot read mask image {path}: {source}")]
    MaskImage {
        /// The file.
        path: PathBuf,
        /// Decoder error.
        source: image::ImageError,
    },
    /// The rasteriser could not build the shape's outline (should not happen for valid input).
    #[error("{0}: could not build the outline")]
    Geometry(&'static str),
}

/// An opaque RGB colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Colour {
    /// Red.
    pub r: u8,
    /// Green.
    pub g: u8,
    /// Blue.
    pub b: u8,
}

impl Colour {
    /// Red, the CLI default.
    pub const RED: Colour = Colour::new(255, 0, 0);

    /// A colour from its components.
    pub const fn new(r: u8, g: u8, b: u8) -> Self {
        Self { r, g, b }
    }

    /// Parse a pool name (`red`, `lime`, ..., case-insensitive) or `#rrggbb`.
    pub fn parse(s: &str) -> Result<Self, VisualPromptError> {
        let t = s.trim();
        if let Some(hex) = t.strip_prefix('#') {
            if hex.len() == 6 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                let byte = |i: usize| u8::from_str_radix(&hex[i..i + 2], 16);
                if let (Ok(r), Ok(g), Ok(b)) = (byte(0), byte(2), byte(4)) {
                    return Ok(Self::new(r, g, b));
                }
            }
            return Err(VisualPromptError::UnknownColour(s.to_string()));
        }
        COLOUR_POOL
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(t))
            .map(|&(_, c)| c)
            .ok_or_else(|| VisualPromptError::UnknownColour(s.to_string()))
    }

    /// The pool name of this colour (`"red"`), if it is one; for "the red rectangle".
    pub fn name(&self) -> Option<&'static str> {
        COLOUR_POOL.iter().find(|(_, c)| c == self).map(|&(n, _)| n)
    }
}

impl FromStr for Colour {
    type Err = VisualPromptError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Colour {
    /// The pool name, or `#rrggbb`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "#{:02x}{:02x}{:02x}", self.r, self.g, self.b),
        }
    }
}

/// What to draw, in original-image pixel coordinates.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// Outline of the box `[x0, x1] × [y0, y1]`, stroked inward.
    Rectangle {
        /// Left.
        x0: f32,
        /// Top.
        y0: f32,
        /// Right (`> x0`).
        x1: f32,
        /// Bottom (`> y0`).
        y1: f32,
    },
    /// Outline of the ellipse inscribed in the box, stroked inward.
    Ellipse {
        /// Left.
        x0: f32,
        /// Top.
        y0: f32,
        /// Right (`> x0`).
        x1: f32,
        /// Bottom (`> y0`).
        y1: f32,
    },
    /// Outline of a triangle, round joins.
    Triangle {
        /// The corners.
        points: [(f32, f32); 3],
    },
    /// A filled dot of radius `max(floor(8·s), 1)`; the line width does not apply.
    Point {
        /// Centre x.
        x: f32,
        /// Centre y.
        y: f32,
    },
    /// A smooth curve (Catmull-Rom spline) through the points, round caps and joins.
    Scribble {
        /// At least two distinct points.
        points: Vec<(f32, f32)>,
    },
    /// A straight arrow from the tail `(x0, y0)` to its tip `(x1, y1)` (the target), with a
    /// filled head.
    Arrow {
        /// Tail x.
        x0: f32,
        /// Tail y.
        y0: f32,
        /// Tip x.
        x1: f32,
        /// Tip y.
        y1: f32,
    },
    /// A filled polygon (non-zero winding).
    Mask {
        /// At least three points.
        polygon: Vec<(f32, f32)>,
    },
    /// A filled mask image of the image's size: pixels above [`MASK_THRESHOLD`].
    MaskImage(GrayImage),
    /// The outline of a polygon mask, stroked centred on it.
    MaskContour {
        /// At least three points.
        polygon: Vec<(f32, f32)>,
    },
    /// The inner boundary band (one line width thick) of a mask image's region (pixels
    /// above [`MASK_THRESHOLD`]; the image border counts as outside).
    MaskContourImage(GrayImage),
}

impl Shape {
    /// The original's name for the shape (`words_shape`): `"rectangle"`, `"ellipse"`,
    /// `"triangle"`, `"point"`, `"scribble"`, `"arrow"`, `"mask"` or `"mask contour"`.
    pub fn name(&self) -> &'static str {
        match self {
            Shape::Rectangle { .. } => "rectangle",
            Shape::Ellipse { .. } => "ellipse",
            Shape::Triangle { .. } => "triangle",
            Shape::Point { .. } => "point",
            Shape::Scribble { .. } => "scribble",
            Shape::Arrow { .. } => "arrow",
            Shape::Mask { .. } | Shape::MaskImage(_) => "mask",
            Shape::MaskContour { .. } | Shape::MaskContourImage(_) => "mask contour",
        }
    }

    /// Whether the shape is a filled mask (lower default alpha).
    pub fn is_filled_mask(&self) -> bool {
        matches!(self, Shape::Mask { .. } | Shape::MaskImage(_))
    }
}

/// One mark: a shape, its colour, and optional per-prompt alpha and line width.
#[derive(Debug, Clone, PartialEq)]
pub struct VisualPrompt {
    /// What to draw.
    pub shape: Shape,
    /// Its colour.
    pub colour: Colour,
    /// Opacity 1..=255; overrides [`DrawOptions::alpha`].
    pub alpha: Option<u8>,
    /// Line width in pixels; overrides [`DrawOptions::line_width`].
    pub line_width: Option<f32>,
}

impl VisualPrompt {
    /// A prompt with default alpha and line width.
    pub fn new(shape: Shape, colour: Colour) -> Self {
        Self {
            shape,
            colour,
            alpha: None,
            line_width: None,
        }
    }

    /// Set this prompt's alpha.
    pub fn with_alpha(mut self, alpha: u8) -> Self {
        self.alpha = Some(alpha);
        self
    }

    /// Set this prompt's line width in pixels.
    pub fn with_line_width(mut self, line_width: f32) -> Self {
        self.line_width = Some(line_width);
        self
    }
}

/// Defaults applied to prompts that do not set their own.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DrawOptions {
    /// Opacity 1..=255; `None`: [`DEFAULT_STROKE_ALPHA`], or [`DEFAULT_MASK_ALPHA`] for
    /// filled masks.
    pub alpha: Option<u8>,
    /// Line width in pixels; `None`: `max(floor(3 · max(W, H) / 336), 1)`.
    pub line_width: Option<f32>,
}

/// `max(W, H) / 336`, the original's size scale.
pub fn size_scale(width: u32, height: u32) -> f32 {
    width.max(height) as f32 / SIZE_ANCHOR
}

/// Default line width in pixels for an image: `max(floor(3 · s), 1)`.
pub fn default_line_width(width: u32, height: u32) -> f32 {
    (BASE_LINE_WIDTH * size_scale(width, height)).floor().max(1.0)
}

/// Point radius in pixels for an image: `max(floor(8 · s), 1)`.
pub fn point_radius(width: u32, height: u32) -> f32 {
    (BASE_POINT_RADIUS * size_scale(width, height)).floor().max(1.0)
}

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

/// The extent `(x0, y0, x1, y1)` (pixel edges, `x1`/`y1` exclusive) of what `prompt` draws
/// on a `width`×`height` image with `options`, line width included, clipped to the image;
/// `None` if nothing of it falls inside the image.
pub fn bounding_box(
    prompt: &VisualPrompt,
    options: &DrawOptions,
    width: u32,
    height: u32,
) -> Result<Option<(f32, f32, f32, f32)>, VisualPromptError> {
    if width == 0 || height == 0 {
        return Err(VisualPromptError::EmptyImage(width, height));
    }
    let (_, line_width) = resolve(prompt, options, width, height)?;
    let cov = coverage(&prompt.shape, line_width, width, height)?;
    let (w, h) = (width as usize, height as usize);
    let mut ext: Option<(usize, usize, usize, usize)> = None;
    for (y, row) in cov.chunks_exact(w).enumerate().take(h) {
        let (Some(first), Some(last)) = (row.iter().position(|&v| v > 0), row.iter().rposition(|&v| v > 0))
        else {
            continue;
        };
        ext = Some(match ext {
            None => (first, y, last, y),
            Some((x0, y0, x1, _)) => (x0.min(first), y0, x1.max(last), y),
        });
    }
    Ok(ext.map(|(x0, y0, x1, y1)| (x0 as f32, y0 as f32, (x1 + 1) as f32, (y1 + 1) as f32)))
}

/// Parse a CLI visual prompt: `kind` is `box` (or `rectangle`), `ellipse`, `triangle`,
/// `point`, `arrow`, `scribble`, `mask` or `mask-contour`; `spec` is numbers separated by
/// `,` / `;` (`box`/`ellipse`/`arrow`: `x0,y0,x1,y1`; `triangle`: three points; `point`:
/// `x,y`; `scribble`: two or more points `x,y;x,y;...`), with an optional `:colour` suffix
/// (default red). `mask`/`mask-contour` take a grayscale PNG path of the image's size (its
/// size is checked when drawing) or a polygon of three or more points.
pub fn parse_cli_shape(kind: &str, spec: &str) -> Result<VisualPrompt, VisualPromptError> {
    let kind_l = kind.trim().to_ascii_lowercase();
    let bad = |reason: String| VisualPromptError::BadSpec {
        kind: kind.to_string(),
        spec: spec.to_string(),
        reason,
    };
    let is_mask = matches!(
        kind_l.as_str(),
        "mask" | "mask-contour" | "mask_contour" | "mask contour"
    );
    // Split off an optional ":colour" (for masks only when it names a colour, so that paths
    // with colons survive).
    let (body, colour) = match spec.rsplit_once(':') {
        Some((body, c)) => match Colour::parse(c) {
            Ok(colour) => (body, colour),
            Err(e) if !is_mask => return Err(e),
            Err(_) => (spec, Colour::RED),
        },
        None => (spec, Colour::RED),
    };
    let numbers = || -> Result<Vec<f32>, VisualPromptError> {
        body.split([',', ';'])
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| {
                t.parse::<f32>()
                    .map_err(|_| bad(format!("{t:?} is not a number")))
            })
            .collect()
    };
    let exactly = |n: usize| -> Result<Vec<f32>, VisualPromptError> {
        let v = numbers()?;
        if v.len() == n {
            Ok(v)
        } else {
            Err(bad(format!("expected {n} numbers, got {}", v.len())))
        }
    };
    let points = |min: usize| -> Result<Vec<(f32, f32)>, VisualPromptError> {
        let v = numbers()?;
        if v.len() % 2 != 0 {
            return Err(bad(format!("expected x,y pairs, got {} numbers", v.len())));
        }
        if v.len() / 2 < min {
            return Err(bad(format!(
                "expected at least {min} points, got {}",
                v.len() / 2
            )));
        }
        Ok(v.chunks_exact(2).map(|p| (p[0], p[1])).collect())
    };
    let shape = match kind_l.as_str() {
        "box" | "rectangle" | "rect" => {
            let v = exactly(4)?;
            Shape::Rectangle {
                x0: v[0],
                y0: v[1],
                x1: v[2],
                y1: v[3],
            }
        }
        "ellipse" => {
            let v = exactly(4)?;
            Shape::Ellipse {
                x0: v[0],
                y0: v[1],
                x1: v[2],
                y1: v[3],
            }
        }
        "arrow" => {
            let v = exactly(4)?;
            Shape::Arrow {
                x0: v[0],
                y0: v[1],
                x1: v[2],
                y1: v[3],
            }
        }
        "triangle" => {
            let v = exactly(6)?;
            Shape::Triangle {
                points: [(v[0], v[1]), (v[2], v[3]), (v[4], v[5])],
            }
        }
        "point" => {
            let v = exactly(2)?;
            Shape::Point { x: v[0], y: v[1] }
        }
        "scribble" => Shape::Scribble { points: points(2)? },
        _ if is_mask => {
            let contour = kind_l != "mask";
            let looks_numeric =
                !body.trim().is_empty() && body.chars().all(|c| c.is_ascii_digit() || ",;.-+eE ".contains(c));
            if looks_numeric {
                let polygon = points(3)?;
                if contour {
                    Shape::MaskContour { polygon }
                } else {
                    Shape::Mask { polygon }
                }
            } else {
                let mask = load_mask(Path::new(body.trim()))?;
                if contour {
                    Shape::MaskContourImage(mask)
                } else {
                    Shape::MaskImage(mask)
                }
            }
        }
        _ => return Err(VisualPromptError::UnknownShape(kind.to_string())),
    };
    Ok(VisualPrompt::new(shape, colour))
}

/// Load a mask image as 8-bit grayscale.
pub fn load_mask(path: &Path) -> Result<GrayImage, VisualPromptError> {
    image::open(path)
        .map(|img| img.to_luma8())
        .map_err(|source| VisualPromptError::MaskImage {
            path: path.to_path_buf(),
            source,
        })
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

/// Validate `prompt` for a `w`×`h` image and resolve its alpha and line width.
fn resolve(
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

/// Per-pixel coverage (0..=255, row-major `w`×`h`) of a validated shape.
fn coverage(shape: &Shape, lw: f32, w: u32, h: u32) -> Result<Vec<u8>, VisualPromptError> {
    let name = shape.name();
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
    let geometry = || VisualPromptError::Geometry(name);
    let round = Stroke {
        width: lw,
        line_cap: LineCap::Round,
        line_join: LineJoin::Round,
        ..Stroke::default()
    };
    let mut fill = |path: &tiny_skia::Path, rule: FillRule| {
        canvas.fill_path(path, rule, true, Transform::identity());
    };
    match shape {
        Shape::Rectangle { x0, y0, x1, y1 } | Shape::Ellipse { x0, y0, x1, y1 } => {
            let outer = Rect::from_ltrb(*x0, *y0, *x1, *y1).ok_or_else(geometry)?;
            let inner = Rect::from_ltrb(x0 + lw, y0 + lw, x1 - lw, y1 - lw);
            let ellipse = matches!(shape, Shape::Ellipse { .. });
            let mut pb = PathBuilder::new();
            for r in std::iter::once(outer).chain(inner) {
                if ellipse { pb.push_oval(r) } else { pb.push_rect(r) }
            }
            fill(&pb.finish().ok_or_else(geometry)?, FillRule::EvenOdd);
        }
        Shape::Triangle { points } => {
            let mut pb = PathBuilder::new();
            pb.move_to(points[0].0, points[0].1);
            pb.line_to(points[1].0, points[1].1);
            pb.line_to(points[2].0, points[2].1);
            pb.close();
            let path = pb.finish().ok_or_else(geometry)?;
            fill(&path.stroke(&round, 1.0).ok_or_else(geometry)?, FillRule::Winding);
        }
        Shape::Point { x, y } => {
            let path = PathBuilder::from_circle(*x, *y, point_radius(w, h)).ok_or_else(geometry)?;
            fill(&path, FillRule::Winding);
        }
        Shape::Scribble { points } => {
            let path = catmull_rom(points).ok_or_else(geometry)?;
            fill(&path.stroke(&round, 1.0).ok_or_else(geometry)?, FillRule::Winding);
        }
        Shape::Arrow { x0, y0, x1, y1 } => {
            let (dx, dy) = (x0 - x1, y0 - y1);
            let len = dx.hypot(dy);
            let (bx, by) = (dx / len, dy / len); // unit vector from the tip back to the tail
            let s = size_scale(w, h);
            let lo = (6.0 * s).max(3.0 * lw);
            let head = (0.35 * len).clamp(lo, (18.0 * s).max(lo)).min(len);
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
            pb.move_to(*x1, *y1);
            pb.line_to(l.0, l.1);
            pb.line_to(r.0, r.1);
            pb.close();
            fill(&pb.finish().ok_or_else(geometry)?, FillRule::Winding);
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
                fill(&shaft.stroke(&butt, 1.0).ok_or_else(geometry)?, FillRule::Winding);
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
                fill(&path, FillRule::Winding);
            } else {
                fill(&path.stroke(&round, 1.0).ok_or_else(geometry)?, FillRule::Winding);
            }
        }
        Shape::MaskImage(_) | Shape::MaskContourImage(_) => {}
    }
    Ok(canvas.take())
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

/// Coverage of the band of the mask region (pixels above the threshold) within `lw` pixels
/// of its outside, from an exact Euclidean distance transform (the image border counts as
/// outside); the inner edge of the band is anti-aliased.
fn contour_band(mask: &GrayImage, lw: f32) -> Vec<u8> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let d2 = outside_distance_sq(mask);
    let mut out = vec![0u8; w * h];
    for (o, (&v, &d)) in out.iter_mut().zip(mask.as_raw().iter().zip(d2.iter())) {
        if v > MASK_THRESHOLD {
            // Boundary pixels have distance 1: full coverage up to `lw`, fading over a pixel.
            let c = (lw + 1.0 - (d as f32).sqrt()).clamp(0.0, 1.0);
            *o = (c * 255.0).round() as u8;
        }
    }
    out
}

/// Squared Euclidean distance from each pixel to the nearest pixel outside the mask region,
/// with a one-pixel outside frame around the image (Felzenszwalb & Huttenlocher).
fn outside_distance_sq(mask: &GrayImage) -> Vec<f64> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let (pw, ph) = (w + 2, h + 2);
    let inf = 1e20;
    let mut g = vec![0.0f64; pw * ph];
    for y in 0..h {
        for x in 0..w {
            if mask.as_raw()[y * w + x] > MASK_THRESHOLD {
                g[(y + 1) * pw + x + 1] = inf;
            }
        }
    }
    let mut f = vec![0.0; pw.max(ph)];
    let mut d = vec![0.0; pw.max(ph)];
    for x in 0..pw {
        for y in 0..ph {
            f[y] = g[y * pw + x];
        }
        edt_1d(&f[..ph], &mut d[..ph]);
        for y in 0..ph {
            g[y * pw + x] = d[y];
        }
    }
    for y in 0..ph {
        f[..pw].copy_from_slice(&g[y * pw..(y + 1) * pw]);
        edt_1d(&f[..pw], &mut d[..pw]);
        g[y * pw..(y + 1) * pw].copy_from_slice(&d[..pw]);
    }
    let mut out = Vec::with_capacity(w * h);
    for y in 0..h {
        out.extend_from_slice(&g[(y + 1) * pw + 1..(y + 1) * pw + 1 + w]);
    }
    out
}

/// 1-D squared distance transform of sampled function `f` (lower envelope of parabolas).
fn edt_1d(f: &[f64], d: &mut [f64]) {
    let n = f.len();
    if n == 0 {
        return;
    }
    let mut v = vec![0usize; n];
    let mut z = vec![0.0f64; n + 1];
    let mut k = 0usize;
    z[0] = f64::NEG_INFINITY;
    z[1] = f64::INFINITY;
    let sq = |q: usize| (q * q) as f64;
    for q in 1..n {
        loop {
            let p = v[k];
            let s = ((f[q] + sq(q)) - (f[p] + sq(p))) / (2.0 * (q as f64 - p as f64));
            if s <= z[k] && k > 0 {
                k -= 1;
            } else {
                k += 1;
                v[k] = q;
                z[k] = s;
                z[k + 1] = f64::INFINITY;
                break;
            }
        }
    }
    k = 0;
    for (q, dq) in d.iter_mut().enumerate() {
        while z[k + 1] < q as f64 {
            k += 1;
        }
        let p = v[k];
        let diff = q as f64 - p as f64;
        *dq = diff * diff + f[p];
    }
}
