//! Measures what replacing the hand-written parts of the drawing (Pillow-exact layer
//! compositing, mask thresholding) by tiny-skia's own blending would change in the pixels
//! the model sees. The numbers are recorded in `draw.rs`'s module docs.

use image::{DynamicImage, GrayImage, Luma, Rgb, RgbImage};
use tiny_skia::{
    FilterQuality, IntSize, Mask, Paint, Pixmap, PixmapPaint, PremultipliedColorU8, Rect, Transform,
};

use super::geometry::fill_paths;
use super::raster::coverage;
use super::validate::resolve;
use super::{Colour, DrawOptions, Shape, VisualPrompt, draw};
use crate::image::{ImageProcessorConfig, resize_and_crop};

/// How tiny-skia would draw each prompt.
#[derive(Clone, Copy, Debug)]
enum Variant {
    /// One transparent layer per prompt (paths filled opaque, mask images through a
    /// coverage mask), drawn over the image with the prompt's opacity (`draw_pixmap`).
    Layer,
    /// Our coverage as a tiny-skia mask, one `fill_rect` with the prompt's colour and
    /// alpha: only the compositing is tiny-skia's.
    CoverageMask,
}

fn to_pixmap(img: &RgbImage) -> Pixmap {
    let mut pm = Pixmap::new(img.width(), img.height()).unwrap();
    for (dst, src) in pm.pixels_mut().iter_mut().zip(img.pixels()) {
        *dst = PremultipliedColorU8::from_rgba(src.0[0], src.0[1], src.0[2], 255).unwrap();
    }
    pm
}

fn tiny_skia_draw(img: &RgbImage, prompts: &[VisualPrompt], variant: Variant) -> RgbImage {
    let (w, h) = img.dimensions();
    let mut pm = to_pixmap(img);
    let full = Rect::from_xywh(0.0, 0.0, w as f32, h as f32).unwrap();
    let id = Transform::identity();
    for p in prompts {
        let (alpha, lw) = resolve(p, &DrawOptions::smooth(), w, h).unwrap();
        let c = p.colour;
        let cov_mask = || {
            Mask::from_vec(
                coverage(&p.shape, lw, &DrawOptions::smooth(), w, h).unwrap(),
                IntSize::from_wh(w, h).unwrap(),
            )
            .unwrap()
        };
        match variant {
            Variant::CoverageMask => {
                let mut paint = Paint::default();
                paint.set_color_rgba8(c.r, c.g, c.b, alpha);
                pm.fill_rect(full, &paint, id, Some(&cov_mask()));
            }
            Variant::Layer => {
                let mut layer = Pixmap::new(w, h).unwrap();
                let mut paint = Paint::default();
                paint.set_color_rgba8(c.r, c.g, c.b, 255);
                paint.anti_alias = true;
                match &p.shape {
                    Shape::MaskImage(_) | Shape::MaskContourImage(_) => {
                        layer.fill_rect(full, &paint, id, Some(&cov_mask()));
                    }
                    shape => {
                        for (path, rule) in fill_paths(shape, lw, &DrawOptions::smooth(), w, h).unwrap() {
                            layer.fill_path(&path, &paint, rule, id, None);
                        }
                    }
                }
                let paint = PixmapPaint {
                    opacity: f32::from(alpha) / 255.0,
                    quality: FilterQuality::Nearest,
                    ..PixmapPaint::default()
                };
                pm.draw_pixmap(0, 0, layer.as_ref(), &paint, id, None);
            }
        }
    }
    RgbImage::from_fn(w, h, |x, y| {
        let px = pm.pixel(x, y).unwrap().demultiply();
        Rgb([px.red(), px.green(), px.blue()])
    })
}

/// The processor's visual-prompt test scenes: every shape on the astronaut (fixture size
/// and 672 px wide), and a slanted triangle on grey at several alphas.
fn scenes() -> Vec<(String, DynamicImage, Vec<VisualPrompt>)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/images/astronaut.png"
    );
    let small = image::open(path).unwrap().to_rgb8();
    let big = image::imageops::resize(
        &small,
        672,
        672 * small.height() / small.width(),
        image::imageops::FilterType::Triangle,
    );
    let mut out = Vec::new();
    for (name, img) in [("astronaut", small), ("astronaut_672", big)] {
        let (wf, hf) = (img.width() as f32, img.height() as f32);
        let at = |pts: &[(f32, f32)]| pts.iter().map(|&(x, y)| (x * wf, y * hf)).collect::<Vec<_>>();
        let mask = GrayImage::from_fn(img.width(), img.height(), |x, y| {
            let (dx, dy) = (x as f32 - 0.8 * wf, y as f32 - 0.8 * hf);
            Luma([if dx * dx / 2.0 + dy * dy < (0.1 * hf).powi(2) {
                255
            } else {
                0
            }])
        });
        let b = at(&[
            (0.3, 0.05),
            (0.7, 0.45),
            (0.05, 0.05),
            (0.28, 0.3),
            (0.1, 0.95),
            (0.35, 0.7),
        ]);
        let t = at(&[(0.75, 0.05), (0.95, 0.3), (0.7, 0.35)]);
        let shapes = vec![
            (
                Shape::Rectangle {
                    x0: b[0].0,
                    y0: b[0].1,
                    x1: b[1].0,
                    y1: b[1].1,
                },
                "red",
            ),
            (
                Shape::Ellipse {
                    x0: b[2].0,
                    y0: b[2].1,
                    x1: b[3].0,
                    y1: b[3].1,
                },
                "lime",
            ),
            (
                Shape::Triangle {
                    points: [t[0], t[1], t[2]],
                },
                "blue",
            ),
            (
                Shape::Point {
                    x: 0.5 * wf,
                    y: 0.6 * hf,
                },
                "yellow",
            ),
            (
                Shape::Scribble {
                    points: at(&[(0.05, 0.5), (0.15, 0.4), (0.25, 0.6), (0.3, 0.5)]),
                },
                "fuchsia",
            ),
            (
                Shape::Arrow {
                    x0: b[4].0,
                    y0: b[4].1,
                    x1: b[5].0,
                    y1: b[5].1,
                },
                "aqua",
            ),
            (
                Shape::Mask {
                    polygon: at(&[(0.4, 0.75), (0.6, 0.7), (0.55, 0.95)]),
                },
                "orange",
            ),
            (
                Shape::MaskContour {
                    polygon: at(&[(0.62, 0.5), (0.9, 0.45), (0.95, 0.6), (0.7, 0.62)]),
                },
                "purple",
            ),
            (Shape::MaskImage(mask.clone()), "#3366ff"),
            (Shape::MaskContourImage(mask), "gold"),
        ];
        let prompts = shapes
            .into_iter()
            .map(|(s, c)| VisualPrompt::new(s, Colour::parse(c).unwrap()))
            .collect();
        out.push((name.to_string(), DynamicImage::ImageRgb8(img), prompts));
    }
    for alpha in [1u8, 64, 128, 200, 255] {
        let grey = RgbImage::from_pixel(120, 120, Rgb([128; 3]));
        let tri = Shape::Triangle {
            points: [(10.0, 10.0), (110.0, 30.0), (40.0, 105.0)],
        };
        let prompt = VisualPrompt::new(tri, Colour::RED)
            .with_alpha(alpha)
            .with_line_width(4.0);
        out.push((
            format!("grey_triangle_a{alpha}"),
            DynamicImage::ImageRgb8(grey),
            vec![prompt],
        ));
    }
    out
}

/// (max |diff| over channels, pixels that differ, pixels the prompts touch, all pixels)
fn compare(ours: &RgbImage, theirs: &RgbImage, base: &RgbImage) -> (u8, usize, usize, usize) {
    let mut max = 0u8;
    let (mut differ, mut touched) = (0, 0);
    for ((a, b), o) in ours.pixels().zip(theirs.pixels()).zip(base.pixels()) {
        let d = (0..3).map(|c| a.0[c].abs_diff(b.0[c])).max().unwrap_or(0);
        max = max.max(d);
        differ += usize::from(d > 0);
        touched += usize::from(a != o || b != o);
    }
    (max, differ, touched, ours.pixels().len())
}

#[test]
#[ignore = "measurement; run with --ignored --nocapture to print the numbers"]
fn tiny_skia_blending_against_ours() {
    for variant in [Variant::Layer, Variant::CoverageMask] {
        let (mut all_max, mut all_differ, mut all_touched, mut all_pixels) = (0u8, 0, 0, 0);
        let (mut seen_max, mut seen_differ, mut seen_pixels) = (0u8, 0, 0);
        let clip = ImageProcessorConfig::clip_336();
        for (name, img, prompts) in scenes() {
            let base = img.to_rgb8();
            let ours = draw(&img, &prompts, &DrawOptions::smooth()).unwrap();
            let theirs = tiny_skia_draw(&base, &prompts, variant);
            let (max, differ, touched, pixels) = compare(&ours, &theirs, &base);
            // What the model sees: the 336x336 crop after the PIL-exact resize.
            let seen = |x: &RgbImage| resize_and_crop(&DynamicImage::ImageRgb8(x.clone()), &clip).unwrap();
            let (seen_ours, seen_theirs) = (seen(&ours), seen(&theirs));
            let (smax, sdiffer, _, spixels) = compare(&seen_ours, &seen_theirs, &seen(&base));
            println!(
                "{variant:?} {name} as the model sees it (336x336): max |diff| {smax}, {:.2}% of pixels differ",
                100.0 * sdiffer as f64 / spixels as f64
            );
            seen_max = seen_max.max(smax);
            seen_differ += sdiffer;
            seen_pixels += spixels;
            println!(
                "{variant:?} {name}: max |diff| {max}, {differ} of {pixels} pixels differ ({:.2}%; {:.2}% of the {touched} touched)",
                100.0 * differ as f64 / pixels as f64,
                100.0 * differ as f64 / touched.max(1) as f64
            );
            all_max = all_max.max(max);
            all_differ += differ;
            all_touched += touched;
            all_pixels += pixels;
        }
        println!(
            "{variant:?} overall: max |diff| {all_max}, {:.2}% of pixels differ ({:.2}% of touched pixels)",
            100.0 * all_differ as f64 / all_pixels as f64,
            100.0 * all_differ as f64 / all_touched.max(1) as f64
        );
        println!(
            "{variant:?} overall as the model sees it: max |diff| {seen_max}, {:.2}% of pixels differ",
            100.0 * seen_differ as f64 / seen_pixels as f64
        );
    }
}
