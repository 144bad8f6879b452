//! What a visual prompt is: its shape, colour, alpha and line width.

use image::GrayImage;

use super::Colour;

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
    /// A filled mask image of the image's size: pixels above [`MASK_THRESHOLD`](super::MASK_THRESHOLD).
    MaskImage(GrayImage),
    /// The outline of a polygon mask, stroked centred on it.
    MaskContour {
        /// At least three points.
        polygon: Vec<(f32, f32)>,
    },
    /// The inner boundary band (one line width thick) of a mask image's region (pixels
    /// above [`MASK_THRESHOLD`](super::MASK_THRESHOLD); the image border counts as outside).
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
    /// Opacity 1..=255; `None`: [`DEFAULT_STROKE_ALPHA`](super::DEFAULT_STROKE_ALPHA), or
    /// [`DEFAULT_MASK_ALPHA`](super::DEFAULT_MASK_ALPHA) for
    /// filled masks.
    pub alpha: Option<u8>,
    /// Line width in pixels; `None`: `max(floor(3 · max(W, H) / 336), 1)`.
    pub line_width: Option<f32>,
}
