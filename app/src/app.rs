//! The window: model bar on top, tools and sampling on the left, the image in the middle,
//! the chat on the right. All model work happens on the [`Worker`] thread.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use egui::{Color32, Key, Modifiers, RichText, Sense, Stroke, TextureHandle, TextureOptions, Ui};
use image::DynamicImage;
use vipllava::StopReason;
use vipllava::processor::image::{
    ImageMode, ImageProcessorConfig, decode_image, expand_to_square, load_image, resize_and_crop, to_rgb,
};
use vipllava::processor::visual_prompt::{COLOUR_POOL, Colour, DrawOptions, Shape, VisualPrompt, draw_image};

use crate::canvas::{self, Fit};
use crate::export::{self, Scene};
use crate::marks::{MarkEditor, Tool, hits};
use crate::settings::{Launch, ModelSettings, Settings, compiled_devices};
use crate::worker::{AnswerStats, AskRequest, Event, ModelInfo, Worker};

/// Where the model stands.
#[derive(Debug, Clone)]
pub enum ModelState {
    /// Nothing opened yet.
    None,
    /// Loading, with the latest progress.
    Loading {
        /// What is happening.
        message: String,
        /// 0..=1 when known.
        fraction: Option<f32>,
    },
    /// Ready to answer.
    Ready(ModelInfo),
    /// The last load failed.
    Failed(String),
}

/// One question and its (possibly partial) answer.
#[derive(Debug, Clone)]
pub struct Turn {
    /// The worker's number for it.
    pub id: u64,
    /// The question.
    pub question: String,
    /// The answer so far.
    pub answer: String,
    /// Figures, once finished.
    pub stats: Option<AnswerStats>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// The image being marked.
struct OpenImage {
    original: DynamicImage,
    path: Option<PathBuf>,
    /// Distinguishes images for the scene key.
    id: u64,
}

/// The app's state (an [`eframe::App`]).
pub struct VipApp {
    settings: Settings,
    worker: Worker,
    model: ModelState,
    image: Option<OpenImage>,
    next_image_id: u64,
    marks: MarkEditor,
    /// The marked image and the key it was drawn for.
    marked: Option<(u64, DynamicImage, TextureHandle)>,
    /// "What the model sees" and the key it was made for.
    preview: Option<(u64, TextureHandle)>,
    show_preview: bool,
    /// Pointer path of the gesture in progress, in image pixels.
    gesture: Option<Vec<(f32, f32)>>,
    /// Last pointer position while moving the selected mark.
    moving: Option<(f32, f32)>,
    fit: Option<Fit>,
    chat: Vec<Turn>,
    /// The scene the chat is about.
    chat_scene: Option<u64>,
    generating: Option<u64>,
    question: String,
    error: Option<String>,
    notice: Option<String>,
}

impl VipApp {
    /// The app as eframe creates it: remembered settings, then the command line's model
    /// and image.
    pub fn new(cc: &eframe::CreationContext<'_>, launch: Launch) -> Self {
        let settings: Settings = cc
            .storage
            .and_then(|s| eframe::get_value(s, eframe::APP_KEY))
            .unwrap_or_default();
        Self::with_settings(&cc.egui_ctx, settings, launch)
    }

    /// The app with given settings (tests start from defaults).
    pub fn with_settings(ctx: &egui::Context, settings: Settings, launch: Launch) -> Self {
        let wake_ctx = ctx.clone();
        let worker = Worker::spawn(move || wake_ctx.request_repaint());
        let mut app = Self {
            settings,
            worker,
            model: ModelState::None,
            image: None,
            next_image_id: 0,
            marks: MarkEditor::default(),
            marked: None,
            preview: None,
            show_preview: false,
            gesture: None,
            moving: None,
            fit: None,
            chat: Vec::new(),
            chat_scene: None,
            generating: None,
            question: String::new(),
            error: None,
            notice: None,
        };
        if let Some(path) = &launch.image {
            app.open_image_path(path);
        }
        if let Some(model) = launch.model {
            let mut m = ModelSettings {
                model,
                ..app.settings.model.clone()
            };
            if let Some(d) = launch.device {
                m.device = d;
            }
            if let Some(d) = launch.dtype {
                m.dtype = d;
            }
            if let Some(q) = launch.quantize {
                m.quantize = q;
            }
            app.load_model(m);
        }
        app
    }

    // ---- what tests and scripts can see and do ----

    /// The marks, in original-image pixels.
    pub fn marks(&self) -> &[VisualPrompt] {
        self.marks.marks()
    }

    /// The mark editor (undo/redo, selection).
    pub fn editor(&self) -> &MarkEditor {
        &self.marks
    }

    /// Settings (tool, colour, sampling, model).
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Settings, to change.
    pub fn settings_mut(&mut self) -> &mut Settings {
        &mut self.settings
    }

    /// The model's state.
    pub fn model_state(&self) -> &ModelState {
        &self.model
    }

    /// The chat so far.
    pub fn chat(&self) -> &[Turn] {
        &self.chat
    }

    /// Whether an answer is being generated.
    pub fn is_generating(&self) -> bool {
        self.generating.is_some()
    }

    /// The error shown in the window, if any.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Where the image is on screen (after the first frame with an image).
    pub fn image_fit(&self) -> Option<Fit> {
        self.fit
    }

    /// The image size.
    pub fn image_size(&self) -> Option<(u32, u32)> {
        self.image
            .as_ref()
            .map(|i| (i.original.width(), i.original.height()))
    }

    /// Sets the question box.
    pub fn set_question(&mut self, question: &str) {
        self.question = question.to_string();
    }

    /// The image with its marks, exactly as it goes to the model.
    pub fn prompted_image(&self) -> Option<DynamicImage> {
        let image = self.image.as_ref()?;
        draw_image(&image.original, self.marks.marks(), &self.draw_options()).ok()
    }

    /// What the model sees: the prompted image after pad (pad mode), resize and crop, as
    /// 8-bit RGB before rescaling and normalisation.
    pub fn model_view(&self) -> Option<image::RgbImage> {
        let drawn = self.prompted_image()?;
        self.model_view_of(&drawn).ok()
    }

    fn model_view_of(
        &self,
        drawn: &DynamicImage,
    ) -> Result<image::RgbImage, vipllava::processor::image::ImageError> {
        let config = self.image_config();
        match self.image_mode() {
            ImageMode::Crop => resize_and_crop(drawn, &config),
            ImageMode::Pad => {
                let square = expand_to_square(&to_rgb(drawn), vipllava::processor::image::LLAVA_PAD_COLOR);
                resize_and_crop(&DynamicImage::ImageRgb8(square), &config)
            }
        }
    }

    /// The `vipllava generate ...` command that reproduces the current question.
    pub fn command_line(&self) -> String {
        let sampling = &self.settings.sampling;
        let defaults_sample = matches!(&self.model, ModelState::Ready(info) if info.defaults.do_sample);
        export::command_line(&Scene {
            model: &self.settings.model,
            image: self.image.as_ref().and_then(|i| i.path.as_deref()),
            image_mode: self.image_mode(),
            marks: self.marks.marks(),
            alpha: self.settings.alpha(),
            line_width: self.settings.line_width(),
            question: &self.question,
            sampling,
            defaults_sample,
        })
    }

    /// Opens a model on the worker.
    pub fn load_model(&mut self, model: ModelSettings) {
        self.settings.model = model.clone();
        self.generating = None;
        self.model = ModelState::Loading {
            message: format!("opening {}", model.model),
            fraction: None,
        };
        self.worker.load(model);
    }

    /// Opens an image file (errors are shown in the window).
    pub fn open_image_path(&mut self, path: &Path) {
        match load_image(path) {
            Ok(image) => self.set_image(image, Some(path.to_path_buf())),
            Err(e) => self.error = Some(format!("cannot open {}: {e}", path.display())),
        }
    }

    /// Opens an image from encoded bytes (drag and drop without a path, paste).
    pub fn open_image_bytes(&mut self, bytes: &[u8], name: &str) {
        match decode_image(bytes) {
            Ok(image) => self.set_image(image, None),
            Err(e) => self.error = Some(format!("cannot open {name}: {e}")),
        }
    }

    fn set_image(&mut self, image: DynamicImage, path: Option<PathBuf>) {
        self.next_image_id += 1;
        self.image = Some(OpenImage {
            original: image,
            path,
            id: self.next_image_id,
        });
        self.marks.reset(Vec::new());
        self.marked = None;
        self.preview = None;
        self.error = None;
        self.new_chat();
    }

    /// Asks the question in the box about the current image and marks.
    pub fn ask(&mut self) {
        let question = self.question.trim().to_string();
        if question.is_empty() || self.generating.is_some() {
            return;
        }
        let ModelState::Ready(info) = &self.model else {
            self.error = Some("open a model first".into());
            return;
        };
        let Some(image) = self.prompted_image() else {
            self.error = Some("open an image first".into());
            return;
        };
        let scene = self.scene_key();
        if self.chat_scene.is_some_and(|s| s != scene) && !self.chat.is_empty() {
            self.notice = Some("The image or its marks changed: a new chat started.".into());
            self.chat.clear();
        }
        self.chat_scene = Some(scene);
        let options = self.settings.sampling.options(&info.defaults);
        let id = self.worker.ask(AskRequest {
            scene,
            image,
            image_mode: self.image_mode(),
            question: question.clone(),
            options,
        });
        self.chat.push(Turn {
            id,
            question,
            answer: String::new(),
            stats: None,
            error: None,
        });
        self.generating = Some(id);
        self.question.clear();
        self.error = None;
    }

    /// Stops the answer being generated.
    pub fn stop(&mut self) {
        self.worker.stop();
    }

    /// Forgets the chat (the model's KV cache included).
    pub fn new_chat(&mut self) {
        self.chat.clear();
        self.chat_scene = None;
        self.generating = None;
        self.notice = None;
        self.worker.reset();
    }

    // ---- internals ----

    fn image_mode(&self) -> ImageMode {
        if self.settings.pad {
            ImageMode::Pad
        } else {
            ImageMode::Crop
        }
    }

    fn draw_options(&self) -> DrawOptions {
        DrawOptions {
            alpha: self.settings.alpha(),
            line_width: self.settings.line_width(),
            ..DrawOptions::default()
        }
    }

    fn image_config(&self) -> ImageProcessorConfig {
        match &self.model {
            ModelState::Ready(info) => info.image_config.clone(),
            _ => ImageProcessorConfig::clip_336(),
        }
    }

    /// Identifies what the model would be shown: image, marks, drawing options, mode.
    fn scene_key(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.image.as_ref().map(|i| i.id).hash(&mut h);
        self.marks.revision().hash(&mut h);
        self.settings.alpha.hash(&mut h);
        self.settings.line_width.to_bits().hash(&mut h);
        self.settings.pad.hash(&mut h);
        h.finish()
    }

    fn drain_events(&mut self) {
        for event in self.worker.poll() {
            match event {
                Event::Progress { message, fraction } => {
                    if matches!(self.model, ModelState::Loading { .. }) {
                        self.model = ModelState::Loading { message, fraction };
                    }
                }
                Event::Loaded(info) => {
                    self.settings.sampling.sample = info.defaults.do_sample;
                    self.model = ModelState::Ready(info);
                    self.preview = None;
                    // Earlier answers came from another model: start a new chat.
                    self.chat.clear();
                    self.chat_scene = None;
                }
                Event::LoadFailed(message) => self.model = ModelState::Failed(message),
                Event::Notice(message) => self.notice = Some(message),
                Event::Text { turn, text } => {
                    if let Some(t) = self.chat.iter_mut().find(|t| t.id == turn) {
                        t.answer.push_str(&text);
                    }
                }
                Event::Finished { turn, stats } => {
                    if let Some(t) = self.chat.iter_mut().find(|t| t.id == turn) {
                        t.stats = Some(stats);
                    }
                    if self.generating == Some(turn) {
                        self.generating = None;
                    }
                }
                Event::Failed { turn, message } => {
                    if let Some(t) = self.chat.iter_mut().find(|t| t.id == turn) {
                        t.error = Some(message.clone());
                    } else {
                        self.error = Some(message);
                    }
                    if self.generating == Some(turn) {
                        self.generating = None;
                    }
                }
            }
        }
    }

    fn handle_dropped_and_pasted(&mut self, ctx: &egui::Context) {
        let dropped = ctx.input(|i| i.raw.dropped_files.clone());
        if let Some(file) = dropped.first() {
            let path = file.path().to_path_buf();
            if path.is_file() {
                self.open_image_path(&path);
            } else {
                match file.bytes() {
                    Ok(bytes) => self.open_image_bytes(&bytes, "the dropped file"),
                    Err(e) => self.error = Some(format!("cannot read the dropped file: {e}")),
                }
            }
        }
        let pasted: Option<String> = ctx.input(|i| {
            i.events.iter().find_map(|e| match e {
                egui::Event::Paste(text) => Some(text.clone()),
                _ => None,
            })
        });
        let editing_text = ctx.memory(|m| m.focused().is_some());
        if let Some(text) = pasted.filter(|_| !editing_text) {
            let path = PathBuf::from(text.trim().trim_start_matches("file://"));
            if path.is_file() {
                self.open_image_path(&path);
            }
        }
    }

    fn paste_clipboard_image(&mut self) {
        let image = arboard::Clipboard::new().and_then(|mut c| c.get_image());
        match image {
            Ok(img) => {
                let rgba =
                    image::RgbaImage::from_raw(img.width as u32, img.height as u32, img.bytes.into_owned());
                match rgba {
                    Some(rgba) => self.set_image(DynamicImage::ImageRgba8(rgba), None),
                    None => self.error = Some("the clipboard image is malformed".into()),
                }
            }
            Err(e) => self.error = Some(format!("no image on the clipboard: {e}")),
        }
    }

    fn shortcuts(&mut self, ctx: &egui::Context) {
        if ctx.memory(|m| m.focused().is_some()) {
            return;
        }
        let (undo, redo, delete) = ctx.input_mut(|i| {
            let redo = i.consume_key(Modifiers::COMMAND | Modifiers::SHIFT, Key::Z)
                || i.consume_key(Modifiers::COMMAND, Key::Y);
            let undo = i.consume_key(Modifiers::COMMAND, Key::Z);
            let delete =
                i.consume_key(Modifiers::NONE, Key::Delete) || i.consume_key(Modifiers::NONE, Key::Backspace);
            (undo, redo, delete)
        });
        if redo {
            self.marks.redo();
        } else if undo {
            self.marks.undo();
        }
        if delete {
            self.marks.delete_selected();
        }
    }

    fn model_bar(&mut self, ui: &mut Ui) {
        ui.horizontal_wrapped(|ui| {
            let label = ui.label("Model");
            let mut m = self.settings.model.clone();
            ui.add(
                egui::TextEdit::singleline(&mut m.model)
                    .hint_text("directory or hub id")
                    .desired_width(260.0),
            )
            .labelled_by(label.id);
            if ui.button("Browse…").clicked()
                && let Some(dir) = rfd::FileDialog::new().set_title("Model directory").pick_folder()
            {
                m.model = dir.display().to_string();
            }
            egui::ComboBox::from_label("Device")
                .selected_text(m.device.clone())
                .show_ui(ui, |ui| {
                    for d in compiled_devices() {
                        ui.selectable_value(&mut m.device, d.to_string(), d);
                    }
                });
            egui::ComboBox::from_label("Dtype")
                .selected_text(m.dtype.clone())
                .show_ui(ui, |ui| {
                    for d in ["f32", "f16", "bf16"] {
                        ui.selectable_value(&mut m.dtype, d.to_string(), d);
                    }
                });
            egui::ComboBox::from_label("Quantize")
                .selected_text(m.quantize.clone())
                .show_ui(ui, |ui| {
                    for q in ["none", "q8", "q4"] {
                        ui.selectable_value(&mut m.quantize, q.to_string(), q);
                    }
                });
            self.settings.model = m;
            let loading = matches!(self.model, ModelState::Loading { .. });
            if ui
                .add_enabled(!loading, egui::Button::new("Load model"))
                .clicked()
            {
                self.load_model(self.settings.model.clone());
            }
            match &self.model {
                ModelState::None => {
                    ui.label("no model");
                }
                ModelState::Loading { message, fraction } => {
                    ui.spinner();
                    match fraction {
                        Some(f) => {
                            ui.add(
                                egui::ProgressBar::new(*f)
                                    .text(message.clone())
                                    .desired_width(260.0),
                            );
                        }
                        None => {
                            ui.label(message.clone());
                        }
                    }
                }
                ModelState::Ready(info) => {
                    ui.label(
                        RichText::new(format!("ready: {}", info.summary))
                            .color(Color32::from_rgb(60, 170, 90)),
                    )
                    .on_hover_text(format!(
                        "{}\nloaded in {:.1} s",
                        info.dir.display(),
                        info.load_ms / 1000.0
                    ));
                }
                ModelState::Failed(message) => {
                    ui.label(
                        RichText::new(format!("load failed: {message}"))
                            .color(Color32::from_rgb(220, 70, 60)),
                    );
                }
            }
        });
        ui.horizontal_wrapped(|ui| {
            if ui.button("Open image…").clicked()
                && let Some(path) = rfd::FileDialog::new()
                    .add_filter("images", &["png", "jpg", "jpeg", "webp", "gif"])
                    .pick_file()
            {
                self.open_image_path(&path);
            }
            if ui.button("Paste image").clicked() {
                self.paste_clipboard_image();
            }
            ui.separator();
            ui.selectable_value(&mut self.settings.pad, false, "Crop");
            ui.selectable_value(&mut self.settings.pad, true, "Pad");
            ui.checkbox(&mut self.show_preview, "What the model sees");
            ui.separator();
            let has_image = self.image.is_some();
            if ui
                .add_enabled(has_image, egui::Button::new("Save prompted image…"))
                .clicked()
                && let Some(path) = rfd::FileDialog::new().set_file_name("prompted.png").save_file()
                && let Some(img) = self.prompted_image()
                && let Err(e) = img.save(&path)
            {
                self.error = Some(format!("cannot save {}: {e}", path.display()));
            }
            if ui
                .add_enabled(has_image, egui::Button::new("Copy command"))
                .clicked()
            {
                ui.ctx().copy_text(self.command_line());
                self.notice = Some("Copied the `vipllava generate` command line.".into());
            }
        });
        if let Some(error) = &self.error {
            ui.label(RichText::new(error).color(Color32::from_rgb(220, 70, 60)));
        }
    }

    fn tools_panel(&mut self, ui: &mut Ui) {
        ui.heading("Marks");
        for tool in Tool::ALL {
            ui.selectable_value(&mut self.settings.tool, tool, tool.label());
        }
        ui.separator();
        ui.label("Colour");
        ui.horizontal_wrapped(|ui| {
            for (name, colour) in COLOUR_POOL {
                let c = Color32::from_rgb(colour.r, colour.g, colour.b);
                let selected = self.settings.colour == [colour.r, colour.g, colour.b];
                let button = egui::Button::new(RichText::new(name).color(c).strong()).selected(selected);
                if ui.add(button).clicked() {
                    self.settings.colour = [colour.r, colour.g, colour.b];
                    self.marks.recolour_selected(colour);
                }
            }
            if ui.color_edit_button_srgb(&mut self.settings.colour).changed() {
                self.marks.recolour_selected(self.settings.colour());
            }
        });
        ui.add(egui::Slider::new(&mut self.settings.alpha, 0..=255).text("alpha (0: default)"));
        ui.add(
            egui::Slider::new(&mut self.settings.line_width, 0.0..=20.0)
                .step_by(1.0)
                .text("line width (0: default)"),
        );
        ui.horizontal(|ui| {
            if ui
                .add_enabled(self.marks.can_undo(), egui::Button::new("Undo"))
                .clicked()
            {
                self.marks.undo();
            }
            if ui
                .add_enabled(self.marks.can_redo(), egui::Button::new("Redo"))
                .clicked()
            {
                self.marks.redo();
            }
        });
        ui.horizontal(|ui| {
            if ui
                .add_enabled(self.marks.selected().is_some(), egui::Button::new("Delete"))
                .clicked()
            {
                self.marks.delete_selected();
            }
            if ui
                .add_enabled(!self.marks.marks().is_empty(), egui::Button::new("Clear"))
                .clicked()
            {
                self.marks.clear();
            }
        });
        ui.separator();
        ui.heading("Sampling");
        let s = &mut self.settings.sampling;
        ui.checkbox(&mut s.sample, "sample (off: greedy)");
        ui.add_enabled(
            s.sample,
            egui::Slider::new(&mut s.temperature, 0.05..=2.0).text("temperature"),
        );
        ui.add_enabled(
            s.sample,
            egui::Slider::new(&mut s.top_p, 0.05..=1.0).text("top-p"),
        );
        ui.add_enabled(s.sample, egui::DragValue::new(&mut s.seed).prefix("seed "));
        ui.add(egui::Slider::new(&mut s.max_new_tokens, 1..=1024).text("max new tokens"));
    }

    fn suggestions(&self) -> Vec<String> {
        let mut out = Vec::new();
        for mark in self.marks.marks().iter().take(3) {
            let colour = mark.colour.name().unwrap_or("marked");
            out.push(match &mark.shape {
                Shape::Arrow { .. } => format!("What is the {colour} arrow pointing to?"),
                Shape::Point { .. } => format!("What is at the {colour} point?"),
                Shape::Scribble { .. } => format!("What is marked by the {colour} scribble?"),
                Shape::Mask { .. } | Shape::MaskImage(_) => format!("What is covered by the {colour} mask?"),
                other => format!("What is inside the {colour} {}?", other.name()),
            });
        }
        if out.is_empty() {
            out.push("Describe the image.".into());
        }
        out
    }

    fn chat_panel(&mut self, ui: &mut Ui) {
        ui.heading("Chat");
        if let Some(notice) = &self.notice {
            ui.label(RichText::new(notice).italics());
        }
        let input_height = 150.0;
        egui::ScrollArea::vertical()
            .max_height((ui.available_height() - input_height).max(80.0))
            .stick_to_bottom(true)
            .show(ui, |ui| {
                for turn in &self.chat {
                    ui.label(RichText::new(format!("You: {}", turn.question)).strong());
                    ui.label(turn.answer.clone());
                    if let Some(error) = &turn.error {
                        ui.label(RichText::new(error).color(Color32::from_rgb(220, 70, 60)));
                    }
                    if let Some(s) = &turn.stats {
                        let stopped = if s.stop_reason == StopReason::Cancelled { " · stopped" } else { "" };
                        ui.label(
                            RichText::new(format!(
                                "{} prompt tokens ({} computed) · first token {:.0} ms · {:.1} tok/s{stopped}",
                                s.prompt_tokens, s.computed_tokens, s.time_to_first_token_ms, s.tokens_per_s
                            ))
                            .small()
                            .weak(),
                        );
                    }
                    ui.separator();
                }
            });
        ui.horizontal_wrapped(|ui| {
            for s in self.suggestions() {
                if ui.small_button(&s).clicked() {
                    self.question = s;
                }
            }
        });
        let label = ui.label("Question");
        let edit = ui.add(
            egui::TextEdit::multiline(&mut self.question)
                .desired_rows(2)
                .desired_width(f32::INFINITY)
                .hint_text("What is inside the red rectangle?"),
        );
        let edit = edit.labelled_by(label.id);
        let enter = edit.has_focus() && ui.input(|i| i.key_pressed(Key::Enter) && !i.modifiers.shift);
        ui.horizontal(|ui| {
            let ready = matches!(self.model, ModelState::Ready(_)) && self.image.is_some();
            if ui
                .add_enabled(ready && self.generating.is_none(), egui::Button::new("Ask"))
                .clicked()
                || (enter && ready)
            {
                self.question = self.question.trim_end_matches('\n').to_string();
                self.ask();
            }
            if ui
                .add_enabled(self.generating.is_some(), egui::Button::new("Stop"))
                .clicked()
            {
                self.stop();
            }
            if ui.button("New chat").clicked() {
                self.new_chat();
            }
            if self.generating.is_some() {
                ui.spinner();
            }
        });
    }

    fn refresh_textures(&mut self, ctx: &egui::Context) {
        let Some(image) = &self.image else { return };
        let key = self.scene_key();
        if self.marked.as_ref().is_none_or(|(k, _, _)| *k != key) && self.moving.is_none() {
            match draw_image(&image.original, self.marks.marks(), &self.draw_options()) {
                Ok(drawn) => {
                    let texture =
                        ctx.load_texture("marked", canvas::color_image(&drawn), TextureOptions::LINEAR);
                    self.marked = Some((key, drawn, texture));
                }
                Err(e) => self.error = Some(format!("cannot draw the marks: {e}")),
            }
        }
        if self.show_preview
            && self.preview.as_ref().is_none_or(|(k, _)| *k != key)
            && let Some((_, drawn, _)) = &self.marked
        {
            let config = self.image_config();
            let seen = match self.image_mode() {
                ImageMode::Crop => resize_and_crop(drawn, &config),
                ImageMode::Pad => {
                    let square =
                        expand_to_square(&to_rgb(drawn), vipllava::processor::image::LLAVA_PAD_COLOR);
                    resize_and_crop(&DynamicImage::ImageRgb8(square), &config)
                }
            };
            match seen {
                Ok(rgb) => {
                    let texture = ctx.load_texture(
                        "model-input",
                        canvas::color_image(&DynamicImage::ImageRgb8(rgb)),
                        TextureOptions::NEAREST,
                    );
                    self.preview = Some((key, texture));
                }
                Err(e) => self.error = Some(format!("cannot preprocess: {e}")),
            }
        }
    }

    fn canvas(&mut self, ui: &mut Ui) {
        let available = ui.available_rect_before_wrap();
        let response = ui.allocate_rect(available, Sense::click_and_drag());
        let painter = ui.painter_at(available);
        let Some((w, h)) = self.image_size() else {
            self.fit = None;
            canvas::paint_hint(
                &painter,
                available,
                "Open, drop or paste an image",
                ui.visuals().weak_text_color(),
            );
            return;
        };
        let fit = Fit::new(available.shrink(8.0), w, h);
        self.fit = Some(fit);
        if let Some((_, _, texture)) = &self.marked {
            painter.image(
                texture.id(),
                fit.rect,
                egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
                Color32::WHITE,
            );
        }
        let window = canvas::model_window(w, h, self.image_mode(), &self.image_config());
        canvas::paint_overlay(&painter, &fit, window);

        let tool = self.settings.tool;
        let pointer = response.interact_pointer_pos().or(response.hover_pos());
        let at = pointer.map(|p| fit.to_image(p));
        let tolerance = 6.0 / fit.scale;
        if tool == Tool::Select {
            if response.clicked()
                && let Some(p) = at
            {
                self.marks.select_at(p, tolerance);
            }
            if response.drag_started() {
                let origin = ui.input(|i| i.pointer.press_origin()).map(|p| fit.to_image(p));
                if let Some(o) = origin {
                    let on_selected = self
                        .marks
                        .selected()
                        .and_then(|i| self.marks.marks().get(i))
                        .is_some_and(|m| hits(&m.shape, o, tolerance));
                    if !on_selected {
                        self.marks.select_at(o, tolerance);
                    }
                    if self.marks.begin_move() {
                        self.moving = Some(o);
                    }
                }
            }
            if response.dragged()
                && let (Some(last), Some(p)) = (self.moving, at)
            {
                self.marks.move_selected(p.0 - last.0, p.1 - last.1);
                self.moving = Some(p);
            }
            if response.drag_stopped() {
                self.moving = None;
            }
        } else if tool == Tool::Point {
            if response.clicked()
                && let Some(p) = at
                && let Some(shape) = tool.shape(&[p])
            {
                self.marks.add(VisualPrompt::new(shape, self.settings.colour()));
            }
        } else {
            if response.drag_started() {
                let origin = ui.input(|i| i.pointer.press_origin()).map(|p| fit.to_image(p));
                self.gesture = origin.map(|o| vec![o]);
            }
            if response.dragged()
                && let (Some(path), Some(p)) = (self.gesture.as_mut(), at)
                && (tool.is_freehand() || path.len() < 2)
            {
                path.push(p);
            } else if response.dragged()
                && let (Some(path), Some(p)) = (self.gesture.as_mut(), at)
                && let Some(last) = path.last_mut()
            {
                *last = p;
            }
            if response.drag_stopped()
                && let Some(mut path) = self.gesture.take()
            {
                if let Some(p) = at {
                    path.push(p);
                }
                if let Some(shape) = tool.shape(&path) {
                    self.marks.add(VisualPrompt::new(shape, self.settings.colour()));
                }
            }
        }
        let c = self.settings.colour();
        if let Some(path) = &self.gesture {
            canvas::paint_gesture(&painter, &fit, tool, path, Color32::from_rgb(c.r, c.g, c.b));
        }
        if let Some(mark) = self.marks.selected().and_then(|i| self.marks.marks().get(i)) {
            canvas::paint_outline(&painter, &fit, &mark.shape, Stroke::new(1.5, Color32::WHITE));
        }
    }

    fn preview_window(&mut self, ctx: &egui::Context) {
        if !self.show_preview {
            return;
        }
        let mut open = true;
        egui::Window::new("What the model sees")
            .open(&mut open)
            .resizable(false)
            .show(ctx, |ui| match &self.preview {
                Some((_, texture)) => {
                    ui.image((texture.id(), egui::vec2(336.0, 336.0)));
                }
                None => {
                    ui.label("open an image");
                }
            });
        self.show_preview = open;
    }
}

/// Colours of the pool as egui colours (for tests and docs).
pub fn pool_colour(name: &str) -> Option<Colour> {
    COLOUR_POOL.iter().find(|(n, _)| *n == name).map(|&(_, c)| c)
}

impl eframe::App for VipApp {
    fn ui(&mut self, ui: &mut Ui, _frame: &mut eframe::Frame) {
        let ctx = ui.ctx().clone();
        self.drain_events();
        self.handle_dropped_and_pasted(&ctx);
        self.shortcuts(&ctx);
        self.refresh_textures(&ctx);
        egui::Panel::top("model").show(ui, |ui| self.model_bar(ui));
        egui::Panel::left("tools")
            .resizable(false)
            .show(ui, |ui| self.tools_panel(ui));
        egui::Panel::right("chat")
            .default_size(340.0)
            .show(ui, |ui| self.chat_panel(ui));
        egui::CentralPanel::default().show(ui, |ui| self.canvas(ui));
        self.preview_window(&ctx);
        if self.generating.is_some() || matches!(self.model, ModelState::Loading { .. }) {
            // Events wake the UI too; this is a safety net for a missed wake-up.
            ctx.request_repaint_after(Duration::from_millis(250));
        }
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, eframe::APP_KEY, &self.settings);
    }
}
