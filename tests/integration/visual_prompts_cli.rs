//! Visual prompts from the CLI: `draw`, marks on `generate`, the crop warning and pad mode.

use crate::common::{fixture, run_cli};

#[test]
fn draw_writes_the_marked_image() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("marked.png");
    let image = fixture("images/astronaut.png");
    let r = run_cli(&[
        "draw",
        "--image",
        image.to_str().expect("utf8"),
        "--out",
        out.to_str().expect("utf8"),
        "--box",
        "40,20,110,90",
        "--arrow",
        "150,150,100,80:blue",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let before = image::open(&image).expect("input").to_rgb8();
    let after = image::open(&out).expect("output").to_rgb8();
    assert_eq!(before.dimensions(), after.dimensions());
    // On the box's top edge the image turned redder; far from every mark it is unchanged.
    let (b, a) = (before.get_pixel(70, 20), after.get_pixel(70, 20));
    assert!(
        a[0] as i32 - a[1] as i32 > b[0] as i32 - b[1] as i32 + 20,
        "{b:?} -> {a:?}"
    );
    assert_eq!(before.get_pixel(5, 150), after.get_pixel(5, 150));

    let r = run_cli(&[
        "draw",
        "--image",
        image.to_str().expect("utf8"),
        "--out",
        "/tmp/x.png",
        "--box",
        "40,20,10,90",
    ]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("x0 < x1"));
}

#[test]
fn marks_near_the_edge_warn_in_crop_mode_not_in_pad_mode() {
    let model = fixture("tiny-5x-f32");
    let image = fixture("images/coffee_wide.png");
    let base = [
        "generate",
        "--model",
        model.to_str().expect("utf8"),
        "--image",
        image.to_str().expect("utf8"),
        "--prompt",
        "What is in the red box?",
        "--box",
        "2,2,30,40",
        "--max-new-tokens",
        "3",
        "--json",
    ];
    let crop = run_cli(&base);
    assert!(crop.status.success(), "{}", String::from_utf8_lossy(&crop.stderr));
    assert!(String::from_utf8_lossy(&crop.stderr).contains("--image-mode pad"));
    let pad = run_cli(&[&base[..], &["--image-mode", "pad"]].concat());
    assert!(pad.status.success(), "{}", String::from_utf8_lossy(&pad.stderr));
    assert!(!String::from_utf8_lossy(&pad.stderr).contains("warning"));
    // The marks reach the model: the answer's prompt differs from an unmarked run's logits.
    let plain = run_cli(&[
        "generate",
        "--model",
        model.to_str().expect("utf8"),
        "--image",
        image.to_str().expect("utf8"),
        "--prompt",
        "What is in the red box?",
        "--max-new-tokens",
        "3",
        "--json",
        "--image-mode",
        "pad",
    ]);
    assert!(plain.status.success());
    assert_ne!(pad.stdout, plain.stdout, "drawing the box changed nothing");
}

/// `(x0, y0, x1, y1)`, end-exclusive.
type Region = (u32, u32, u32, u32);

#[test]
fn every_shape_is_visible_in_the_saved_prompted_image() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = fixture("images/astronaut.png");
    let mask = tmp.path().join("mask.png");
    let mut m = image::GrayImage::new(160, 160);
    for y in 100..140 {
        for x in 20..60 {
            m.put_pixel(x, y, image::Luma([255]));
        }
    }
    m.save(&mask).expect("mask");
    let mask = mask.to_str().expect("utf8").to_string();
    // (flag, spec, region (x0, y0, x1, y1) that must contain every changed pixel)
    let cases: Vec<(&str, String, Region)> = vec![
        ("--box", "40,20,110,90".into(), (38, 18, 112, 92)),
        ("--ellipse", "40,20,110,90:lime".into(), (38, 18, 112, 92)),
        ("--triangle", "30,30,90,30,60,80:blue".into(), (26, 26, 94, 84)),
        ("--point", "80,80:yellow".into(), (70, 70, 90, 90)),
        ("--arrow", "20,140,80,80:aqua".into(), (14, 70, 90, 146)),
        (
            "--scribble",
            "20,20;60,50;100,30;140,60:fuchsia".into(),
            (14, 10, 146, 70),
        ),
        ("--mask", format!("{mask}:orange"), (20, 100, 60, 140)),
        // Centred on the mask's boundary, so one pixel reaches outside it.
        ("--mask-contour", format!("{mask}:purple"), (19, 99, 61, 141)),
    ];
    let before = image::open(&image).expect("input").to_rgb8();
    for (flag, spec, (x0, y0, x1, y1)) in cases {
        let model = fixture("tiny-5x-f32");
        let out = tmp
            .path()
            .join(format!("prompted-{}.png", flag.trim_start_matches('-')));
        let r = run_cli(&[
            "generate",
            "--model",
            model.to_str().expect("utf8"),
            "--image",
            image.to_str().expect("utf8"),
            "--prompt",
            "What is marked?",
            "--max-new-tokens",
            "1",
            flag,
            &spec,
            "--save-prompted-image",
            out.to_str().expect("utf8"),
        ]);
        assert!(
            r.status.success(),
            "{flag}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        let after = image::open(&out).expect("saved").to_rgb8();
        let mut changed = 0;
        for (x, y, p) in after.enumerate_pixels() {
            if p != before.get_pixel(x, y) {
                changed += 1;
                assert!(
                    x >= x0 && x < x1 && y >= y0 && y < y1,
                    "{flag}: pixel ({x}, {y}) changed outside the shape"
                );
            }
        }
        assert!(changed > 20, "{flag}: only {changed} pixels changed");
    }
}

/// `chat` takes `generate`'s visual-prompt and sampling flags: its first answer equals
/// `generate`'s with the same marks, image mode and options.
#[test]
fn chat_takes_generate_marks_and_sampling_flags() {
    use std::io::Write;
    let model = fixture("tiny-5x-f32");
    let image = fixture("images/coffee_wide.png");
    let shared = [
        "--model",
        model.to_str().expect("utf8"),
        "--image",
        image.to_str().expect("utf8"),
        "--box",
        "40,5,120,45:blue",
        "--arrow",
        "10,10,60,30",
        "--image-mode",
        "pad",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0.7",
        "--seed",
        "3",
    ];
    let question = "What is in the blue box?";
    let mut args = vec!["generate", "--prompt", question];
    args.extend(shared);
    let generated = run_cli(&args);
    assert!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let answer = String::from_utf8_lossy(&generated.stdout).trim_end().to_string();

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vipllava"))
        .arg("chat")
        .args(shared)
        .env("HF_HUB_OFFLINE", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn chat");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{question}\n/quit\n").as_bytes())
        .expect("write");
    let chat = child.wait_with_output().expect("chat");
    assert!(chat.status.success(), "{}", String::from_utf8_lossy(&chat.stderr));
    let transcript = String::from_utf8_lossy(&chat.stdout);
    let first = transcript
        .strip_prefix("> ")
        .and_then(|t| t.lines().next())
        .expect("an answer line");
    assert!(!answer.is_empty());
    assert_eq!(first.trim_end(), answer, "chat transcript: {transcript:?}");
}

/// `draw`'s drawing flags reach the renderer: the file equals the library's `draw` with the
/// same options, in the default (training) style and with `--smooth`, and the two differ.
#[test]
fn draw_flags_reach_the_renderer() {
    use vipllava::processor::visual_prompt::{ArrowHead, DrawOptions, MarkStyle, ShapeKind, draw};
    let tmp = tempfile::tempdir().expect("tempdir");
    let input = tmp.path().join("grey.png");
    let grey = image::RgbImage::from_pixel(120, 90, image::Rgb([128, 128, 128]));
    grey.save(&input).expect("save");
    let marks = [
        ("arrow", "10,80,60,20:blue"),
        ("point", "90,30:yellow"),
        ("box", "70,50,110,85"),
    ];
    let library = |style| {
        let prompts: Vec<_> = marks
            .iter()
            .map(|(k, s)| k.parse::<ShapeKind>().expect("kind").parse_spec(s).expect("spec"))
            .collect();
        let options = DrawOptions {
            style,
            point_radius: Some(6.0),
            arrow_head_size: Some(15.0),
            arrow_head: ArrowHead::Open,
            line_width: Some(2.0),
            ..DrawOptions::default()
        };
        draw(&image::DynamicImage::ImageRgb8(grey.clone()), &prompts, &options).expect("draw")
    };
    let cli = |extra: &[&str]| {
        let out = tmp.path().join("out.png");
        let mut args = vec![
            "draw",
            "--image",
            input.to_str().expect("utf8"),
            "--out",
            out.to_str().expect("utf8"),
            "--point-radius",
            "6",
            "--arrow-head-size",
            "15",
            "--arrow-head",
            "open",
            "--line-width",
            "2",
        ];
        for (kind, spec) in &marks {
            args.push(match *kind {
                "arrow" => "--arrow",
                "point" => "--point",
                _ => "--box",
            });
            args.push(spec);
        }
        args.extend(extra);
        let r = run_cli(&args);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        image::open(&out).expect("output").to_rgb8()
    };
    let training = cli(&[]);
    assert_eq!(training, library(MarkStyle::Training));
    let smooth = cli(&["--smooth"]);
    assert_eq!(smooth, library(MarkStyle::Smooth));
    assert_ne!(training, smooth);
    // Bad sizes are clear errors.
    let r = run_cli(&[
        "draw",
        "--image",
        input.to_str().expect("utf8"),
        "--out",
        tmp.path().join("x.png").to_str().expect("utf8"),
        "--point",
        "5,5",
        "--point-radius",
        "0",
    ]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("point radius"));
}

/// `--batch` lines carry their own marks (`visual_prompts`): the answer equals `generate`
/// with the same marks as flags; mark flags with `--batch` are refused.
#[test]
fn batch_lines_carry_visual_prompts() {
    let model = fixture("tiny-5x-f32");
    let image = fixture("images/coffee_wide.png");
    let tmp = tempfile::tempdir().expect("tempdir");
    let question = "What is in the blue box?";
    let single = run_cli(&[
        "generate",
        "--model",
        model.to_str().expect("utf8"),
        "--image",
        image.to_str().expect("utf8"),
        "--prompt",
        question,
        "--box",
        "40,5,120,45:blue",
        "--arrow",
        "10,10,60,30",
        "--alpha",
        "200",
        "--image-mode",
        "pad",
        "--max-new-tokens",
        "6",
        "--json",
    ]);
    assert!(
        single.status.success(),
        "{}",
        String::from_utf8_lossy(&single.stderr)
    );
    let single: serde_json::Value = serde_json::from_slice(&single.stdout).expect("json");
    let file = tmp.path().join("requests.jsonl");
    let marked = serde_json::json!({
        "image": image, "prompt": question, "max_new_tokens": 6,
        "visual_prompts": [
            {"shape": "box", "spec": "40,5,120,45:blue"},
            {"shape": "arrow", "spec": "10,10,60,30"},
        ],
    });
    let plain = serde_json::json!({"image": image, "prompt": question, "max_new_tokens": 6});
    std::fs::write(&file, format!("{marked}\n{plain}\n")).expect("write");
    let batch = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().expect("utf8"),
            "--batch",
            file.to_str().expect("utf8"),
            "--alpha",
            "200",
            "--image-mode",
            "pad",
            "--json",
        ];
        args.extend(extra);
        run_cli(&args)
    };
    let out = batch(&[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["token_ids"], single["token_ids"]);
    assert_ne!(
        rows[1]["token_ids"], single["token_ids"],
        "the marks changed nothing"
    );
    let refused = batch(&["--box", "1,1,5,5"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("visual_prompts"));
}
