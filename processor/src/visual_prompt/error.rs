//! Errors of visual prompt parsing, validation and drawing.

use std::path::PathBuf;

use super::{MASK_THRESHOLD, MAX_COORDINATE};

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
    /// A point radius or arrow head size that is not a positive finite number of pixels.
    #[error("{what} must be a positive finite number of pixels (at most {MAX_COORDINATE}), got {value}")]
    InvalidSize {
        /// Which size.
        what: &'static str,
        /// The value given.
        value: f32,
    },
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
        reason: SpecProblem,
    },
    /// A mask image that cannot be read.
    #[error("cannot read mask image {path}: {source}")]
    MaskImage {
        /// The file.
        path: PathBuf,
        /// Decoder error.
        source: image::ImageError,
    },
    /// A Pillow primitive refused the shape (e.g. a line width above its limit).
    #[error("{shape}: {source}")]
    Pillow {
        /// Shape name.
        shape: &'static str,
        /// What the primitive refused.
        source: super::pillow::PillowDrawError,
    },
    /// The rasteriser could not build the shape's outline (should not happen for valid input).
    #[error("{0}: could not build the outline")]
    Geometry(&'static str),
}

/// Why a CLI shape spec (`45,15,115,95:red`) does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecProblem {
    /// An item that is not a number.
    #[error("{0:?} is not a number")]
    NotANumber(String),
    /// A shape with a fixed number of values got another count.
    #[error("expected {expected} numbers, got {got}")]
    WrongCount {
        /// Values the shape takes.
        expected: usize,
        /// Values given.
        got: usize,
    },
    /// A point list with an odd number of values.
    #[error("expected x,y pairs, got {0} numbers")]
    OddCount(usize),
    /// A point list that is too short.
    #[error("expected at least {min} points, got {got}")]
    TooFewPoints {
        /// Points the shape needs.
        min: usize,
        /// Points given.
        got: usize,
    },
}
