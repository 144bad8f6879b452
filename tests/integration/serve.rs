//! `vipllava serve` on the tiny fixtures over 127.0.0.1: every endpoint, the streaming
//! chunk format, greedy answers identical to `vipllava generate` (alone and with three
//! requests at once), visual prompts identical to `generate --box ...`, and each error
//! status.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

use crate::common::{fixture, run_cli};

/// A running server, killed on drop.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(extra: &[&str]) -> Self {
        let model = fixture("tiny-5x-f32");
        let mut child = Command::new(env!("CARGO_BIN_EXE_vipllava"))
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
            .args(extra)
            .env("HF_HUB_OFFLINE", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start vipllava serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(120)).expect("listening line");
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"), "{addr}");
        Self { child, addr }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn get(&self, path: &str, key: Option<&str>) -> (u16, String) {
        let mut req = agent().get(&self.url(path));
        if let Some(k) = key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        answer(req.call())
    }

    fn post(&self, body: &Value) -> (u16, Value) {
        self.post_raw(&body.to_string(), None)
    }

    fn post_raw(&self, body: &str, key: Option<&str>) -> (u16, Value) {
        let mut req = agent()
            .post(&self.url("/v1/chat/completions"))
            .set("Content-Type", "application/json");
        if let Some(k) = key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        let (status, text) = answer(req.send_string(body));
        (
            status,
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")),
        )
    }

    /// A streaming request: the status and every `data:` payload.
    fn stream(&self, body: &Value) -> (u16, Vec<String>) {
        let r = agent()
            .post(&self.url("/v1/chat/completions"))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string());
        match r {
            Ok(resp) => {
                assert_eq!(resp.header("Content-Type"), Some("text/event-stream"));
                let reader = BufReader::new(resp.into_reader());
                let data = reader
                    .lines()
                    .map(Result::unwrap)
                    .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
                    .collect();
                (200, data)
            }
            Err(ureq::Error::Status(code, resp)) => (code, vec![resp.into_string().unwrap()]),
            Err(e) => panic!("{e}"),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build()
}

fn answer(r: Result<ureq::Response, ureq::Error>) -> (u16, String) {
    match r {
        Ok(resp) => (resp.status(), resp.into_string().unwrap()),
        Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

fn data_url(image: &str) -> String {
    let bytes = std::fs::read(fixture(&format!("images/{image}"))).unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn request(image: &str, question: &str, max_tokens: usize, extra: Value) -> Value {
    let mut part = json!({"type": "image_url", "image_url": {"url": data_url(image)}});
    if let Value::Object(fields) = extra {
        for (k, v) in fields {
            part[k] = v;
        }
    }
    json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": [part, {"type": "text", "text": question}]}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

/// `vipllava generate --json` for the same question.
fn generate(image: &str, question: &str, max_tokens: usize, extra: &[&str]) -> Value {
    let model = fixture("tiny-5x-f32");
    let image = fixture(&format!("images/{image}"));
    let max = max_tokens.to_string();
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        question,
        "--max-new-tokens",
        &max,
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = run_cli(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn assert_same_answer(got: &Value, want: &Value) {
    let choice = &got["choices"][0];
    assert_eq!(choice["message"]["content"], want["text"], "{got}");
    assert_eq!(choice["message"]["role"], "assistant");
    let finish = if want["stop_reason"] == "max_new_tokens" {
        "length"
    } else {
        "stop"
    };
    assert_eq!(choice["finish_reason"], finish);
    assert_eq!(got["usage"]["prompt_tokens"], want["prompt_tokens"]);
    assert_eq!(got["usage"]["completion_tokens"], want["new_tokens"]);
    assert_eq!(got["object"], "chat.completion");
}

#[test]
fn endpoints_streaming_and_greedy_parity_with_generate() {
    let server = Server::start(&[]);
    let (status, body) = server.get("/health", None);
    assert_eq!((status, body.contains("ok")), (200, true), "{body}");
    let (status, body) = server.get("/v1/models", None);
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-5x-f32");
    assert_eq!(models["object"], "list");

    let question = "What is in the red box?";
    let want = generate("astronaut.png", question, 12, &[]);
    let (status, got) = server.post(&request("astronaut.png", question, 12, json!({})));
    assert_eq!(status, 200, "{got}");
    assert_same_answer(&got, &want);

    // Streaming: the role first, the text in pieces, finish_reason last, usage, [DONE].
    let mut body = request("astronaut.png", question, 12, json!({}));
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, data) = server.stream(&body);
    assert_eq!(status, 200, "{data:?}");
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], want["new_tokens"]);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(
        finish["choices"][0]["finish_reason"],
        got["choices"][0]["finish_reason"]
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, want["text"].as_str().unwrap());
    assert!(
        chunks[1..chunks.len() - 2]
            .iter()
            .all(|c| c["choices"][0]["finish_reason"].is_null())
    );

    // Three at once, different prompt lengths and images: each as `generate` alone.
    let cases = [
        ("astronaut.png", "What is in the red box?", 10usize),
        (
            "coffee.png",
            "Describe the cup, its colour, its handle and the table.",
            14,
        ),
        ("chelsea.png", "Who?", 6),
    ];
    let wants: Vec<Value> = cases.iter().map(|(i, q, n)| generate(i, q, *n, &[])).collect();
    let gots: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(i, q, n)| {
                let server = &server;
                s.spawn(move || server.post(&request(i, q, *n, json!({}))))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((status, got), want) in gots.iter().zip(&wants) {
        assert_eq!(*status, 200, "{got}");
        assert_same_answer(got, want);
    }

    // Multi-turn with a system message and a plain-string content: a valid answer.
    let turns = json!({"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url("coffee.png")}},
                                     {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cup."},
        {"role": "user", "content": "What colour?"}],
        "max_completion_tokens": 5, "seed": 3, "temperature": 0.8, "top_p": 0.9, "stop": ["\n\n"]});
    let (status, got) = server.post(&turns);
    assert_eq!(status, 200, "{got}");
    assert!(got["usage"]["completion_tokens"].as_u64().unwrap() <= 5);

    let (status, metrics) = server.get("/metrics", None);
    assert_eq!(status, 200);
    for name in [
        "vipllava_requests_total{status=\"200\"} 6",
        "vipllava_completion_tokens_total",
        "vipllava_queue_depth",
        "vipllava_time_to_first_token_seconds_count 6",
        "vipllava_tokens_per_second",
    ] {
        assert!(metrics.contains(name), "{name} missing in\n{metrics}");
    }
}

#[test]
fn visual_prompts_and_image_mode_match_generate() {
    let server = Server::start(&[]);
    let question = "What is in the red box?";
    let want = generate(
        "astronaut.png",
        question,
        20,
        &[
            "--box",
            "45,15,115,95:red",
            "--arrow",
            "155,150,110,100:yellow",
            "--alpha",
            "200",
        ],
    );
    let marks = json!({"visual_prompts": [
        {"shape": "box", "spec": "45,15,115,95:red", "alpha": 200},
        {"shape": "arrow", "spec": "155,150,110,100:yellow", "alpha": 200}]});
    let (status, got) = server.post(&request("astronaut.png", question, 20, marks));
    assert_eq!(status, 200, "{got}");
    assert_same_answer(&got, &want);
    // The marks reach the model: without them the answer differs.
    let plain = generate("astronaut.png", question, 20, &[]);
    assert_ne!(plain["text"], want["text"]);

    let want = generate(
        "coffee_wide.png",
        question,
        8,
        &["--image-mode", "pad", "--mask-contour", "5,5;60,5;30,40:blue"],
    );
    let extra = json!({"image_mode": "pad", "visual_prompts": [{"shape": "mask_contour", "spec": "5,5;60,5;30,40:blue"}]});
    let (status, got) = server.post(&request("coffee_wide.png", question, 8, extra));
    assert_eq!(status, 200, "{got}");
    assert_same_answer(&got, &want);

    // Bad marks are the client's error.
    for bad in [
        json!({"visual_prompts": [{"shape": "star", "spec": "1,2"}]}),
        json!({"visual_prompts": [{"shape": "box", "spec": "1,2,3"}]}),
        json!({"visual_prompts": [{"shape": "mask", "spec": "/etc/passwd"}]}),
        json!({"image_mode": "stretch"}),
    ] {
        let (status, got) = server.post(&request("astronaut.png", question, 4, bad.clone()));
        assert_eq!(status, 400, "{bad}: {got}");
        assert_eq!(got["error"]["type"], "invalid_request_error");
    }
}

fn assert_error(status: u16, body: &Value, want: u16) {
    assert_eq!(status, want, "{body}");
    let e = &body["error"];
    assert!(
        e["message"].is_string()
            && e["type"].is_string()
            && e.get("param").is_some()
            && e.get("code").is_some(),
        "{body}"
    );
}

#[test]
fn errors_have_openai_shape_and_status() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("images/coffee.png"), tmp.path().join("coffee.png")).unwrap();
    let media = tmp.path().to_str().unwrap();
    let server = Server::start(&["--api-key", "sekrit", "--max-body-mb", "1", "--media-dir", media]);
    let key = Some("sekrit");
    let (status, _) = server.get("/v1/models", key);
    assert_eq!(status, 200);
    let (status, body) = server.get("/v1/models", None);
    assert_error(status, &serde_json::from_str(&body).unwrap(), 401);
    let (status, body) = server.get("/v1/models", Some("wrong"));
    assert_error(status, &serde_json::from_str(&body).unwrap(), 401);
    let (status, body) = server.post_raw("{}", None);
    assert_error(status, &body, 401);
    let (status, body) = server.get("/v2/nothing", key);
    assert_error(status, &serde_json::from_str(&body).unwrap(), 404);
    // Health and metrics need no key.
    assert_eq!(server.get("/health", None).0, 200);
    assert_eq!(server.get("/metrics", None).0, 200);

    let good = |url: &str| {
        json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}]}],
            "max_tokens": 3})
    };
    for (body, code) in [
        ("{not json".to_string(), 400),
        (good("data:image/png;base64,!!!!").to_string(), 400),
        (good("data:image/png;base64,AAAAAAAA").to_string(), 400),
        (good("https://example.com/cat.png").to_string(), 400),
        (good("file://../etc/passwd").to_string(), 400),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "n": 2}).to_string(),
            400,
        ),
        (json!({"messages": []}).to_string(), 400),
    ] {
        let (status, got) = server.post_raw(&body, key);
        assert_error(status, &got, code);
    }
    // file:// below --media-dir works.
    let (status, got) = server.post_raw(&good("file://coffee.png").to_string(), key);
    assert_eq!(status, 200, "{got}");
    // Prompt + max_tokens over the 256-position context.
    let mut long = good(&data_url("astronaut.png"));
    long["max_tokens"] = json!(1000);
    let (status, got) = server.post_raw(&long.to_string(), key);
    assert_error(status, &got, 400);
    assert_eq!(got["error"]["code"], "context_length_exceeded");
    // More images than the template can take in one prompt: a 400, not a panic.
    let many: Vec<Value> = (0..9)
        .map(|_| json!({"type": "image_url", "image_url": {"url": data_url("coffee.png")}}))
        .collect();
    let (status, got) = server.post_raw(
        &json!({"messages": [{"role": "user", "content": many}], "max_tokens": 2}).to_string(),
        key,
    );
    assert_error(status, &got, 400);

    // Over --max-body-mb: 413 before the body is read.
    let mut tcp = std::net::TcpStream::connect(&server.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        tcp,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekrit\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{{\"messages\"",
        3 * 1024 * 1024
    )
    .unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    // Until the JSON error has arrived (the server need not close the connection).
    while !String::from_utf8_lossy(&response).contains("}}") {
        match tcp.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
        }
    }
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("\"error\""), "{response}");

    // A slowloris client (headers never finished) does not hold up the others.
    let mut slow = std::net::TcpStream::connect(&server.addr).unwrap();
    write!(
        slow,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le"
    )
    .unwrap();
    // The server is still serving after all that.
    let (status, _) = server.post_raw(&good(&data_url("coffee.png")).to_string(), key);
    assert_eq!(status, 200);
    drop(slow);
}

#[test]
fn full_queue_answers_429_and_disconnects_free_rows() {
    let server = Server::start(&["--max-concurrent", "1", "--max-batch-size", "1"]);
    let body = {
        let mut b = request("astronaut.png", "What is in the red box?", 150, json!({}));
        b["stream"] = json!(true);
        b
    };
    // Eight clients at once against one slot: some are refused with 429, the others get a
    // whole stream.
    let barrier = std::sync::Barrier::new(8);
    let results: Vec<(u16, Vec<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (server, body, barrier) = (&server, &body, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    server.stream(body)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refused = results.iter().filter(|(s, _)| *s == 429).count();
    let served = results
        .iter()
        .filter(|(s, d)| *s == 200 && d.last().map(String::as_str) == Some("[DONE]"))
        .count();
    assert!(
        refused >= 1 && served >= 1 && refused + served == 8,
        "{results:?}"
    );
    for (status, data) in &results {
        if *status == 429 {
            let v: Value = serde_json::from_str(&data[0]).unwrap();
            assert_eq!(v["error"]["type"], "rate_limit_error");
        }
    }

    // A client that leaves mid-stream: the slot comes back and the next request is served.
    let resp = agent()
        .post(&server.url("/v1/chat/completions"))
        .send_string(&body.to_string())
        .unwrap();
    let mut reader = BufReader::new(resp.into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: "), "{first}");
    drop(reader);
    let mut ok = false;
    for _ in 0..100 {
        let (status, _) = server.post(&request("coffee.png", "What?", 3, json!({})));
        if status == 200 {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok, "the slot of a disconnected client never came back");
}

/// Writes a random checkpoint with a ~100M-parameter Llama (hidden 1024, 8 layers) and the
/// tiny fixture's tokenizer, vision tower and processor files into `$VIPLLAVA_LOAD_DIR`,
/// for `scripts/load_test.py` on a model whose decode step costs more than the HTTP
/// around it. Run on demand:
/// `VIPLLAVA_LOAD_DIR=/tmp/load-model cargo test --test integration make_load_test_checkpoint -- --ignored`.
#[test]
#[ignore]
fn make_load_test_checkpoint() {
    let Ok(out) = std::env::var("VIPLLAVA_LOAD_DIR") else {
        return;
    };
    let out = std::path::PathBuf::from(out);
    std::fs::create_dir_all(&out).unwrap();
    let tiny = fixture("tiny-5x-f32");
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "processor_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(tiny.join(file), out.join(file)).unwrap();
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(tiny.join("config.json")).unwrap()).unwrap();
    let text = &mut config["text_config"];
    text["hidden_size"] = json!(1024);
    text["intermediate_size"] = json!(2816);
    text["num_hidden_layers"] = json!(8);
    text["num_attention_heads"] = json!(16);
    text["num_key_value_heads"] = json!(4);
    text["head_dim"] = json!(64);
    text["max_position_embeddings"] = json!(1024);
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    let resolved = vipllava::VipLlavaConfig::from_json_value(&config).unwrap();
    let model = vipllava::VipLlava::new_random(&resolved, &burn::tensor::Device::flex());
    vipllava::convert::save_burnpack(&model, &resolved, &out).unwrap();
}
