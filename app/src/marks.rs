//! The marks of the current image, as the processor's own [`VisualPrompt`]s in
//! original-image pixel coordinates (so the model sees exactly what `vipllava draw` draws
//! with the same marks), with selection, moving, and undo/redo. No egui here: the canvas
//! turns mouse gestures into the calls below.

use vipllava::processor::visual_prompt::{Colour, Shape, VisualPrompt};

/// What a mouse gesture on the image does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Tool {
    /// Click a mark to select it, drag it to move it.
    Select,
    /// Drag a box's corners.
    Box,
    /// Drag the box the ellipse is inscribed in.
    Ellipse,
    /// Drag a box: the triangle stands on its bottom edge with its apex at the top middle.
    Triangle,
    /// Click.
    Point,
    /// Drag from the tail to the tip (the target).
    Arrow,
    /// Draw freehand.
    Scribble,
    /// Paint a region freehand: the path is closed and filled.
    Mask,
    /// Trace a region freehand: the closed path's outline.
    MaskContour,
}

impl Tool {
    /// Every tool, in the toolbar's order.
    pub const ALL: [Tool; 9] = [
        Tool::Select,
        Tool::Box,
        Tool::Ellipse,
        Tool::Triangle,
        Tool::Point,
        Tool::Arrow,
        Tool::Scribble,
        Tool::Mask,
        Tool::MaskContour,
    ];

    /// The toolbar label (also what tests click).
    pub fn label(self) -> &'static str {
        match self {
            Tool::Select => "Select",
            Tool::Box => "Box",
            Tool::Ellipse => "Ellipse",
            Tool::Triangle => "Triangle",
            Tool::Point => "Point",
            Tool::Arrow => "Arrow",
            Tool::Scribble => "Scribble",
            Tool::Mask => "Mask",
            Tool::MaskContour => "Mask contour",
        }
    }

    /// Whether the gesture is a freehand path rather than a start and an end point.
    pub fn is_freehand(self) -> bool {
        matches!(self, Tool::Scribble | Tool::Mask | Tool::MaskContour)
    }

    /// The shape a gesture draws: `path` holds the pointer positions in image pixels, the
    /// first where the button went down and the last where it came up. `None` when the
    /// gesture is too small to be a mark (a click for a box, one point for a scribble).
    pub fn shape(self, path: &[(f32, f32)]) -> Option<Shape> {
        let (&start, &end) = (path.first()?, path.last()?);
        let (x0, x1) = (start.0.min(end.0), start.0.max(end.0));
        let (y0, y1) = (start.1.min(end.1), start.1.max(end.1));
        let has_area = x1 - x0 >= 1.0 && y1 - y0 >= 1.0;
        match self {
            Tool::Select => None,
            Tool::Box => has_area.then_some(Shape::Rectangle { x0, y0, x1, y1 }),
            Tool::Ellipse => has_area.then_some(Shape::Ellipse { x0, y0, x1, y1 }),
            Tool::Triangle => has_area.then_some(Shape::Triangle {
                points: [(x0, y1), (x1, y1), ((x0 + x1) / 2.0, y0)],
            }),
            Tool::Point => Some(Shape::Point { x: end.0, y: end.1 }),
            Tool::Arrow => (distance(start, end) >= 2.0).then_some(Shape::Arrow {
                x0: start.0,
                y0: start.1,
                x1: end.0,
                y1: end.1,
            }),
            Tool::Scribble => {
                let points = thin(path, 2.0);
                (points.len() >= 2).then_some(Shape::Scribble { points })
            }
            Tool::Mask | Tool::MaskContour => {
                let polygon = thin(path, 2.0);
                if polygon.len() < 3 || polygon_area(&polygon).abs() < 1.0 {
                    return None;
                }
                Some(match self {
                    Tool::Mask => Shape::Mask { polygon },
                    _ => Shape::MaskContour { polygon },
                })
            }
        }
    }
}

/// Drops points closer than `min_step` to the last kept one (a mouse reports many per
/// pixel). The path's end is kept: it replaces a kept point too close to it, unless that
/// point is the start.
fn thin(path: &[(f32, f32)], min_step: f32) -> Vec<(f32, f32)> {
    let mut out: Vec<(f32, f32)> = Vec::with_capacity(path.len());
    for &p in path {
        if out.last().is_none_or(|&q| distance(p, q) >= min_step) {
            out.push(p);
        }
    }
    if let Some(&last) = path.last()
        && out.last() != Some(&last)
        && out.len() > 1
    {
        out.pop();
        if out.last().is_some_and(|&q| distance(last, q) >= min_step) {
            out.push(last);
        }
    }
    out
}

fn distance(a: (f32, f32), b: (f32, f32)) -> f32 {
    (a.0 - b.0).hypot(a.1 - b.1)
}

fn polygon_area(points: &[(f32, f32)]) -> f32 {
    let n = points.len();
    (0..n)
        .map(|i| {
            let (a, b) = (points[i], points[(i + 1) % n]);
            a.0 * b.1 - b.0 * a.1
        })
        .sum::<f32>()
        / 2.0
}

/// The position of a shape's flag in the CLI's drawing order (`--box` marks first).
pub fn cli_rank(shape: &Shape) -> usize {
    match shape {
        Shape::Rectangle { .. } => 0,
        Shape::Ellipse { .. } => 1,
        Shape::Triangle { .. } => 2,
        Shape::Point { .. } => 3,
        Shape::Arrow { .. } => 4,
        Shape::Scribble { .. } => 5,
        Shape::Mask { .. } | Shape::MaskImage(_) => 6,
        Shape::MaskContour { .. } | Shape::MaskContourImage(_) => 7,
    }
}

/// The points that define a shape (for hit tests, moving and drawing handles).
pub fn shape_points(shape: &Shape) -> Vec<(f32, f32)> {
    match shape {
        Shape::Rectangle { x0, y0, x1, y1 } | Shape::Ellipse { x0, y0, x1, y1 } => {
            vec![(*x0, *y0), (*x1, *y0), (*x1, *y1), (*x0, *y1)]
        }
        Shape::Arrow { x0, y0, x1, y1 } => vec![(*x0, *y0), (*x1, *y1)],
        Shape::Triangle { points } => points.to_vec(),
        Shape::Point { x, y } => vec![(*x, *y)],
        Shape::Scribble { points } => points.clone(),
        Shape::Mask { polygon } | Shape::MaskContour { polygon } => polygon.clone(),
        Shape::MaskImage(_) | Shape::MaskContourImage(_) => Vec::new(),
    }
}

/// `shape` moved by `(dx, dy)` image pixels.
pub fn translated(shape: &Shape, dx: f32, dy: f32) -> Shape {
    let mv = |(x, y): (f32, f32)| (x + dx, y + dy);
    match shape {
        Shape::Rectangle { x0, y0, x1, y1 } => Shape::Rectangle {
            x0: x0 + dx,
            y0: y0 + dy,
            x1: x1 + dx,
            y1: y1 + dy,
        },
        Shape::Ellipse { x0, y0, x1, y1 } => Shape::Ellipse {
            x0: x0 + dx,
            y0: y0 + dy,
            x1: x1 + dx,
            y1: y1 + dy,
        },
        Shape::Arrow { x0, y0, x1, y1 } => Shape::Arrow {
            x0: x0 + dx,
            y0: y0 + dy,
            x1: x1 + dx,
            y1: y1 + dy,
        },
        Shape::Triangle { points } => Shape::Triangle {
            points: points.map(mv),
        },
        Shape::Point { x, y } => Shape::Point { x: x + dx, y: y + dy },
        Shape::Scribble { points } => Shape::Scribble {
            points: points.iter().copied().map(mv).collect(),
        },
        Shape::Mask { polygon } => Shape::Mask {
            polygon: polygon.iter().copied().map(mv).collect(),
        },
        Shape::MaskContour { polygon } => Shape::MaskContour {
            polygon: polygon.iter().copied().map(mv).collect(),
        },
        other @ (Shape::MaskImage(_) | Shape::MaskContourImage(_)) => other.clone(),
    }
}

/// Distance from `p` to the segment `a`-`b`.
fn segment_distance(p: (f32, f32), a: (f32, f32), b: (f32, f32)) -> f32 {
    let (vx, vy) = (b.0 - a.0, b.1 - a.1);
    let len2 = vx * vx + vy * vy;
    let t = if len2 > 0.0 {
        (((p.0 - a.0) * vx + (p.1 - a.1) * vy) / len2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    distance(p, (a.0 + t * vx, a.1 + t * vy))
}

fn inside_polygon(p: (f32, f32), polygon: &[(f32, f32)]) -> bool {
    let mut inside = false;
    let n = polygon.len();
    for i in 0..n {
        let (a, b) = (polygon[i], polygon[(i + n - 1) % n]);
        if (a.1 > p.1) != (b.1 > p.1) && p.0 < (b.0 - a.0) * (p.1 - a.1) / (b.1 - a.1) + a.0 {
            inside = !inside;
        }
    }
    inside
}

/// Whether `p` (image pixels) touches `shape` within `tolerance` pixels: near an outline
/// or a stroke, or inside a filled mask.
pub fn hits(shape: &Shape, p: (f32, f32), tolerance: f32) -> bool {
    let near_path = |points: &[(f32, f32)], closed: bool| {
        let n = points.len();
        let segments = if closed { n } else { n.saturating_sub(1) };
        (0..segments).any(|i| segment_distance(p, points[i], points[(i + 1) % n]) <= tolerance)
    };
    match shape {
        Shape::Rectangle { .. } => near_path(&shape_points(shape), true),
        Shape::Ellipse { x0, y0, x1, y1 } => {
            let (cx, cy) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0);
            let (rx, ry) = (((x1 - x0) / 2.0).max(0.5), ((y1 - y0) / 2.0).max(0.5));
            let r = ((p.0 - cx) / rx).hypot((p.1 - cy) / ry);
            (r - 1.0).abs() * rx.min(ry) <= tolerance
        }
        Shape::Triangle { points } => near_path(points, true),
        Shape::Point { x, y } => distance(p, (*x, *y)) <= tolerance.max(8.0),
        Shape::Arrow { .. } => near_path(&shape_points(shape), false),
        Shape::Scribble { points } => near_path(points, false),
        Shape::Mask { polygon } => inside_polygon(p, polygon) || near_path(polygon, true),
        Shape::MaskContour { polygon } => near_path(polygon, true),
        Shape::MaskImage(_) | Shape::MaskContourImage(_) => false,
    }
}

/// The marks with a cursor into their history.
#[derive(Debug, Clone, Default)]
pub struct MarkEditor {
    marks: Vec<VisualPrompt>,
    selected: Option<usize>,
    undo: Vec<Vec<VisualPrompt>>,
    redo: Vec<Vec<VisualPrompt>>,
    /// Bumped on every change, so views and the chat know when to redraw or restart.
    revision: u64,
}

impl MarkEditor {
    /// The marks, in drawing order.
    pub fn marks(&self) -> &[VisualPrompt] {
        &self.marks
    }

    /// The selected mark's index.
    pub fn selected(&self) -> Option<usize> {
        self.selected
    }

    /// A number that changes whenever the marks do.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    fn checkpoint(&mut self) {
        self.undo.push(self.marks.clone());
        self.redo.clear();
        self.revision += 1;
    }

    /// Adds a mark (the selection is dropped: a colour picked next is for the next mark).
    /// Marks are kept in the CLI's drawing order (all boxes,
    /// then ellipses, ... as `vipllava generate` draws its `--box`, `--ellipse`, ... flags),
    /// so the exported command line draws the very same image where marks overlap.
    pub fn add(&mut self, mark: VisualPrompt) {
        self.checkpoint();
        let rank = cli_rank(&mark.shape);
        let at = self
            .marks
            .iter()
            .rposition(|m| cli_rank(&m.shape) <= rank)
            .map_or(0, |i| i + 1);
        self.marks.insert(at, mark);
        self.selected = None;
    }

    /// Selects the topmost mark under `p`, or nothing.
    pub fn select_at(&mut self, p: (f32, f32), tolerance: f32) -> Option<usize> {
        self.selected = self.marks.iter().rposition(|m| hits(&m.shape, p, tolerance));
        self.selected
    }

    /// Selects mark `index` (ignored when out of range).
    pub fn select(&mut self, index: Option<usize>) {
        self.selected = index.filter(|&i| i < self.marks.len());
    }

    /// Starts moving the selected mark: one undo step for the whole drag.
    pub fn begin_move(&mut self) -> bool {
        if self.selected.is_some() {
            self.checkpoint();
            true
        } else {
            false
        }
    }

    /// Moves the selected mark by `(dx, dy)` image pixels (call [`Self::begin_move`] first).
    pub fn move_selected(&mut self, dx: f32, dy: f32) {
        if let Some(mark) = self.selected.and_then(|i| self.marks.get_mut(i)) {
            mark.shape = translated(&mark.shape, dx, dy);
            self.revision += 1;
        }
    }

    /// Changes the selected mark's colour.
    pub fn recolour_selected(&mut self, colour: Colour) {
        let Some(i) = self.selected else { return };
        if self.marks.get(i).is_none_or(|m| m.colour == colour) {
            return;
        }
        self.checkpoint();
        if let Some(mark) = self.marks.get_mut(i) {
            mark.colour = colour;
        }
    }

    /// Deletes the selected mark.
    pub fn delete_selected(&mut self) -> bool {
        let Some(i) = self.selected.filter(|&i| i < self.marks.len()) else {
            return false;
        };
        self.checkpoint();
        self.marks.remove(i);
        self.selected = None;
        true
    }

    /// Removes every mark (undoable).
    pub fn clear(&mut self) {
        if !self.marks.is_empty() {
            self.checkpoint();
            self.marks.clear();
        }
        self.selected = None;
    }

    /// Replaces the marks and forgets the history (a new image).
    pub fn reset(&mut self, marks: Vec<VisualPrompt>) {
        self.marks = marks;
        self.undo.clear();
        self.redo.clear();
        self.selected = None;
        self.revision += 1;
    }

    /// Whether there is something to undo / redo.
    pub fn can_undo(&self) -> bool {
        !self.undo.is_empty()
    }

    /// Whether there is something to redo.
    pub fn can_redo(&self) -> bool {
        !self.redo.is_empty()
    }

    /// Goes back one change.
    pub fn undo(&mut self) -> bool {
        let Some(previous) = self.undo.pop() else {
            return false;
        };
        self.redo.push(std::mem::replace(&mut self.marks, previous));
        self.selected = None;
        self.revision += 1;
        true
    }

    /// Goes forward one undone change.
    pub fn redo(&mut self) -> bool {
        let Some(next) = self.redo.pop() else {
            return false;
        };
        self.undo.push(std::mem::replace(&mut self.marks, next));
        self.selected = None;
        self.revision += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drags_become_shapes_in_image_pixels() {
        let drag = [(50.0, 40.0), (20.0, 10.0)];
        assert_eq!(
            Tool::Box.shape(&drag),
            Some(Shape::Rectangle {
                x0: 20.0,
                y0: 10.0,
                x1: 50.0,
                y1: 40.0
            })
        );
        assert_eq!(
            Tool::Arrow.shape(&drag),
            Some(Shape::Arrow {
                x0: 50.0,
                y0: 40.0,
                x1: 20.0,
                y1: 10.0
            })
        );
        assert_eq!(
            Tool::Triangle.shape(&drag),
            Some(Shape::Triangle {
                points: [(20.0, 40.0), (50.0, 40.0), (35.0, 10.0)]
            })
        );
        assert_eq!(Tool::Box.shape(&[(5.0, 5.0), (5.2, 5.0)]), None);
        assert_eq!(
            Tool::Point.shape(&[(5.0, 6.0)]),
            Some(Shape::Point { x: 5.0, y: 6.0 })
        );
        let path = [(0.0, 0.0), (0.5, 0.5), (10.0, 0.0), (10.0, 10.0), (10.2, 10.1)];
        assert_eq!(
            Tool::Mask.shape(&path),
            Some(Shape::Mask {
                polygon: vec![(0.0, 0.0), (10.0, 0.0), (10.2, 10.1)]
            })
        );
        assert_eq!(Tool::Scribble.shape(&[(1.0, 1.0), (1.5, 1.0)]), None);
        assert_eq!(
            Tool::MaskContour.shape(&[(0.0, 0.0), (10.0, 0.0), (20.0, 0.0)]),
            None
        );
    }

    #[test]
    fn undo_redo_select_move_delete() {
        let mut editor = MarkEditor::default();
        let square = Shape::Rectangle {
            x0: 10.0,
            y0: 10.0,
            x1: 50.0,
            y1: 50.0,
        };
        editor.add(VisualPrompt::new(square.clone(), Colour::RED));
        editor.add(VisualPrompt::new(
            Shape::Point { x: 100.0, y: 100.0 },
            Colour::RED,
        ));
        assert_eq!(editor.select_at((10.5, 30.0), 3.0), Some(0));
        assert_eq!(
            editor.select_at((30.0, 30.0), 3.0),
            None,
            "a box's inside is not the box"
        );
        assert_eq!(editor.select_at((103.0, 100.0), 3.0), Some(1));
        editor.add(VisualPrompt::new(
            Shape::Rectangle {
                x0: 0.0,
                y0: 0.0,
                x1: 5.0,
                y1: 5.0,
            },
            Colour::RED,
        ));
        assert!(
            matches!(editor.marks()[1].shape, Shape::Rectangle { x1: 5.0, .. }),
            "boxes go before points, as the CLI draws them"
        );
        assert!(matches!(editor.marks()[2].shape, Shape::Point { .. }));
        assert!(editor.undo());
        editor.select(Some(0));
        assert!(editor.begin_move());
        editor.move_selected(5.0, 0.0);
        editor.move_selected(0.0, -5.0);
        assert_eq!(editor.marks()[0].shape, translated(&square, 5.0, -5.0));
        assert!(editor.undo(), "the whole drag is one step");
        assert_eq!(editor.marks()[0].shape, square);
        assert!(editor.redo());
        assert_eq!(editor.marks()[0].shape, translated(&square, 5.0, -5.0));
        editor.select(Some(1));
        assert!(editor.delete_selected());
        assert_eq!(editor.marks().len(), 1);
        editor.clear();
        assert!(editor.marks().is_empty());
        assert!(editor.undo() && editor.undo());
        assert_eq!(editor.marks().len(), 2);
        let before = editor.revision();
        editor.add(VisualPrompt::new(Shape::Point { x: 1.0, y: 1.0 }, Colour::RED));
        assert!(!editor.can_redo(), "a new change drops the redo stack");
        assert!(editor.revision() > before);
    }

    #[test]
    fn hit_tests_follow_each_shape() {
        let ellipse = Shape::Ellipse {
            x0: 0.0,
            y0: 0.0,
            x1: 100.0,
            y1: 50.0,
        };
        assert!(hits(&ellipse, (100.0, 25.0), 2.0));
        assert!(!hits(&ellipse, (50.0, 25.0), 2.0));
        let mask = Shape::Mask {
            polygon: vec![(0.0, 0.0), (40.0, 0.0), (0.0, 40.0)],
        };
        assert!(hits(&mask, (5.0, 5.0), 1.0));
        assert!(!hits(&mask, (35.0, 35.0), 1.0));
        let contour = Shape::MaskContour {
            polygon: vec![(0.0, 0.0), (40.0, 0.0), (0.0, 40.0)],
        };
        assert!(!hits(&contour, (5.0, 5.0), 1.0));
        let scribble = Shape::Scribble {
            points: vec![(0.0, 0.0), (10.0, 10.0)],
        };
        assert!(hits(&scribble, (5.0, 6.0), 1.0));
    }
}
