//! Visual prompts from the CLI: `draw`, marks on `generate`, the crop warning and pad mode.

mod common;

use std::process::Command;

use common::fixture;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vipllava"))
        .args(args)
        .output()
        .expect("run vipllava")
}

#[test]
fn draw_writes_the_marked_image() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("marked.png");
    let image = fixture("images/astronaut.png");
    let r = run(&[
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

    let r = run(&[
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
    let crop = run(&base);
    assert!(crop.status.success(), "{}", String::from_utf8_lossy(&crop.stderr));
    assert!(String::from_utf8_lossy(&crop.stderr).contains("--image-mode pad"));
    let pad = run(&[&base[..], &["--image-mode", "pad"]].concat());
    assert!(pad.status.success(), "{}", String::from_utf8_lossy(&pad.stderr));
    assert!(!String::from_utf8_lossy(&pad.stderr).contains("warning"));
    // The marks reach the model: the answer's prompt differs from an unmarked run's logits.
    let plain = run(&[
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
