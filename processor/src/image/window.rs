//! The part of an original image that survives preprocessing's resize and center crop,
//! in original-image pixels: where a visual prompt must lie to be seen by the model.

use super::{ImageProcessorConfig, Size};

/// A rectangle in original-image pixels, `x1`/`y1` exclusive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CropWindow {
    /// Left edge.
    pub x0: f32,
    /// Top edge.
    pub y0: f32,
    /// Right edge (exclusive).
    pub x1: f32,
    /// Bottom edge (exclusive).
    pub y1: f32,
}

impl CropWindow {
    /// Whether the extent `(x0, y0, x1, y1)` (as
    /// [`crate::visual_prompt::bounding_box`] gives it) lies wholly inside.
    pub fn contains(&self, (x0, y0, x1, y1): (f32, f32, f32, f32)) -> bool {
        x0 >= self.x0 && y0 >= self.y0 && x1 <= self.x1 && y1 <= self.y1
    }
}

/// The part of a `width`×`height` image that survives resize-shortest-edge + center crop
/// (crop mode), in original pixels. The whole image when the config does not
/// center-crop or does not resize by shortest edge.
///
/// Computed in `f32` from the resize scale: the crop offset `floor((scaled - crop) / 2)`
/// (at least 0), mapped back to the original and clipped to the image.
pub fn crop_window(width: u32, height: u32, config: &ImageProcessorConfig) -> CropWindow {
    let (w, h) = (width as f32, height as f32);
    let whole = CropWindow {
        x0: 0.0,
        y0: 0.0,
        x1: w,
        y1: h,
    };
    if !config.do_center_crop {
        return whole;
    }
    let short = w.min(h);
    let crop_w = config.crop_size.width as f32;
    let crop_h = config.crop_size.height as f32;
    let target = match config.size {
        Size::ShortestEdge { shortest_edge, .. } => shortest_edge as f32,
        _ => return whole,
    };
    let scale = target / short;
    let (rw, rh) = (w * scale, h * scale);
    let left = ((rw - crop_w) / 2.0).max(0.0).floor();
    let top = ((rh - crop_h) / 2.0).max(0.0).floor();
    CropWindow {
        x0: left / scale,
        y0: top / scale,
        x1: ((left + crop_w) / scale).min(w),
        y1: ((top + crop_h) / scale).min(h),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::HeightWidth;

    #[test]
    fn landscape_loses_its_sides() {
        // 640x480 -> 448x336, crop 336: 56 resized px each side = 80 original px.
        let w = crop_window(640, 480, &ImageProcessorConfig::clip_336());
        assert_eq!(
            w,
            CropWindow {
                x0: 80.0,
                y0: 0.0,
                x1: 560.0,
                y1: 480.0
            }
        );
        assert!(w.contains((80.0, 0.0, 560.0, 480.0)));
        assert!(!w.contains((79.0, 10.0, 100.0, 20.0)));
        assert!(!w.contains((100.0, 10.0, 561.0, 20.0)));
    }

    #[test]
    fn portrait_loses_top_and_bottom() {
        // 300x451 -> 336x505: top = floor(169 / 2) = 84 resized px.
        let w = crop_window(300, 451, &ImageProcessorConfig::clip_336());
        let scale = 336.0f32 / 300.0;
        assert_eq!(w.x0, 0.0);
        assert_eq!(w.x1, (336.0 / scale).min(300.0));
        assert_eq!(w.y0, 84.0 / scale);
        assert_eq!(w.y1, (84.0 + 336.0) / scale);
    }

    #[test]
    fn square_or_uncropped_keeps_everything() {
        let whole = |w: u32, h: u32| CropWindow {
            x0: 0.0,
            y0: 0.0,
            x1: w as f32,
            y1: h as f32,
        };
        assert_eq!(
            crop_window(500, 500, &ImageProcessorConfig::clip_336()),
            whole(500, 500)
        );
        let no_crop = ImageProcessorConfig {
            do_center_crop: false,
            ..ImageProcessorConfig::clip_336()
        };
        assert_eq!(crop_window(640, 480, &no_crop), whole(640, 480));
        let exact = ImageProcessorConfig {
            size: Size::Exact {
                height: 336,
                width: 336,
            },
            ..ImageProcessorConfig::clip_336()
        };
        assert_eq!(crop_window(640, 480, &exact), whole(640, 480));
        // A crop larger than the resized image: nothing is cut.
        let big_crop = ImageProcessorConfig {
            crop_size: HeightWidth {
                height: 400,
                width: 400,
            },
            ..ImageProcessorConfig::clip_336()
        };
        assert_eq!(crop_window(336, 336, &big_crop), whole(336, 336));
    }
}
