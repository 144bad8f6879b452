//! The training crate's integration tests, one binary (each test binary links all of Burn):
//! parity with PyTorch (`parity`) and work at scale (`scale`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod parity;
mod scale;
