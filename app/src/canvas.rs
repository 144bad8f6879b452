//! The image view: where the image sits on screen, conversions between screen points and
//! original-image pixels, the crop/pad overlay, and outlines of the mark being drawn or
//! selected (the marks themselves are in the texture, drawn by the processor).

use egui::{Color32, Painter, Pos2, Rect, Shape as EguiShape, Stroke, StrokeKind, Vec2, pos2, vec2};
use vipllava::processor::image::{ImageMode, ImageProcessorConfig, crop_window};
use vipllava::processor::visual_prompt::Shape;

use crate::marks::{Tool, shape_points};

/// An image of `size` pixels shown in `rect` on screen, aspect ratio kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fit {
    /// Where the image is drawn.
    pub rect: Rect,
    /// Screen points per image pixel.
    pub scale: f32,
}

impl Fit {
    /// The largest aspect-preserving fit of a `width`×`height` image in `available`,
    /// centred, never enlarged past 4x.
    pub fn new(available: Rect, width: u32, height: u32) -> Self {
        let (w, h) = (width.max(1) as f32, height.max(1) as f32);
        let scale = (available.width() / w)
            .min(available.height() / h)
            .clamp(1e-3, 4.0);
        let size = vec2(w * scale, h * scale);
        Self {
            rect: Rect::from_center_size(available.center(), size),
            scale,
        }
    }

    /// Screen point -> image pixel coordinates (not clamped), rounded to 1/100 px: finer
    /// than any drawing can show, and command lines stay readable (`109.99999` -> `110`).
    pub fn to_image(&self, p: Pos2) -> (f32, f32) {
        let v = (p - self.rect.min) / self.scale;
        let round = |x: f32| (x * 100.0).round() / 100.0;
        (round(v.x), round(v.y))
    }

    /// Image pixel coordinates -> screen point.
    pub fn to_screen(&self, (x, y): (f32, f32)) -> Pos2 {
        self.rect.min + vec2(x, y) * self.scale
    }

    /// An image-pixel rectangle on screen.
    pub fn rect_to_screen(&self, x0: f32, y0: f32, x1: f32, y1: f32) -> Rect {
        Rect::from_min_max(self.to_screen((x0, y0)), self.to_screen((x1, y1)))
    }
}

/// What the model sees of the image, in original pixels: the crop window (crop mode), or
/// the padded square around the image (pad mode).
pub fn model_window(
    width: u32,
    height: u32,
    mode: ImageMode,
    config: &ImageProcessorConfig,
) -> (f32, f32, f32, f32) {
    match mode {
        ImageMode::Crop => {
            let w = crop_window(width, height, config);
            (w.x0, w.y0, w.x1, w.y1)
        }
        ImageMode::Pad => {
            // expand_to_square centres the image on a square of the long side.
            let side = width.max(height) as f32;
            let left = ((side - width as f32) / 2.0).floor();
            let top = ((side - height as f32) / 2.0).floor();
            (-left, -top, side - left, side - top)
        }
    }
}

/// Dims what crop mode cuts away, or draws the pad bars of pad mode, and outlines the
/// square the model sees.
pub fn paint_overlay(painter: &Painter, fit: &Fit, window: (f32, f32, f32, f32)) {
    let seen = fit.rect_to_screen(window.0, window.1, window.2, window.3);
    let shade = Color32::from_black_alpha(140);
    let image = fit.rect;
    if seen.contains_rect(image) {
        // Pad mode: the bars outside the image, in the pad colour.
        let pad = Color32::from_rgba_unmultiplied(122, 116, 104, 160);
        for bar in ring(seen, image) {
            if bar.width() > 0.5 && bar.height() > 0.5 {
                painter.rect_filled(bar, 0.0, pad);
            }
        }
    } else {
        // Crop mode: shade the parts of the image outside the window.
        for part in ring(image, seen) {
            if part.width() > 0.5 && part.height() > 0.5 {
                painter.rect_filled(part, 0.0, shade);
            }
        }
    }
    painter.rect_stroke(
        seen,
        0.0,
        Stroke::new(1.5, Color32::from_rgb(80, 200, 255)),
        StrokeKind::Outside,
    );
}

/// The four rectangles of `outer` around `inner` (above, below, left, right), some of them
/// empty when `inner` touches an edge.
fn ring(outer: Rect, inner: Rect) -> [Rect; 4] {
    [
        Rect::from_min_max(outer.min, pos2(outer.max.x, inner.min.y)),
        Rect::from_min_max(pos2(outer.min.x, inner.max.y), outer.max),
        Rect::from_min_max(pos2(outer.min.x, inner.min.y), pos2(inner.min.x, inner.max.y)),
        Rect::from_min_max(pos2(inner.max.x, inner.min.y), pos2(outer.max.x, inner.max.y)),
    ]
}

/// The outline of a shape (the gesture in progress, or the selection).
pub fn paint_outline(painter: &Painter, fit: &Fit, shape: &Shape, stroke: Stroke) {
    let points: Vec<Pos2> = shape_points(shape)
        .into_iter()
        .map(|p| fit.to_screen(p))
        .collect();
    match shape {
        Shape::Rectangle { .. } | Shape::Triangle { .. } | Shape::Mask { .. } | Shape::MaskContour { .. } => {
            painter.add(EguiShape::closed_line(points, stroke));
        }
        Shape::Ellipse { x0, y0, x1, y1 } => {
            let r = fit.rect_to_screen(*x0, *y0, *x1, *y1);
            painter.add(EguiShape::ellipse_stroke(r.center(), r.size() / 2.0, stroke));
        }
        Shape::Point { .. } => {
            if let Some(&c) = points.first() {
                painter.circle_stroke(c, 6.0, stroke);
            }
        }
        Shape::Arrow { .. } | Shape::Scribble { .. } => {
            painter.add(EguiShape::line(points, stroke));
        }
        Shape::MaskImage(_) | Shape::MaskContourImage(_) => {}
    }
}

/// The gesture in progress, before it becomes a mark.
pub fn paint_gesture(painter: &Painter, fit: &Fit, tool: Tool, path: &[(f32, f32)], colour: Color32) {
    let stroke = Stroke::new(2.0, colour);
    if let Some(shape) = tool.shape(path) {
        paint_outline(painter, fit, &shape, stroke);
    } else if tool.is_freehand() {
        let points: Vec<Pos2> = path.iter().map(|&p| fit.to_screen(p)).collect();
        painter.add(EguiShape::line(points, stroke));
    }
}

/// A hint drawn in an empty canvas.
pub fn paint_hint(painter: &Painter, rect: Rect, text: &str, colour: Color32) {
    painter.text(
        rect.center(),
        egui::Align2::CENTER_CENTER,
        text,
        egui::FontId::proportional(16.0),
        colour,
    );
}

/// Converts an RGB(A) image to an egui image.
pub fn color_image(image: &image::DynamicImage) -> egui::ColorImage {
    let rgba = image.to_rgba8();
    let size = [rgba.width() as usize, rgba.height() as usize];
    egui::ColorImage::from_rgba_unmultiplied(size, rgba.as_raw())
}

/// Size of `v` as a vector (for layout code that wants one).
pub fn size_vec(width: u32, height: u32) -> Vec2 {
    vec2(width as f32, height as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_keeps_aspect_and_round_trips() {
        let fit = Fit::new(
            Rect::from_min_size(pos2(10.0, 20.0), vec2(400.0, 400.0)),
            800,
            400,
        );
        assert_eq!(fit.scale, 0.5);
        assert_eq!(
            fit.rect,
            Rect::from_min_size(pos2(10.0, 120.0), vec2(400.0, 200.0))
        );
        let p = fit.to_screen((123.0, 45.0));
        let back = fit.to_image(p);
        assert!((back.0 - 123.0).abs() < 1e-3 && (back.1 - 45.0).abs() < 1e-3);
    }

    #[test]
    fn model_windows() {
        let config = ImageProcessorConfig::clip_336();
        // 640x480: resized to 448x336, cropped 56 px each side -> 80 original px.
        let (x0, y0, x1, y1) = model_window(640, 480, ImageMode::Crop, &config);
        assert!((x0 - 80.0).abs() < 0.01 && y0 == 0.0 && (x1 - 560.0).abs() < 0.01 && y1 == 480.0);
        assert_eq!(
            model_window(640, 480, ImageMode::Pad, &config),
            (0.0, -80.0, 640.0, 560.0)
        );
    }
}
