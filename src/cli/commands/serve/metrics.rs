//! Counters for `GET /metrics` in the Prometheus text format.

use std::fmt::Write;
use std::sync::Mutex;

/// Upper bounds (seconds) of the time-to-first-token histogram.
const TTFT_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Debug, Default)]
struct Inner {
    /// Finished requests by status code.
    requests: std::collections::BTreeMap<u16, u64>,
    prompt_tokens: u64,
    completion_tokens: u64,
    cancelled: u64,
    queue_depth: u64,
    running: u64,
    ttft_counts: [u64; TTFT_BUCKETS.len()],
    ttft_sum: f64,
    ttft_count: u64,
    /// Tokens per second of the last decode step (all rows together).
    tokens_per_s: f64,
    steps: u64,
}

/// Shared between the handlers and the scheduler thread.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Inner)) {
        if let Ok(mut inner) = self.inner.lock() {
            f(&mut inner);
        }
    }

    /// A request answered with `status`.
    pub fn request(&self, status: u16) {
        self.with(|m| *m.requests.entry(status).or_default() += 1);
    }

    /// Tokens of a finished request.
    pub fn tokens(&self, prompt: usize, completion: usize) {
        self.with(|m| {
            m.prompt_tokens += prompt as u64;
            m.completion_tokens += completion as u64;
        });
    }

    /// A request whose client went away.
    pub fn cancelled(&self) {
        self.with(|m| m.cancelled += 1);
    }

    /// Queued and running requests.
    pub fn load(&self, queued: usize, running: usize) {
        self.with(|m| {
            m.queue_depth = queued as u64;
            m.running = running as u64;
        });
    }

    /// Arrival to first token.
    pub fn ttft(&self, seconds: f64) {
        self.with(|m| {
            for (count, bound) in m.ttft_counts.iter_mut().zip(TTFT_BUCKETS) {
                if seconds <= bound {
                    *count += 1;
                }
            }
            m.ttft_sum += seconds;
            m.ttft_count += 1;
        });
    }

    /// A decode step that produced `tokens` tokens in `seconds`; `forward`: it ran the
    /// model (a step in which every row finished only picks tokens, and its rate would
    /// mean nothing).
    pub fn step(&self, tokens: usize, seconds: f64, forward: bool) {
        self.with(|m| {
            m.steps += 1;
            if forward && seconds > 0.0 {
                m.tokens_per_s = tokens as f64 / seconds;
            }
        });
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let m = match self.inner.lock() {
            Ok(inner) => inner,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP vipllava_requests_total Chat completion requests answered, by HTTP status."
        );
        let _ = writeln!(s, "# TYPE vipllava_requests_total counter");
        if m.requests.is_empty() {
            let _ = writeln!(s, "vipllava_requests_total{{status=\"200\"}} 0");
        }
        for (status, n) in &m.requests {
            let _ = writeln!(s, "vipllava_requests_total{{status=\"{status}\"}} {n}");
        }
        let counters = [
            (
                "vipllava_prompt_tokens_total",
                "Prompt tokens of finished requests.",
                m.prompt_tokens,
            ),
            (
                "vipllava_completion_tokens_total",
                "Generated tokens of finished requests.",
                m.completion_tokens,
            ),
            (
                "vipllava_cancelled_requests_total",
                "Requests whose client disconnected.",
                m.cancelled,
            ),
            (
                "vipllava_decode_steps_total",
                "Decode steps of the running batch.",
                m.steps,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        }
        let gauges = [
            (
                "vipllava_queue_depth",
                "Requests waiting for a batch slot.",
                m.queue_depth as f64,
            ),
            (
                "vipllava_running_requests",
                "Rows in the running decode batch.",
                m.running as f64,
            ),
            (
                "vipllava_tokens_per_second",
                "Tokens per second of the last decode step, all rows together.",
                m.tokens_per_s,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }
        let name = "vipllava_time_to_first_token_seconds";
        let _ = writeln!(
            s,
            "# HELP {name} Request arrival to first generated token.\n# TYPE {name} histogram"
        );
        for (count, bound) in m.ttft_counts.iter().zip(TTFT_BUCKETS) {
            let _ = writeln!(s, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {}", m.ttft_count);
        let _ = writeln!(s, "{name}_sum {}", m.ttft_sum);
        let _ = writeln!(s, "{name}_count {}", m.ttft_count);
        s
    }
}
