//! Visual prompts: the marks (box, ellipse, arrow, scribble, ...) that ViP-LLaVA reads on
//! a photo, drawn the way the original training code draws them.
//!
//! The original (`llava/visual_prompt_generator.py`, `image_blending`) converts the image to
//! RGB, draws every mark with Pillow's `ImageDraw` on a transparent RGBA layer of the image's
//! size and alpha-composites that layer onto the image at its original resolution. This
//! module does the same, one layer per [`VisualPrompt`], in order, with Pillow's
//! `alpha_composite` integer arithmetic (`out ≈ round(src·a + dst·(1 − a))`).
//!
//! Two renderings ([`MarkStyle`]):
//! - **training** (default): the training code's `ImageDraw` calls on the user's geometry,
//!   pixel for pixel ([`pillow`]): hard edges, Pillow's conventions — coordinates truncated
//!   to integers, end corners inclusive (box `0,0,10,10` covers pixels 0..=10), `width`
//!   growing inward for boxes and ellipses and centred on lines. What the model saw.
//! - **smooth**: anti-aliased paths; a pixel's alpha is the prompt's alpha times the
//!   fraction of the pixel the shape covers, and pixel `(i, j)` covers
//!   `[i, i + 1) × [j, j + 1)` (box `0,0,10,10` covers pixels 0..10).
//!
//! Shapes that reach outside the image are clipped.
//!
//! Defaults follow the original, where sizes are given for a 336-px image and multiplied by
//! `s = max(W, H) / 336` (line numbers: `llava/visual_prompt_generator.py`):
//!
//! | what | default | original |
//! |---|---|---|
//! | stroke alpha | 128 | `cli_vip.py --alpha 128`; training `randint(96, 255)` (l. 278) |
//! | mask (fill) alpha | 88 | middle of training's `randint(48, 128)` (l. 278) |
//! | line width | `max(int(3·s), 1)` px, every stroke | `'constant'` style rectangle (l. 303) and `cli_vip.py --width 3` (l. 304); inside every shape's training range: rectangle, ellipse, triangle `2s..8s`, arrow `1s..6s`, scribble `2s..12s` |
//! | point radius | `max(int(8·s), 1)` px | `'constant'` style point (l. 321; training `5s..20s`) |
//! | arrow head side H | `max(0.35·L, int(6·s))`, at most L | `max(uniform(0.2, 0.5)·L, int(6·s))` (l. 52), 0.35 the mean ratio |
//! | arrow head | filled | filled `polygon` or open `line` V, half the time each (l. 68-84) |
//! | mask contour | band `2w + 1` px, `w = max(int(lw) / 2, 1)`, centred on the outline | offsets `[-w, w]²`, `w` in `1s..2s` (l. 254, 333) |
//! | ellipse | Pillow's ellipse in the given box | the object's box scaled 1-1.5x (l. 309): give the enlarged box to match |
//!
//! Rectangles and ellipses are stroked inward from their box (like Pillow's `width=`);
//! triangles, scribbles, arrow shafts and polygon mask contours are stroked centred on
//! their path (round joins when smooth; `joint="curve"` for the training triangle).
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

mod colour;
mod contour;
mod draw;
mod error;
mod extent;
mod geometry;
pub mod pillow;
mod raster;
mod shape;
mod spec;
#[cfg(test)]
mod tiny_skia_check;
mod training;
mod validate;

pub use colour::{COLOUR_POOL, Colour};
pub use draw::{draw, draw_image, draw_on_rgb};
pub use error::{SpecProblem, VisualPromptError};
pub use extent::{bounding_box, marks_outside};
pub use pillow::ArrowHead;
pub use shape::{DrawOptions, MarkStyle, Shape, VisualPrompt};
pub use spec::{MarkSpec, ShapeKind, load_mask, parse_cli_shape};
pub use training::{contour_half_width, default_arrow_head_size, scribble_samples, training_size};

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

/// `max(W, H) / 336`, the original's size scale.
pub fn size_scale(width: u32, height: u32) -> f32 {
    width.max(height) as f32 / SIZE_ANCHOR
}

/// Default line width in pixels for an image: `max(int(3 · max(W, H) / 336), 1)`, computed
/// as the training code does ([`training_size`]).
pub fn default_line_width(width: u32, height: u32) -> f32 {
    training_size(BASE_LINE_WIDTH as u32, width, height) as f32
}

/// Default point radius in pixels for an image: `max(int(8 · max(W, H) / 336), 1)`, computed
/// as the training code does ([`training_size`]).
pub fn point_radius(width: u32, height: u32) -> f32 {
    training_size(BASE_POINT_RADIUS as u32, width, height) as f32
}
