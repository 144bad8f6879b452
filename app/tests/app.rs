//! The app driven as a user would, without a display: egui_kittest feeds mouse events and
//! clicks (found through the accessibility tree) to the real [`VipApp`]; snapshots render
//! with wgpu (lavapipe in CI).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use egui::{Pos2, Rect};
use egui_kittest::kittest::Queryable;
use egui_kittest::{Harness, SnapshotOptions};
use vipllava::processor::image::load_image;
use vipllava::processor::visual_prompt::{Colour, DrawOptions, MarkSpec, Shape, draw_image};
use vipllava::{LoadOptions, Pipeline, Prompt, StopReason};
use vipllava_app::app::ModelState;
use vipllava_app::export::shell_quote;
use vipllava_app::{Launch, ModelSettings, Settings, VipApp};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

fn harness(launch: Launch) -> Harness<'static, VipApp> {
    Harness::builder()
        .with_size([1100.0, 700.0])
        // The tiny random model writes U+FFFD, which the default font lacks.
        .allow_missing_glyphs()
        .build_eframe(move |cc| VipApp::with_settings(&cc.egui_ctx, Settings::default(), launch))
}

fn with_image() -> Harness<'static, VipApp> {
    let mut h = harness(Launch {
        image: Some(fixture("images/chelsea.png")),
        ..Launch::default()
    });
    h.run();
    assert_eq!(h.state().image_size(), Some((160, 106)));
    h
}

fn screen(h: &Harness<'_, VipApp>, p: (f32, f32)) -> Pos2 {
    h.state()
        .image_fit()
        .expect("the image is on screen")
        .to_screen(p)
}

/// Presses at the first point, moves through the others and releases at the last (image
/// pixels).
fn drag(h: &mut Harness<'_, VipApp>, points: &[(f32, f32)]) {
    let screen_points: Vec<Pos2> = points.iter().map(|&p| screen(h, p)).collect();
    h.hover_at(screen_points[0]);
    h.step();
    h.drag_at(screen_points[0]);
    h.step();
    for &p in &screen_points[1..] {
        h.hover_at(p);
        h.step();
    }
    release_at(h, *screen_points.last().unwrap());
}

/// Releases the button where the pointer is (kittest's `drop_at` also removes the
/// pointer, so the app would not see where it was released).
fn release_at(h: &mut Harness<'_, VipApp>, pos: Pos2) {
    h.event(egui::Event::PointerButton {
        pos,
        button: egui::PointerButton::Primary,
        pressed: false,
        modifiers: egui::Modifiers::NONE,
    });
    h.step();
    h.remove_cursor();
    h.run();
}

fn click_at(h: &mut Harness<'_, VipApp>, p: (f32, f32)) {
    let s = screen(h, p);
    h.hover_at(s);
    h.step();
    h.drag_at(s);
    h.step();
    release_at(h, s);
}

fn type_question(h: &mut Harness<'_, VipApp>, text: &str) {
    h.get_by_label("Question").focus();
    h.run();
    h.get_by_label("Question").type_text(text);
    h.run();
}

fn pick_tool(h: &mut Harness<'_, VipApp>, label: &str) {
    h.get_by_label(label).click();
    h.run();
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() < 0.01
}

fn points_close(a: &[(f32, f32)], b: &[(f32, f32)]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(p, q)| close(p.0, q.0) && close(p.1, q.1))
}

#[test]
fn each_tool_draws_its_shape_in_image_pixels() {
    let mut h = with_image();
    let fit = h.state().image_fit().unwrap();
    assert!(fit.scale > 1.5, "the 160x106 image is shown enlarged: {fit:?}");
    assert!(
        (fit.rect.width() / fit.rect.height() - 160.0 / 106.0).abs() < 1e-3,
        "aspect ratio kept"
    );

    pick_tool(&mut h, "Box");
    drag(&mut h, &[(40.0, 20.0), (70.0, 50.0), (110.0, 90.0)]);
    pick_tool(&mut h, "Ellipse");
    drag(&mut h, &[(100.0, 60.0), (20.0, 10.0)]);
    pick_tool(&mut h, "Triangle");
    drag(&mut h, &[(10.0, 10.0), (50.0, 40.0)]);
    pick_tool(&mut h, "Point");
    click_at(&mut h, (80.5, 52.0));
    pick_tool(&mut h, "Arrow");
    drag(&mut h, &[(150.0, 100.0), (120.0, 80.0), (100.0, 60.0)]);
    let scribble = [(10.0, 90.0), (30.0, 80.0), (50.0, 95.0), (70.0, 85.0)];
    pick_tool(&mut h, "Scribble");
    drag(&mut h, &scribble);
    let lasso = [(120.0, 10.0), (150.0, 10.0), (150.0, 40.0), (120.0, 40.0)];
    pick_tool(&mut h, "Mask");
    drag(&mut h, &lasso);
    pick_tool(&mut h, "Mask contour");
    drag(&mut h, &lasso);

    let marks = h.state().marks();
    assert_eq!(marks.len(), 8, "{marks:?}");
    let red = Colour::RED;
    assert!(marks.iter().all(|m| m.colour == red && m.alpha.is_none()));
    match &marks[0].shape {
        Shape::Rectangle { x0, y0, x1, y1 } => {
            assert!(close(*x0, 40.0) && close(*y0, 20.0) && close(*x1, 110.0) && close(*y1, 90.0))
        }
        other => panic!("{other:?}"),
    }
    match &marks[1].shape {
        Shape::Ellipse { x0, y0, x1, y1 } => {
            assert!(close(*x0, 20.0) && close(*y0, 10.0) && close(*x1, 100.0) && close(*y1, 60.0))
        }
        other => panic!("{other:?}"),
    }
    match &marks[2].shape {
        Shape::Triangle { points } => {
            assert!(points_close(points, &[(10.0, 40.0), (50.0, 40.0), (30.0, 10.0)]))
        }
        other => panic!("{other:?}"),
    }
    match &marks[3].shape {
        Shape::Point { x, y } => assert!(close(*x, 80.5) && close(*y, 52.0)),
        other => panic!("{other:?}"),
    }
    match &marks[4].shape {
        Shape::Arrow { x0, y0, x1, y1 } => {
            assert!(close(*x0, 150.0) && close(*y0, 100.0) && close(*x1, 100.0) && close(*y1, 60.0))
        }
        other => panic!("{other:?}"),
    }
    match &marks[5].shape {
        Shape::Scribble { points } => assert!(points_close(points, &scribble), "{points:?}"),
        other => panic!("{other:?}"),
    }
    match (&marks[6].shape, &marks[7].shape) {
        (Shape::Mask { polygon }, Shape::MaskContour { polygon: contour }) => {
            assert!(
                points_close(polygon, &lasso) && points_close(contour, &lasso),
                "{polygon:?}"
            )
        }
        other => panic!("{other:?}"),
    }
    // The command line reproduces them: every mark as its flag, parsed back to itself.
    let command = h.state().command_line();
    for mark in marks {
        let spec = MarkSpec::from_prompt(mark).unwrap();
        let flag = format!("--{} {}", spec.shape, shell_quote(&spec.spec));
        assert!(command.contains(&flag), "{flag} not in {command}");
        assert_eq!(&spec.to_prompt().unwrap(), mark);
    }
}

#[test]
fn select_move_delete_undo_redo_and_colours() {
    let mut h = with_image();
    pick_tool(&mut h, "Box");
    drag(&mut h, &[(40.0, 20.0), (110.0, 90.0)]);
    h.get_by_label("blue").click();
    h.run();
    pick_tool(&mut h, "Arrow");
    drag(&mut h, &[(150.0, 100.0), (120.0, 70.0)]);
    assert_eq!(h.state().marks().len(), 2);
    assert_eq!(
        h.state().marks()[0].colour,
        Colour::RED,
        "a new colour applies to new marks only"
    );
    assert_eq!(h.state().marks()[1].colour, Colour::new(0, 0, 255));

    // Move the box by dragging its left edge 10 px right and 5 px down.
    pick_tool(&mut h, "Select");
    drag(&mut h, &[(40.0, 50.0), (45.0, 52.0), (50.0, 55.0)]);
    assert_eq!(h.state().editor().selected(), Some(0));
    assert_eq!(
        h.state().marks()[0].shape,
        Shape::Rectangle {
            x0: 50.0,
            y0: 25.0,
            x1: 120.0,
            y1: 95.0
        }
    );
    // Recolour the selection.
    h.get_by_label("lime").click();
    h.run();
    assert_eq!(h.state().marks()[0].colour, Colour::new(0, 255, 0));

    h.get_by_label("Undo").click();
    h.run();
    assert_eq!(h.state().marks()[0].colour, Colour::RED);
    h.get_by_label("Undo").click();
    h.run();
    assert_eq!(
        h.state().marks()[0].shape,
        Shape::Rectangle {
            x0: 40.0,
            y0: 20.0,
            x1: 110.0,
            y1: 90.0
        },
        "the whole move is one undo step"
    );
    h.get_by_label("Redo").click();
    h.run();
    assert_eq!(
        h.state().marks()[0].shape,
        Shape::Rectangle {
            x0: 50.0,
            y0: 25.0,
            x1: 120.0,
            y1: 95.0
        }
    );

    // Select the arrow by clicking on it, delete it with the button.
    click_at(&mut h, (135.0, 85.0));
    assert_eq!(h.state().editor().selected(), Some(1));
    h.get_by_label("Delete").click();
    h.run();
    assert_eq!(h.state().marks().len(), 1);
    h.get_by_label("Clear").click();
    h.run();
    assert!(h.state().marks().is_empty());
    h.get_by_label("Undo").click();
    h.run();
    assert_eq!(h.state().marks().len(), 1);
}

fn wait_until(h: &mut Harness<'_, VipApp>, what: &str, done: impl Fn(&VipApp) -> bool) {
    let start = Instant::now();
    while !done(h.state()) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    h.run();
}

fn load_tiny(h: &mut Harness<'_, VipApp>) {
    // Relative (tests run in the crate's directory), so snapshots show no machine's path.
    assert!(Path::new("../tests/fixtures/tiny-5x-f32/config.json").is_file());
    h.state_mut().settings_mut().model = ModelSettings {
        model: "../tests/fixtures/tiny-5x-f32".into(),
        ..ModelSettings::default()
    };
    h.get_by_label("Load model").click();
    h.step();
    wait_until(h, "the model", |app| {
        !matches!(app.model_state(), ModelState::Loading { .. })
    });
    assert!(
        matches!(h.state().model_state(), ModelState::Ready(_)),
        "{:?}",
        h.state().model_state()
    );
}

#[test]
fn ask_about_a_drawn_box_streams_what_generate_answers() {
    let mut h = with_image();
    load_tiny(&mut h);
    pick_tool(&mut h, "Box");
    drag(&mut h, &[(45.0, 15.0), (115.0, 95.0)]);
    h.state_mut().settings_mut().sampling.max_new_tokens = 24;
    let question = "What is inside the red rectangle?";
    type_question(&mut h, question);
    h.get_by_label("Ask").click();
    h.step();
    wait_until(&mut h, "the answer", |app| !app.is_generating());
    let turn = h.state().chat()[0].clone();
    assert_eq!(turn.question, question);
    assert!(turn.error.is_none(), "{:?}", turn.error);
    let stats = turn.stats.clone().unwrap();

    // What `vipllava generate --box ...` does with the exported flags.
    let command = h.state().command_line();
    assert!(command.contains("--box 45,15,115,95:red"), "{command}");
    let dir = fixture("tiny-5x-f32");
    let pipeline = Pipeline::load(&dir, &burn::tensor::Device::flex(), &LoadOptions::default()).unwrap();
    let mark = MarkSpec {
        shape: "box".into(),
        spec: "45,15,115,95:red".into(),
        alpha: None,
        line_width: None,
    }
    .to_prompt()
    .unwrap();
    let image = draw_image(
        &load_image(&fixture("images/chelsea.png")).unwrap(),
        &[mark],
        &DrawOptions::default(),
    )
    .unwrap();
    let input = pipeline
        .prepare(&[image], &Prompt::User(question.into()))
        .unwrap();
    let mut options = pipeline.generation_defaults().clone();
    options.max_new_tokens = 24;
    let reference = pipeline.generate(&input, &options, |_| {}).unwrap();
    assert!(!reference.token_ids.is_empty());
    assert_eq!(stats.token_ids, reference.token_ids);
    assert_eq!(
        turn.answer, reference.text,
        "the streamed pieces add up to the answer"
    );
    assert_eq!(stats.prompt_tokens, input.input_ids.len());
    assert_eq!(stats.computed_tokens, input.input_ids.len());

    // A follow-up reuses the cache: only the new turn's tokens are computed.
    type_question(&mut h, "And the colour?");
    h.get_by_label("Ask").click();
    h.step();
    wait_until(&mut h, "the follow-up", |app| !app.is_generating());
    let follow = h.state().chat()[1].stats.clone().unwrap();
    let image_token = pipeline.config().image_token_index as u32;
    let image_end = input.input_ids.iter().rposition(|&t| t == image_token).unwrap() + 1;
    assert!(
        follow.prompt_tokens - follow.computed_tokens >= image_end,
        "the image and the first question come from the cache: {follow:?}"
    );

    // "What the model sees" is the model's input: de-normalised pixel values, in pad mode.
    h.get_by_label("Pad").click();
    h.run();
    h.get_by_label("What the model sees").click();
    h.run();
    let view = h.state().model_view().unwrap();
    let marked = h.state().prompted_image().unwrap();
    let pixels = &pipeline
        .preprocess_images_in_mode(&[marked], vipllava::processor::image::ImageMode::Pad)
        .unwrap()[0];
    let config = pipeline.image_config();
    assert_eq!(
        (view.width() as usize, view.height() as usize),
        (pixels.width, pixels.height)
    );
    let plane = pixels.width * pixels.height;
    let mut max_diff = 0f32;
    for (i, p) in view.pixels().enumerate() {
        for c in 0..3 {
            let v = pixels.data[c * plane + i] * config.image_std[c] + config.image_mean[c];
            max_diff = max_diff.max((v * 255.0 - p.0[c] as f32).abs());
        }
    }
    assert!(max_diff < 0.01, "max |diff| {max_diff} levels");

    // New chat forgets it; moving on to other marks starts afresh too.
    h.get_by_label("New chat").click();
    h.run();
    assert!(h.state().chat().is_empty());
}

#[test]
fn stop_cancels_and_errors_stay_in_the_window() {
    let mut h = harness(Launch::default());
    h.run();
    // A corrupt image and a bad model directory: messages, no crash.
    h.state_mut().open_image_path(&fixture("images/inputs.json"));
    h.run();
    assert!(
        h.state().error().unwrap().contains("cannot open"),
        "{:?}",
        h.state().error()
    );
    h.get_by_label_contains("cannot open");
    h.state_mut().settings_mut().model.model = fixture("bad").display().to_string();
    h.get_by_label("Load model").click();
    h.step();
    wait_until(&mut h, "the failed load", |app| {
        !matches!(app.model_state(), ModelState::Loading { .. })
    });
    assert!(matches!(h.state().model_state(), ModelState::Failed(_)));
    h.get_by_label_contains("load failed");

    // The app keeps working: load the real model, ask, stop.
    h.state_mut().open_image_path(&fixture("images/chelsea.png"));
    load_tiny(&mut h);
    {
        let app = h.state_mut();
        let s = &mut app.settings_mut().sampling;
        s.sample = true;
        s.seed = 7;
        s.max_new_tokens = 200;
        app.set_question("Describe the image.");
        // The Stop button calls `stop`; pressing it right after asking makes the test
        // independent of how fast the tiny model is.
        app.ask();
        app.stop();
    }
    wait_until(&mut h, "the stopped answer", |app| !app.is_generating());
    let stats = h.state().chat()[0].stats.clone().unwrap();
    assert_eq!(stats.stop_reason, StopReason::Cancelled);
    assert!(stats.token_ids.len() < 200, "{}", stats.token_ids.len());
    h.get_by_label_contains("stopped");

    // Closing during a generation ends the model thread promptly.
    {
        let app = h.state_mut();
        app.set_question("Describe the image again.");
        app.ask();
    }
    let start = Instant::now();
    drop(h);
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[test]
fn launch_arguments_open_model_and_image() {
    let mut h = harness(Launch {
        model: Some(fixture("tiny-5x-f32").display().to_string()),
        device: Some("cpu".into()),
        dtype: Some("f32".into()),
        quantize: Some("none".into()),
        image: Some(fixture("images/coffee.png")),
    });
    h.step();
    wait_until(&mut h, "the model", |app| {
        !matches!(app.model_state(), ModelState::Loading { .. })
    });
    assert!(matches!(h.state().model_state(), ModelState::Ready(_)));
    assert_eq!(h.state().image_size(), Some((160, 107)));
    // The default answer length (256) is more than the tiny model's 256 positions leave:
    // the answer is shortened to fit, with a notice, instead of failing.
    h.state_mut().set_question("Describe the image.");
    h.state_mut().ask();
    h.step();
    wait_until(&mut h, "the answer", |app| !app.is_generating());
    let turn = h.state().chat()[0].clone();
    assert!(turn.error.is_none(), "{:?}", turn.error);
    let stats = turn.stats.unwrap();
    assert!(stats.prompt_tokens + stats.token_ids.len() <= 256, "{stats:?}");
    h.get_by_label_contains("The answer is limited to");
    // A device this build lacks is refused with a message, not a panic.
    h.state_mut().load_model(ModelSettings {
        model: "x".into(),
        device: "cuda".into(),
        ..ModelSettings::default()
    });
    wait_until(&mut h, "the refusal", |app| {
        !matches!(app.model_state(), ModelState::Loading { .. })
    });
    match h.state().model_state() {
        ModelState::Failed(message) => assert!(message.contains("cuda"), "{message}"),
        other => panic!("{other:?}"),
    }
}

/// Whether a wgpu adapter exists (lavapipe in CI). Without one the snapshots cannot be
/// rendered; CI sets `VIPLLAVA_REQUIRE_WGPU=1` so that a missing adapter fails there.
fn renderer_available() -> bool {
    let instance = wgpu::Instance::default();
    let found = !pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all())).is_empty();
    if !found {
        assert!(
            std::env::var("VIPLLAVA_REQUIRE_WGPU").is_err(),
            "VIPLLAVA_REQUIRE_WGPU is set but no wgpu adapter was found"
        );
        eprintln!("no wgpu adapter: snapshots skipped (install mesa-vulkan-drivers)");
    }
    found
}

fn snapshot(h: &mut Harness<'_, VipApp>, name: &str) {
    // Timings vary from run to run: cover them.
    for text in ["prompt tokens"] {
        let rects: Vec<Rect> = h.query_all_by_label_contains(text).map(|n| n.rect()).collect();
        for r in rects {
            h.mask(r);
        }
    }
    let options = SnapshotOptions::new().threshold(0.6).max_failed_pixels(500);
    h.snapshot_options(name, &options);
}

#[test]
fn snapshot_of_the_empty_window() {
    if !renderer_available() {
        return;
    }
    let mut h = harness(Launch::default());
    h.run();
    snapshot(&mut h, "empty");
}

#[test]
fn snapshots_of_marks_overlays_and_an_answer() {
    if !renderer_available() {
        return;
    }
    let mut h = with_image();
    pick_tool(&mut h, "Box");
    drag(&mut h, &[(45.0, 15.0), (115.0, 95.0)]);
    h.get_by_label("yellow").click();
    h.run();
    pick_tool(&mut h, "Arrow");
    drag(&mut h, &[(155.0, 100.0), (120.0, 70.0)]);
    h.run();
    snapshot(&mut h, "marks_crop");
    h.get_by_label("Pad").click();
    h.run();
    snapshot(&mut h, "marks_pad");

    load_tiny(&mut h);
    h.state_mut().settings_mut().sampling.max_new_tokens = 12;
    type_question(&mut h, "What is inside the red rectangle?");
    h.get_by_label("Ask").click();
    h.step();
    wait_until(&mut h, "the answer", |app| !app.is_generating());
    snapshot(&mut h, "answer");
}

/// The model on the wgpu device (lavapipe in CI): the same greedy tokens as on the CPU,
/// within the float tolerance of the wgpu parity tests (argmax agreement). Skipped, like the
/// snapshots, where no adapter exists and `VIPLLAVA_REQUIRE_WGPU` is unset.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_device_answers_like_the_cpu() {
    if !renderer_available() {
        return;
    }
    let mut answers = Vec::new();
    for device in ["cpu", "wgpu"] {
        let mut h = with_image();
        h.state_mut().settings_mut().model = ModelSettings {
            model: "../tests/fixtures/tiny-5x-f32".into(),
            device: device.into(),
            ..ModelSettings::default()
        };
        h.get_by_label("Load model").click();
        h.step();
        wait_until(&mut h, "the model", |app| {
            !matches!(app.model_state(), ModelState::Loading { .. })
        });
        assert!(
            matches!(h.state().model_state(), ModelState::Ready(_)),
            "{device}: {:?}",
            h.state().model_state()
        );
        pick_tool(&mut h, "Box");
        drag(&mut h, &[(45.0, 15.0), (115.0, 95.0)]);
        h.state_mut().settings_mut().sampling.max_new_tokens = 8;
        h.state_mut().set_question("What is inside the red rectangle?");
        h.state_mut().ask();
        h.step();
        wait_until(&mut h, "the answer", |app| !app.is_generating());
        let turn = h.state().chat()[0].clone();
        assert!(turn.error.is_none(), "{device}: {:?}", turn.error);
        answers.push(turn.stats.unwrap().token_ids);
    }
    assert_eq!(answers[0], answers[1]);
}
