//! Where a prompt lands: its pixel extent, and which prompts reach outside the part of
//! the image that preprocessing keeps.

use crate::image::CropWindow;

use super::raster::coverage;
use super::validate::resolve;
use super::{DrawOptions, VisualPrompt, VisualPromptError};

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
    let cov = coverage(&prompt.shape, line_width, options, width, height)?;
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

/// The prompts (in order) whose drawn extent ([`bounding_box`]) reaches outside `window`
/// (see [`crate::image::crop_window`]) on a `width`×`height` image, i.e. the marks that
/// the center crop cuts, at least partly. Prompts that draw nothing inside the image are
/// not listed.
pub fn marks_outside<'a>(
    prompts: &'a [VisualPrompt],
    options: &DrawOptions,
    width: u32,
    height: u32,
    window: &CropWindow,
) -> Result<Vec<&'a VisualPrompt>, VisualPromptError> {
    let mut outside = Vec::new();
    for prompt in prompts {
        if let Some(extent) = bounding_box(prompt, options, width, height)?
            && !window.contains(extent)
        {
            outside.push(prompt);
        }
    }
    Ok(outside)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{ImageProcessorConfig, crop_window};
    use crate::visual_prompt::{Colour, Shape};

    fn boxed(x0: f32, y0: f32, x1: f32, y1: f32) -> VisualPrompt {
        VisualPrompt::new(Shape::Rectangle { x0, y0, x1, y1 }, Colour::RED)
    }

    #[test]
    fn marks_cut_by_the_center_crop_are_listed() {
        // 640x480 keeps x in [80, 560) after resize to 448x336 and the 336 crop.
        let window = crop_window(640, 480, &ImageProcessorConfig::clip_336());
        let prompts = [
            boxed(10.0, 10.0, 50.0, 50.0),     // wholly in the left margin
            boxed(200.0, 100.0, 300.0, 200.0), // inside
            boxed(500.0, 100.0, 600.0, 200.0), // straddles the right edge
            boxed(700.0, 10.0, 800.0, 50.0),   // outside the image: draws nothing
        ];
        let outside = marks_outside(&prompts, &DrawOptions::default(), 640, 480, &window).unwrap();
        assert_eq!(outside, vec![&prompts[0], &prompts[2]]);
        // The check includes the line width: a box touching the window edge from inside
        // stays inside. Smooth boxes end before x1; Pillow's (the default) include x1.
        let edge = [boxed(80.0, 0.0, 560.0, 480.0)];
        assert!(
            marks_outside(&edge, &DrawOptions::smooth(), 640, 480, &window)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            marks_outside(&edge, &DrawOptions::default(), 640, 480, &window).unwrap(),
            vec![&edge[0]]
        );
        let edge = [boxed(80.0, 0.0, 559.0, 479.0)];
        assert!(
            marks_outside(&edge, &DrawOptions::default(), 640, 480, &window)
                .unwrap()
                .is_empty()
        );
        // Invalid prompts are errors, as when drawing.
        assert!(
            marks_outside(
                &[boxed(5.0, 5.0, 1.0, 9.0)],
                &DrawOptions::default(),
                640,
                480,
                &window
            )
            .is_err()
        );
    }
}
