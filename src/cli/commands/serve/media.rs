//! Request messages -> chat messages and images: image URLs (data:, file:// below
//! `--media-dir`), the visual-prompt extension (drawn with the same library calls as
//! `generate`'s flags) and the per-request image mode.

use std::path::{Component, Path};

use base64::Engine;
use image::DynamicImage;
use vipllava::processor::image::{ImageMode, decode_image_with_limit};
use vipllava::processor::visual_prompt::{self, DrawOptions, ShapeKind, VisualPrompt};
use vipllava::processor::{ChatMessage, ContentPart};

use super::api::{ApiError, Content, Message, Part, VisualPromptSpec};

/// Largest decoded image (width x height): 4096 x 4096.
pub const MAX_IMAGE_PIXELS: u64 = 4096 * 4096;
/// Images per request.
pub const MAX_IMAGES: usize = 8;

/// Where image URLs may point.
#[derive(Debug, Clone, Default)]
pub struct MediaPolicy {
    /// Canonical root of `file://` URLs.
    pub media_dir: Option<std::path::PathBuf>,
    /// `--allow-remote-images`: fetch `http(s)://` image URLs.
    pub allow_remote: bool,
}

/// A conversation ready for the chat template.
#[derive(Debug)]
pub struct Conversation {
    /// Messages with image placeholders in place.
    pub messages: Vec<ChatMessage>,
    /// The images, marked, in placeholder order.
    pub images: Vec<DynamicImage>,
    /// The image mode every image part agreed on (`None`: the server's default).
    pub mode: Option<ImageMode>,
}

/// Converts the request's messages.
pub fn conversation(messages: &[Message], policy: &MediaPolicy) -> Result<Conversation, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    let mut out = Vec::with_capacity(messages.len());
    let mut images = Vec::new();
    let mut mode: Option<ImageMode> = None;
    for (i, message) in messages.iter().enumerate() {
        let role = match message.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::bad_request(
                    format!("messages[{i}]: unsupported role {other:?}"),
                    Some("messages"),
                ));
            }
        };
        let mut content = Vec::new();
        match &message.content {
            None => {}
            Some(Content::Text(text)) => content.push(ContentPart::Text { text: text.clone() }),
            Some(Content::Parts(parts)) => {
                for part in parts {
                    match part {
                        Part::Text { text } => content.push(ContentPart::Text { text: text.clone() }),
                        Part::ImageUrl {
                            image_url,
                            visual_prompts,
                            image_mode,
                        } => {
                            if role != "user" {
                                return Err(ApiError::bad_request(
                                    format!("messages[{i}]: images are only allowed in user messages"),
                                    Some("messages"),
                                ));
                            }
                            if images.len() == MAX_IMAGES {
                                return Err(ApiError::bad_request(
                                    format!("at most {MAX_IMAGES} images per request"),
                                    Some("messages"),
                                ));
                            }
                            let requested = match image_mode.as_ref().or(image_url.image_mode.as_ref()) {
                                None => None,
                                Some(m) => Some(parse_mode(m)?),
                            };
                            if let Some(m) = requested {
                                if mode.is_some_and(|prev| prev != m) {
                                    return Err(ApiError::bad_request(
                                        "every image of a request must use the same image_mode",
                                        Some("image_mode"),
                                    ));
                                }
                                mode = Some(m);
                            }
                            let image = load_url(&image_url.url, policy)?;
                            let marks = visual_prompts.as_ref().or(image_url.visual_prompts.as_ref());
                            let image = match marks {
                                Some(marks) if !marks.is_empty() => draw(image, marks)?,
                                _ => image,
                            };
                            images.push(image);
                            content.push(ContentPart::Image);
                        }
                    }
                }
            }
        }
        out.push(ChatMessage {
            role: role.to_string(),
            content,
        });
    }
    if out.last().is_some_and(|m| m.role == "assistant") {
        return Err(ApiError::bad_request(
            "the last message must not be the assistant's",
            Some("messages"),
        ));
    }
    Ok(Conversation {
        messages: out,
        images,
        mode,
    })
}

fn parse_mode(m: &str) -> Result<ImageMode, ApiError> {
    match m {
        "crop" => Ok(ImageMode::Crop),
        "pad" => Ok(ImageMode::Pad),
        other => Err(ApiError::bad_request(
            format!("image_mode must be \"crop\" or \"pad\", got {other:?}"),
            Some("image_mode"),
        )),
    }
}

/// Decodes an image URL.
pub fn load_url(url: &str, policy: &MediaPolicy) -> Result<DynamicImage, ApiError> {
    let bytes = if let Some(rest) = url.strip_prefix("data:") {
        data_url(rest)?
    } else if let Some(path) = url.strip_prefix("file://") {
        read_media_file(path, policy)?
    } else if url.starts_with("http://") || url.starts_with("https://") {
        if !policy.allow_remote {
            return Err(ApiError::bad_request(
                "http(s) image URLs are refused (the server fetches them only with --allow-remote-images); send the image as a data: URL",
                Some("image_url"),
            ));
        }
        fetch(url)?
    } else {
        return Err(ApiError::bad_request(
            "image_url.url must be a data: URL (or file:// below --media-dir)",
            Some("image_url"),
        ));
    };
    decode_image_with_limit(&bytes, MAX_IMAGE_PIXELS)
        .map_err(|e| ApiError::bad_request(format!("undecodable image: {e}"), Some("image_url")))
}

/// Largest image file fetched from a URL.
pub const MAX_REMOTE_BYTES: u64 = 20 * 1024 * 1024;
/// Time allowed for fetching one image URL, connection included.
pub const REMOTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// GETs an image URL (runs on a blocking thread): bounded in time and size, redirects
/// followed up to 3 times, any status but 200 refused.
fn fetch(url: &str) -> Result<Vec<u8>, ApiError> {
    use std::io::Read;
    let failed = |why: String| ApiError::bad_request(format!("fetching {url}: {why}"), Some("image_url"));
    let agent = ureq::AgentBuilder::new()
        .timeout(REMOTE_TIMEOUT)
        .redirects(3)
        .build();
    let response = agent.get(url).call().map_err(|e| failed(e.to_string()))?;
    if response.status() != 200 {
        return Err(failed(format!("status {}", response.status())));
    }
    let mut bytes = Vec::new();
    response
        .into_reader()
        .take(MAX_REMOTE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| failed(e.to_string()))?;
    if bytes.len() as u64 > MAX_REMOTE_BYTES {
        return Err(failed(format!(
            "larger than {} MB",
            MAX_REMOTE_BYTES / (1024 * 1024)
        )));
    }
    Ok(bytes)
}

/// `image/png;base64,DATA` -> bytes.
fn data_url(rest: &str) -> Result<Vec<u8>, ApiError> {
    let (meta, data) = rest
        .split_once(',')
        .ok_or_else(|| ApiError::bad_request("malformed data: URL (no comma)", Some("image_url")))?;
    if !meta.ends_with(";base64") {
        return Err(ApiError::bad_request(
            "only base64 data: URLs are supported",
            Some("image_url"),
        ));
    }
    let cleaned: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(cleaned.as_bytes())
        .map_err(|e| ApiError::bad_request(format!("bad base64 in data: URL: {e}"), Some("image_url")))
}

/// Reads `path` (absolute, or relative to the media root) only if it resolves below the
/// media root: no `..`, and symlinks are followed before the check.
fn read_media_file(path: &str, policy: &MediaPolicy) -> Result<Vec<u8>, ApiError> {
    let Some(root) = &policy.media_dir else {
        return Err(ApiError::bad_request(
            "file:// image URLs need the server's --media-dir",
            Some("image_url"),
        ));
    };
    let refused = || ApiError::bad_request("file:// URL outside --media-dir", Some("image_url"));
    let given = Path::new(path);
    if given.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(refused());
    }
    let joined = if given.is_absolute() {
        given.to_path_buf()
    } else {
        root.join(given)
    };
    let resolved = joined
        .canonicalize()
        .map_err(|_| ApiError::bad_request("file:// image not found below --media-dir", Some("image_url")))?;
    if !resolved.starts_with(root) || !resolved.is_file() {
        return Err(refused());
    }
    std::fs::read(&resolved)
        .map_err(|e| ApiError::bad_request(format!("reading the image: {e}"), Some("image_url")))
}

/// Draws the marks as `generate --box ...` does: each spec parsed by the CLI's parser, then
/// `draw_image`.
pub fn draw(image: DynamicImage, specs: &[VisualPromptSpec]) -> Result<DynamicImage, ApiError> {
    let prompts = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            prompt(s).map_err(|e| {
                ApiError::bad_request(format!("visual_prompts[{i}]: {e}"), Some("visual_prompts"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    visual_prompt::draw_image(&image, &prompts, &DrawOptions::default())
        .map_err(|e| ApiError::bad_request(format!("visual_prompts: {e}"), Some("visual_prompts")))
}

fn prompt(spec: &VisualPromptSpec) -> Result<VisualPrompt, String> {
    let kind: ShapeKind = spec.shape.parse().map_err(|e| format!("{e}"))?;
    if matches!(kind, ShapeKind::Mask | ShapeKind::MaskContour) && !is_points(&spec.spec) {
        // A PNG path would be read on the server: masks come as polygons only.
        return Err("masks must be given as polygons (x,y;x,y;x,y[:colour]), not file paths".into());
    }
    if spec.alpha == Some(0) {
        return Err("alpha must be in 1..=255".into());
    }
    if let Some(w) = spec.line_width
        && !(w.is_finite() && w > 0.0)
    {
        return Err(format!("line_width must be > 0, got {w}"));
    }
    spec.to_prompt().map_err(|e| e.to_string())
}

/// Numbers, separators and an optional `:colour` only.
fn is_points(spec: &str) -> bool {
    let body = spec.rsplit_once(':').map_or(spec, |(b, _)| b);
    !body.is_empty()
        && body
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | ',' | ';' | '-' | '+' | ' ' | 'e' | 'E'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        let policy = MediaPolicy::default();
        for (url, want) in [
            ("data:image/png;base64,@@@", "bad base64"),
            ("data:image/png;base64,AAAA", "undecodable image"),
            ("data:image/png,abc", "only base64"),
            ("https://example.com/a.png", "refused"),
            ("file:///etc/passwd", "--media-dir"),
            ("ftp://x", "data: URL"),
        ] {
            let e = load_url(url, &policy).unwrap_err();
            assert!(e.message.contains(want), "{url}: {}", e.message);
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let media = root.join("media");
        std::fs::create_dir(&media).unwrap();
        image::RgbImage::new(4, 4).save(root.join("outside.png")).unwrap();
        image::RgbImage::new(4, 4).save(media.join("in.png")).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(root.join("outside.png"), media.join("link.png")).unwrap();
        let policy = MediaPolicy {
            media_dir: Some(media.clone()),
            allow_remote: false,
        };
        assert!(load_url(&format!("file://{}", media.join("in.png").display()), &policy).is_ok());
        assert!(load_url("file://in.png", &policy).is_ok());
        for bad in ["file://../outside.png", "file://link.png"] {
            assert!(
                load_url(bad, &policy).unwrap_err().message.contains("outside"),
                "{bad}"
            );
        }
        let abs = format!("file://{}", root.join("outside.png").display());
        assert!(load_url(&abs, &policy).unwrap_err().message.contains("outside"));
    }

    /// Serves `body` with `status` to one request on 127.0.0.1; returns the URL.
    fn serve_once(status: &'static str, body: Vec<u8>) -> String {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/image.png", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request);
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
            }
        });
        url
    }

    #[test]
    fn remote_images_are_fetched_only_when_allowed() {
        let mut png = Vec::new();
        image::RgbImage::from_pixel(3, 2, image::Rgb([10, 20, 30]))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let allowed = MediaPolicy {
            media_dir: None,
            allow_remote: true,
        };
        let url = serve_once("200 OK", png.clone());
        let refused = load_url(&url, &MediaPolicy::default()).unwrap_err();
        assert!(
            refused.message.contains("--allow-remote-images"),
            "{}",
            refused.message
        );
        let url = serve_once("200 OK", png);
        let image = load_url(&url, &allowed).unwrap().to_rgb8();
        assert_eq!((image.width(), image.height()), (3, 2));
        assert_eq!(image.get_pixel(2, 1).0, [10, 20, 30]);
        let url = serve_once("404 Not Found", b"no".to_vec());
        let missing = load_url(&url, &allowed).unwrap_err();
        assert!(missing.message.contains("404"), "{}", missing.message);
        let url = serve_once("200 OK", b"not an image".to_vec());
        assert!(
            load_url(&url, &allowed)
                .unwrap_err()
                .message
                .contains("undecodable")
        );
    }

    #[test]
    fn marks_are_parsed_like_the_cli_flags() {
        let ok = VisualPromptSpec {
            shape: "mask_contour".into(),
            spec: "1,1;5,1;3,4:blue".into(),
            alpha: Some(200),
            line_width: None,
        };
        assert_eq!(prompt(&ok).unwrap().alpha, Some(200));
        for (shape, spec) in [
            ("mask", "/etc/mask.png"),
            ("box", "1,2,3"),
            ("star", "1,2"),
            ("box", "1,2,3,4:nocolour"),
        ] {
            let s = VisualPromptSpec {
                shape: shape.into(),
                spec: spec.into(),
                alpha: None,
                line_width: None,
            };
            assert!(prompt(&s).is_err(), "{shape} {spec}");
        }
    }
}
