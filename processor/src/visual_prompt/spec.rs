//! Text specs of visual prompts, as the CLI flags (`--box 45,15,115,95:red`) and the
//! training data (`{"shape": "box", "spec": "10,10,80,80:red"}`) give them.
//!
//! A spec is numbers separated by `,` / `;` with an optional `:colour` suffix (default
//! red): `box`/`ellipse`/`arrow` take `x0,y0,x1,y1`, `triangle` three points, `point`
//! `x,y`, `scribble` two or more points `x,y;x,y;...`; `mask`/`mask-contour` take a
//! polygon of three or more points or the path of a grayscale PNG of the image's size.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use image::GrayImage;

use super::{Colour, Shape, SpecProblem, VisualPrompt, VisualPromptError};

/// A visual prompt kind as the CLI and the training data name it.
///
/// Its spec is numbers separated by `,` / `;` with an optional `:colour` suffix (a
/// [`Colour`] name or `#rrggbb`; default red), e.g. `45,15,115,95:red`; masks take a
/// polygon or the path of a grayscale PNG of the image's size instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShapeKind {
    /// `box` (also `rectangle`, `rect`): `x0,y0,x1,y1`.
    Rectangle,
    /// `ellipse`: `x0,y0,x1,y1` (the box it is inscribed in).
    Ellipse,
    /// `triangle`: `x0,y0,x1,y1,x2,y2`.
    Triangle,
    /// `point`: `x,y`.
    Point,
    /// `arrow`: `x0,y0,x1,y1`, tail to tip.
    Arrow,
    /// `scribble`: two or more points `x,y;x,y;...`.
    Scribble,
    /// `mask`: a polygon (three or more points) or a grayscale PNG path, filled.
    Mask,
    /// `mask-contour` (also `mask_contour`, `mask contour`): the outline of a mask.
    MaskContour,
}

impl ShapeKind {
    /// Every kind, in the CLI's order.
    pub const ALL: [ShapeKind; 8] = [
        Self::Rectangle,
        Self::Ellipse,
        Self::Triangle,
        Self::Point,
        Self::Arrow,
        Self::Scribble,
        Self::Mask,
        Self::MaskContour,
    ];

    /// The CLI flag name: `box`, `ellipse`, `triangle`, `point`, `arrow`, `scribble`,
    /// `mask` or `mask-contour`.
    pub fn cli_name(self) -> &'static str {
        match self {
            Self::Rectangle => "box",
            Self::Ellipse => "ellipse",
            Self::Triangle => "triangle",
            Self::Point => "point",
            Self::Arrow => "arrow",
            Self::Scribble => "scribble",
            Self::Mask => "mask",
            Self::MaskContour => "mask-contour",
        }
    }

    /// Parse a spec of this kind (`45,15,115,95:red`) into a prompt with default alpha
    /// and line width. Masks given as PNG paths are read here.
    pub fn parse_spec(self, spec: &str) -> Result<VisualPrompt, VisualPromptError> {
        parse_spec_named(self, self.cli_name(), spec)
    }

    fn is_mask(self) -> bool {
        matches!(self, Self::Mask | Self::MaskContour)
    }
}

impl FromStr for ShapeKind {
    type Err = VisualPromptError;

    /// A CLI kind name, case-insensitive, surrounding blanks ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "box" | "rectangle" | "rect" => Self::Rectangle,
            "ellipse" => Self::Ellipse,
            "triangle" => Self::Triangle,
            "point" => Self::Point,
            "arrow" => Self::Arrow,
            "scribble" => Self::Scribble,
            "mask" => Self::Mask,
            "mask-contour" | "mask_contour" | "mask contour" => Self::MaskContour,
            _ => return Err(VisualPromptError::UnknownShape(s.to_string())),
        })
    }
}

impl fmt::Display for ShapeKind {
    /// The CLI name ([`ShapeKind::cli_name`]).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.cli_name())
    }
}

impl FromStr for VisualPrompt {
    type Err = VisualPromptError;

    /// `KIND=SPEC`, e.g. `box=45,15,115,95:red` or `mask=mask.png:blue`: the kind
    /// ([`ShapeKind`]) and its spec ([`ShapeKind::parse_spec`]) in one string.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, spec) = s
            .split_once('=')
            .ok_or_else(|| VisualPromptError::UnknownShape(s.to_string()))?;
        parse_cli_shape(kind, spec)
    }
}

/// Parse a CLI visual prompt: `kind` names a [`ShapeKind`] (`box`, `ellipse`, ...), `spec`
/// is its spec (see [`ShapeKind`]). `kind.parse::<ShapeKind>()` followed by
/// [`ShapeKind::parse_spec`], except that errors name `kind` as given.
pub fn parse_cli_shape(kind: &str, spec: &str) -> Result<VisualPrompt, VisualPromptError> {
    match kind.parse::<ShapeKind>() {
        Ok(k) => parse_spec_named(k, kind, spec),
        Err(unknown) => {
            // A bad colour is reported before an unknown kind, as it always was.
            split_colour(spec, false)?;
            Err(unknown)
        }
    }
}

/// A mark as JSON data gives it (`--batch` lines, request bodies): a [`ShapeKind`] name, its
/// spec exactly as on the command line, and an optional alpha and line width, e.g.
/// `{"shape": "box", "spec": "45,15,115,95:red", "alpha": 200}`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarkSpec {
    /// The kind (`box`, `ellipse`, `triangle`, `point`, `arrow`, `scribble`, `mask`,
    /// `mask-contour`).
    pub shape: String,
    /// The spec, as the CLI flag's value.
    pub spec: String,
    /// Opacity 1..=255 of this mark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<u8>,
    /// Line width of this mark in pixels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line_width: Option<f32>,
}

impl MarkSpec {
    /// The spec that parses back to `prompt` ([`MarkSpec::to_prompt`]): the kind's CLI
    /// name and its coordinates in the shortest form that round-trips `f32`, with the
    /// colour's pool name or `#rrggbb`. `None` for masks given as images, which have no
    /// text form.
    pub fn from_prompt(prompt: &VisualPrompt) -> Option<MarkSpec> {
        let pairs = |points: &[(f32, f32)]| {
            points
                .iter()
                .map(|(x, y)| format!("{x},{y}"))
                .collect::<Vec<_>>()
                .join(";")
        };
        let (kind, numbers) = match &prompt.shape {
            Shape::Rectangle { x0, y0, x1, y1 } => (ShapeKind::Rectangle, format!("{x0},{y0},{x1},{y1}")),
            Shape::Ellipse { x0, y0, x1, y1 } => (ShapeKind::Ellipse, format!("{x0},{y0},{x1},{y1}")),
            Shape::Arrow { x0, y0, x1, y1 } => (ShapeKind::Arrow, format!("{x0},{y0},{x1},{y1}")),
            Shape::Triangle { points } => (ShapeKind::Triangle, pairs(points)),
            Shape::Point { x, y } => (ShapeKind::Point, format!("{x},{y}")),
            Shape::Scribble { points } => (ShapeKind::Scribble, pairs(points)),
            Shape::Mask { polygon } => (ShapeKind::Mask, pairs(polygon)),
            Shape::MaskContour { polygon } => (ShapeKind::MaskContour, pairs(polygon)),
            Shape::MaskImage(_) | Shape::MaskContourImage(_) => return None,
        };
        let colour = match prompt.colour.name() {
            Some(name) => name.to_string(),
            None => format!(
                "#{:02x}{:02x}{:02x}",
                prompt.colour.r, prompt.colour.g, prompt.colour.b
            ),
        };
        Some(MarkSpec {
            shape: kind.cli_name().to_string(),
            spec: format!("{numbers}:{colour}"),
            alpha: prompt.alpha,
            line_width: prompt.line_width,
        })
    }

    /// The prompt: [`parse_cli_shape`] with this mark's alpha and line width.
    pub fn to_prompt(&self) -> Result<VisualPrompt, VisualPromptError> {
        let mut prompt = parse_cli_shape(&self.shape, &self.spec)?;
        prompt.alpha = self.alpha.or(prompt.alpha);
        prompt.line_width = self.line_width.or(prompt.line_width);
        Ok(prompt)
    }
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

/// Split off an optional `:colour` (for masks only when it names a colour, so that paths
/// with colons survive).
fn split_colour(spec: &str, is_mask: bool) -> Result<(&str, Colour), VisualPromptError> {
    match spec.rsplit_once(':') {
        Some((body, c)) => match Colour::parse(c) {
            Ok(colour) => Ok((body, colour)),
            Err(e) if !is_mask => Err(e),
            Err(_) => Ok((spec, Colour::RED)),
        },
        None => Ok((spec, Colour::RED)),
    }
}

/// The numbers of a spec body.
fn numbers(body: &str) -> Result<Vec<f32>, SpecProblem> {
    body.split([',', ';'])
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<f32>()
                .map_err(|_| SpecProblem::NotANumber(t.to_string()))
        })
        .collect()
}

/// Exactly `n` numbers.
fn exactly(body: &str, n: usize) -> Result<Vec<f32>, SpecProblem> {
    let v = numbers(body)?;
    if v.len() == n {
        Ok(v)
    } else {
        Err(SpecProblem::WrongCount {
            expected: n,
            got: v.len(),
        })
    }
}

/// At least `min` `x,y` points.
fn points(body: &str, min: usize) -> Result<Vec<(f32, f32)>, SpecProblem> {
    let v = numbers(body)?;
    if v.len() % 2 != 0 {
        return Err(SpecProblem::OddCount(v.len()));
    }
    if v.len() / 2 < min {
        return Err(SpecProblem::TooFewPoints {
            min,
            got: v.len() / 2,
        });
    }
    Ok(v.chunks_exact(2).map(|p| (p[0], p[1])).collect())
}

/// A box-like spec: `x0,y0,x1,y1`.
fn corners(body: &str) -> Result<[f32; 4], SpecProblem> {
    let v = exactly(body, 4)?;
    Ok([v[0], v[1], v[2], v[3]])
}

/// Whether a mask spec is a polygon (numbers) rather than a file path.
fn looks_numeric(body: &str) -> bool {
    !body.trim().is_empty() && body.chars().all(|c| c.is_ascii_digit() || ",;.-+eE ".contains(c))
}

/// [`ShapeKind::parse_spec`] with errors naming the kind as `kind_text`.
fn parse_spec_named(kind: ShapeKind, kind_text: &str, spec: &str) -> Result<VisualPrompt, VisualPromptError> {
    let bad = |reason: SpecProblem| VisualPromptError::BadSpec {
        kind: kind_text.to_string(),
        spec: spec.to_string(),
        reason,
    };
    let (body, colour) = split_colour(spec, kind.is_mask())?;
    let shape = match kind {
        ShapeKind::Rectangle => {
            let [x0, y0, x1, y1] = corners(body).map_err(bad)?;
            Shape::Rectangle { x0, y0, x1, y1 }
        }
        ShapeKind::Ellipse => {
            let [x0, y0, x1, y1] = corners(body).map_err(bad)?;
            Shape::Ellipse { x0, y0, x1, y1 }
        }
        ShapeKind::Arrow => {
            let [x0, y0, x1, y1] = corners(body).map_err(bad)?;
            Shape::Arrow { x0, y0, x1, y1 }
        }
        ShapeKind::Triangle => {
            let v = exactly(body, 6).map_err(bad)?;
            Shape::Triangle {
                points: [(v[0], v[1]), (v[2], v[3]), (v[4], v[5])],
            }
        }
        ShapeKind::Point => {
            let v = exactly(body, 2).map_err(bad)?;
            Shape::Point { x: v[0], y: v[1] }
        }
        ShapeKind::Scribble => Shape::Scribble {
            points: points(body, 2).map_err(bad)?,
        },
        ShapeKind::Mask | ShapeKind::MaskContour => {
            let contour = kind == ShapeKind::MaskContour;
            if looks_numeric(body) {
                let polygon = points(body, 3).map_err(bad)?;
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
    };
    Ok(VisualPrompt::new(shape, colour))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in ShapeKind::ALL {
            assert_eq!(kind.to_string().parse::<ShapeKind>().unwrap(), kind);
        }
        assert_eq!(" Rect ".parse::<ShapeKind>().unwrap(), ShapeKind::Rectangle);
        assert_eq!(
            "mask contour".parse::<ShapeKind>().unwrap(),
            ShapeKind::MaskContour
        );
        assert!(matches!(
            "hexagon".parse::<ShapeKind>(),
            Err(VisualPromptError::UnknownShape(k)) if k == "hexagon"
        ));
    }

    #[test]
    fn prompts_parse_from_one_string() {
        let p: VisualPrompt = "box=45,15,115,95:blue".parse().unwrap();
        assert_eq!(p, ShapeKind::Rectangle.parse_spec("45,15,115,95:blue").unwrap());
        assert_eq!(p.colour, Colour::new(0, 0, 255));
        assert!("45,15,115,95".parse::<VisualPrompt>().is_err());
    }

    #[test]
    fn spec_problems_are_typed() {
        let e = ShapeKind::Point.parse_spec("1,2,3").unwrap_err();
        assert!(
            matches!(
                &e,
                VisualPromptError::BadSpec {
                    reason: SpecProblem::WrongCount { expected: 2, got: 3 },
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "bad point spec \"1,2,3\": expected 2 numbers, got 3"
        );
        let e = parse_cli_shape("Scribble", "1,2;3").unwrap_err();
        assert_eq!(
            e.to_string(),
            "bad Scribble spec \"1,2;3\": expected x,y pairs, got 3 numbers"
        );
        // An unknown kind with a bad colour reports the colour first, as before.
        assert!(matches!(
            parse_cli_shape("hexagon", "1,2:reddish"),
            Err(VisualPromptError::UnknownColour(_))
        ));
    }
}

#[cfg(test)]
mod mark_spec_tests {
    use super::*;

    #[test]
    fn from_prompt_round_trips_every_text_shape() {
        let shapes = [
            Shape::Rectangle {
                x0: 10.5,
                y0: 2.0,
                x1: 80.25,
                y1: 70.0,
            },
            Shape::Ellipse {
                x0: 1.0,
                y0: 2.0,
                x1: 3.0,
                y1: 4.0,
            },
            Shape::Arrow {
                x0: 155.0,
                y0: 150.0,
                x1: 110.1,
                y1: 100.0,
            },
            Shape::Triangle {
                points: [(1.0, 2.0), (30.0, 4.0), (5.5, 60.0)],
            },
            Shape::Point {
                x: 7.0,
                y: 0.333_333_34,
            },
            Shape::Scribble {
                points: vec![(1.0, 1.0), (5.0, 9.0), (12.0, 3.0)],
            },
            Shape::Mask {
                polygon: vec![(1.0, 1.0), (50.0, 1.0), (25.0, 40.0)],
            },
            Shape::MaskContour {
                polygon: vec![(1.0, 1.0), (50.0, 1.0), (25.0, 40.0), (0.0, 30.0)],
            },
        ];
        for (i, shape) in shapes.into_iter().enumerate() {
            let colour = if i % 2 == 0 {
                Colour::new(255, 165, 0)
            } else {
                Colour::new(1, 2, 3)
            };
            let mut prompt = VisualPrompt::new(shape, colour);
            if i == 3 {
                prompt = prompt.with_alpha(200).with_line_width(4.5);
            }
            let spec = MarkSpec::from_prompt(&prompt).unwrap();
            assert_eq!(spec.to_prompt().unwrap(), prompt, "{spec:?}");
        }
        let image = VisualPrompt::new(Shape::MaskImage(GrayImage::new(2, 2)), Colour::RED);
        assert_eq!(MarkSpec::from_prompt(&image), None);
    }
}
