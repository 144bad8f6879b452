//! What a visual prompt is: its shape, colour, alpha and line width.

use image::GrayImage;

use super::Colour;
use super::pillow::ArrowHead;

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
    /// A filled dot of radius [`DrawOptions::point_radius`] (default `max(int(8·s), 1)`);
    /// the line width does not apply.
    Point {
        /// Centre x.
        x: f32,
        /// Centre y.
        y: f32,
    },
    /// A smooth curve (Catmull-Rom spline) through the points.
    Scribble {
        /// At least two distinct points.
        points: Vec<(f32, f32)>,
    },
    /// A straight arrow from the tail `(x0, y0)` to its tip `(x1, y1)` (the target), with a
    /// head of [`DrawOptions::arrow_head_size`] and [`DrawOptions::arrow_head`] kind.
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
    /// The contour of a mask image's region (pixels above
    /// [`MASK_THRESHOLD`](super::MASK_THRESHOLD); the image border counts as outside): a
    /// band centred on the region's boundary (training style) or the inner band one line
    /// width thick (smooth style).
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

/// How marks are rasterised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MarkStyle {
    /// The training code's rendering: Pillow `ImageDraw` calls on a transparent layer, hard
    /// edges, Pillow's coordinate conventions (end corners inclusive, coordinates truncated
    /// to integers). What ViP-LLaVA saw in training; the default.
    #[default]
    Training,
    /// Anti-aliased paths (tiny-skia): a pixel's alpha is the fraction of it the shape
    /// covers; boxes span `[x0, x1)`. Smoother to look at, slightly off the training look.
    Smooth,
}

/// Defaults applied to prompts that do not set their own, and how marks are drawn.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DrawOptions {
    /// Opacity 1..=255; `None`: [`DEFAULT_STROKE_ALPHA`](super::DEFAULT_STROKE_ALPHA), or
    /// [`DEFAULT_MASK_ALPHA`](super::DEFAULT_MASK_ALPHA) for
    /// filled masks.
    pub alpha: Option<u8>,
    /// Line width in pixels; `None`: `max(floor(3 · max(W, H) / 336), 1)`. The training
    /// style draws whole pixels: the width is truncated, at least 1.
    pub line_width: Option<f32>,
    /// Rasterisation: the training code's (default) or anti-aliased.
    pub style: MarkStyle,
    /// Radius of points in pixels; `None`: `max(floor(8 · max(W, H) / 336), 1)`.
    pub point_radius: Option<f32>,
    /// Side length of arrow heads in pixels; `None`: see
    /// [`default_arrow_head_size`](super::default_arrow_head_size).
    pub arrow_head_size: Option<f32>,
    /// Filled or open (a V of the line width) arrow heads.
    pub arrow_head: ArrowHead,
}

impl DrawOptions {
    /// The anti-aliased renderer ([`MarkStyle::Smooth`]) with default sizes.
    pub fn smooth() -> Self {
        Self {
            style: MarkStyle::Smooth,
            ..Self::default()
        }
    }
}
