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
mod validate;

pub use colour::{COLOUR_POOL, Colour};
pub use draw::{draw, draw_image, draw_on_rgb};
pub use error::{SpecProblem, VisualPromptError};
pub use extent::{bounding_box, marks_outside};
pub use shape::{DrawOptions, Shape, VisualPrompt};
pub use spec::{ShapeKind, load_mask, parse_cli_shape};

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

/// Default line width in pixels for an image: `max(floor(3 · s), 1)`.
pub fn default_line_width(width: u32, height: u32) -> f32 {
    (BASE_LINE_WIDTH * size_scale(width, height)).floor().max(1.0)
}

/// Point radius in pixels for an image: `max(floor(8 · s), 1)`.
pub fn point_radius(width: u32, height: u32) -> f32 {
    (BASE_POINT_RADIUS * size_scale(width, height)).floor().max(1.0)
}
