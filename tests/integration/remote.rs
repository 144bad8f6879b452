//! `--device remote:ws://...` against `vipllava serve-device` on 127.0.0.1: the same logits
//! and greedy tokens as running on the local CPU. Needs `--features remote`.
#![cfg(feature = "remote")]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use crate::common::{fixture, logits_and_tokens, max_slice_diff, run_cli};
use burn::tensor::Device;
use vipllava::open_device;

/// The server process, killed when the test ends (also on failure).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `serve-device` on a free loopback port and returns it with its URL.
fn start_server() -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vipllava"))
        .args([
            "serve-device",
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start serve-device");
    let stderr = child.stderr.take().expect("stderr");
    let server = Server(child);
    let mut lines = BufReader::new(stderr).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("serve-device exited before serving")
            .expect("read stderr");
        if let Some(rest) = line.split(" at ").nth(1) {
            break rest.split_whitespace().next().expect("url").to_string();
        }
    };
    // Keep draining the server's log so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (server, url)
}

#[test]
fn remote_device_matches_local_cpu() {
    let (_server, url) = start_server();
    assert!(url.starts_with("ws://127.0.0.1:"), "{url}");
    let remote = open_device(&format!("remote:{url}")).expect("connect");
    let (remote_logits, remote_tokens) = logits_and_tokens("tiny-5x-f32", &remote, 8);
    let (local_logits, local_tokens) = logits_and_tokens("tiny-5x-f32", &Device::flex(), 8);
    let diff = max_slice_diff(&remote_logits, &local_logits);
    println!(
        "remote vs local cpu: max |diff| of logits {diff:e}, tokens equal: {}",
        remote_tokens == local_tokens
    );
    // The remote device runs Burn's own ops; the local CPU its fast paths (our prefill
    // attention and kernels), which sum in another order: f32 roundings apart (7.6e-6
    // measured). A remote op that went wrong would move the logits by far more.
    assert!(diff <= 2e-5, "remote logits differ from local by {diff}");
    assert_eq!(remote_tokens, local_tokens);
}

#[test]
fn unreachable_server_is_a_clear_error() {
    // Bind a port, then free it: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let model = fixture("tiny-5x-f32");
    let image = fixture("images/astronaut.png");
    let device = format!("remote:ws://127.0.0.1:{port}");
    let output = run_cli(&[
        "logits",
        "--model",
        model.to_str().expect("utf-8"),
        "--image",
        image.to_str().expect("utf-8"),
        "--prompt",
        "hi",
        "--out",
        "/dev/null",
        "--device",
        &device,
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot be opened"), "{stderr}");
    assert!(stderr.contains("serve-device"), "{stderr}");
}
